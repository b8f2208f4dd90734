"""The goal table of benchmarks/bench_cpu.py, rendered from its rows (cpu.json): fourbit's CPU kernels
against bitsandbytes' CPU backend and fourbit's reference, with the copy bandwidth and load of the run
(benchmarks/results/cpu/cpu_goals.md; benchmarks/docs_tables.py puts the same table into docs/kernels.md)."""

from __future__ import annotations

__all__ = ["goals_table", "goals_markdown"]


def goals_table(rows: list[dict]) -> str:
    """The copy bandwidth and load, then fourbit ms | bitsandbytes ms | speed ratio | % of copy bandwidth
    per op row, the geometric mean, the first-use cost and the finetune split (docs/kernels.md)."""
    copy = next(r for r in rows if r["op"] == "copy")
    loads = sorted({r["loadavg"] for r in rows if r.get("loadavg") is not None})
    lines = [
        f"Copy bandwidth (torch copy_ of {copy['shape']}, read + write) {copy['gb_per_s']:.1f} GB/s; instruction set "
        f"{copy.get('isa')}; {copy.get('threads')} threads; 1-minute load average during the run "
        f"{loads[0]:.2f}–{loads[-1]:.2f} (2 cores); git {copy.get('git_sha')}.",
        "",
        "| op | shape | dtype | fourbit ms | bitsandbytes ms | fourbit / bnb speed | fourbit, % of copy bandwidth | "
        "reference ms | fourbit / reference speed |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    keyed = {(r["op"], r["shape"], r["dtype"], r["provider"]): r for r in rows}
    ratios = []
    for r in rows:
        if r["provider"] != "fourbit" or r["op"] in ("copy", "finetune", "first use"):
            continue
        bnb = keyed.get((r["op"], r["shape"], r["dtype"], "bitsandbytes"))
        ref = keyed.get((r["op"], r["shape"], r["dtype"], "fourbit-reference"))
        pct = f"{r['pct_of_ceiling']:.0f} %" if r.get("pct_of_ceiling") else ""
        cells = [r["op"], r["shape"], r["dtype"], f"{r['median_ms']:.2f}"]
        if bnb:
            ratios.append(bnb["median_ms"] / r["median_ms"])
            cells += [f"{bnb['median_ms']:.2f}", f"{ratios[-1]:.2f}×"]
        else:
            cells += ["", ""]
        cells.append(pct)
        cells += [f"{ref['median_ms']:.2f}", f"{ref['median_ms'] / r['median_ms']:.2f}×"] if ref else ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    if ratios:
        geo = 1.0
        for x in ratios:
            geo *= x
        lines += ["", f"Geometric mean of the fourbit / bitsandbytes speed over these {len(ratios)} rows: "
                      f"{geo ** (1 / len(ratios)):.2f}×."]
    fills = [r for r in rows if r["provider"] == "fresh-fill"]
    if fills:
        cells = []
        for r in fills:
            ours = keyed.get((r["op"], r["shape"], r["dtype"], "fourbit"))
            if ours:
                cells.append(f"{r['shape']} {r['dtype']} {r['median_ms']:.2f} ms (dequantize {ours['median_ms']:.2f})")
        lines += ["", "A fresh output's cost: `torch.empty(shape).fill_(1)` in the same rounds (page faults and the "
                      "kernel's zeroing of new pages, which the copy bandwidth's warm buffer does not pay; dequantize "
                      "advises 2 MiB pages first, a plain fill does not): " + "; ".join(cells) + "."]
    first = {r["shape"]: r["median_ms"] / 1e3 for r in rows if r["op"] == "first use"}
    if first:
        lines += ["", f"First use, in a fresh process: compiling and loading the kernels {first['compile+load']:.1f} s "
                      f"(once per machine), loading the cached build {first['load cached']:.2f} s (every later process)."]
    fine = [r for r in rows if r["op"] == "finetune"]
    if fine:
        lines += ["", "| `fourbit finetune`, defaults (s) | load | evaluation | training | total |", "|---|---:|---:|---:|---:|"]
        for provider in ("fourbit", "fourbit-reference"):
            got = {r["shape"]: r["median_ms"] / 1e3 for r in fine if r["provider"] == provider}
            if got:
                lines.append(f"| {provider} | {got['load']:.1f} | {got['evaluation']:.1f} | {got['training']:.1f} | "
                             f"{got['total']:.1f} |")
    return "\n".join(lines) + "\n"


def goals_markdown(rows: list[dict]) -> str:
    return "# CPU kernels against bitsandbytes (benchmarks/bench_cpu.py, from cpu.json)\n\n" + goals_table(rows)
