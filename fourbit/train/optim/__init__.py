"""Optimizers for QLoRA: AdamW with 32-bit or 8-bit states, optionally paged (bitsandbytes-compatible).

`adamw` holds the optimizers, `functional` one update step on flat tensors, `pager` the page pool.
"""

from .adamw import AdamW, AdamW8bit, PagedAdamW, PagedAdamW8bit
from .functional import adamw_update_32bit, adamw_update_8bit
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
    "adamw_update_32bit",
    "adamw_update_8bit",
]
