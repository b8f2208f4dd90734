"""Reference 4-bit matmul: y = x @ dequantize(W).T + bias, for W of shape [N, K] (out, in).

This is the CPU production path (what CPU training runs) and the reference the Triton kernels must
equal. The math is bitsandbytes' fallback, element for element:

    w[n, k] = round_to(x.dtype, fl32(code[q[n, k]] * absmax_hat[(n*K + k) // blocksize]))
    y       = F.linear(x, w, bias.to(x.dtype))           computed in x's dtype, like bitsandbytes

What makes it fast on CPU is never holding the whole dense W. The output features are walked in
chunks of R rows (R*K about 2**20 values, a 4 MiB float32 buffer that stays in cache), decoded by
`fourbit.nf4.quant.decoded_chunks` (the same decoder `dequantize` uses):

    bytes   packed[r0*K/2 : r1*K/2]            (R*K/2,)  uint8
    pairs   pair_table[bytes]                  (R*K/2,)  int64, each two float32 codes (one gather
                                                          per byte instead of two nibble lookups)
    scaled  pairs.view(float32) * absmax_hat   (R*K,)    one float32 rounding, as dequantize
    y[..., r0:r1] = x @ scaled.to(x.dtype).T   (M, R)

`matmul_backward` (dx = dy @ W, reduced over N) decodes one dense W in dy's dtype instead (through
`dequantize`, the same decoder), so the sum over N is not split into separately rounded partial
products. A weight of at most one chunk (every SmolLM2 projection) is decoded into a single buffer
that is the dense operand itself, and its forward returns F.linear's result directly: no copies.

A chunk starts on a quantization-block boundary, so blocks that cross rows (K not a multiple of
the blocksize) need no special case. Measured on this 2-core machine, one thread, 4096 x 4096 NF4
weight: decoded to bfloat16 in 64- or 256-row chunks 16 ms (bitsandbytes' native CPU kernel 15 ms)
against 70 ms for a whole-tensor decode through a 65536 x 4 table into one 64 MiB float32 buffer;
the whole matmul for M = 1 / 16 / 512 in float32 40 / 67 / 234 ms against 94 / 134 / 392 ms for
that decode + linear. The gain is cache residency, no page faults on a fresh 64 MiB buffer, and the
byte-sized table (2 KiB, in L1). Chunks are 2**20 values rather than fewer: each chunk is a handful
of multi-threaded torch calls, and on a busy machine every one of them pays a thread synchronisation.
"""

from __future__ import annotations

import math

import torch

from .quant import _CHUNK_VALUES, decoded_chunks, dequantize, pair_table
from .state import QuantState

__all__ = ["matmul", "matmul_backward", "pair_table", "check_matmul_args"]

def check_matmul_args(x: torch.Tensor, packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None) -> None:
    """Shape/dtype/device checks shared by the reference and the Triton launcher."""
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a fourbit QuantState, got {type(state).__name__}")
    if len(state.shape) != 2:
        raise ValueError(f"matmul needs a 2-D quantized weight [N, K], got shape {tuple(state.shape)}")
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"x must be a float32/float16/bfloat16 (or, for gradcheck, float64) tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (its last is K)")
    n_out, k = state.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features in its last dimension but the weight expects K={k}")
    if x.device != packed.device:
        raise ValueError(f"x is on {x.device} but the packed weight is on {packed.device}; move one of them")
    if bias is not None:
        if tuple(bias.shape) != (n_out,):
            raise ValueError(f"bias must have shape ({n_out},) (one per output feature), got {tuple(bias.shape)}")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")


def _chunk_rows(n_out: int, k: int, blocksize: int) -> int:
    """Rows per chunk: a multiple of blocksize / gcd(K, blocksize), so every chunk starts on a block
    boundary (and on a byte boundary: blocksize is even), with about _CHUNK_VALUES values."""
    step = blocksize // math.gcd(k, blocksize)
    rows = max(step, (_CHUNK_VALUES // max(k, 1)) // step * step)
    return min(rows, max(n_out, 1))


def _decoded_chunks(packed: torch.Tensor, state: QuantState, dtype: torch.dtype):
    """Yield (r0, r1, w) with w = dequantize(W)[r0:r1] in `dtype`, (r1 - r0, K), in chunks of whole
    rows that start on block boundaries. w may share a reused buffer: consume it first."""
    n_out, k = (int(d) for d in state.shape)
    rows = _chunk_rows(n_out, k, state.blocksize)
    for e0, e1, w in decoded_chunks(packed, state, dtype, range(0, n_out * k, rows * k)):
        yield e0 // k, e1 // k, w.view(-1, k)


def matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    state: QuantState,
    bias: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ dequantize(W).T + bias.  x: (..., K) float; W: [N, K] quantized; y: (..., N) in x.dtype.
    `out`, if given, is a contiguous (..., N) tensor of x's dtype that receives y."""
    check_matmul_args(x, packed, state, bias)
    n_out, k = (int(d) for d in state.shape)
    x2 = x.reshape(x.shape[:-1].numel(), k)  # (M, K); (-1, k) is ambiguous when k == 0
    shape = (*x.shape[:-1], n_out)
    if out is None and _chunk_rows(n_out, k, state.blocksize) >= n_out:  # one chunk: y needs no copy
        b = None if bias is None else bias.to(x.dtype)
        return torch.nn.functional.linear(x2, dequantize(packed, state, dtype=x.dtype), b).view(shape)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    elif tuple(out.shape) != shape or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape {shape} on {x.device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    y = out.view(-1, n_out)  # (M, N)
    for r0, r1, w in _decoded_chunks(packed, state, x.dtype):
        b = None if bias is None else bias[r0:r1].to(x.dtype)
        y[:, r0:r1] = torch.nn.functional.linear(x2, w, b)  # (M, R)
    return out


def matmul_backward(grad_y: torch.Tensor, packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """grad_x = grad_y @ dequantize(W) in grad_y's dtype; grad_y: (..., N), grad_x: (..., K).

    The product reduces over N, which the chunks split, so per-chunk products would be summed in
    grad_y's dtype with one rounding per chunk. Instead one dense W in grad_y's dtype is decoded
    (bitsandbytes does the same: dequantize, cast, matmul); it lives for this call only."""
    if not isinstance(state, QuantState) or len(state.shape) != 2:
        raise ValueError("matmul_backward needs a QuantState of a 2-D weight [N, K]")
    n_out, k = (int(d) for d in state.shape)
    if grad_y.shape[-1] != n_out:
        raise ValueError(f"grad_y has {grad_y.shape[-1]} features in its last dimension but the weight has N={n_out}")
    return grad_y @ dequantize(packed, state, dtype=grad_y.dtype)  # (..., N) @ (N, K)
