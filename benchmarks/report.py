"""Render a results JSON (written by harness.write_results) into a markdown table and a PNG plot.

    python -m benchmarks.report benchmarks/results/cpu/quant.json [...]

Rows are grouped by (op, shape, dtype). Each fourbit row also gets "speedup vs <peer>" for every
other provider in its group: peer median time / fourbit median time (> 1 means fourbit is faster).
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from pathlib import Path

__all__ = ["render", "table", "speedups"]


def _group(rows):
    groups = defaultdict(list)
    for r in rows:
        groups[(r["op"], r["shape"], r["dtype"])].append(r)
    return groups


def speedups(rows) -> dict[tuple, dict[str, float]]:
    """{(op, shape, dtype, fourbit_provider): {peer: peer_ms / ours_ms}}."""
    out = {}
    for key, group in _group(rows).items():
        for ours in group:
            if not ours["provider"].startswith("fourbit"):
                continue
            out[key + (ours["provider"],)] = {
                peer["provider"]: peer["median_ms"] / ours["median_ms"]
                for peer in group
                if not peer["provider"].startswith("fourbit") and ours["median_ms"] > 0
            }
    return out


def _fmt(v, spec):
    return "" if v is None else format(v, spec)


def table(rows) -> str:
    ratios = speedups(rows)
    lines = [
        "| op | shape | dtype | provider | median ms | p20–p80 ms | GB/s | TFLOP/s | % ceiling | peak MiB | speedup |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for key, group in _group(rows).items():
        for r in group:
            sp = ratios.get(key + (r["provider"],), {})
            sp_text = ", ".join(f"{v:.2f}× vs {k}" for k, v in sp.items())
            peak = r.get("peak_mem_bytes")
            lines.append(
                f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['provider']} | {r['median_ms']:.3f} | "
                f"{r['p20_ms']:.3f}–{r['p80_ms']:.3f} | {_fmt(r.get('gb_per_s'), '.1f')} | "
                f"{_fmt(r.get('tflop_per_s'), '.3f')} | {_fmt(r.get('pct_of_ceiling'), '.0f')} | "
                f"{_fmt(peak / 2**20 if peak else None, '.0f')} | {sp_text} |"
            )
    first = rows[0] if rows else {}
    footer = f"\n\nDevice: {first.get('device')}; versions: {first.get('versions')}; git {first.get('git_sha')}.\n"
    return "\n".join(lines) + footer


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _group(rows)
    providers = sorted({r["provider"] for r in rows})
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(groups) + 2), 4))
    width = 0.8 / max(1, len(providers))
    for i, p in enumerate(providers):
        xs, ys = [], []
        for j, group in enumerate(groups.values()):
            for r in group:
                if r["provider"] == p:
                    xs.append(j + i * width)
                    ys.append(r["median_ms"])
        ax.bar(xs, ys, width=width, label=p)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels(["\n".join(map(str, k)) for k in groups], fontsize=7)
    ax.set_ylabel("median ms (lower is better)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(json_path: str | os.PathLike) -> tuple[Path, Path]:
    path = Path(json_path)
    rows = json.loads(path.read_text())
    md, png = path.with_suffix(".md"), path.with_suffix(".png")
    md.write_text(f"# {path.stem}\n\n" + table(rows))
    plot(rows, png)
    return md, png


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(render(arg)[0].read_text())
