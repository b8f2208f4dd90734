"""Bytes of the optimizer states of a set of parameters, from their sizes, without running a step.

The layouts are those of fourbit/train/optim (tests/test_plan.py checks this module against the
bytes the optimizers really allocate):

    adamw, paged_adamw (32-bit)   m, v float32: 8 bytes per element
    adamw8bit, paged_adamw8bit    m, v uint8 + one float32 absmax each per 256 elements, for
                                  tensors of at least 4096 elements; smaller ones keep 32-bit states;
                                  two 256-entry float32 maps per device
    paged_*                       each parameter's states start at a multiple of 256 elements in the
                                  state space of their width; the space is cut into pages of
                                  page_bytes (E elements per page), and at most S = budget // page_bytes
                                  of the P pages sit on the device. A page keeps its host buffer
                                  once it has been evicted, and the walk turns around each step
                                  (pager.py): step 1 evicts P - S pages, step 2 as many others, so
                                  from the second step on min(P, 2 (P - S)) pages have one
    torch_adamw                   exp_avg, exp_avg_sq in the parameter's dtype, and a float32 step
                                  count per parameter, which torch keeps on the CPU

A GPU plan uses this instead of tracing the step: on CUDA the Triton update writes the states in
place and allocates nothing, so the states are all the optimizer holds. A CPU plan runs the real
optimizer on fake tensors (its reference update makes temporaries).
"""

from __future__ import annotations

import math

import torch

from ..train.optim.pager import DEFAULT_PAGE_BYTES, StateLayout

__all__ = ["state_bytes"]

_QBLOCK = 256
_MIN_8BIT = 4096


def _rounded(n: int, round_to: int) -> int:
    return -(-n // round_to) * round_to if n else 0


def state_bytes(params: list[torch.Tensor], optimizer: str, *, budget_bytes: int | None = None,
                page_bytes: int = DEFAULT_PAGE_BYTES, device: str = "cpu") -> tuple[int, int]:
    """(bytes on the device, bytes on the host: paged out, or torch's step counts) of `optimizer`'s
    states for `params` on a "cpu" or "cuda" device (whose allocator hands out 512-byte blocks)."""
    eight = optimizer in ("adamw8bit", "paged_adamw8bit")
    round_to = 512 if device == "cuda" else 1
    if optimizer == "torch_adamw":
        states = sum(2 * _rounded(p.numel() * p.element_size(), round_to) for p in params)
        steps = 4 * len(params)
        return (states + steps, 0) if device == "cpu" else (states, steps)
    bits = [8 if eight and p.numel() >= _MIN_8BIT else 32 for p in params]
    maps = 2 * _rounded(256 * 4, round_to) if eight else 0
    if not optimizer.startswith("paged"):
        total = maps
        for p, b in zip(params, bits):
            n = p.numel()
            if b == 32:
                total += 2 * _rounded(4 * n, round_to)
            else:
                total += 2 * _rounded(n, round_to) + 2 * _rounded(4 * -(-n // _QBLOCK), round_to)
        return total, 0
    pages = 0
    for width in (8, 32):
        size = sum(-(-p.numel() // _QBLOCK) * _QBLOCK for p, b in zip(params, bits) if b == width)
        pages += math.ceil(size / StateLayout(width, page_bytes).chunk)
    slots = pages if budget_bytes is None else min(pages, budget_bytes // page_bytes)
    return slots * _rounded(page_bytes, round_to) + maps, min(pages, 2 * (pages - slots)) * page_bytes
