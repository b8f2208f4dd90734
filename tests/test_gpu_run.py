"""The GPU session (benchmarks/gpu/run.sh) without a GPU: the dry run proves the plumbing, the file
count, the schema and the time accounting, so the one real call on an H200 cannot fail on a typo."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.gpu import predicted, summary
from benchmarks.gpu.common import RESULTS, read_results, validate

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu" / "run.sh"
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: run.sh would start measuring")


def run_sh(*args, timeout=120, env=None):
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env=env)


@no_gpu
def test_run_sh_refuses_bad_calls(tmp_path):
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    child = run_sh(tmp_path / "out")
    assert child.returncode == 1 and "no CUDA device" in child.stderr
    assert not (tmp_path / "out").exists()  # nothing written before the session can run
    for args in ([], ["--dry-run"], ["a", "b"], ["--bogus"]):
        child = run_sh(*args)
        assert child.returncode == 2 and "usage" in child.stderr, args
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / RESULTS).write_text("{}\n")
    child = run_sh("--dry-run", tmp_path / "used")
    assert child.returncode == 2 and "not empty" in child.stderr


@pytest.mark.slow
@pytest.mark.bnb
@no_gpu
def test_dry_run_brings_every_headline_number_back(tmp_path):
    out = tmp_path / "out"
    child = run_sh("--dry-run", out, timeout=600)
    log = child.stdout[-6000:] + child.stderr[-3000:]
    assert child.returncode == 0, log
    files = [p for p in out.rglob("*") if p.is_file()]
    assert 3 <= len(files) <= 8 and all(len(p.relative_to(out).parts) <= 3 for p in files), files

    # the summary line states the GPU stage budget, and it adds up to at most 7 minutes
    line = next(text for text in child.stdout.splitlines() if text.startswith("summary: "))
    assert line.startswith("summary: OK"), line
    stages, total = re.search(r"GPU stage budget (.*?) = (\d+) s", line).groups()
    budget = {name: int(s) for name, s in (part.rsplit(" ", 1) for part in stages.split(" + "))}
    assert list(budget) == ["install", "env", "correctness", "timings", "train", "plan", "predicted", "summary"]
    assert sum(budget.values()) == int(total) <= 420

    lines, problems = read_results(out)
    assert not problems
    by_kind = {}
    for x in lines:
        by_kind.setdefault(x["kind"], []).append(x)
    # time accounting: every stage ran within the timeout it was given, and the timeouts shrink as
    # the budget is spent (what remains minus what later stages are owed)
    ran = {x["name"]: x for x in by_kind["stage"]}
    assert list(ran) == list(budget)
    assert all(x["rc"] == 0 and x["elapsed_s"] <= x["timeout_s"] + 3 and x["gpu_budget_s"] == budget[n]
               for n, x in ran.items()), ran
    facts = {x["name"]: x["value"] for x in by_kind["fact"]}
    assert facts["copy_gb_per_s"] > 0 and facts["bf16_matmul_tflop_per_s"] > 0 and "environment" in facts
    assert not [x["name"] for x in by_kind["check"] if x["required"] and not x["ok"]]
    assert any(x["name"].startswith("matmul backward") for x in by_kind["check"])
    # every kernel the timed shapes pick was checked, and the exact integer test ran (benchmarks/gpu/variants.py)
    checks = {x["name"]: x for x in by_kind["check"]}
    assert checks["variants cover every kernel the timed shapes pick"]["ok"]
    assert sum(name.startswith("variant ") for name in checks) >= 20
    exact = [x for name, x in checks.items() if name.startswith("swapped tiles exact on integers")]
    assert exact and all(x["forward_mismatches"] == x["backward_mismatches"] == 0 for x in exact)
    assert facts["toolchain"]["triton"] and facts["toolchain"]["ptxas"] and "swapped_tiles" in facts["gates"]
    timed = {(x["op"], x["provider"], x["M"]) for x in by_kind["timing"]}
    for m in (1, 16, 33):
        assert {("matmul", p, m) for p in ("fourbit", "bitsandbytes", "dense")} <= timed
    assert {("matmul", "fourbit-nodq", 1), ("backward", "fourbit", 33), ("backward", "bitsandbytes", 33),
            ("matmul", "fourbit-dequant", 33), ("backward", "fourbit-dequant", 33),
            ("dequantize", "fourbit", None), ("dequantize", "bitsandbytes", None)} <= timed
    assert {x["provider"] for x in by_kind["train"]} == {"fourbit", "bnb+peft"}
    assert any(x["stage"] == "plan" and x["name"].startswith("plan within 3 %") for x in by_kind["check"])
    if (REPO / "fourbit" / "kernels" / "analysis" / "costmodel.py").exists():  # joined on the dry run's shapes at M = 1
        assert {(x["op"], x["M"]) for x in by_kind["prediction"]} >= {("gemv", 1), ("dequantize", None)}
        assert all(x["measured_us"] > 0 and x["chosen"] for x in by_kind["prediction"])
    else:
        assert any(x["name"] == "costmodel missing" for x in by_kind["note"])
    assert "## Headline timings" in (out / "summary.md").read_text()


@pytest.mark.slow
@no_gpu
def test_without_bitsandbytes_fourbit_and_dense_are_still_timed(tmp_path):
    hide = tmp_path / "hide"
    (hide / "bitsandbytes").mkdir(parents=True)
    (hide / "bitsandbytes" / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    env = {**os.environ, "PYTHONPATH": f"{hide}{os.pathsep}{REPO}", "TRITON_INTERPRET": "1", "FOURBIT_BACKEND": "triton"}
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "benchmarks.gpu.session", "timings", "--dry-run", "--out", str(out)]
    child = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-3000:]
    lines, problems = read_results(out)
    assert not problems
    assert {x["provider"] for x in lines if x["kind"] == "timing"} == {"fourbit", "fourbit-nodq", "fourbit-dequant", "dense"}
    assert any(x["kind"] == "note" and "bitsandbytes missing" in x["text"] for x in lines)

    env.pop("FOURBIT_BACKEND")  # the training stage runs the reference on the CPU, as run.sh's dry run does
    cmd = [sys.executable, "-m", "benchmarks.bench_train", "--smoke", "--model", "tiny-llama:1", "--seq-len", "16",
           "--session", str(out)]
    child = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-3000:]
    lines, problems = read_results(out)
    assert not problems
    assert [x["provider"] for x in lines if x["kind"] == "train"] == ["fourbit"]
    assert any(x["kind"] == "note" and x["text"].startswith("bnb+peft missing") for x in lines)


def test_schema_rejects_malformed_lines(tmp_path):
    good = {"stage": "env", "kind": "check", "name": "x", "t": 1.0, "ok": True, "required": False}
    assert validate(good) == []
    assert validate({**good, "ok": "yes"}) and validate({**good, "kind": "other"}) and validate({"kind": "note"})
    (tmp_path / RESULTS).write_text(json.dumps(good) + "\n" + '{"stage": "timings", "kind": "timing"\n')
    lines, problems = read_results(tmp_path)  # a line cut off by a killed stage is a problem, not a crash
    assert lines == [good] and len(problems) == 1 and "not JSON" in problems[0]


def test_summary_fails_on_too_many_files_or_budget(tmp_path):
    base = [{"stage": "x", "kind": "check", "name": "c", "t": 1.0, "ok": True, "required": True}]
    one_file = [("results.jsonl", 0)]
    assert summary.render(base, {"a": 100, "b": 300}, 420, [], one_file)[2]
    assert not summary.render(base, {"a": 100, "b": 321}, 420, [], one_file)[2]  # 421 s > 7 minutes
    assert not summary.render(base, {"a": 1}, 420, [], [(f"f{i}", 0) for i in range(9)])[2]
    assert not summary.render(base, {"a": 1}, 420, [], [("a/b/c/f", 3)])[2]
    assert not summary.render([{**base[0], "ok": False}], {"a": 1}, 420, [], one_file)[2]
    assert summary.render([{**base[0], "ok": False, "required": False}], {"a": 1}, 420, [], one_file)[2]


def test_predicted_joins_the_cost_model_on_op_m_n_k():
    predictions = [
        {"op": "gemv", "M": 1, "N": 4096, "K": 4096, "config": "a", "predicted_fraction": 0.8, "predicted_time_us": 10.0},
        {"op": "gemm", "M": 2048, "N": 4096, "K": 4096, "config": "b", "predicted_fraction": 0.9, "predicted_time_us": 100.0},
        {"op": "dequantize", "M": None, "N": 4096, "K": 4096, "config": "c", "predicted_time_us": 20.0},
        {"op": "gemv", "M": 16, "N": 4096, "K": 4096, "config": "d"},  # not measured: no row
    ]
    timings = [
        {"op": "matmul", "provider": "fourbit", "shape": "1x4096x4096", "kernel_op": "gemv", "M": 1, "N": 4096,
         "K": 4096, "median_ms": 0.02, "bytes_moved": 4_000_000},
        {"op": "matmul", "provider": "fourbit", "shape": "2048x4096x4096", "kernel_op": "gemm", "M": 2048, "N": 4096,
         "K": 4096, "median_ms": 0.2},
        {"op": "matmul", "provider": "dense", "shape": "2048x4096x4096", "kernel_op": "gemm", "M": 2048, "N": 4096,
         "K": 4096, "median_ms": 0.15},
        {"op": "dequantize", "provider": "fourbit", "shape": "4096x4096", "kernel_op": "dequantize", "M": None,
         "N": 4096, "K": 4096, "median_ms": 0.04, "bytes_moved": 42_000_000},
    ]
    rows = {r["op"]: r for r in predicted.join(predictions, timings, copy_gbs=4000.0)}
    assert set(rows) == {"gemv", "gemm", "dequantize"}
    assert rows["gemv"]["measured_fraction"] == pytest.approx(1.0 / 20.0)  # 1 µs of roofline in 20 µs
    assert rows["gemv"]["measured_over_predicted"] == pytest.approx(2.0)
    assert rows["gemm"]["measured_fraction"] == pytest.approx(0.75)  # dense 0.15 ms / fourbit 0.2 ms
    assert rows["dequantize"]["measured_fraction"] == pytest.approx(10.5 / 40.0)
    assert predicted.prediction_rows({"rows": predictions}) == predictions
