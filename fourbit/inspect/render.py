"""`fourbit inspect` output: inspect.json (every number), inspect.md (tables), inspect.png (four panels).

The picture, left to right, top to bottom:
  1. How NF4 is built: the normal CDF over the normalised range, with the 16 code values dropped
     from equally spaced probabilities (8 steps above 0.5, 7 below: the asymmetry).
  2. What the weights look like: the histogram of w / block absmax against the NF4 and FP4 code points.
  3. How often each code is used (NF4 aims at 1/16 each for normal weights; FP4 does not).
  4. What each format costs and loses: relative error against bits per weight, one point per blocksize.
"""

from __future__ import annotations

import json
import math
import os

import torch

from .. import nf4
from ..nf4.files import atomic_write
from .codebook import OFFSET
from .stats import FORMATS

__all__ = ["write_report", "markdown", "plot", "summary_text"]

NAMES = {"nf4": "NF4", "nf4+dq": "NF4+DQ", "fp4": "FP4", "int4": "Int4 absmax"}
COLORS = {"nf4": "tab:blue", "nf4+dq": "tab:cyan", "fp4": "tab:orange", "int4": "tab:green"}


def write_report(report: dict, out_dir: str) -> dict[str, str]:
    """Write inspect.json, inspect.md and inspect.png into `out_dir` (created); returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f"inspect.{k}") for k in ("json", "md", "png")}

    def write_json(tmp):
        with open(tmp, "w") as f:
            json.dump(report, f, default=float)  # compact: a 210-layer model gives ~0.7 MB

    def write_md(tmp):
        with open(tmp, "w") as f:
            f.write(markdown(report))

    atomic_write(paths["json"], write_json)
    atomic_write(paths["md"], write_md)
    plot(report, paths["png"])
    return paths


def summary_text(report: dict) -> str:
    """A few lines for the terminal: each format at the main blocksize, pooled over the layers."""
    bs = str(report["main_blocksize"])
    where = f"layer {report['layer']}" if report["layer"] else f"{report['n_layers']} linear weights"
    lines = [f"{report['label']}: {where}, {report['numel']:,} parameters, blocksize {bs} ({report['seconds']:.1f} s)",
             f"{'format':>12}  {'rel. error':>10}  {'SQNR dB':>8}  {'bits/param':>10}"]
    for f in FORMATS:
        s = report["totals"][f][bs]
        lines.append(f"{NAMES[f]:>12}  {s['rel_error']:>10.4f}  {s['sqnr_db']:>8.2f}  {s['bits_total']:>10.4f}")
    o = report["outliers"]
    lines.append(f"worst 1 % of NF4 blocks: {100 * o['top_1pct_share']:.1f} % of the squared error")
    return "\n".join(lines)


def _mib(bits: float) -> float:
    return bits / 8 / 2**20


def markdown(report: dict) -> str:
    bs0 = str(report["main_blocksize"])
    t = report["totals"]
    where = f"layer `{report['layer']}`" if report["layer"] else f"{report['n_layers']} linear weights"
    lines = [
        f"# fourbit inspect: {report['label']}",
        "",
        f"{where}, {report['numel']:,} parameters; {report['seconds']:.1f} s. Relative error = "
        "‖W − Ŵ‖ / ‖W‖ over all weights pooled; SQNR = 10 log10(‖W‖² / ‖W − Ŵ‖²).",
        "",
        f"Ordering by error at blocksize {bs0}: " + " < ".join(NAMES[f] for f in report["ordering"]) + ".",
        "",
        "## Error and storage by format and blocksize",
        "",
        "| format | blocksize | rel. error | rel. sq. error | SQNR dB | codes | absmax | nested | offset | bits/param | MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for f in FORMATS:
        for b in map(str, report["blocksizes"]):
            s = t[f][b]
            p = s["bits_per_param"]
            lines.append(
                f"| {NAMES[f]} | {b} | {s['rel_error']:.4f} | {s['rel_sq_error']:.5f} | {s['sqnr_db']:.2f} | {p['codes']:.4f} | "
                f"{p['absmax']:.4f} | {p['nested']:.5f} | {p['offset']:.6f} | {s['bits_total']:.4f} | {s['bytes'] / 2**20:.2f} |"
            )
    ent = report["code_entropy_bits"]
    lines += [
        "",
        f"Code use at blocksize {bs0}: the NF4 codes carry {ent['nf4']:.2f} bits of information per weight, the FP4 codes "
        f"{ent['fp4']:.2f} (4 is the most a 4-bit code can: every code used equally often).",
        "",
        "## What double quantization saves (NF4 codes unchanged)",
        "",
        "| blocksize | absmax float32 (MiB) | DQ: 8-bit absmax + nested + offset (MiB) | saved (MiB) | saved bits/param "
        "| error NF4 → NF4+DQ |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for b in map(str, report["blocksizes"]):
        plain, dq = t["nf4"][b], t["nf4+dq"][b]
        n = plain["numel"]
        before = plain["bits_per_param"]["absmax"] * n
        after = sum(dq["bits_per_param"][k] for k in ("absmax", "nested", "offset")) * n
        lines.append(
            f"| {b} | {_mib(before):.3f} | {_mib(after):.3f} | {_mib(before - after):.3f} | {(before - after) / n:.4f} | "
            f"{plain['rel_error']:.5f} → {dq['rel_error']:.5f} |"
        )
    lines += [
        "",
        f"## Per layer (blocksize {bs0}): relative error",
        "",
        "| layer | shape | NF4 | NF4+DQ | FP4 | Int4 absmax | NF4 SQNR dB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for layer in report["layers"]:
        e = {f: layer["formats"][f][bs0] for f in FORMATS}
        lines.append(
            f"| {layer['name']} | {'×'.join(map(str, layer['shape']))} | " + " | ".join(f"{e[f]['rel_error']:.4f}" for f in FORMATS)
            + f" | {e['nf4']['sqnr_db']:.2f} |"
        )
    o = report["outliers"]
    lines += [
        "",
        f"## Worst blocks (NF4, blocksize {bs0})",
        "",
        f"Of {o['blocks']:,} blocks, the worst 1 % hold {100 * o['top_1pct_share']:.1f} % of the squared error. "
        "A block's scale is its largest |w|: one outlier (high absmax / rms) stretches the grid, so the block's other "
        "values fall onto the few codes near 0 and lose their precision.",
        "",
        "| layer | block | row, col | absmax | rms | absmax / rms | block rel. error | codes at 0 | share of layer error "
        "| of model error |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for w in report["worst_blocks"]:
        lines.append(
            f"| {w['layer']} | {w['block']} | {w['row']}, {w['col']} | {w['absmax']:.4g} | {w['rms']:.4g} | {w['crest']:.1f} | "
            f"{w['rel_error']:.3f} | {w['zero_codes']}/{w['block_size']} | {100 * w['share_of_layer_error']:.1f} % | "
            f"{100 * w['share_of_model_error']:.2f} % |"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    _construction(axes[0, 0])
    _histogram(axes[0, 1], report)
    _usage(axes[1, 0], report)
    _tradeoff(axes[1, 1], report)
    what = f"layer {report['layer']}" if report["layer"] else f"{report['n_layers']} linear weights"
    fig.suptitle(f"{report['label']}: {what}, {report['numel'] / 1e6:.1f} M parameters", fontsize=12)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    plt.close(fig)
    return path


def _construction(ax) -> None:
    """Normal CDF in normalised units, with each NF4 value dropped from its probability."""
    scale = float(torch.special.ndtri(torch.tensor(OFFSET, dtype=torch.float64)))  # Phi^-1(o) = 1.848
    x = torch.linspace(-1.08, 1.08, 400, dtype=torch.float64)
    ax.plot(x, torch.special.ndtr(x * scale), color="gray", lw=1.5, label="N(0,1) CDF, x scaled by 1/Φ⁻¹(o)")
    code = nf4.NF4_CODE.double()
    probs = torch.special.ndtr(code * scale)
    for v, p in zip(code.tolist(), probs.tolist()):
        color = "tab:red" if v < 0 else ("black" if v == 0 else "tab:blue")
        ax.plot([-1.1, v], [p, p], color=color, lw=0.6, ls=":")
        ax.plot([v, v], [0, p], color=color, lw=0.8)
        ax.plot([v], [p], "o", color=color, ms=4)
    ax.set_xlim(-1.1, 1.1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("normalised value (NF4 code points on the axis)")
    ax.set_ylabel("probability")
    ax.set_title("NF4 = normal quantiles at equally spaced probabilities")
    ax.text(-1.05, 0.93, f"8 positive: 8 steps of (o − ½)/8 above ½\n7 negative: 7 steps of (o − ½)/7 below ½\n"
            f"plus exact 0; o = {OFFSET}", fontsize=8, va="top")


def _histogram(ax, report: dict) -> None:
    h = report["histogram"]
    counts = torch.tensor(h["counts"])
    edges = torch.linspace(h["min"], h["max"], counts.numel() + 1)
    width = float(edges[1] - edges[0])
    density = counts / counts.sum() / width
    ax.bar(edges[:-1].tolist(), density.tolist(), width=width, align="edge", color="lightgray", label="w / block absmax")
    interior = density[1:-1].max().item()
    ax.set_ylim(0, interior * 1.3)
    # the distribution NF4's equal-use argument assumes: w / absmax ~ N(0, 1) / Phi^-1(o)
    scale = float(torch.special.ndtri(torch.tensor(OFFSET, dtype=torch.float64)))
    x = torch.linspace(-1, 1, 401, dtype=torch.float64)
    ax.plot(x, scale * torch.exp(-0.5 * (x * scale) ** 2) / math.sqrt(2 * math.pi), color="black", lw=1, ls="--",
            label="N(0,1) / Φ⁻¹(o), what NF4 assumes")
    for i, v in enumerate(nf4.NF4_CODE.tolist()):
        ax.axvline(v, color="tab:blue", lw=0.8, label="NF4 codes" if i == 0 else None)
    fp4 = sorted(set(nf4.FP4_CODE.tolist()))
    ax.plot(fp4, [interior * 1.24] * len(fp4), "v", color="tab:orange", ms=6, label="FP4 codes")
    edge_share = (counts[0] + counts[-1]).item() / counts.sum().item()
    note = f"outermost bins (every block's\nmax is ±1): {100 * edge_share:.1f} % of\nvalues, bars clipped"
    ax.text(0.98, 0.70, note, transform=ax.transAxes, ha="right", fontsize=8)
    ax.set_xlabel(f"w / absmax of its block (blocksize {report['main_blocksize']})")
    ax.set_ylabel("density")
    ax.set_title("block-normalised weights vs the 4-bit code points")
    ax.legend(fontsize=7, loc="center left")


def _usage(ax, report: dict) -> None:
    width = 0.4
    for shift, fmt in ((-width / 2, "nf4"), (width / 2, "fp4")):
        counts = torch.tensor(report["code_usage"][fmt], dtype=torch.float64)
        values = (nf4.NF4_CODE if fmt == "nf4" else nf4.FP4_CODE).tolist()
        order = sorted(range(16), key=lambda i: (values[i], i))  # by value, so bars read left to right
        share = (counts[order] / counts.sum()).tolist()
        ax.bar([i + shift for i in range(16)], share, width=width, color=COLORS[fmt], label=NAMES[fmt])
    ax.axhline(1 / 16, color="black", lw=0.8, ls="--", label="1/16 (equal use)")
    ax.set_xticks(range(16))
    ax.set_xlabel("code, sorted by value (most negative → most positive)")
    ax.set_ylabel("share of weights")
    ent = report["code_entropy_bits"]
    ax.set_title(f"how often each code is used (entropy NF4 {ent['nf4']:.2f}, FP4 {ent['fp4']:.2f} of 4 bits)")
    ax.legend(fontsize=8)


def _tradeoff(ax, report: dict) -> None:
    for fmt in FORMATS:
        pts = [(report["totals"][fmt][str(b)]["bits_total"], report["totals"][fmt][str(b)]["rel_error"], b)
               for b in report["blocksizes"]]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=COLORS[fmt], label=NAMES[fmt])
        for bits, err, b in pts:
            ax.annotate(str(b), (bits, err), textcoords="offset points", xytext=(3, 3), fontsize=7, color=COLORS[fmt])
    ax.set_xlabel("bits per weight (codes + absmax + nested + offset)")
    ax.set_ylabel("relative error ‖W − Ŵ‖ / ‖W‖")
    ax.set_title("error vs storage, labelled by blocksize")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if not math.isfinite(ax.get_ylim()[1]):
        ax.set_ylim(0, 1)
