"""fourbit's CPU kernels (fourbit.cpu) beside bitsandbytes' CPU backend and fourbit's PyTorch reference,
in one process, against the copy bandwidth measured in the same run.

    python -m benchmarks.bench_cpu [--rounds 5] [--only dequantize matmul ...] [--train] [--finetune] [--smoke] [--out DIR]

Ops (NF4 + double quantization, blocksize 64, as a new user runs them: fourbit.functional /
fourbit.optim against bitsandbytes.functional / bitsandbytes.optim):
    dequantize            4096x4096 and 11008x4096 -> float32 / bfloat16
    quantize              4096x4096 float32 (not a goal row: the model load's cost)
    matmul_4bit M=1       4096x4096 and 11008x4096 (W [N, K]), float32 / bfloat16 x; M=512 bfloat16
    quantize_blockwise    8-bit codes of 4.9 M float32 optimizer values and of the 262144 scales of a
    dequantize_blockwise  4096x4096 weight (double quantization's nested scales), blocksize 256
    adamw32 / adamw8      one step of (Paged)AdamW(8bit) on the LoRA parameters of SmolLM2-135M (420
                          tensors, 4.9 M values; benchmarks.bench_optim), the same gradients each step
Providers: fourbit (FOURBIT_BACKEND=auto: the CPU kernels), fourbit-reference (FOURBIT_BACKEND=reference,
the PyTorch path before the CPU kernels) and bitsandbytes. Each op's providers are timed in interleaved
rounds (round r times every provider once, for --min-time seconds); a row's median is the median of its
rounds' medians, so a burst of load from elsewhere hits every provider alike. The 1-minute load average
(`os.getloadavg`) is recorded with every row: this machine is shared.

Bytes (GB/s and % of the copy bandwidth) count what an ideal kernel must move: dequantize reads the
packed codes and scales and writes the output; the GEMV reads the packed weight and scales; quantize
reads the input and writes codes and scales; AdamW 32-bit reads p, g, m, v and writes p, m, v (28 B per
value), 8-bit reads p, g and two codes and writes p and two codes (16 B) plus the scales. The copy
bandwidth is torch's copy_ of 256 MiB float32 counted as read + write, with torch's threads.

--train adds benchmarks/bench_train.py's QLoRA training step (SmolLM2-135M, batch 8) for both backends
against bitsandbytes + PEFT. --finetune times `fourbit finetune` with its defaults (both backends), split
into load (model, quantization, data), evaluation (the two exact-match passes) and training.

Also recorded: the first use's cost (compile + load with an empty cache, then a cached load, each in a
fresh process).

Results: benchmarks/results/cpu/cpu.json (the source), cpu.md / cpu.png (the harness's long table),
cpu_goals.md (the goal table; benchmarks/docs_tables.py puts the same table into docs/kernels.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from .cpu_table import goals_markdown
from .harness import quantized_bytes, record, time_fn, write_results

COPY_BYTES = 256 << 20
DEQUANT_SHAPES = [(4096, 4096), (11008, 4096)]
GEMV_SHAPES = [(4096, 4096), (11008, 4096)]  # W [N, K]
SMOKE_SHAPE = (256, 512)
OPTIMIZERS = ["AdamW", "PagedAdamW", "AdamW8bit", "PagedAdamW8bit"]


def _loadavg() -> float:
    return round(os.getloadavg()[0], 2)


def copy_bandwidth(smoke: bool = False) -> dict:
    """GB/s of torch's copy_ (read + write) of 256 MiB float32, and its timing."""
    n = (1 << 20 if smoke else COPY_BYTES) // 4
    src, dst = torch.randn(n), torch.empty(n)
    t = time_fn(lambda: dst.copy_(src), smoke=smoke, min_time_s=0.5)
    return {"timing": t, "gbs": 2 * n * 4 / (t["median_ms"] / 1e3) / 1e9}


class backend:
    """FOURBIT_BACKEND for the duration of a with-block (dispatch reads it on every call)."""

    def __init__(self, name: str):
        self.name, self.before = name, None

    def __enter__(self):
        self.before = os.environ.get("FOURBIT_BACKEND")
        os.environ["FOURBIT_BACKEND"] = self.name

    def __exit__(self, *exc):
        if self.before is None:
            os.environ.pop("FOURBIT_BACKEND", None)
        else:
            os.environ["FOURBIT_BACKEND"] = self.before


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, min_time_s: float, smoke: bool) -> dict[str, dict]:
    """Per provider: median of the per-round medians, p20 / p80 over all rounds' medians."""
    per: dict[str, list[dict]] = {name: [] for name in fns}
    for _ in range(1 if smoke else rounds):
        for name, fn in fns.items():
            per[name].append(time_fn(fn, smoke=smoke, min_time_s=min_time_s, max_reps=50))
    out = {}
    for name, ts in per.items():
        medians = sorted(t["median_ms"] for t in ts)
        q = statistics.quantiles(medians, n=10, method="inclusive") if len(medians) > 1 else medians * 9
        out[name] = {"median_ms": statistics.median(medians), "p20_ms": q[1], "p80_ms": q[7],
                     "reps": sum(t["reps"] for t in ts), "rounds": len(ts)}
    return out


def _providers(fourbit_fn: Callable[[], object], bnb_fn: Callable[[], object]) -> dict[str, Callable[[], object]]:
    def cpu():
        with backend("auto"):
            return fourbit_fn()

    def reference():
        with backend("reference"):
            return fourbit_fn()

    return {"fourbit": cpu, "fourbit-reference": reference, "bitsandbytes": bnb_fn}


def _fourbit_state(bnb_state):
    """fourbit's QuantState for bitsandbytes' (its CPU 8-bit quantizer picks a few nested scale codes
    differently, SPEC §3: both sides then decode the very same bytes and scales)."""
    from fourbit.nf4 import QuantState

    return QuantState.from_dict(bnb_state.as_dict(packed=True))


def _rows(op: str, shape, dtype, timings: dict[str, dict], bytes_moved: int, ceiling: float, **extra) -> list[dict]:
    load = _loadavg()
    return [record(op, name, shape, dtype, t, bytes_moved=bytes_moved, ceiling_gbs=ceiling, loadavg=load, **extra)
            for name, t in timings.items()]


# ---- the ops ---------------------------------------------------------------------------------
def bench_dequantize(ceiling: float, rounds: int, min_time_s: float, smoke: bool) -> list[dict]:
    import bitsandbytes.functional as bnbf

    import fourbit.functional as FF

    rows = []
    for shape in [SMOKE_SHAPE] if smoke else DEQUANT_SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            w = torch.randn(shape).to(dtype)
            packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
            mine = _fourbit_state(state)  # the same bytes and scales on both sides
            ours = lambda: FF.dequantize_4bit(packed, mine)  # noqa: E731
            theirs = lambda: bnbf.dequantize_4bit(packed, state)  # noqa: E731
            with backend("auto"):
                assert torch.equal(ours(), theirs()), f"dequantize {shape} {dtype}: fourbit and bitsandbytes differ"
            n = shape[0] * shape[1]
            moved = quantized_bytes(*shape, True) + n * w.element_size()
            # the API returns a new tensor (as bitsandbytes'): writing fresh pages costs the kernel's
            # page faults and zeroing, which copy_ into a warm buffer does not pay; a plain fill_ of a fresh
            # tensor of the output's size shows that cost, timed in the same rounds
            fns = {**_providers(ours, theirs), "fresh-fill": lambda: torch.empty(shape, dtype=dtype).fill_(1.0)}
            rows += _rows("dequantize", shape, dtype, interleaved(fns, rounds, min_time_s, smoke),
                          moved, ceiling, config={"blocksize": 64, "quant": "nf4+dq"})
    return rows


def bench_quantize(ceiling: float, rounds: int, min_time_s: float, smoke: bool) -> list[dict]:
    import bitsandbytes.functional as bnbf

    import fourbit.functional as FF

    shape = SMOKE_SHAPE if smoke else (4096, 4096)
    w = torch.randn(shape)
    ours = lambda: FF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)  # noqa: E731
    theirs = lambda: bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)  # noqa: E731
    with backend("auto"):
        assert torch.equal(ours()[0], theirs()[0]), "quantize: fourbit and bitsandbytes codes differ"
    moved = quantized_bytes(*shape, True) + w.numel() * 4
    return _rows("quantize", shape, torch.float32, interleaved(_providers(ours, theirs), rounds, min_time_s, smoke),
                 moved, ceiling, config={"blocksize": 64, "quant": "nf4+dq"})


def bench_matmul(ceiling: float, rounds: int, min_time_s: float, smoke: bool) -> list[dict]:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    import fourbit.functional as FF

    cases = [(1, SMOKE_SHAPE, torch.float32)] if smoke else (
        [(1, s, d) for s in GEMV_SHAPES for d in (torch.float32, torch.bfloat16)] + [(512, (4096, 4096), torch.bfloat16)])
    rows = []
    for m, (n, k), dtype in cases:
        w = torch.randn(n, k)
        packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        mine = _fourbit_state(state)
        x = torch.randn(m, k).to(dtype)
        ours = lambda: FF.matmul_4bit(x, packed.t(), mine)  # noqa: E731
        theirs = lambda: bnb.matmul_4bit(x, packed.t(), state)  # noqa: E731
        w64 = bnbf.dequantize_4bit(packed, state).double()
        want = x.double() @ w64.T
        with backend("auto"):
            err = ((ours().double() - want).norm() / want.norm()).item()
        assert err < {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}[dtype], f"matmul {m}x{n}x{k} {dtype}: error {err}"
        moved = quantized_bytes(n, k, True) + (m * k + m * n) * x.element_size()
        rows += _rows("matmul_4bit", (m, n, k), dtype, interleaved(_providers(ours, theirs), rounds, min_time_s, smoke),
                      moved, ceiling, flops=None, config={"blocksize": 64, "quant": "nf4+dq", "M": m}, rel_err=err)
    return rows


def bench_blockwise(ceiling: float, rounds: int, min_time_s: float, smoke: bool) -> list[dict]:
    import bitsandbytes.functional as bnbf

    from fourbit import dispatch
    from fourbit.nf4 import dynamic_map

    code = dynamic_map(signed=True)
    rows = []
    for label, n in [("states", 4_882_432), ("nested-scales", 4096 * 4096 // 64)] if not smoke else [("states", 65536)]:
        x = torch.randn(n) * 1e-3
        ours_q = lambda: dispatch.quantize_blockwise(x, code, 256)  # noqa: E731
        theirs_q = lambda: bnbf.quantize_blockwise(x, code=code, blocksize=256)  # noqa: E731
        q, absmax = ours_q()
        their_q, their_state = theirs_q()
        differ = int((q != their_q).sum())  # bitsandbytes' CPU build rounds some codes near 0 by its own table (SPEC §3)
        nb = absmax.numel()
        rows += _rows("quantize_blockwise", f"{label} {n}", torch.float32,
                      interleaved(_providers(ours_q, theirs_q), rounds, min_time_s, smoke), 5 * n + 4 * nb, ceiling,
                      config={"blocksize": 256, "code": "dynamic signed"}, codes_differing_from_bnb=differ)
        ours_d = lambda: dispatch.dequantize_blockwise(q, absmax, code, 256)  # noqa: E731
        theirs_d = lambda: bnbf.dequantize_blockwise(q, absmax=absmax, code=code, blocksize=256)  # noqa: E731
        with backend("auto"):
            assert torch.equal(ours_d(), theirs_d()), "dequantize_blockwise: fourbit and bitsandbytes differ"
        rows += _rows("dequantize_blockwise", f"{label} {n}", torch.float32,
                      interleaved(_providers(ours_d, theirs_d), rounds, min_time_s, smoke), 5 * n + 4 * nb, ceiling,
                      config={"blocksize": 256, "code": "dynamic signed"})
    return rows


def bench_optimizers(ceiling: float, rounds: int, min_time_s: float, smoke: bool) -> list[dict]:
    import bitsandbytes as bnb

    import fourbit.optim as fopt

    from .bench_optim import lora_shapes

    shapes = lora_shapes(1 if smoke else 30)
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=g) * 0.02 for s in shapes]
    grads = [torch.randn(s, generator=g) * 1e-3 for s in shapes]
    n = sum(p.numel() for p in start)
    rows = []
    for name in OPTIMIZERS:
        eight = "8bit" in name

        def make(cls):
            params = [torch.nn.Parameter(p.clone()) for p in start]
            for p, gr in zip(params, grads):
                p.grad = gr.clone()
            opt = cls(params, lr=1e-3, weight_decay=1e-2)
            return opt

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bitsandbytes: paged optimizers are not paged on CPU
            ours_cpu, ours_ref, theirs = make(getattr(fopt, name)), make(getattr(fopt, name)), make(getattr(bnb.optim, name))

        def step(opt, which):
            def run():
                with backend(which):
                    opt.step()
            return run

        fns = {"fourbit": step(ours_cpu, "auto"), "fourbit-reference": step(ours_ref, "reference"),
               "bitsandbytes": theirs.step}
        moved = n * (16 if eight else 28) + (2 * 4 * -(-n // 256) * 2 if eight else 0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            timings = interleaved(fns, rounds, min_time_s, smoke)
        rows += _rows("adamw8" if eight else "adamw32", f"{name} lora-smollm2 {n}", torch.float32, timings, moved,
                      ceiling, config={"optimizer": name, "tensors": len(shapes)})
    return rows


def bench_training_step(rounds: int, smoke: bool) -> list[dict]:
    """benchmarks/bench_train.py's QLoRA step (SmolLM2-135M, batch 8, fp32, PagedAdamW; each provider in
    fresh processes, alternating) under both backends; its bnb+peft row is the peer."""
    import json

    from . import bench_train

    rows = []
    with tempfile.TemporaryDirectory() as out:
        for which in ("auto", "reference"):
            with backend(which):
                bench_train.main(["--out", f"{out}/{which}", "--rounds", str(1 if smoke else max(2, rounds // 2))]
                                 + (["--smoke"] if smoke else []))
            for r in json.loads((Path(out) / which / "train.json").read_text()):
                if which == "reference" and r["provider"] != "fourbit":
                    continue  # the peer ran in the first pass
                r["provider"] = {"fourbit": "fourbit" if which == "auto" else "fourbit-reference",
                                 "bnb+peft": "bitsandbytes"}[r["provider"]]
                r["loadavg"] = _loadavg()
                rows.append(r)
    return rows


def bench_finetune(ceiling: float, smoke: bool) -> list[dict]:
    """`fourbit finetune` with its defaults, per backend: load (Trainer: model, quantization, data),
    evaluation (both exact-match passes) and training (the rest of train())."""
    from fourbit.train.config import TrainConfig
    from fourbit.train.loop import Trainer

    rows = []
    for which in ("auto", "reference"):
        with tempfile.TemporaryDirectory() as tmp, backend(which):
            overrides = {"max_steps": 2, "eval_examples": 4} if smoke else {}
            t0 = time.perf_counter()
            trainer = Trainer(TrainConfig(output_dir=str(Path(tmp) / "run"), **overrides), progress=False)
            load = time.perf_counter() - t0
            spent = {"eval": 0.0}
            evaluate = trainer.evaluate

            def timed_eval():
                e0 = time.perf_counter()
                try:
                    return evaluate()
                finally:
                    spent["eval"] += time.perf_counter() - e0

            trainer.evaluate = timed_eval
            t1 = time.perf_counter()
            trainer.train()
            total = time.perf_counter() - t0
            train = time.perf_counter() - t1 - spent["eval"]
        provider = "fourbit" if which == "auto" else "fourbit-reference"
        for phase, seconds in (("load", load), ("evaluation", spent["eval"]), ("training", train), ("total", total)):
            ms = seconds * 1e3
            rows.append(record("finetune", provider, phase, "float32", {"median_ms": ms, "p20_ms": ms, "p80_ms": ms, "reps": 1},
                               loadavg=_loadavg(), config={"defaults": not smoke}))
    return rows


SECTIONS = {"dequantize": bench_dequantize, "quantize": bench_quantize, "matmul": bench_matmul,
            "blockwise": bench_blockwise, "optimizers": bench_optimizers}


def run(smoke: bool = False, rounds: int = 5, min_time_s: float = 0.2, only: list[str] | None = None,
        finetune: bool = False, train: bool = False) -> list[dict]:
    from fourbit import cpu, dispatch

    ok, why = cpu.available()
    if not ok:
        raise SystemExit(f"bench_cpu: the CPU kernels did not load ({why})")
    copy = copy_bandwidth(smoke)
    ceiling = copy["gbs"]
    rows = [record("copy", "torch", "256MiB" if not smoke else "4MiB", torch.float32, copy["timing"],
                   bytes_moved=int(copy["gbs"] * copy["timing"]["median_ms"] * 1e6), ceiling_gbs=ceiling,
                   loadavg=_loadavg(), isa=why, threads=torch.get_num_threads())]
    if not smoke:  # two fresh processes and a compile: tests/test_dispatch.py checks that path
        rows += first_use(smoke)
    for name in only or list(SECTIONS):
        rows += SECTIONS[name](ceiling, rounds, min_time_s, smoke)
    if train:
        rows += bench_training_step(rounds, smoke)
    if finetune:
        rows += bench_finetune(ceiling, smoke)
    for row in rows:
        row.setdefault("isa", why)
        row["copy_gbs"] = ceiling
    assert dispatch.cpu_kernels_available()
    return rows


def first_use(smoke: bool) -> list[dict]:
    """Seconds to build and load the kernels in a fresh process with an empty cache, then to load the
    cached build in the next process (each a `python -c` that imports fourbit.cpu and loads it)."""
    import subprocess
    import sys

    rows = []
    probe = "from fourbit.cpu import _lib\nprint(_lib.built_here(), _lib.build_seconds())"
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "FOURBIT_CACHE": cache, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        for label in ("compile+load", "load cached"):
            done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=600,
                                  check=True)
            built, seconds = done.stdout.split()
            assert (built == "True") == (label == "compile+load"), done.stdout
            ms = float(seconds) * 1e3
            rows.append(record("first use", "fourbit", label, "-", {"median_ms": ms, "p20_ms": ms, "p80_ms": ms, "reps": 1},
                               loadavg=_loadavg()))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="one tiny repetition of everything (the test suite's check)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-time", type=float, default=0.2, help="seconds per provider per round")
    ap.add_argument("--only", nargs="+", choices=list(SECTIONS))
    ap.add_argument("--train", action="store_true", help="also bench_train's QLoRA step (SmolLM2, batch 8) per backend")
    ap.add_argument("--finetune", action="store_true", help="also time `fourbit finetune` (defaults) per backend")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results/cpu)")
    args = ap.parse_args(argv)
    rows = run(args.smoke, args.rounds, args.min_time, args.only, args.finetune, args.train)
    path = write_results("cpu", rows, device="cpu", out_dir=args.out)
    (path.parent / "cpu_goals.md").write_text(goals_markdown(rows))
    print((path.parent / "cpu_goals.md").read_text())


if __name__ == "__main__":
    main()
