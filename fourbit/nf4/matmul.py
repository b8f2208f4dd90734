"""Reference 4-bit matmul: y = x @ dequantize(W).T + bias, for W of shape [N, K] (out, in).

This is the CPU production path (what CPU training runs) and the reference the Triton kernels must
equal. The math is bitsandbytes' fallback, element for element:

    w[n, k] = round_to(x.dtype, fl32(code[q[n, k]] * absmax_hat[(n*K + k) // blocksize]))
    y       = F.linear(x, w, bias.to(x.dtype))           computed in x's dtype, like bitsandbytes

What makes it fast on CPU is never holding the whole dense W. The output features are walked in
chunks of R rows (R*K about 2**20 values, a 4 MiB float32 buffer that stays in cache):

    bytes   packed[r0*K/2 : r1*K/2]            (R*K/2,)  uint8
    pairs   PAIR_TABLE[bytes]                  (R*K/2,)  int64, each two float32 codes (one gather
                                                          per byte instead of two nibble lookups)
    scaled  pairs.view(float32) * absmax_hat   (R*K,)    one float32 rounding, as dequantize
    y[..., r0:r1] = x @ scaled.to(x.dtype).T   (M, R)

`matmul_backward` (dx = dy @ W, reduced over N) fills one dense W in dy's dtype from the same
chunks instead, so the sum over N is not split into separately rounded partial products.

A chunk starts on a quantization-block boundary, so blocks that cross rows (K not a multiple of
the blocksize) need no special case. Measured on this 2-core machine, one thread, 4096 x 4096 NF4
weight: decoded to bfloat16 in 64- or 256-row chunks 16 ms (bitsandbytes' native CPU kernel 15 ms)
against 70 ms for `dequantize` (65536 x 4 table, one 64 MiB float32 buffer); the whole matmul for M = 1 / 16 / 512 in float32 40 / 67 / 234 ms
against 94 / 134 / 392 ms for dequantize + linear. The gain is cache residency, no page faults on a
fresh 64 MiB buffer, and the byte-sized table (2 KiB, in L1). Chunks are 2**20 values rather than
fewer: each chunk is a handful of multi-threaded torch calls, and on a busy machine every one of them
pays a thread synchronisation.
"""

from __future__ import annotations

import math

import torch

from .codes import code_for
from .quant import check_packed
from .state import QuantState

__all__ = ["matmul", "matmul_backward", "pair_table", "check_matmul_args"]

_CHUNK_VALUES = 1 << 20  # weight values decoded per chunk: 4 MiB of float32
_PAIR_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def pair_table(quant_type: str, device: torch.device | str) -> torch.Tensor:
    """(256,) int64: entry b holds the two float32 codes of byte b, high nibble first in memory
    (the low 32 bits on a little-endian machine), so `table[bytes].view(float32)` is the decoded
    pair sequence. The Triton kernels read the same table: one gather per byte."""
    key = (quant_type, torch.device(device))
    if key not in _PAIR_TABLES:
        code = code_for(quant_type)
        b = torch.arange(256)
        pairs = torch.stack([code[b >> 4], code[b & 15]], dim=1).contiguous()  # (256, 2) float32
        _PAIR_TABLES[key] = pairs.view(torch.int64).view(256).to(device)
    return _PAIR_TABLES[key]


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
    """Yield (r0, r1, w) with w = dequantize(W)[r0:r1] in `dtype`, (r1 - r0, K). w may share a
    reused buffer: consume it before asking for the next chunk."""
    data = check_packed(packed, state)  # (ceil(N*K/2),) uint8
    n_out, k = (int(d) for d in state.shape)
    bs = state.blocksize
    scales = state.dequantized_absmax()  # (nb,) float32
    table = pair_table(state.quant_type, data.device)
    rows = _chunk_rows(n_out, k, bs)
    buf = torch.empty(-(-rows * k // bs) * bs, dtype=torch.float32, device=data.device)  # whole blocks
    for r0 in range(0, n_out, rows):
        r1 = min(r0 + rows, n_out)
        e0, e1 = r0 * k, r1 * k  # flat element range of this chunk; e0 % bs == 0
        b0, b1 = e0 // 2, -(-e1 // 2)  # its bytes (the last may hold a padding nibble)
        nblk = -(-(e1 - e0) // bs)
        pairs = buf[: 2 * (b1 - b0)].view(torch.int64)  # (b1 - b0,) two float32 codes each
        torch.index_select(table, 0, data[b0:b1].int(), out=pairs)  # int32 indices: 16 vs 22 ms with int64
        vals = buf[: nblk * bs].view(nblk, bs)  # (nblk, bs); entries past 2*(b1-b0) are unused
        # in place, then a separate cast: 16 ms for 4096 x 4096 to bf16, against 23-28 ms for a
        # mixed-dtype torch.mul(..., out=bf16) (not vectorised on this CPU)
        vals.mul_(scales[e0 // bs : e0 // bs + nblk].unsqueeze(1))
        yield r0, r1, vals.view(-1)[: e1 - e0].view(r1 - r0, k).to(dtype)  # (R, K)


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
    x2 = x.reshape(-1, k)  # (M, K)
    shape = (*x.shape[:-1], n_out)
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
    grad_y's dtype with one rounding per chunk. Instead the chunks fill one dense W in grad_y's
    dtype (bitsandbytes does the same: dequantize, cast, matmul) that lives for this call only."""
    if not isinstance(state, QuantState) or len(state.shape) != 2:
        raise ValueError("matmul_backward needs a QuantState of a 2-D weight [N, K]")
    n_out, k = (int(d) for d in state.shape)
    if grad_y.shape[-1] != n_out:
        raise ValueError(f"grad_y has {grad_y.shape[-1]} features in its last dimension but the weight has N={n_out}")
    w = torch.empty(n_out, k, dtype=grad_y.dtype, device=grad_y.device)  # (N, K)
    for r0, r1, chunk in _decoded_chunks(packed, state, grad_y.dtype):
        w[r0:r1] = chunk
    return grad_y @ w  # (..., K)
