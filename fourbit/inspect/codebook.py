"""`fourbit inspect --codebook`: the 16 NF4 values rebuilt from normal quantiles, step by step.

The recipe is `fourbit.nf4.derive_nf4` (QLoRA §3, SPEC §1.1); this module lays out its intermediate
values so that each table entry can be traced to the probability it came from, and checks the
result against the table bitsandbytes ships (`nf4.NF4_CODE`, and `bitsandbytes.functional`'s own
when bitsandbytes is installed).
"""

from __future__ import annotations

import torch

from .. import nf4

__all__ = ["OFFSET", "codebook_rows", "format_codebook"]

OFFSET = 0.9677083  # bitsandbytes' truncation of QLoRA's 1 - (1/30 + 1/32) / 2 = 0.96770833...

ASYMMETRY = """\
Why 8 positive values and 7 negative ones: 4 bits give 16 values, and quantizing padding and exact
zeros without error needs one of them to be exactly 0. A symmetric set of 16 quantiles has no 0
(it would need an odd count), so NF4 takes the 0.5 quantile (0) once and splits the other 15 values
unevenly: the positive half uses 9 equally spaced probabilities from 0.5 to o (8 after dropping
0.5), the negative half only 8 (7 after dropping 0.5). The negative steps are therefore coarser
(each covers (o - 0.5) / 7 of probability instead of / 8), which is why code 1 is -0.696 while
code 14 is +0.723. Both halves end at the same quantile Phi^-1(o) = 1.848, so after dividing by it
the table spans exactly [-1, 1]. o < 1 because Phi^-1(1) is infinite; QLoRA's o leaves a tail of
probability 1 - o = (1/30 + 1/32) / 2 = 0.0323 beyond each end value."""


def codebook_rows(offset: float = OFFSET) -> list[dict]:
    """One row per code, sorted by value: probability, float64 quantile, float32 table value,
    bitsandbytes' value and whether the two are equal bit for bit."""
    positive_p = torch.linspace(offset, 0.5, 9, dtype=torch.float32)[:-1]  # 8 probabilities, as derive_nf4
    negative_p = torch.linspace(offset, 0.5, 8, dtype=torch.float32)[:-1]  # 7
    derived = nf4.derive_nf4(offset)
    scale = float(torch.special.ndtri(positive_p[:1].double()).float())  # Phi^-1(o), the divisor
    sources = [("negative", 1 - float(p), -float(torch.special.ndtri(p.double()))) for p in negative_p]
    sources.append(("zero", 0.5, 0.0))
    sources += [("positive", float(p), float(torch.special.ndtri(p.double()))) for p in positive_p]
    sources.sort(key=lambda s: s[2])
    rows = []
    for code, ((half, prob, quantile), value, table) in enumerate(zip(sources, derived.tolist(), nf4.NF4_CODE.tolist())):
        rows.append({
            "code": code, "half": half, "probability": prob, "normal_quantile": quantile, "divided": quantile / scale,
            "value": value, "bitsandbytes": table, "equal": value == table, "hex": _hex32(table),
        })
    return rows


def _hex32(x: float) -> str:
    """C99 hex of a float32 value without Python's 13-digit padding: -0x1.647362p-1."""
    mantissa, exponent = float.hex(x).split("p")
    return mantissa.rstrip("0").rstrip(".") + "p" + exponent


def _bitsandbytes_table() -> list[float] | None:
    try:
        from bitsandbytes.functional import get_4bit_type
    except ImportError:
        return None
    return get_4bit_type("nf4", device="cpu").tolist()


def format_codebook(offset: float = OFFSET) -> str:
    """The derivation as text: the recipe, a table of the 16 codes, the checks and the asymmetry."""
    rows = codebook_rows(offset)
    lines = [
        "NF4 from normal quantiles (QLoRA section 3; fourbit.nf4.derive_nf4):",
        f"  o = {offset} (bitsandbytes' truncation of 1 - (1/30 + 1/32) / 2 = {1 - (1 / 30 + 1 / 32) / 2:.8f})",
        "  positive: Phi^-1 at linspace(o, 0.5, 9)[:8]   negative: -Phi^-1 at linspace(o, 0.5, 8)[:7]   plus 0",
        "  probabilities in float32, Phi^-1 in float64, cast to float32, sorted, divided by Phi^-1(o) in float32",
        "",
        f"{'code':>4}  {'half':<8}  {'p':>10}  {'Phi^-1(p)':>11}  {'/ Phi^-1(o)':>11}  {'NF4 value':>12}  {'hex':>15}  equal",
    ]
    for r in rows:
        lines.append(
            f"{r['code']:>4}  {r['half']:<8}  {r['probability']:>10.6f}  {r['normal_quantile']:>11.6f}  "
            f"{r['divided']:>11.6f}  {r['value']:>12.9f}  {r['hex']:>15}  {'yes' if r['equal'] else 'NO'}"
        )
    same = sum(r["equal"] for r in rows)
    lines += ["", f"derived == fourbit's table (bitsandbytes' hex values): {same}/16 bit for bit"]
    theirs = _bitsandbytes_table()
    if theirs is None:
        lines.append("bitsandbytes not installed: its own table not compared")
    else:
        match = sum(r["value"] == t for r, t in zip(rows, theirs))
        lines.append(f"derived == bitsandbytes.functional.get_4bit_type('nf4'): {match}/16 bit for bit")
    return "\n".join(lines + ["", ASYMMETRY])
