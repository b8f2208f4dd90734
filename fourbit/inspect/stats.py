"""The numbers behind `fourbit inspect`: error and storage of one weight in each 4-bit format.

Formats (blockwise over the flat row-major tensor, like every format in fourbit):
    nf4      NF4 codes + one float32 absmax per block                      (nf4.quantize, no DQ)
    nf4+dq   the same codes, absmax double-quantized: 8-bit codes of (absmax - mean) in blocks of
             256 with one float32 scale each, plus the float32 mean       (nf4.quantize, DQ)
    fp4      bitsandbytes' FP4 codes + float32 absmax
    int4     symmetric integers q = round(7 w / absmax) in [-7, 7], w_hat = q absmax / 7 (15 levels)

Error: relative error ||w - w_hat|| / ||w|| (Frobenius), relative squared error (its square) and
SQNR = 10 log10(||w||^2 / ||w - w_hat||^2) dB (`squared_sum`).

Storage in bits per weight, n weights, nb = ceil(n / bs) blocks, nb2 = ceil(nb / 256):
    codes    8 ceil(n / 2) / n                     4 exactly for even n
    absmax   32 nb / n                             8 nb / n with DQ
    nested   32 nb2 / n                            DQ only: one float32 scale per 256 absmax codes
    offset   32 / n                                DQ only: the mean subtracted before the 8-bit step
For bs = 64 and n a multiple of 64 * 256 that is 4 + 32/64 = 4.5 bits without DQ and
4 + 8/64 + 32/(64 * 256) (+ 32/n) = 4.127 bits with DQ, the QLoRA paper's accounting. The 16- and
256-entry code tables are shared by every tensor in memory and are not counted.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .. import nf4
from ..nf4.quant import blocks, double_quantize
from ..errors import InvalidInput

__all__ = ["FORMATS", "FormatStats", "int4_round_trip", "round_trips", "storage_bits", "analyse_tensor", "unpack_codes", "squared_sum"]

FORMATS = ("nf4", "nf4+dq", "fp4", "int4")
NESTED_BLOCKSIZE = 256
HIST_BINS = 200  # histogram of w / block absmax over [-1, 1]: bins 0.01 wide


@dataclasses.dataclass
class FormatStats:
    """Sums over one or more tensors, for one format and blocksize (sums so tensors can be pooled)."""

    n: int = 0
    signal: float = 0.0  # sum w^2
    error: float = 0.0  # sum (w - w_hat)^2
    bits: dict = dataclasses.field(default_factory=lambda: {"codes": 0.0, "absmax": 0.0, "nested": 0.0, "offset": 0.0})

    def add(self, other: "FormatStats") -> None:
        self.n += other.n
        self.signal += other.signal
        self.error += other.error
        for k, v in other.bits.items():
            self.bits[k] += v

    def summary(self) -> dict:
        """Per-weight figures: relative error, SQNR, bits per weight split, total bytes."""
        rel_sq = self.error / self.signal if self.signal > 0 else 0.0
        per = {k: v / self.n for k, v in self.bits.items()} if self.n else dict(self.bits)
        return {
            "numel": self.n,
            "rel_error": math.sqrt(rel_sq),
            "rel_sq_error": rel_sq,
            "sqnr_db": 10 * math.log10(1 / rel_sq) if rel_sq > 0 else math.inf,
            "bits_per_param": per,
            "bits_total": sum(per.values()),
            "bytes": sum(self.bits.values()) / 8,
        }


def storage_bits(n: int, blocksize: int, fmt: str) -> dict[str, float]:
    """Total stored bits of an n-element tensor, split as in the module docstring."""
    nb = -(-n // blocksize)
    codes = 8.0 * ((n + 1) // 2)
    if fmt == "nf4+dq":
        return {"codes": codes, "absmax": 8.0 * nb, "nested": 32.0 * -(-nb // NESTED_BLOCKSIZE), "offset": 32.0}
    if fmt in ("nf4", "fp4", "int4"):
        return {"codes": codes, "absmax": 32.0 * nb, "nested": 0.0, "offset": 0.0}
    raise InvalidInput(f"format must be one of {FORMATS}, got {fmt!r}")


def int4_round_trip(w: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """The plain symmetric Int4 baseline: 15 evenly spaced levels per block, flat row-major blocks."""
    flat = w.reshape(-1).float()
    padded = blocks(flat, blocksize)  # (nb, bs), zero-padded
    absmax = padded.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
    q = torch.round(padded / absmax * 7).clamp(-7, 7)
    return (q * absmax / 7).reshape(-1)[: flat.numel()].reshape(w.shape)


def unpack_codes(packed: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) uint8 codes from packed bytes (high nibble first)."""
    b = packed.reshape(-1)
    return torch.stack([b >> 4, b & 15], dim=1).reshape(-1)[:n]


def round_trips(w: torch.Tensor, blocksize: int):
    """Yield (format, w_hat, extra) for every format; extra holds the NF4 and FP4 codes and the NF4
    per-block state, for the histogram, code usage and worst-block views. NF4+DQ reuses NF4's codes
    and double-quantizes its absmax exactly as `nf4.quantize(..., double_quant=True)` does."""
    packed, state = nf4.quantize(w, blocksize=blocksize, quant_type="nf4", double_quant=False)
    yield "nf4", nf4.dequantize(packed, state), {"packed": packed, "absmax": state.absmax}
    qabs, offset, nested = double_quantize(state.absmax)
    dq = dataclasses.replace(state, absmax=qabs, offset=offset, nested=nested)
    yield "nf4+dq", nf4.dequantize(packed, dq), {}
    packed, state = nf4.quantize(w, blocksize=blocksize, quant_type="fp4", double_quant=False)
    yield "fp4", nf4.dequantize(packed, state), {"packed": packed}
    yield "int4", int4_round_trip(w, blocksize), {}


def squared_sum(x: torch.Tensor) -> float:
    """sum(x^2) of a float32 tensor: float32 sums over rows of 1024 (accurate to ~1e-7 relative),
    added in float64. Five times faster than sum(dtype=float64), which converts every element."""
    return float(blocks(x.reshape(-1), 1024).square().sum(1).double().sum())


def analyse_tensor(w: torch.Tensor, blocksizes, main_blocksize: int = 64) -> dict:
    """Per-format stats for each blocksize, and at `main_blocksize` the views the plot needs.

    Returns {"stats": {(fmt, bs): FormatStats}, "hist": (HIST_BINS,) counts of w / block absmax,
    "usage": {fmt: (16,) code counts}, "block_error": (nb,) float64 NF4 squared error per block,
    "block_signal": (nb,) float64, "absmax": (nb,), "zeros": (nb,) NF4 codes of 0.0 per block}.
    """
    w = w.float().contiguous()
    flat, n = w.view(-1), w.numel()
    signal = squared_sum(w)
    out: dict = {"stats": {}, "usage": {}}
    for bs in blocksizes:
        for fmt, w_hat, extra in round_trips(w, bs):
            diff = (w_hat - w).view(-1)
            out["stats"][(fmt, bs)] = FormatStats(n, signal, squared_sum(diff), storage_bits(n, bs, fmt))
            if bs != main_blocksize or fmt not in ("nf4", "fp4"):
                continue
            codes = unpack_codes(extra["packed"], n)  # (n,) uint8
            out["usage"][fmt] = torch.bincount(codes.long(), minlength=16)
            if fmt == "nf4":
                absmax = extra["absmax"]  # (nb,)
                # the zero padding of a partial last block lies past n: cut it off before counting
                normalised = (blocks(flat, bs) / absmax.clamp(min=1e-38).unsqueeze(1)).view(-1)[:n]
                out["hist"] = torch.histc(normalised, bins=HIST_BINS, min=-1.0, max=1.0)
                out["block_error"] = blocks(diff, bs).square().sum(1).double()  # (nb,)
                out["block_signal"] = blocks(flat, bs).square().sum(1).double()
                out["absmax"] = absmax
                out["zeros"] = blocks((codes == 7).float(), bs).sum(1)  # NF4 code 7 is 0.0; padding is 0, not 7
    return out
