"""The session's last stage: check what came back, write OUT/summary.md, print the summary line.

    python -m benchmarks.gpu.summary OUT [--budget "install=15 env=30 ..."] [--limit 420]

Reads OUT/results.jsonl only (no torch: it runs even when the budget is spent). Checks the schema of
every line, the number of files under OUT (the device tool brings back at most 8, at most two
folders down) and that the GPU stage budget adds up to no more than the limit. Exit status 0 when
all of that holds and no required check failed; 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
from collections import defaultdict
from pathlib import Path

from .common import read_results

MAX_FILES, MAX_DEPTH = 8, 2  # the device tool's limits on what comes back from $OUT
PEERS = ("fourbit-nodq", "fourbit-dequant", "bitsandbytes", "dense")


def parse_budget(text: str) -> dict[str, int]:
    return {name: int(seconds) for name, _, seconds in (item.partition("=") for item in text.split())}


def files_under(out: Path) -> list[tuple[str, int]]:
    """(relative path, folders down) of every file under OUT."""
    found = []
    for root, _, names in os.walk(out):
        rel = Path(root).relative_to(out)
        found += [(str(rel / n), len(rel.parts)) for n in names]
    return found


def _ms(v) -> str:
    return "" if v is None else f"{v:.3f}"


def timing_table(timings: list[dict]) -> list[str]:
    """One row per (case, M, N, K): each provider's median ms, fourbit's GB/s and % of the copy
    ceiling, and fourbit's speedup (peer ms / fourbit ms, > 1: fourbit faster)."""
    cases: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for t in timings:
        cases[(t["op"], t["shape"])][t["provider"]] = t
    lines = ["| case | M×N×K | fourbit ms | nodq ms | dequant+cuBLAS ms | bnb ms | dense ms | fourbit GB/s | % copy | TFLOP/s "
             "| vs bnb | vs dense |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (op, shape), row in cases.items():
        ours = row.get("fourbit", {})
        ms = {p: row[p]["median_ms"] if p in row else None for p in ("fourbit", *PEERS)}

        def vs(p):
            return f"{ms[p] / ms['fourbit']:.2f}×" if ms[p] and ms["fourbit"] else ""

        gbs, pct, tflops = ours.get("gb_per_s"), ours.get("pct_of_ceiling"), ours.get("tflop_per_s")
        lines.append(f"| {op} | {shape} | {_ms(ms['fourbit'])} | {_ms(ms['fourbit-nodq'])} | {_ms(ms['fourbit-dequant'])} | "
                     f"{_ms(ms['bitsandbytes'])} | "
                     f"{_ms(ms['dense'])} | {'' if gbs is None else f'{gbs:.0f}'} | {'' if pct is None else f'{pct:.0f}'} | "
                     f"{'' if tflops is None else f'{tflops:.1f}'} | {vs('bitsandbytes')} | {vs('dense')} |")
    return lines


def render(lines: list[dict], budget: dict[str, int], limit: int, problems: list[str], files: list) -> tuple[str, str, bool]:
    by_kind: dict[str, list[dict]] = defaultdict(list)
    for line in lines:
        by_kind[line["kind"]].append(line)
    facts = {f["name"]: f["value"] for f in by_kind["fact"]}
    checks = by_kind["check"]
    failed = [c for c in checks if c["required"] and not c["ok"]]
    informative = [c for c in checks if not c["required"] and not c["ok"]]
    total = sum(budget.values())
    deepest = max((d for _, d in files), default=0)
    ok = not problems and not failed and total <= limit and len(files) <= MAX_FILES and deepest <= MAX_DEPTH
    used = {s["name"]: s for s in by_kind["stage"]}
    summary = (f"summary: {'OK' if ok else 'FAILED'}; GPU stage budget "
               f"{' + '.join(f'{k} {v}' for k, v in budget.items())} = {total} s "
               f"({'<=' if total <= limit else 'OVER'} {limit} s); wall {max((x['t'] for x in lines), default=0):.0f} s; "
               f"checks: {len(failed)} required failed, {len(checks) - len(failed) - len(informative)} ok, "
               f"{len(informative)} informative differ; {len(by_kind['timing'])} timings, "
               f"{len(by_kind['train'])} train rows, {len(by_kind['prediction'])} predictions; {len(files)} files "
               f"(<= {MAX_FILES}), {deepest} folders deep; {len(problems)} schema problems")

    env = facts.get("environment", {})
    md = ["# GPU session", "", summary, "",
          f"Device: {facts.get('device')}; versions: {env.get('versions')}; git {env.get('git_sha')}; peer: {facts.get('peer')}.",
          f"Ceilings measured here: copy {facts.get('copy_gb_per_s', 0):.0f} GB/s (read + write), "
          f"bf16 matmul {facts.get('bf16_matmul_tflop_per_s', 0):.1f} TFLOP/s.", "",
          "## Stages", "", "| stage | GPU budget s | timeout s | elapsed s | exit |", "|---|---:|---:|---:|---:|"]
    md += [f"| {name} | {budget.get(name, '')} | {s['timeout_s']} | {s['elapsed_s']} | {s['rc']} |" for name, s in used.items()]
    md += ["", "## Headline timings (median ms; L2 flushed; CUDA graphs for M <= 16)", "", *timing_table(by_kind["timing"])]
    if by_kind["train"]:
        tps = {t["provider"]: t.get("tokens_per_s") for t in by_kind["train"]}
        md += ["", "## QLoRA training step", "", "| provider | model | tokens/s | median ms | peak MiB | fourbit speedup |",
               "|---|---|---:|---:|---:|---:|"]
        for t in by_kind["train"]:
            speedup = tps.get("fourbit") / tps["bnb+peft"] if t["provider"] == "fourbit" and tps.get("bnb+peft") else None
            md.append(f"| {t['provider']} | {t.get('config', {}).get('model')} | {t.get('tokens_per_s', 0):.0f} | "
                      f"{t['median_ms']:.1f} | {(t.get('peak_mem_bytes') or 0) / 2**20:.0f} | "
                      f"{'' if speedup is None else f'{speedup:.2f}×'} |")
    if by_kind["prediction"]:
        md += ["", "## Cost model: predicted vs measured", "",
               "| op | M | N | K | path | config | limiter | predicted fraction | measured fraction | predicted µs | measured µs "
               "| measured / predicted |", "|---|---:|---:|---:|---|---|---|---:|---:|---:|---:|---:|"]
        md += [f"| {p['op']} | {'' if p['M'] is None else p['M']} | {p['N']} | {p['K']} | {p.get('path')} | {p.get('config')} | "
               f"{p.get('limiter')} | {_ms(p.get('predicted_fraction'))} | {_ms(p.get('measured_fraction'))} | "
               f"{_ms(p.get('predicted_time_us'))} | {_ms(p.get('measured_us'))} | {_ms(p.get('measured_over_predicted'))} |"
               for p in by_kind["prediction"]]
    md += ["", f"## Checks ({len(failed)} required failed of {len(checks)})", ""]
    md += [f"- {'ok' if c['ok'] else 'FAILED' if c['required'] else 'differs (informative)'}: {c['name']}" for c in checks]
    md += ["", "## Notes", ""] + [f"- {n['stage']}: {n['name']}: {n['text']}" for n in by_kind["note"]]
    md += [f"- schema: {p}" for p in problems]
    return summary, "\n".join(md) + "\n", ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu.summary", description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--budget", default=None,
                        help='the GPU stage budget, "stage=seconds ..." (default: the one run.sh recorded in results.jsonl)')
    parser.add_argument("--limit", type=int, default=420, help="seconds the whole GPU session may take")
    args = parser.parse_args(argv)
    out = Path(args.out)
    lines, problems = read_results(out)
    summary_path = out / "summary.md"
    summary_path.touch()  # counted with the rest
    if args.budget is not None:
        budget = parse_budget(args.budget)
    else:  # re-rendering a finished session (benchmarks/results/h200/): the budget it ran under
        budget = {x["name"]: x["gpu_budget_s"] for x in lines if x["kind"] == "stage" and "gpu_budget_s" in x}
    summary, text, ok = render(lines, budget, args.limit, problems, files_under(out))
    summary_path.write_text(text)
    print(summary)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
