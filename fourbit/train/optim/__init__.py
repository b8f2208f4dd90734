"""Optimizers for QLoRA: AdamW with 32-bit or 8-bit states, optionally paged (bitsandbytes-compatible).

`adamw` holds the optimizers (`aliases` bitsandbytes' other names for them: Adam*, *32bit), `saved_state` their state_dict form, `manager` per-parameter settings (GlobalOptimManager), `pager` the page pool. One update
step on flat tensors is `fourbit.dispatch.adamw_update_32bit / _8bit` (reference: fourbit/nf4/adamw.py,
Triton: fourbit/kernels/adamw.py); a step calls their `_many` forms once per group of tensors sharing the
hyperparameters (the CPU kernels step the whole group in one call) after one `any_nonfinite` over the grads.
"""

from .adamw import AdamW, AdamW8bit, PagedAdamW, PagedAdamW8bit
from .aliases import Adam, Adam8bit, Adam32bit, AdamW32bit, PagedAdam, PagedAdam8bit, PagedAdam32bit, PagedAdamW32bit
from .manager import GlobalOptimManager
from .pager import DEFAULT_PAGE_BYTES, PagePool, PagerStats, StateLayout

__all__ = [
    "Adam",
    "Adam32bit",
    "Adam8bit",
    "AdamW",
    "AdamW32bit",
    "AdamW8bit",
    "DEFAULT_PAGE_BYTES",
    "GlobalOptimManager",
    "PagePool",
    "PagedAdam",
    "PagedAdam32bit",
    "PagedAdam8bit",
    "PagedAdamW",
    "PagedAdamW32bit",
    "PagedAdamW8bit",
    "PagerStats",
    "StateLayout",
]
