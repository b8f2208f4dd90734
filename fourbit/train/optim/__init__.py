"""Optimizers for QLoRA: AdamW with 32-bit or 8-bit states, optionally paged (bitsandbytes-compatible).

`adamw` holds the optimizers, `saved_state` their state_dict form, `pager` the page pool. One update
step on flat tensors is `fourbit.dispatch.adamw_update_32bit / _8bit` (reference: fourbit/nf4/adamw.py,
Triton: fourbit/kernels/adamw.py).
"""

from .adamw import AdamW, AdamW8bit, PagedAdamW, PagedAdamW8bit
from .pager import DEFAULT_PAGE_BYTES, PagePool, PagerStats, StateLayout

__all__ = [
    "AdamW",
    "AdamW8bit",
    "DEFAULT_PAGE_BYTES",
    "PagePool",
    "PagedAdamW",
    "PagedAdamW8bit",
    "PagerStats",
    "StateLayout",
]
