"""bitsandbytes' other names for the same AdamW machinery: AdamW32bit, PagedAdamW32bit and the Adam
family (Adam, Adam8bit, Adam32bit, PagedAdam, PagedAdam8bit, PagedAdam32bit).

Adam here is bitsandbytes' Adam, which is AdamW with weight_decay defaulting to 0: bitsandbytes
runs both through one "adam" update that applies weight decay *decoupled* (p *= 1 - lr * wd, then
the Adam step), not as torch.optim.Adam's L2 term added to the gradient. With weight_decay=0 (the
default) the two agree; with weight_decay > 0 this class follows bitsandbytes, as code written for
`bnb.optim.Adam` expects (tests/test_optim.py compares it with bitsandbytes' Adam at wd = 0.1).
For torch's coupled L2 Adam use torch.optim.Adam.

The "32bit" names always keep float32 states and the "8bit" names 8-bit ones; bitsandbytes
ignores `optim_bits` for them, fourbit refuses a value other than the default 32 (as AdamW8bit does).
"""

from __future__ import annotations

from .adamw import AdamW, PagedAdamW
from .pager import DEFAULT_PAGE_BYTES

__all__ = ["Adam", "Adam32bit", "Adam8bit", "AdamW32bit", "PagedAdam", "PagedAdam32bit", "PagedAdam8bit", "PagedAdamW32bit"]


def _fixed_bits(name: str, optim_bits: int, bits: int) -> int:
    if optim_bits != 32:  # bitsandbytes' signature keeps optim_bits=32 as a placeholder here
        raise ValueError(f"{name} always keeps {bits}-bit states; leave optim_bits at 32, got {optim_bits}")
    return bits


class AdamW32bit(AdamW):
    """AdamW with float32 states (bnb.optim.AdamW32bit)."""

    def __init__(
        self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, optim_bits=32,
        args=None, min_8bit_size=4096, is_paged=False, *, device_budget_bytes=None, page_bytes=DEFAULT_PAGE_BYTES,
        nonfinite="skip",
    ):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, _fixed_bits("AdamW32bit", optim_bits, 32), args,
                         min_8bit_size, is_paged, device_budget_bytes=device_budget_bytes, page_bytes=page_bytes,
                         nonfinite=nonfinite)


class PagedAdamW32bit(PagedAdamW):
    """Paged AdamW with float32 states (bnb.optim.PagedAdamW32bit)."""

    def __init__(
        self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, optim_bits=32,
        args=None, min_8bit_size=4096, *, device_budget_bytes=None, page_bytes=DEFAULT_PAGE_BYTES, nonfinite="skip",
    ):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, _fixed_bits("PagedAdamW32bit", optim_bits, 32),
                         args, min_8bit_size, device_budget_bytes=device_budget_bytes, page_bytes=page_bytes,
                         nonfinite=nonfinite)


def _adam(name: str, bits: int | None, paged: bool, doc: str):
    """An Adam class: AdamW's machinery with weight_decay=0 by default (see the module docstring).
    bits=None follows `optim_bits` (Adam, PagedAdam); paged=True ignores `is_paged`, as bitsandbytes."""

    def __init__(
        self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, optim_bits=32,
        args=None, min_8bit_size=4096, is_paged=False, *, device_budget_bytes=None, page_bytes=DEFAULT_PAGE_BYTES,
        nonfinite="skip",
    ):
        state_bits = optim_bits if bits is None else _fixed_bits(name, optim_bits, bits)
        AdamW.__init__(self, params, lr, betas, eps, weight_decay, amsgrad, state_bits, args, min_8bit_size,
                       paged or is_paged, device_budget_bytes=device_budget_bytes, page_bytes=page_bytes,
                       nonfinite=nonfinite)

    return type(name, (AdamW,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


Adam = _adam("Adam", None, False, "Adam with float32 states (optim_bits=8: 8-bit), bitsandbytes' decoupled weight decay.")
Adam8bit = _adam("Adam8bit", 8, False, "Adam with 8-bit blockwise states (bnb.optim.Adam8bit).")
Adam32bit = _adam("Adam32bit", 32, False, "Adam with float32 states (bnb.optim.Adam32bit).")
PagedAdam = _adam("PagedAdam", None, True, "Paged Adam (bnb.optim.PagedAdam); see PagedAdamW for the budget.")
PagedAdam8bit = _adam("PagedAdam8bit", 8, True, "Paged Adam with 8-bit states (bnb.optim.PagedAdam8bit).")
PagedAdam32bit = _adam("PagedAdam32bit", 32, True, "Paged Adam with float32 states (bnb.optim.PagedAdam32bit).")
