"""Models of bitsandbytes' CPU-build quirks (SPEC §2, §3), used to *prove* that a byte where fourbit
and bitsandbytes' CPU backend disagree is one of those quirks and nothing else.

fourbit follows bitsandbytes' CUDA rules; the CPU build differs in three documented places:
  1. 4-bit, partial last block: true division x / absmax instead of x * (1 / absmax).
  2. FP4: exact midpoints (sorted table) instead of CUDA's hand-typed thresholds, and the opposite
     sign convention for |s| <= 0.0026.
  3. 8-bit blockwise: a 65536-bin lookup table instead of an exact nearest-code search.
  4. A partial last block whose values are all zero stores absmax 1e-38 (the clamped divisor)
     instead of 0; full zero blocks store 0. This shifts the double-quant mean for such tensors.
"""

from __future__ import annotations

import torch

from fourbit.nf4.codes import FP4_THRESHOLDS, NF4_THRESHOLDS

# FP4 magnitudes in value order, and the exact float32 midpoints the CPU build compares against.
_FP4_MAGS = torch.tensor([0, 0.0625, 2, 3, 4, 6, 8, 12], dtype=torch.float32) / 12.0
FP4_EXACT_MIDPOINTS = (_FP4_MAGS[:-1] + _FP4_MAGS[1:]) / 2


def cpu_stored_absmax(absmax: torch.Tensor, n: int, blocksize: int) -> torch.Tensor:
    """The float32 scales bitsandbytes' CPU build stores, given the true per-block maxima (quirk 4)."""
    out = absmax.clone()
    if n % blocksize and out.numel() and out[-1] == 0:
        out[-1] = 1e-38
    return out


def unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 codes (n,) from packed bytes (high nibble first)."""
    b = packed.reshape(-1).view(torch.uint8)
    return torch.stack([b >> 4, b & 15], dim=1).reshape(-1)[:n]


def scaled_both_ways(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s_mul, s_div, in_tail): x scaled by the reciprocal (CUDA, fourbit) and by true division
    (bitsandbytes CPU, partial last block), and a mask of elements in a partial last block."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    idx = torch.arange(n)
    nb = -(-n // blocksize)
    absmax = torch.zeros(nb).scatter_reduce(0, idx // blocksize, flat.abs(), "amax")
    am = absmax.clamp(min=1e-38)[idx // blocksize]
    s_mul = (flat * (1.0 / am)).clamp(-1, 1)
    s_div = (flat / am).clamp(-1, 1)
    in_tail = (n % blocksize != 0) & (idx >= (n // blocksize) * blocksize)
    return s_mul, s_div, in_tail


def nf4_cpu_code(s: torch.Tensor) -> torch.Tensor:
    return torch.bucketize(s, NF4_THRESHOLDS, right=False)


def explain_4bit_differences(x, ours, theirs, blocksize, quant_type) -> dict[str, int]:
    """Every element whose code differs must be explained by a CPU quirk; returns counts per quirk.
    Raises AssertionError naming the first unexplained element."""
    n = x.numel()
    a, b = unpack(ours, n), unpack(theirs, n)
    diff = torch.nonzero(a != b).reshape(-1)
    counts = {"tail_division": 0, "fp4_thresholds": 0, "fp4_tiny_sign": 0}
    if diff.numel() == 0:
        return counts
    s_mul, s_div, in_tail = scaled_both_ways(x, blocksize)
    for i in diff.tolist():
        sm, sd = s_mul[i].item(), s_div[i].item()
        if in_tail[i] and sm != sd:
            counts["tail_division"] += 1
            continue
        if quant_type == "fp4":
            mag = abs(sm)
            if mag <= 0.0026042:
                counts["fp4_tiny_sign"] += 1
                continue
            lo = torch.minimum(FP4_THRESHOLDS, FP4_EXACT_MIDPOINTS)
            hi = torch.maximum(FP4_THRESHOLDS, FP4_EXACT_MIDPOINTS)
            if bool(((lo <= mag) & (mag <= hi)).any()):
                counts["fp4_thresholds"] += 1
                continue
        raise AssertionError(
            f"element {i}: fourbit code {int(a[i])}, bitsandbytes code {int(b[i])}, scaled value {sm!r} "
            f"(division {sd!r}) — not explained by any documented CPU quirk"
        )
    return counts


def cpu_lut_quantize(x: torch.Tensor, code: torch.Tensor, blocksize: int = 256) -> torch.Tensor:
    """bitsandbytes' CPU 8-bit blockwise quantizer (SPEC §3), modelled bit for bit:
    v = clamp(fl32(x * fl32(1/absmax)), -1, 1); bin = trunc(fl32(fma(fl32(v+1)*0.5, 65535, 0.5)));
    code index = number of float32 midpoints strictly below fl32(fl32(2*bin)/65535) - 1."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    idx = torch.arange(n)
    nb = -(-n // blocksize)
    absmax = torch.zeros(nb).scatter_reduce(0, idx // blocksize, flat.abs(), "amax")
    am = absmax[idx // blocksize]
    v = torch.where(am == 0, 0.0, (flat * (1.0 / am)).clamp(-1, 1))  # zero blocks: codes forced to 0 below
    half = ((v + 1).float() * 0.5).float()
    bins = (half.double() * 65535 + 0.5).float().trunc().long()  # the double result is exact: one rounding
    grid = ((torch.arange(65536, dtype=torch.float32) * 2) / 65535) - 1
    mids = (code[:-1] + code[1:]) / 2
    lut = torch.bucketize(grid, mids, right=False)
    q = lut[bins]
    q[am == 0] = 0
    return q.to(torch.uint8)


def explain_8bit_differences(x, ours, theirs, code, blocksize=256) -> int:
    """bitsandbytes CPU codes must equal the LUT model everywhere; where fourbit differs, the LUT
    model must differ from fourbit's exact nearest choice there. Returns the number of such codes."""
    lut = cpu_lut_quantize(x, code, blocksize)
    mismatch_model = torch.nonzero(lut != theirs.reshape(-1)).reshape(-1)
    assert mismatch_model.numel() == 0, f"bitsandbytes CPU 8-bit codes differ from the LUT model at {mismatch_model[:5].tolist()}"
    return int((ours.reshape(-1) != theirs.reshape(-1)).sum())
