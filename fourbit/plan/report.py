"""A plan in words (the terminal table), as JSON, and as a picture (stacked bars per category against
the card's capacity, one bar per planned setup)."""

from __future__ import annotations

import io
import json
import os

from ..errors import UserError, output_error
from ..nf4.files import write_bytes
from .gpus import format_bytes
from .planner import Plan
from .tracker import CATEGORIES

__all__ = ["table", "compare_table", "write_json", "write_png"]

_GIB = 2**30




def table(p: Plan) -> str:
    """The plan of one setup: verdict, the breakdown at the peak, each phase's own peak, changes."""
    c = p.config
    unit, scale = ("GiB", _GIB) if p.peak >= _GIB else ("MiB", 2**20)  # a tiny model's plan in MiB
    ranks = f", {p.world_size} ranks ({c['distributed']})" if p.world_size > 1 else ""
    lines = [
        f"{p.label} plan for {p.model} on {p.target.name}",
        f"  batch {p.batch[0]} x {p.batch[1]} tokens{ranks}, gradient checkpointing {'on' if p.checkpointing else 'off'}, "
        f"{c['optimizer']}" + (f" (device budget {c['paging_budget_mb']:g} MiB)" if c.get("paging_budget_mb") else "")
        + (f", r={c['r']}" if p.mode != "full16" else ""),
        f"  {p.params}",
        f"  peak {format_bytes(p.peak)} at {p.where}; usable {format_bytes(p.target.usable)}: "
        + ("fits" if p.fits else "DOES NOT FIT"),
        "",
        f"  {'at the peak':56s} {unit:>8s}",
    ]
    s = p.static
    for key, label in CATEGORIES.items():
        n = p.breakdown.get(key, 0)
        if key == "optimizer_host":
            n = s.get("optimizer_host", 0)
            if not n:
                continue
            label += " (not in the peak)"
        elif not n:
            continue
        extra = ""
        if key == "base_4bit":
            extra = f"   codes {s['codes'] / scale:.2f}, absmax {s['absmax'] / scale:.2f}, nested {s['nested'] / scale:.3f}"
        lines.append(f"  {label:56s} {n / scale:8.2f}{extra}")
    lines.append(f"  {'total':56s} {p.peak / scale:8.2f}")
    lines.append("")
    lines.append(f"  each phase's own peak ({unit}): " + ", ".join(f"{k} {v / scale:.2f}" for k, v in p.phases.items()))
    if p.suggestions:
        lines.append("")
        lines.append("  changes, each alone (predicted peak):")
        for sug in p.suggestions:
            lines.append(f"    {sug.change:48s} {format_bytes(sug.peak):>12s}  {'fits' if sug.fits else 'still too big'}")
    for note in p.notes:
        lines.append(f"  note: {note}")
    lines.append(f"  planned in {p.seconds:.1f} s")
    return "\n".join(lines)


def compare_table(plans: list[Plan]) -> str:
    """Setups side by side: the breakdown at each one's peak."""
    width = 20
    head = f"  {'GiB at the peak':50s}" + "".join(f"{q.label:>{width}s}" for q in plans)
    lines = [f"{plans[0].model} on {plans[0].target.name} (usable {format_bytes(plans[0].target.usable)}), "
             f"batch {plans[0].batch[0]} x {plans[0].batch[1]} tokens", head]
    for key, label in CATEGORIES.items():
        if key == "optimizer_host" or not any(q.breakdown.get(key) for q in plans):
            continue
        lines.append(f"  {label:50s}" + "".join(f"{q.breakdown.get(key, 0) / _GIB:>{width}.2f}" for q in plans))
    lines.append(f"  {'peak':50s}" + "".join(f"{q.peak / _GIB:>{width}.2f}" for q in plans))
    lines.append(f"  {'where':50s}" + "".join(f"{q.phase:>{width}s}" for q in plans))
    lines.append(f"  {'verdict':50s}" + "".join(f"{'fits' if q.fits else 'does not fit':>{width}s}" for q in plans))
    return "\n".join(lines)


def write_json(plans: list[Plan], path: str) -> str:
    data = [q.to_dict() for q in plans]
    _write(path, (json.dumps(data if len(data) > 1 else data[0], indent=1, default=str) + "\n").encode())
    return path


def _write(path: str, data: bytes) -> None:
    """Atomically (never half a file), creating the folder; OutputError names what went wrong."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_bytes(path, data)
    except UserError:
        raise
    except OSError as err:
        raise output_error(path, err) from err


def write_png(plans: list[Plan], path: str, title: str | None = None, labels: list[str] | None = None,
              marks: list[tuple[int, str]] = ()) -> str:
    """Stacked bars (GiB by category at each setup's peak, named by `labels` or the setups' own)
    against the target's capacity (solid) and what is usable of it (dashed); `marks`: (bytes, text)
    lines to read the bars against (up to three), e.g. a published claim."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in CATEGORIES if k != "optimizer_host" and any(q.breakdown.get(k) for q in plans)]
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(plans), 4.8))
    bottoms = [0.0] * len(plans)
    colors = plt.get_cmap("tab20").colors
    for i, key in enumerate(keys):
        heights = [q.breakdown.get(key, 0) / _GIB for q in plans]
        ax.bar(range(len(plans)), heights, bottom=bottoms, label=CATEGORIES[key], color=colors[i % len(colors)], width=0.6)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    target = plans[0].target
    ax.axhline(target.capacity / _GIB, color="black", linewidth=1)
    ax.axhline(target.usable / _GIB, color="black", linewidth=1, linestyle="--")
    ax.text(len(plans) - 0.5, target.capacity / _GIB, f" {target.name}", va="bottom", ha="right", fontsize=8)
    for (nbytes, text), style in zip(marks, (":", "-.", (0, (1, 3)))):  # named in the legend: bars' labels sit near them
        ax.axhline(nbytes / _GIB, color="dimgray", linewidth=1.2, linestyle=style, label=text)
    for x, q in enumerate(plans):
        ax.text(x, q.peak / _GIB, f"{q.peak / _GIB:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(plans)), labels or [q.label for q in plans], fontsize=8)
    ax.set_ylabel("GiB at the peak")
    ax.set_ylim(0, 1.1 * max(max(q.peak for q in plans), target.capacity) / _GIB)  # room for the labels
    ax.set_title(title or f"{plans[0].model}: planned peak memory", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")  # the legend sits right of the bars
    plt.close(fig)
    _write(path, buffer.getvalue())
    return path
