"""bitsandbytes-compatible optimizer names: `bnb.optim.PagedAdamW(...)` -> `fourbit.optim.PagedAdamW(...)`."""

from .train.optim import AdamW, AdamW8bit, PagedAdamW, PagedAdamW8bit

__all__ = ["AdamW", "AdamW8bit", "PagedAdamW", "PagedAdamW8bit"]
