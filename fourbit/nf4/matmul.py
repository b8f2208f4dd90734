"""Reference 4-bit matmul: y = x @ dequantize(W).T + bias, for W of shape [N, K] (out, in).

The weight is dequantized directly into x's dtype (one rounding from float32, as bitsandbytes'
fallback path) and fed to `torch.nn.functional.linear`; the dense copy lives only for this call.
"""

from __future__ import annotations

import torch

from .quant import dequantize
from .state import QuantState

__all__ = ["matmul"]


def matmul(x: torch.Tensor, packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None = None) -> torch.Tensor:
    if len(state.shape) != 2:
        raise ValueError(f"matmul needs a 2-D quantized weight [N, K], got shape {tuple(state.shape)}")
    n_out, k = state.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features in its last dimension but the weight expects K={k}")
    w = dequantize(packed, state, dtype=x.dtype)  # (N, K)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))
