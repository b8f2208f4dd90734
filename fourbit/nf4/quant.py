"""Reference 4-bit blockwise quantization (NF4 / FP4) with double quantization, in plain PyTorch.

For a tensor x (any shape, fp32/fp16/bf16) with n elements and block size bs:

    flat      = x.reshape(-1).float()                         (n,)   row-major; blocks cross rows
    absmax[b] = max |flat[b*bs : (b+1)*bs]|                   (nb,)  float32, nb = ceil(n / bs)
    s[i]      = flat[i] * fl32(1 / absmax[i // bs])                  in [-1, 1]
    q[i]      = code index chosen by thresholds on s                 4 bits
    packed[j] = q[2j] << 4 | q[2j + 1]                        ((n+1)//2, 1) uint8; an odd tail
                                                                     pads the low nibble with the
                                                                     code of 0.0

Code choice follows bitsandbytes' CUDA kernels (what QLoRA users run):
  * NF4: the number of float32 midpoints strictly below s (a tie goes to the lower code).
  * FP4: sign bit = (s < 0); the magnitude goes through CUDA's hand-typed thresholds.
  * The normaliser is the reciprocal times a multiply, also in a partial last block (bitsandbytes'
    CPU build divides there instead: a documented quirk, SPEC §2). The reciprocal's input is
    clamped at 1e-38 as the CPU build does, so an all-zero block encodes 0.0 (NF4 0x7, FP4 0x0)
    and dequantizes to +0.0 (CUDA computes 0 * inf = NaN there and picks code 0, also 0 after
    dequantization; we prefer a NaN-free path and the CPU bytes).

Double quantization (QLoRA §3, SPEC §3) then stores the scales in 8 bits:
    offset = mean(absmax)                                    0-dim float32 (torch's own reduction)
    qabs, absmax2 = quantize_blockwise(absmax - offset, signed dynamic map, blocksize=256)

Dequantization: out[i] = round_to(dtype, fl32(code[q[i]] * absmax_hat[i // bs])), with absmax_hat
rebuilt as fl32(code8[qabs] * absmax2) + offset. For speed on CPU, each packed byte indexes a 256-entry
table of value pairs (pair_table) instead of unpacking nibbles one by one, and the tensor is decoded
in cache-sized chunks (decoded_chunks, shared with the matmul reference).
"""

from __future__ import annotations

import torch

from .blockwise import quantize_blockwise
from .checks import check_blocksize, check_finite, check_float_dtype, check_float_tensor, check_quant_type, check_scales_fit
from .checks import FLOAT_DTYPES, check_storage
from .codes import FP4_MAGNITUDE_TO_BITS, FP4_THRESHOLDS, NF4_THRESHOLDS, code_for, dynamic_map
from .state import NESTED_BLOCKSIZE, QuantState

__all__ = ["quantize", "dequantize", "blocks", "encode", "pack", "pair_table", "decoded_chunks", "double_quantize"]


def blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """(nb, blocksize) view of a flat tensor, zero-padded at the end (a copy only when padding)."""
    n = flat.numel()
    nb = -(-n // blocksize)
    if nb * blocksize == n:
        return flat.view(nb, blocksize)
    return torch.nn.functional.pad(flat, (0, nb * blocksize - n)).view(nb, blocksize)


def encode(scaled: torch.Tensor, quant_type: str) -> torch.Tensor:
    """4-bit codes (uint8 0..15) for normalised float32 values, with CUDA's decision rules."""
    if quant_type == "nf4":
        return torch.bucketize(scaled, NF4_THRESHOLDS.to(scaled.device), right=False, out_int32=True).to(torch.uint8)
    magnitude = torch.bucketize(scaled.abs(), FP4_THRESHOLDS.to(scaled.device), right=False, out_int32=True)
    bits = FP4_MAGNITUDE_TO_BITS.to(scaled.device)[magnitude]
    return bits | ((scaled < 0).to(torch.uint8) << 3)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Two codes per byte, the even element in the high nibble; (n+1)//2 bytes as ((n+1)//2, 1)."""
    if codes.numel() % 2:
        raise ValueError("pack needs an even number of codes (pad the odd tail first)")
    return ((codes[0::2] << 4) | codes[1::2]).unsqueeze(1)


def double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, QuantState]:
    """8-bit codes of (absmax - mean), the mean, and the nested state (absmax2 per 256 scales)."""
    offset = absmax.mean() if absmax.numel() else absmax.new_zeros(())
    code8 = dynamic_map(signed=True).to(absmax.device)
    qabs, absmax2 = quantize_blockwise(absmax - offset, code8, NESTED_BLOCKSIZE)
    return qabs, offset, QuantState.nested_state(absmax2, absmax.numel(), code8)


def quantize(
    x: torch.Tensor,
    *,
    blocksize: int = 64,
    quant_type: str = "nf4",
    double_quant: bool = True,
    quant_storage: torch.dtype = torch.uint8,
) -> tuple[torch.Tensor, QuantState]:
    """Quantize `x` to packed 4-bit codes; returns (packed, QuantState) exactly as bitsandbytes."""
    check_float_tensor(x)
    check_blocksize(blocksize)
    check_quant_type(quant_type)
    n = x.numel()
    nbytes = (n + 1) // 2
    itemsize = check_storage(quant_storage, nbytes)

    flat = x.reshape(-1).float()  # (n,) fp16/bf16 widen exactly
    padded = blocks(flat, blocksize)  # (nb, bs)
    absmax = padded.abs().amax(dim=1) if n else flat.new_empty(0)  # (nb,)
    if not bool(torch.isfinite(absmax).all()):  # amax propagates NaN and inf: one check per block
        check_finite(x)  # raises, naming how many and where the first is
    recip = 1.0 / absmax.clamp(min=1e-38)  # (nb,) float32, correctly rounded
    scaled = (padded * recip.unsqueeze(1)).view(-1)[: nbytes * 2]  # zero pad -> code of 0.0
    packed = pack(encode(scaled, quant_type))  # (nbytes, 1) uint8
    if quant_storage != torch.uint8:
        packed = packed.view(-1).view(quant_storage).view(nbytes // itemsize, 1)

    state = QuantState(
        absmax=absmax,
        shape=x.shape,
        dtype=x.dtype,
        blocksize=blocksize,
        quant_type=quant_type,
        code=code_for(quant_type).to(x.device),
    )
    if double_quant:
        state.absmax, state.offset, state.nested = double_quantize(absmax)
        check_scales_fit(x, state)
    return packed, state


_PAIR_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}
_CHUNK_VALUES = 1 << 20  # matmul: weight values decoded per chunk, a 4 MiB float32 buffer
# dequantize writes a whole tensor anyway: bigger chunks mean fewer thread synchronisations. Measured
# for 4096 x 4096 on 2 cores, chunks of 2**16 / 2**18 / 2**20 / 2**22 values: float32 41 / 35 / 33 /
# 30 ms, bfloat16 31 / 26 / 25 / 22 ms.
_DEQUANTIZE_CHUNK_VALUES = 1 << 22


def pair_table(quant_type: str, device: torch.device | str) -> torch.Tensor:
    """(256,) int64: entry b holds the two float32 codes of byte b, high nibble first in memory
    (the low 32 bits on a little-endian machine), so `table[bytes].view(float32)` is the decoded
    pair sequence: one gather per byte instead of two nibble lookups. The table is 2 KiB and stays
    in L1; the Triton kernels read the same table."""
    key = (quant_type, torch.device(device))
    if key not in _PAIR_TABLES:
        code = code_for(quant_type)
        b = torch.arange(256)
        pairs = torch.stack([code[b >> 4], code[b & 15]], dim=1).contiguous()  # (256, 2) float32
        _PAIR_TABLES[key] = pairs.view(torch.int64).view(256).to(device)
    return _PAIR_TABLES[key]


def decoded_chunks(packed: torch.Tensor, state: QuantState, dtype: torch.dtype, starts, out: torch.Tensor | None = None):
    """Yield (e0, e1, w): w = dequantize(packed, state).view(-1)[e0:e1] in `dtype`, for the flat
    element ranges [starts[i], starts[i+1]) (the last ends at numel). Every start must be a multiple
    of the blocksize. Without `out`, w may live in a reused buffer: consume it before asking for the
    next chunk. With `out` (a flat tensor of numel values in `dtype`), w is out[e0:e1], cast and
    stored in one pass from the cache-resident chunk buffer (decoding straight into a float32 `out`
    measured slower: 38 vs 31 ms for 4096 x 4096, the gather and the multiply then miss the cache).

        bytes   data[e0/2 : ceil(e1/2)]                    uint8
        pairs   pair_table[bytes]                          int64, two float32 codes each
        vals    pairs.view(float32) * absmax_hat[block]    one float32 rounding per value
        w       vals.to(dtype)
    """
    data = check_packed(packed, state)
    n, bs = state.numel, state.blocksize
    scales = state.dequantized_absmax()  # (nb,) float32
    table = pair_table(state.quant_type, data.device)
    bounds = [*starts, n]
    longest = max((b - a for a, b in zip(bounds, bounds[1:])), default=0)
    buf = torch.empty(-(-longest // bs) * bs, dtype=torch.float32, device=data.device)  # whole blocks
    for e0, e1 in zip(bounds, bounds[1:]):
        if e0 % bs:
            raise ValueError(f"chunk start {e0} is not a multiple of the blocksize {bs}")
        b0, b1 = e0 // 2, -(-e1 // 2)  # its bytes (the last may hold a padding nibble)
        nblk = -(-(e1 - e0) // bs)
        pairs = buf[: 2 * (b1 - b0)].view(torch.int64)  # (b1 - b0,) two float32 codes each
        torch.index_select(table, 0, data[b0:b1].int(), out=pairs)  # int32 indices: 16 vs 22 ms with int64
        vals = buf[: nblk * bs].view(nblk, bs)  # entries past 2 * (b1 - b0) are unused
        # in place, then a separate cast: 16 ms for 4096 x 4096 to bf16, against 23-28 ms for a
        # mixed-dtype torch.mul(..., out=bf16) (not vectorised on this CPU)
        vals.mul_(scales[e0 // bs : e0 // bs + nblk].unsqueeze(1))
        if out is not None:
            yield e0, e1, out[e0:e1].copy_(vals.view(-1)[: e1 - e0])  # cast and store in one pass
        else:
            yield e0, e1, vals.view(-1)[: e1 - e0].to(dtype)


def check_packed(packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """Validate packed codes against their state; returns them as a flat uint8 view."""
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a fourbit QuantState, got {type(state).__name__}")
    if packed.dtype not in (torch.uint8, torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"packed must be uint8 (or a float quant_storage view), got {packed.dtype}")
    if packed.device != state.absmax.device:
        raise ValueError(f"packed is on {packed.device} but its absmax is on {state.absmax.device}; move both")
    data = packed.contiguous().view(-1).view(torch.uint8)
    need = (state.numel + 1) // 2
    if data.numel() != need:
        raise ValueError(
            f"packed holds {data.numel()} bytes but shape {tuple(state.shape)} needs {need} (two codes per byte)"
        )
    return data


def dequantize(packed: torch.Tensor, state: QuantState, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense tensor of `state.shape` in `dtype` (default: the dtype that was quantized)."""
    check_packed(packed, state)
    dtype = dtype or state.dtype
    check_float_dtype(dtype, allowed=FLOAT_DTYPES + (torch.float64,))
    n, bs = state.numel, state.blocksize
    step = max(bs, _DEQUANTIZE_CHUNK_VALUES // bs * bs)
    if 0 < n <= step:  # one chunk: its buffer is the result (float32: no copy at all)
        _, _, w = next(decoded_chunks(packed, state, dtype, [0]))
        return w.view(state.shape)
    out = torch.empty(n, dtype=dtype, device=packed.device)
    for _ in decoded_chunks(packed, state, dtype, range(0, n, step), out=out):
        pass  # each chunk is written into out
    return out.view(state.shape)
