"""The code books: NF4, bitsandbytes' FP4, and the 8-bit "dynamic" maps.

A 4-bit code is an index into a table of 16 float32 values in [-1, 1]. Quantizing a block of
weights means dividing by the block's absolute maximum (so every value lands in [-1, 1]) and
replacing each value by the index of the nearest table entry.

NormalFloat (NF4, QLoRA §3) picks the 16 values so that each is equally likely when the weights are
normally distributed: the values are quantiles of N(0, 1). `derive_nf4` below rebuilds the table from
that recipe; `NF4_CODE` is the table bitsandbytes ships, written out in hex so that it is exact.

FP4 is bitsandbytes' own 1-sign / 2-exponent / 1-mantissa layout (not OCP E2M1): the low three bits
select a magnitude out of {0, 0.0625, 8, 12, 4, 6, 2, 3} / 12, bit 3 is the sign.

The 8-bit dynamic maps hold the nested (double-quantized) block scales and the 8-bit optimizer
states: a dynamic exponent (one decade per leading-zero count) and a linear fraction.
"""

from __future__ import annotations

import torch

__all__ = [
    "NF4_CODE",
    "FP4_CODE",
    "NF4_THRESHOLDS",
    "FP4_THRESHOLDS",
    "FP4_MAGNITUDE_TO_BITS",
    "derive_nf4",
    "dynamic_map",
    "code_for",
]

# bitsandbytes' NF4 table, index = 4-bit code (sorted ascending). Hex literals are exact float32s.
_NF4_HEX = (
    "-0x1.000000p+0", "-0x1.647362p-1", "-0x1.0cd660p-1", "-0x1.946540p-2",
    "-0x1.23449ap-2", "-0x1.7a6a7ep-3", "-0x1.74f0e2p-4", "0x0p+0",
    "0x1.45f5fep-4", "0x1.4995c6p-3", "0x1.f809bap-3", "0x1.5a0674p-2",
    "0x1.c34970p-2", "0x1.200f56p-1", "0x1.722766p-1", "0x1.000000p+0",
)
NF4_CODE = torch.tensor([float.fromhex(h) for h in _NF4_HEX], dtype=torch.float32)

# FP4, indexed by bit pattern. Code 8 is stored as +0.0, as bitsandbytes' Python table does.
FP4_CODE = (
    torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3], dtype=torch.float32)
    / 12.0
)

# NF4 decision thresholds: the float32 midpoints of neighbouring codes. A value exactly on a
# threshold goes to the lower code (bitsandbytes' CUDA tree compares `s > t`).
NF4_THRESHOLDS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2

# FP4 magnitude thresholds as typed into bitsandbytes' CUDA kernel (not the exact midpoints:
# they differ by 14, 0, 1, 1, 0, 6 and 1 ulp). Ascending, between magnitudes sorted by value.
FP4_THRESHOLDS = torch.tensor(
    [0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333], dtype=torch.float32
)
# Magnitude rank (0 = smallest) -> the 3 low bits of the FP4 code.
FP4_MAGNITUDE_TO_BITS = torch.tensor([0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011], dtype=torch.uint8)


def code_for(quant_type: str) -> torch.Tensor:
    """The 16-entry table for "nf4" or "fp4" (a fresh copy, so callers may move it freely)."""
    if quant_type == "nf4":
        return NF4_CODE.clone()
    if quant_type == "fp4":
        return FP4_CODE.clone()
    raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


def derive_nf4(offset: float = 0.9677083) -> torch.Tensor:
    """Rebuild the NF4 table from normal quantiles, the way QLoRA constructs it.

    1. We want 16 values, one of them exactly 0, with equal probability mass between neighbours
       under N(0, 1). A symmetric 4-bit type cannot have an exact zero, so NF4 is asymmetric:
       8 positive values and 7 negative ones.
    2. The extreme quantiles of N(0, 1) are infinite, so the probabilities are squeezed into
       [1 - offset, offset]. QLoRA's offset is 1 - (1/30 + 1/32) / 2 = 0.96770833...; bitsandbytes
       truncates it to 0.9677083.
    3. Positive half: Phi^-1 at the first 8 of 9 evenly spaced probabilities from `offset` down to 0.5
       (0.5 itself would give 0, which is added separately). Negative half: minus Phi^-1 at the
       first 7 of 8 evenly spaced probabilities over the same range.
    4. Add 0, sort, and divide by the largest value, Phi^-1(offset) ~ 1.8481, so the table spans
       exactly [-1, 1].

    Reproducing bitsandbytes bit for bit needs its dtype pipeline: the probabilities come from a
    float32 linspace, Phi^-1 is evaluated in float64, and the result is cast to float32 before the
    sort and the division (all-float64 gets 10 of the 16 values wrong by up to 6 ulp).
    """
    positive_p = torch.linspace(offset, 0.5, 9, dtype=torch.float32)[:-1]  # 8 probabilities
    negative_p = torch.linspace(offset, 0.5, 8, dtype=torch.float32)[:-1]  # 7 probabilities
    positive = torch.special.ndtri(positive_p.double()).float()
    negative = -torch.special.ndtri(negative_p.double()).float()
    values = torch.cat([positive, torch.zeros(1), negative]).sort().values
    return values / values.max()


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The 8-bit dynamic quantization map (256 float32 values, sorted ascending).

    For exponent e = 0 .. max_exponent_bits-1 the values are the midpoints of an evenly spaced
    grid on [0.1, 1] (2**e points signed, 2**(e+1) unsigned: the sign bit is reused as a fraction
    bit), scaled by 10**(e - max_exponent_bits + 1). Signed maps add the negatives. Then 0 and 1.0.

    Signed: code[0] = -0.99296875 (there is no -1), code[127] = 0, code[255] = 1.
    Unsigned: code[0] = 0, code[255] = 1.
    """
    non_sign_bits = total_bits - 1
    extra = 2 ** (non_sign_bits - max_exponent_bits) - 1
    values: list[float] = []

    def add_decade(points: int, scale: float) -> None:
        grid = torch.linspace(0.1, 1, points + 1, dtype=torch.float32)
        means = ((grid[:-1] + grid[1:]) / 2.0 * scale).tolist()  # float32 arithmetic
        values.extend(means)
        if signed:
            values.extend(-m for m in means)

    for e in range(max_exponent_bits):
        points = 2 ** (e + non_sign_bits - max_exponent_bits + (0 if signed else 1))
        add_decade(points, 10.0 ** (e - max_exponent_bits + 1))
    if extra > 0:
        add_decade(extra, 10.0 ** (max_exponent_bits - 1 - max_exponent_bits + 1))
    values += [0.0, 1.0]
    if len(values) > 2**total_bits:
        raise ValueError(f"{len(values)} values do not fit in {total_bits} bits")
    values += [0.0] * (2**total_bits - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)
