"""`fourbit plan` against measured peaks, and the QLoRA paper's memory claim planned.

    python -m benchmarks.bench_plan accuracy [--smoke] [--case NAME]   results/plan/accuracy.json
    python -m benchmarks.bench_plan paper [--seq-len 512]               results/plan/paper.{json,png}
    python -m benchmarks.bench_plan time70b                             results/plan/time70b.json

The tables in docs/plan.md are generated from these files by `python -m benchmarks.docs_tables`.

Accuracy. Each case is a real `fourbit finetune` run (the Trainer: its evaluation, its steps, its
final evaluation) on this CPU, measured by instruments the planner does not use: the bytes of the
tensor storages the real Trainer holds when the run starts (walked on the objects), plus the highest
rise of live bytes during the run according to torch.profiler with profile_memory=True, whose
allocation events carry the CPU allocator's own sizes, summed in time order. Beside it: the plan's peak, the error, and the peak RSS
of the process (a cross-check only: it also holds Python, the libraries and the dense model that
loading reads before quantizing). An FSDP2 case runs under torchrun (2 ranks, gloo) and reports
rank 0's peak. `--case NAME` measures one case and replaces its row in the file (the whole list
takes about an hour on the 2-core machine).

Paper. The QLoRA paper (Dettmers et al. 2023) says a 65B model needs more than 780 GB of GPU memory
to fine-tune in 16 bits and less than 48 GB with QLoRA. Planned here for LLaMA 7B/13B/33B/65B with
its setup: NF4 with double quantization, LoRA r = 64 on every linear layer, paged AdamW, gradient
checkpointing, batch 1, `--seq-len` tokens (512 by default), bf16 compute on an 80 GB card; with the
exact bytes of each 4-bit base beside the 4.127-bit formula (4 + 8/64 + 32/(64*256) bits per weight).

Time to plan a 70B model: `fourbit plan` of Llama-2-70B and Llama-3-70B (QLoRA, batch 1 x 2048
tokens) as a user runs it, a fresh process timed from start to exit, on a card where it fits and on
one where it does not (then every change is planned too).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import types

import torch

from fourbit.plan import compare, gpu_target, local_target, plan
from fourbit.plan.report import write_png
from fourbit.train.config import TrainConfig
from fourbit.train.loop import Trainer

RESULTS = os.path.join(os.path.dirname(__file__), "results")
MIB = 2**20


# ---- the measurement ----------------------------------------------------------------------------
def _live_peak(prof, start_ns: int, end_ns: int) -> int:
    """Max over [start, end] of the bytes the CPU allocator holds for what was allocated since the
    profiler started (its allocation events, in time order, summed)."""
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for t, n in events:
        live += n
        if start_ns <= t <= end_ns:
            peak = max(peak, live)
    return peak


# not followed: values, and what leads out of the run into the whole process (functions' globals, modules)
_LEAVES = (str, bytes, int, float, type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType,
           types.MethodType, types.CodeType, types.FrameType)


def _held_bytes(root) -> int:
    """Bytes of every tensor storage reachable from `root` (the Trainer: its model, quant states,
    optimizer), each storage once, found by walking the real objects' references."""
    import gc

    seen_objects, storages, todo = set(), {}, [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen_objects or isinstance(obj, _LEAVES):
            continue
        seen_objects.add(id(obj))
        if isinstance(obj, torch.Tensor):
            local = obj.to_local() if hasattr(obj, "to_local") else obj
            st = local.untyped_storage()
            storages[st.data_ptr()] = max(storages.get(st.data_ptr(), 0), st.nbytes())
            if obj.grad is not None:
                todo.append(obj.grad)
        todo.extend(gc.get_referents(obj))
    return sum(storages.values())


def measure_run(config: TrainConfig, *, output_dir: str | None = None) -> dict:
    """Run `config` for real (evaluate, its steps, evaluate) and measure its peak: what the Trainer
    holds when the run starts (`_held_bytes`, on the real objects) plus the highest rise of the
    allocator's live bytes during the run (torch.profiler's allocation events, in time order). The
    profiler starts after loading: transformers frees some loading buffers on its own threads, whose
    events the profiler does not see."""
    import gc

    from torch.profiler import ProfilerActivity, profile, record_function

    with tempfile.TemporaryDirectory() as tmp:
        config = dataclasses.replace(config, output_dir=output_dir or os.path.join(tmp, "run"))
        trainer = Trainer(config, overwrite=True, progress=False)
        try:
            gc.collect()
            held = _held_bytes(trainer)
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                with record_function("fourbit-measured-run"):
                    trainer.evaluate()
                    for _ in range(trainer.total_steps):
                        trainer.train_step()
                    trainer.evaluate()
        finally:
            trainer.close()  # the run directory's lock
        marks = [e for e in prof.profiler.kineto_results.events() if e.name() == "fourbit-measured-run"]
        rise = _live_peak(prof, marks[0].start_ns(), marks[0].end_ns())
    return {"measured_peak_bytes": held + rise, "held_at_start_bytes": held,
            "rss_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def measure_step(config: TrainConfig, source, rows: list[list[int]], *, steps: int, device: str) -> tuple[int, str]:
    """(peak bytes, instrument) of `steps` optimizer steps (Trainer.step_on) of the model `source`
    describes, with random weights quantized to NF4 on `device`, on the batch `rows`: on CUDA the
    caching allocator's peak after the model is in place, on the CPU the profiler's allocator events
    from before the model is built."""
    from torch.profiler import ProfilerActivity, profile, record_function
    from transformers import AutoModelForCausalLM

    from fourbit.lora import quantize_model
    from fourbit.train.data import IGNORE, collate
    from fourbit.train.distributed import Runtime
    from fourbit.train.setup import prepare_model, uses_autocast

    def run():
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(source.hf_config, dtype=torch.float32)
        compute = torch.bfloat16 if uses_autocast(config, torch.device(device)) else torch.float32
        quantize_model(model, compute_dtype=compute)
        model.eval()  # as from_pretrained returns it
        prepare_model(model, config)
        trainer = Trainer.around(config, model, None, Runtime("none", 0, 1, 0, torch.device(device), None))
        batch = collate(rows, [[IGNORE] + r[1:] for r in rows], 0)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with record_function("fourbit-measured-steps"):
            for _ in range(steps):
                trainer.step_on([batch])

    if device == "cuda":
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    mark = next(e for e in prof.profiler.kineto_results.events() if e.name() == "fourbit-measured-steps")
    return _live_peak(prof, mark.start_ns(), mark.end_ns()), "torch.profiler allocator events"


# ---- the cases ----------------------------------------------------------------------------------
def cases(smoke: bool, model_4bit: str | None) -> dict[str, TrainConfig]:
    """The issue's list, on SmolLM2-135M (the main job's model); --smoke: 2 steps, batch 2."""
    base = TrainConfig(steps=2, batch_size=2, eval_examples=16) if smoke else TrainConfig()
    short = dict(steps=2 if smoke else 4)
    out = {
        "main job defaults": base,
        "batch 1": dataclasses.replace(base, batch_size=1, **short),
        "batch 8": dataclasses.replace(base, batch_size=8, **short),
        "gradient checkpointing on": dataclasses.replace(base, grad_checkpointing="on", **short),
        "gradient checkpointing off": dataclasses.replace(base, grad_checkpointing="off", **short),
        "r = 16": dataclasses.replace(base, r=16, **short),
        "r = 64": dataclasses.replace(base, r=64, **short),
        "paged AdamW 32-bit, 8 MiB budget": dataclasses.replace(base, optimizer="paged_adamw", paging_budget_mb=8.0, **short),
        "paged AdamW 8-bit, 2 MiB budget": dataclasses.replace(base, optimizer="paged_adamw8bit", paging_budget_mb=2.0, **short),
        "FSDP2, 2 ranks (gloo), rank 0": dataclasses.replace(base, distributed="fsdp", optimizer="torch_adamw", **short),
    }
    if model_4bit:
        out["transformers model through FourbitConfig"] = dataclasses.replace(base, model=model_4bit, **short)
    if smoke:
        out = {k: v for k, v in out.items() if k in ("main job defaults", "gradient checkpointing on")}
    return out


def _measure_fsdp(config: TrainConfig, world_size: int = 2) -> dict:
    """rank 0's measured peak of `config` under torchrun (this module's `worker` command)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec, result = os.path.join(tmp, "config.json"), os.path.join(tmp, "rank0.json")
        with open(spec, "w") as f:
            json.dump(dataclasses.replace(config, output_dir=os.path.join(tmp, "run")).to_dict(), f)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}",
               "-m", "benchmarks.bench_plan", "worker", spec, result]
        child = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if child.returncode:
            raise RuntimeError(f"torchrun failed:\n{child.stdout[-3000:]}\n{child.stderr[-3000:]}")
        with open(result) as f:
            return json.load(f)


def _worker(spec: str, result: str) -> int:
    with open(spec) as f:
        config = TrainConfig.from_dict(json.load(f))
    measured = measure_run(config, output_dir=config.output_dir)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(result, "w") as f:
            json.dump(measured, f)
    from fourbit.train.distributed import teardown

    teardown()
    return 0


def accuracy(smoke: bool, only: str | None, out_dir: str) -> list[dict]:
    from fourbit.train.export import export_4bit

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_4bit = None if smoke else export_4bit("smollm2", os.path.join(tmp, "smollm2-nf4"))
        for name, config in cases(smoke, model_4bit).items():
            if only and only != name:
                continue
            ws = 2 if config.distributed == "fsdp" else 1
            t0 = time.perf_counter()
            p = plan(config, target=local_target("cpu"), world_size=ws, suggest=False)
            plan_s = time.perf_counter() - t0
            measured = _measure_fsdp(config, ws) if ws > 1 else measure_run(config)
            m = measured["measured_peak_bytes"]
            row = {"case": name, "config": config.to_dict(), "world_size": ws, "predicted_bytes": p.peak,
                   "measured_bytes": m, "error": (p.peak - m) / m, "where": p.where, "rss_peak_bytes": measured["rss_peak_bytes"],
                   "plan_s": round(plan_s, 1), "breakdown": p.breakdown}
            print(f"{name:45s} predicted {p.peak / MIB:9.2f} MiB  measured {m / MIB:9.2f} MiB  error {100 * row['error']:+6.2f} %"
                  f"  (plan {plan_s:.0f} s, {p.where})", flush=True)
            rows.append(row)
    if not smoke:
        stem = os.path.join(out_dir, "plan", "accuracy")
        if only and os.path.isfile(stem + ".json"):  # one case measured again: its row replaced, the order kept
            with open(stem + ".json") as f:
                kept = {r["case"]: r for r in json.load(f)["rows"]}
            kept.update({r["case"]: r for r in rows})
            order = list(cases(False, "4-bit"))
            rows = sorted(kept.values(), key=lambda r: order.index(r["case"]) if r["case"] in order else len(order))
        _write(rows, stem)
    return rows


# ---- the paper ----------------------------------------------------------------------------------
PAPER_MODELS = ("llama-7b", "llama-13b", "llama-33b", "llama-65b")


def _formula_bytes(n_weights: int) -> float:
    return n_weights * (4 + 8 / 64 + 32 / (64 * 256)) / 8


PAGED_MIB = 512  # the paper's paged AdamW on a smaller card: what does not fit this budget waits on the host


def paper(seq_len: int, out_dir: str) -> list[dict]:
    rows, pictures = [], []
    target = gpu_target("A100-80GB")
    for name in PAPER_MODELS:
        config = TrainConfig(model=name, r=64, batch_size=1, max_length=seq_len, grad_checkpointing="on",
                             optimizer="paged_adamw", precision="bf16")
        t0 = time.perf_counter()
        qlora, lora16, full16 = compare(config, target=target)
        paged = plan(dataclasses.replace(config, paging_budget_mb=float(PAGED_MIB)), target=target, suggest=False)
        seconds = time.perf_counter() - t0
        weights = sum(qlora.static[k] for k in ("codes", "absmax", "nested"))
        n4 = qlora.static["n_4bit_weights"]
        plans = {"qlora": qlora, "qlora_paged": paged, "lora16": lora16, "full16": full16}
        row = {"model": name, "seq_len": seq_len, "paged_budget_mib": PAGED_MIB,
               "plans": {k: {"peak_bytes": q.peak, "where": q.where, "breakdown": q.breakdown} for k, q in plans.items()},
               "base_4bit_bytes": weights, "n_4bit_weights": n4, "formula_bytes": _formula_bytes(n4),
               "plan_s": round(seconds, 1), "qlora_plan": qlora.to_dict()}
        rows.append(row)
        pictures = [qlora, paged, lora16, full16]
        print(f"{name}: QLoRA {qlora.peak / 1e9:.1f} GB ({paged.peak / 1e9:.1f} GB paged), LoRA 16-bit "
              f"{lora16.peak / 1e9:.1f} GB, full 16-bit {full16.peak / 1e9:.1f} GB; 4-bit base {weights / 1e9:.3f} GB "
              f"vs formula {_formula_bytes(n4) / 1e9:.3f} GB ({seconds:.0f} s)", flush=True)
    write_png(pictures, os.path.join(out_dir, "plan", "paper.png"),
              title=f"LLaMA-65B, batch 1 x {seq_len} tokens, r = 64, gradient checkpointing",
              labels=["QLoRA", f"QLoRA, paged\n({PAGED_MIB} MiB of states)", "LoRA, bf16 base", "full bf16"],
              marks=[(48 * 10**9, "the paper: QLoRA < 48 GB"), (780 * 10**9, "the paper: 16-bit > 780 GB")])
    _write(rows, os.path.join(out_dir, "plan", "paper"))
    return rows


# ---- the time to plan a 70B model -----------------------------------------------------------------
TIMED = [("llama-2-70b", "H100"), ("llama-3-70b", "H100"), ("llama-3-70b", "4090")]


def time70b(out_dir: str) -> list[dict]:
    """Wall-clock seconds of `fourbit plan` for 70B presets, each in a fresh process (imports included)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model, gpu in TIMED:
            out = os.path.join(tmp, "plan.json")
            argv = ["plan", "--model", model, "--max-length", "2048", "--batch-size", "1", "--gpu", gpu, "--json", out]
            t0 = time.perf_counter()
            child = subprocess.run([sys.executable, "-m", "fourbit.cli", *argv], capture_output=True, text=True, timeout=1800)
            wall = time.perf_counter() - t0
            if child.returncode not in (0, 1):  # 1: it does not fit, a plan all the same
                raise RuntimeError(f"fourbit {' '.join(argv)} failed:\n{child.stderr[-3000:]}")
            with open(out) as f:
                p = json.load(f)
            row = {"command": "fourbit " + " ".join(argv[:-2]), "wall_s": round(wall, 1), "plan_s": round(p["seconds"], 1),
                   "peak_bytes": p["peak"], "fits": p["fits"], "suggestions": len(p["suggestions"]), "where": p["where"]}
            print(f"{row['command']}: {wall:.1f} s wall ({p['seconds']:.1f} s in plan()), peak {p['peak'] / 2**30:.1f} GiB, "
                  f"{'fits' if p['fits'] else 'does not fit'}, {row['suggestions']} changes planned", flush=True)
            rows.append(row)
    _write(rows, os.path.join(out_dir, "plan", "time70b"))
    return rows


# ---- files --------------------------------------------------------------------------------------
def _write(rows: list[dict], stem: str) -> None:
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    meta = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()}
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"wrote {stem}.json (python -m benchmarks.docs_tables carries it into docs/plan.md)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_plan")
    sub = parser.add_subparsers(dest="what", required=True)
    acc = sub.add_parser("accuracy")
    acc.add_argument("--smoke", action="store_true", help="two small cases, nothing written")
    acc.add_argument("--case", default=None)
    pap = sub.add_parser("paper")
    pap.add_argument("--seq-len", type=int, default=512)
    t70 = sub.add_parser("time70b")
    wk = sub.add_parser("worker")
    wk.add_argument("spec")
    wk.add_argument("result")
    for p in (acc, pap, t70):
        p.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    if args.what == "worker":
        return _worker(args.spec, args.result)
    if args.what == "accuracy":
        accuracy(args.smoke, args.case, args.out)
    elif args.what == "time70b":
        time70b(args.out)
    else:
        paper(args.seq_len, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
