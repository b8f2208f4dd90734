"""bitsandbytes-compatible optimizer names: `bnb.optim.PagedAdamW(...)` -> `fourbit.optim.PagedAdamW(...)`.

Adam* are bitsandbytes' Adam: AdamW with weight_decay=0 by default and *decoupled* weight decay
(fourbit/train/optim/aliases.py); torch.optim.Adam adds weight decay to the gradient instead.
"""

from .train.optim import (
    Adam,
    Adam8bit,
    Adam32bit,
    AdamW,
    AdamW8bit,
    AdamW32bit,
    GlobalOptimManager,
    PagedAdam,
    PagedAdam8bit,
    PagedAdam32bit,
    PagedAdamW,
    PagedAdamW8bit,
    PagedAdamW32bit,
)

__all__ = [
    "Adam",
    "Adam32bit",
    "Adam8bit",
    "AdamW",
    "AdamW32bit",
    "AdamW8bit",
    "GlobalOptimManager",
    "PagedAdam",
    "PagedAdam32bit",
    "PagedAdam8bit",
    "PagedAdamW",
    "PagedAdamW32bit",
    "PagedAdamW8bit",
]
