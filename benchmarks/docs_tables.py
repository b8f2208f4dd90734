"""The tables of README.md and docs/*.md, generated from the committed results under
benchmarks/results/ (never typed by hand).

    python -m benchmarks.docs_tables            # rewrite every generated region in place
    python -m benchmarks.docs_tables --check    # exit 1 and name the stale regions (tests/test_docs.py)

A generated region in a page is

    <!-- table: NAME -->
    ...whatever TABLES[NAME]() returns...
    <!-- end table -->

so a new measurement changes the JSON, and this script carries it into every page that shows it.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
REGION = re.compile(r"^(<!-- table: ([\w-]+) -->\n)(.*?)(<!-- end table -->)$", re.S | re.M)


def _load(rel: str) -> list | dict:
    return json.loads((RESULTS / rel).read_text())


def _md(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"
    return "\n".join(["| " + " | ".join(header) + " |", align] + ["| " + " | ".join(r) + " |" for r in rows])


def _median(rows, **match) -> float | None:
    hit = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    return hit[0]["median_ms"] if hit else None


def cpu_headline() -> str:
    """fourbit's CPU kernels against bitsandbytes' CPU backend, one line per op family, from
    benchmarks/bench_cpu.py's run (README; the full table is in docs/kernels.md)."""
    rows = _load("cpu/cpu.json")
    copy = next(r for r in rows if r["op"] == "copy")
    picks = [("dequantize", "4096x4096", "float32", "dequantize NF4+DQ 4096×4096 → fp32"),
             ("dequantize", "11008x4096", "bfloat16", "dequantize NF4+DQ 11008×4096 → bf16"),
             ("quantize", "4096x4096", "float32", "quantize NF4+DQ 4096×4096, fp32"),
             ("matmul_4bit", "1x4096x4096", "bfloat16", "`matmul_4bit` M = 1 (decode), 4096×4096, bf16"),
             ("matmul_4bit", "512x4096x4096", "bfloat16", "`matmul_4bit` M = 512, 4096×4096, bf16"),
             ("adamw32", None, "float32", "AdamW 32-bit step, SmolLM2 LoRA params"),
             ("adamw8", None, "float32", "AdamW 8-bit step, SmolLM2 LoRA params"),
             ("qlora_step", None, "float32", "QLoRA training step, SmolLM2-135M, batch 8")]
    out = []
    for op, shape, dtype, label in picks:
        def one(provider):
            hit = [r for r in rows if r["op"] == op and r["provider"] == provider and r["dtype"] == dtype
                   and (shape is None or r["shape"] == shape)
                   and (op not in ("adamw32", "adamw8") or not r["shape"].startswith("Paged"))]
            return hit[0] if hit else None
        ours, peer = one("fourbit"), one("bitsandbytes")
        pct = f"{ours['pct_of_ceiling']:.0f} %" if ours.get("pct_of_ceiling") and op != "qlora_step" and "512x" not in ours["shape"] else ""
        out.append([label, f"{ours['median_ms']:.2f}", f"{peer['median_ms']:.2f}",
                    f"{peer['median_ms'] / ours['median_ms']:.2f}×", pct])
    note = (f"Copy bandwidth {copy['gb_per_s']:.1f} GB/s (torch copy_, read + write), {copy.get('isa')} kernels, "
            f"{copy.get('threads')} threads.\n\n")
    return note + _md(["op (CPU)", "fourbit ms", "bitsandbytes ms", "fourbit speed", "% of copy bandwidth"], out)


def _costmodel(rel: str) -> str:
    from fourbit.kernels.analysis.costmodel import format_markdown

    data = _load(rel)
    tools = data["toolchain"]
    return (f"Built by Triton {tools['triton']} with its ptxas {tools['ptxas']}, routed as the dispatcher does "
            f"under that Triton (`{rel}`):\n\n" + format_markdown(data["rows"]))


def costmodel_sm90a() -> str:
    """The cost model's chosen rows on the five Llama-3 shapes, CI's Triton (docs/kernels.md)."""
    return _costmodel("sm_90a/costmodel.json")


def costmodel_sm90a_triton36() -> str:
    """The same under Triton 3.6, the GPU machine's (docs/kernels.md)."""
    return _costmodel("sm_90a/costmodel-triton3.6.json")


def gemv_prologue() -> str:
    """The tensor-core GEMV's prologue as the cost model charges it, per Triton (docs/kernels.md)."""
    out = []
    for rel in ("sm_90a/costmodel.json", "sm_90a/costmodel-triton3.6.json"):
        data = _load(rel)
        for r in data["rows"]:
            if r["chosen"] and r["op"] == "gemv" and r["M"] in (1, 16):
                out.append([data["toolchain"]["triton"], f"{r['M']}", f"{r['N']}×{r['K']}", f"{r['prologue_us']:.2f}",
                            f"{r['predicted_time_us']:.2f}", f"{r['predicted_fraction']:.3f}", r["limiter"]])
    return _md(["Triton", "M", "N×K", "prologue µs", "predicted µs", "of the roofline", "limiter"], out)


def _quality_rows(name: str) -> list[dict]:
    order = ["fp32", "bf16", "nf4+dq", "nf4", "fp4", "int4-absmax"]
    rows = _load(f"cpu/{name}.json")
    return sorted(rows, key=lambda r: order.index(r["provider"]) if r["provider"] in order else len(order))


_LABEL = {"nf4+dq": "NF4 + double quant", "nf4": "NF4", "fp4": "FP4", "int4-absmax": "Int4 absmax",
          "fp32": "fp32", "bf16": "bf16"}


def fidelity_smollm2() -> str:
    """Perplexity of SmolLM2-135M with every linear weight round-tripped (docs/inspect.md)."""
    rows = _quality_rows("quality")
    base = next(r["perplexity"] for r in rows if r["provider"] == "fp32")
    out = [[_LABEL[r["provider"]], f"{r['perplexity']:.2f}",
            "—" if r["provider"] == "fp32" else f"{100 * (r['perplexity'] / base - 1):+.1f} %",
            f"{r['weight_rel_error']:.4f}"] for r in rows]
    return _md(["weights", "perplexity", "vs fp32", "weight relative error"], out)


def fidelity_minilm() -> str:
    """all-MiniLM-L6-v2 embeddings with every linear weight round-tripped (docs/inspect.md)."""
    rows = [r for r in _quality_rows("quality_minilm") if r["provider"] != "fp32"]
    digits = lambda r: 5 if r["provider"] == "bf16" else 4  # noqa: E731  (bf16's cosines differ in the 6th place)
    out = [[_LABEL[r["provider"]], f"{r['weight_rel_error']:.4f}", f"{r['cos_mean']:.{digits(r)}f}",
            f"{r['cos_min']:.{digits(r)}f}", f"{100 * r['nn_agreement']:.1f} %"] for r in rows]
    return _md(["weights", "weight relative error", "cosine to fp32: mean", "min", "same nearest neighbour as fp32"], out)


def inspect_pooled() -> str:
    """Relative error of each format at blocksize 64, all linear weights pooled (docs/inspect.md)."""
    out = []
    for model, what in (("minilm", "all-MiniLM-L6-v2, fp32"), ("smollm2", "SmolLM2-135M, GGUF Q4_1 values")):
        d = _load(f"cpu/inspect_{model}/inspect.json")
        err = {f: d["totals"][f]["64"]["rel_error"] for f in ("nf4", "nf4+dq", "fp4", "int4")}
        out.append([f"{what} ({d['n_layers']} weights)", *(f"{err[f]:.4f}" for f in ("nf4", "nf4+dq", "fp4", "int4")),
                    f"{100 * d['outliers']['top_1pct_share']:.1f} %"])
    return _md(["weights", "NF4", "NF4 + DQ", "FP4", "Int4 absmax", "worst 1 % of NF4 blocks hold (of the squared error)"], out)


def qlora_vs_lora() -> str:
    """The main job's recipe on a 4-bit, fp32 and bf16 base (docs/training.md)."""
    mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
    out = []
    for r in _load("cpu/qlora_vs_lora.json"):
        m = r["memory"]
        out.append([r["provider"], f"{r['exact_match_before']:.3f} → {r['exact_match_after']:.3f}",
                    f"{r['losses'][0]:.3f} → {r['losses'][-1]:.3f}", mib(m["base_linear"]), mib(m["base_other"]),
                    mib(m["adapter"]), mib(m["gradients"]), mib(m["optimizer"]), f"{m['activations'] / 2**20:.0f} MiB"])
    return _md(["base weights", "exact match before → after", "loss first → last step", "base linear weights",
                "embedding + norms", "adapter", "its gradients", "AdamW states", "activations saved for backward"], out)


def bnb_own_tests() -> str:
    """bitsandbytes' own test files under install() (tests/bnb_shim/run_bnb_tests.py --record; docs/ecosystem.md)."""
    rows = _load("cpu/bnb_tests.json")
    modes = [("installed", False), ("installed", True), ("bitsandbytes", False)]
    selections = sorted({(r["file"], r["k"] or "", r["optim"]) for r in rows})
    out = []
    for file, k, optim in selections:
        cells = []
        for against, avx in modes:
            hit = [r for r in rows if (r["file"], r["k"] or "", r["optim"], r["against"], r["avx512bf16"]) == (file, k, optim, against, avx)]
            if not hit:
                cells.append("not run")
                continue
            r = hit[0]
            cell = f"{r['passed']}/{r['passed'] + r['failed']} passed, {r['skipped']} skipped"
            if against == "installed":
                cell += f"; {r['passed_without_fourbit']} without a call into fourbit"
            cells.append(cell)
        what = file.removeprefix("tests/") + (f" `-k {k}`" if k else "") + (" (fourbit's optimizers)" if optim else "")
        out.append([what, *cells])
    return _md(["bitsandbytes 0.50.1 test file, selection", "fourbit installed, this CPU",
                "fourbit installed, AVX512-BF16 simulated", "bitsandbytes alone"], out)


def cpu_kernels() -> str:
    """fourbit's C kernels against bitsandbytes' CPU backend, from benchmarks/bench_cpu.py (docs/kernels.md)."""
    from benchmarks.cpu_table import goals_table

    return goals_table(_load("cpu/cpu.json"))


def plan_accuracy() -> str:
    """`fourbit plan` against the profiler's record of real runs on the CPU (docs/plan.md)."""
    mib = lambda b: f"{b / 2**20:.2f}"  # noqa: E731
    out = [[r["case"], mib(r["predicted_bytes"]), mib(r["measured_bytes"]), f"{100 * r['error']:+.2f} %", r["where"],
            f"{r['plan_s']:.0f}"] for r in _load("plan/accuracy.json")["rows"]]
    return _md(["case (SmolLM2-135M, CPU)", "planned MiB", "measured MiB", "error", "peak at", "plan s"], out)


def plan_paper() -> str:
    """The QLoRA paper's memory claim, planned (docs/plan.md)."""
    rows = _load("plan/paper.json")["rows"]
    gb = lambda b: f"{b / 1e9:.1f}"  # noqa: E731
    out = []
    for r in rows:
        p = r["plans"]
        out.append([r["model"], gb(p["qlora"]["peak_bytes"]), gb(p["qlora_paged"]["peak_bytes"]), gb(p["lora16"]["peak_bytes"]),
                    gb(p["full16"]["peak_bytes"]), f"{r['base_4bit_bytes'] / 1e9:.3f}", f"{r['formula_bytes'] / 1e9:.3f}",
                    f"{r['base_4bit_bytes'] - r['formula_bytes']:+,.0f} B ({100 * (r['base_4bit_bytes'] / r['formula_bytes'] - 1):+.1e} %)"])
    head = ["model", "QLoRA GB", f"QLoRA, {rows[0]['paged_budget_mib']} MiB of states on the GPU, GB", "LoRA on a bf16 base GB",
            "full bf16 GB", "4-bit base GB (exact)", "4.127-bit formula GB", "exact vs formula"]
    return _md(head, out)


def plan_time() -> str:
    """Seconds to plan a 70B model, `fourbit plan` in a fresh process (docs/plan.md)."""
    out = [[f"`{r['command']}`", f"{r['wall_s']:.1f}", f"{r['plan_s']:.1f}", f"{r['peak_bytes'] / 2**30:.1f}",
            "fits" if r["fits"] else f"does not fit; {r['suggestions']} changes planned"] for r in _load("plan/time70b.json")["rows"]]
    return _md(["command (this CPU machine)", "wall s", "in plan() s", "peak GiB", "verdict"], out)


def plan_headline() -> str:
    """The paper's claim and the planner's measured error, in one sentence (README.md)."""
    paper = {r["model"]: r for r in _load("plan/paper.json")["rows"]}["llama-65b"]
    errors = [abs(r["error"]) for r in _load("plan/accuracy.json")["rows"]]
    p = paper["plans"]
    return (f"**Memory, planned before a run**: `fourbit plan` puts LLaMA-65B QLoRA in the paper's setup (batch 1 x "
            f"{paper['seq_len']} tokens, r = 64, paged AdamW keeping {paper['paged_budget_mib']} MiB of states on the GPU) at "
            f"{p['qlora_paged']['peak_bytes'] / 1e9:.1f} GB ({p['qlora']['peak_bytes'] / 1e9:.1f} GB with every state on the GPU) "
            f"and full bf16 fine-tuning at {p['full16']['peak_bytes'] / 1e9:.0f} GB (the paper: < 48 GB and > 780 GB); its "
            f"prediction is within {100 * max(errors):.1f} % of the measured peak on {len(errors)} real CPU runs "
            "([docs/plan.md](docs/plan.md)).")


def plan_example() -> str:
    """The LLaMA-65B QLoRA plan of the paper table, as `fourbit plan` prints it (docs/plan.md)."""
    from fourbit.plan.planner import Plan
    from fourbit.plan.report import table

    row = next(r for r in _load("plan/paper.json")["rows"] if r["model"] == "llama-65b")
    text = table(Plan.from_dict(row["qlora_plan"]))
    return "```text\n" + "\n".join(line for line in text.splitlines() if not line.startswith("  planned in")) + "\n```"


TABLES = {f.__name__.replace("_", "-"): f for f in
          (cpu_headline, costmodel_sm90a, costmodel_sm90a_triton36, gemv_prologue, fidelity_smollm2, fidelity_minilm,
           inspect_pooled, qlora_vs_lora, bnb_own_tests, cpu_kernels, plan_accuracy, plan_paper, plan_example, plan_time,
           plan_headline)}


def regenerate(text: str) -> str:
    """text with every generated region rewritten (KeyError names an unknown table)."""
    return REGION.sub(lambda m: m.group(1) + TABLES[m.group(2)]().rstrip("\n") + "\n" + m.group(4), text)


def stale_pages() -> list[str]:
    return [str(p.relative_to(ROOT)) for p in PAGES if regenerate(p.read_text()) != p.read_text()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.docs_tables", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only report pages whose tables are stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_pages()
        for page in stale:
            print(f"stale generated table in {page}: run python -m benchmarks.docs_tables", file=sys.stderr)
        return 1 if stale else 0
    for page in PAGES:
        text = page.read_text()
        new = regenerate(text)
        if new != text:
            page.write_text(new)
            print(f"rewrote {page.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
