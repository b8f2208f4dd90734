"""QLoRA's central claim on the main task: LoRA on a 4-bit NF4 base learns what LoRA on a dense base learns.

    python -m benchmarks.bench_qlora_vs_lora [--smoke] [--out DIR] [--model M] [--bases nf4,fp32,bf16]

Each variant is the `fourbit finetune` recipe with its defaults (TrainConfig(), the embedded date
task, 12 steps of batch 8, r=16 on all seven projections, paged AdamW), differing only in
`base_weights`: "nf4" (QLoRA: NF4 + double quantization, blocksize 64), "fp32" or "bf16" (plain
LoRA on the dense model). Same seed, same adapter init, same batches. Reported per variant: exact
match on the 48 held-out dates before and after, the loss of every step, and the memory of

    base linear    every frozen linear weight (packed codes + absmax + nested state, or dense)
    base other     embedding (tied with lm_head) and norms, dense in the load dtype
    adapter        the LoRA A and B matrices (float32), and as much again for their gradients
    optimizer      AdamW's two float32 moments per adapter parameter (logical size of the pages)
    activations    tensors autograd saved for backward in the first training step (batch 8), counted
                   once per storage, parameters and quantization state excluded

all counted from the tensors themselves, beside the formula the QLoRA paper uses (§2-3: 4 + 8/64 +
32/(64*256) = 4.127 bits per NF4+DQ weight against 16 for bf16). Each variant runs in its own
subprocess, so peak RSS is that run's alone; on CPU it includes loading the dense fp32 model before
quantizing it, so it does not show the 4-bit saving (the component bytes do).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from fourbit.nf4.files import atomic_write

BASES = ("nf4", "fp32", "bf16")
BITS = {"nf4": 4 + 8 / 64 + 32 / (64 * 256), "fp32": 32.0, "bf16": 16.0}  # per linear weight, the paper's accounting
SMOKE = dict(steps=1, batch_size=2, eval_examples=4, max_length=80)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def base_bytes(model) -> dict[str, int]:
    """Bytes of the frozen base: linear weights (4-bit or dense) and everything else (embedding, norms)."""
    from fourbit.lora import Linear4bit, LoRALinear

    linear, other, n_linear, seen = 0, 0, 0, set()
    for module in model.modules():
        if isinstance(module, LoRALinear):
            continue
        if isinstance(module, Linear4bit):
            s = module.quant_state
            linear += _nbytes(module.weight) + _nbytes(s.absmax)  # codes + (8-bit or fp32) absmax
            if s.nested is not None:
                linear += _nbytes(s.nested.absmax) + _nbytes(s.offset)
            n_linear += s.numel
            seen.add(id(module.weight))
            continue
        is_linear = isinstance(module, torch.nn.Linear) and module.weight.requires_grad is False
        for p in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if id(p) in seen or p.requires_grad:
                continue
            seen.add(id(p))
            if is_linear and p is module.weight and module is not getattr(model, "lm_head", None):
                linear += _nbytes(p)
                n_linear += p.numel()
            else:
                other += _nbytes(p)
    return {"base_linear": linear, "base_other": other, "linear_params": n_linear}


def optimizer_bytes(optimizer) -> int:
    """Logical bytes of the optimizer's per-parameter state (moments; step counters excluded)."""

    def tensors(entries: dict):  # bitsandbytes' state-dict layout nests the moments one level down
        for value in entries.values():
            if isinstance(value, dict):
                yield from tensors(value)
            elif isinstance(value, torch.Tensor) and value.numel() > 1:
                yield value

    return sum(_nbytes(t) for state in optimizer.state_dict()["state"].values() for t in tensors(state))


class SavedTensors:
    """saved_tensors_hooks that record the storages autograd keeps for backward until `stop()`."""

    def __init__(self, model):
        owned = [*model.parameters(), *model.buffers()]
        for module in model.modules():
            s = getattr(module, "quant_state", None)
            while s is not None:
                owned += [t for t in (s.absmax, s.code, s.offset) if t is not None]
                s = s.nested
        self.owned = {t.untyped_storage().data_ptr() for t in owned}
        self.storages: dict[int, int] = {}
        self.active = True

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            storage = t.untyped_storage()
            if storage.data_ptr() not in self.owned:
                self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    def stop(self, trainer=None, step=None) -> None:
        self.active = False

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def run_variant(base: str, model_spec: str, out_dir: str, smoke: bool) -> dict:
    """One finetune run in this process; returns its metrics and memory."""
    from fourbit.lora import trainable_parameters
    from fourbit.train import TrainConfig, Trainer

    config = TrainConfig(model=model_spec, base_weights=base, output_dir=out_dir, **(SMOKE if smoke else {}))
    t0 = time.perf_counter()
    trainer = Trainer(config, overwrite=True, progress=False)
    load_s = time.perf_counter() - t0
    memory = base_bytes(trainer.model)
    adapter = sum(_nbytes(p) for p in trainer.params)
    saved = SavedTensors(trainer.model)
    trainer.on_step = saved.stop  # count the first training step only
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        summary = trainer.train()
    train_s = time.perf_counter() - t0
    memory.update(adapter=adapter, gradients=adapter, optimizer=optimizer_bytes(trainer.optimizer), activations=saved.total)
    steps = [r for r in trainer.metrics if "loss" in r]
    return {
        "base": base, "config": config.to_dict(), "params": str(trainable_parameters(trainer.model)),
        "adapter_params": sum(p.numel() for p in trainer.params),
        "exact_match_before": summary["exact_match_before"], "exact_match_after": summary["exact_match_after"],
        "losses": [r["loss"] for r in steps], "step_s": [r["step_s"] for r in steps],
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps),
        "load_s": load_s, "train_s": train_s, "memory": memory,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "end_rss_mib": _rss_mib(),
    }


def paper_accounting(run: dict) -> dict[str, float]:
    """Bytes the QLoRA paper's per-parameter formulas give for this run's linear weights."""
    return {"base_linear": run["memory"]["linear_params"] * BITS[run["base"]] / 8}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_qlora_vs_lora", description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="1 step, batch 2, 4 eval examples (for the test suite)")
    p.add_argument("--out", default=None, help="results directory (default benchmarks/results/cpu)")
    p.add_argument("--model", default="smollm2", help="'smollm2', a transformers directory or a .gguf file")
    p.add_argument("--bases", default=",".join(BASES), help="comma-separated base_weights values")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    args = p.parse_args(argv)

    if args.worker:
        with tempfile.TemporaryDirectory(prefix="qlora-vs-lora-") as tmp:
            print("RESULT " + json.dumps(run_variant(args.worker, args.model, tmp, args.smoke)))
        return 0

    bases = [b.strip() for b in args.bases.split(",") if b.strip()]
    bad = [b for b in bases if b not in BASES]
    if bad:
        raise SystemExit(f"--bases: unknown {bad}; choose from {BASES}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    runs = []
    for base in bases:
        cmd = [sys.executable, "-m", "benchmarks.bench_qlora_vs_lora", "--worker", base, "--model", args.model]
        if args.smoke:
            cmd.append("--smoke")
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            sys.stderr.write(done.stdout[-2000:] + done.stderr[-4000:])
            raise SystemExit(f"variant {base} failed (exit {done.returncode})")
        run = json.loads(lines[-1][len("RESULT "):])
        runs.append(run)
        m = run["memory"]
        print(f"{base:>5}: exact match {run['exact_match_before']:.3f} -> {run['exact_match_after']:.3f}  "
              f"loss {run['losses'][0]:.4f} -> {run['losses'][-1]:.4f}  base linear {m['base_linear'] / 2**20:.1f} MiB  "
              f"activations {m['activations'] / 2**20:.1f} MiB  peak RSS {run['peak_rss_mib']:.0f} MiB")
        out = write(runs, args)  # after every variant: a long run that is cut short keeps what it measured
    print(f"-> {out}")
    return 0


def write(runs: list[dict], args):
    from .harness import write_results

    rows = [to_record(run, args.model) for run in runs]
    out = write_results("qlora_vs_lora", rows, out_dir=args.out)
    render(rows, out)
    return out


def to_record(run: dict, model: str) -> dict:
    from .harness import record

    times = sorted(run["step_s"])
    med = statistics.median(times) * 1e3
    timing = {"median_ms": med, "p20_ms": times[len(times) // 5] * 1e3, "p80_ms": times[(4 * len(times)) // 5] * 1e3,
              "reps": len(times)}
    label = "QLoRA (nf4+dq)" if run["base"] == "nf4" else f"LoRA ({run['base']} base)"
    extra = {k: v for k, v in run.items() if k not in ("config", "base")}
    return record("finetune_step", label, (run["config"]["batch_size"], run["config"]["max_length"]), "float32", timing,
                  peak_mem_bytes=int(run["peak_rss_mib"] * 2**20), config={**run["config"], "model_spec": model},
                  base_weights=run["base"], paper_base_linear_bytes=paper_accounting(run)["base_linear"], **extra)


def render(rows: list[dict], json_path) -> None:
    """Markdown (quality and memory tables) and a PNG (loss curves, memory bars) from the rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mib = lambda b: b / 2**20  # noqa: E731
    base = os.path.splitext(os.fspath(json_path))[0]
    c = rows[0]["config"]
    lines = [
        f"`fourbit finetune` recipe on {c['model_spec']} (date task, {c['steps']} steps, batch {c['batch_size']}, r={c['r']}, "
        f"{c['optimizer']}, seed {c['seed']}); only the base weights differ. Exact match on {c['eval_examples']} held-out dates.",
        "",
        "| variant | exact match before | after | loss step 1 | last step | median step (s) | tokens/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['provider']} | {r['exact_match_before']:.3f} | {r['exact_match_after']:.3f} | {r['losses'][0]:.4f} | "
                     f"{r['losses'][-1]:.4f} | {r['median_ms'] / 1e3:.2f} | {r['tokens_per_s']:.0f} |")
    lines += ["", "Loss per step:", "", "| step | " + " | ".join(r["provider"] for r in rows) + " |",
              "|---:|" + "---:|" * len(rows)]
    for i in range(max(len(r["losses"]) for r in rows)):
        lines.append(f"| {i + 1} | " + " | ".join(f"{r['losses'][i]:.4f}" if i < len(r["losses"]) else "" for r in rows) + " |")
    lines += [
        "", "Memory (MiB), counted from the tensors; *paper* = linear weights x bits per weight from the QLoRA paper "
        "(NF4+DQ 4.127, bf16 16, fp32 32):", "",
        "| variant | base linear | paper | base other | adapter | gradients | optimizer | activations | sum | peak RSS | RSS at end |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    parts = ("base_linear", "base_other", "adapter", "gradients", "optimizer", "activations")
    for r in rows:
        m = r["memory"]
        lines.append(
            f"| {r['provider']} | {mib(m['base_linear']):.1f} | {mib(r['paper_base_linear_bytes']):.1f} | {mib(m['base_other']):.1f} | "
            f"{mib(m['adapter']):.1f} | {mib(m['gradients']):.1f} | {mib(m['optimizer']):.1f} | {mib(m['activations']):.1f} | "
            f"{mib(sum(m[k] for k in parts)):.1f} | {r['peak_rss_mib']:.0f} | {r['end_rss_mib']:.0f} |"
        )
    lines.append(f"\nVersions: {rows[0].get('versions')}; git {rows[0].get('git_sha')}.\n")
    with open(base + ".md.tmp", "w") as f:
        f.write("\n".join(lines))
    os.replace(base + ".md.tmp", base + ".md")

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        ax.plot(range(1, len(r["losses"]) + 1), r["losses"], marker=".",
                label=f"{r['provider']}: EM {r['exact_match_before']:.2f} -> {r['exact_match_after']:.2f}")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (answer tokens)")
    ax.set_title("same recipe, different base weights")
    ax.legend(fontsize=8)
    bottom = [0.0] * len(rows)
    for k in parts:
        vals = [mib(r["memory"][k]) for r in rows]
        bx.bar([r["provider"] for r in rows], vals, bottom=bottom, label=k.replace("_", " "))
        bottom = [b + v for b, v in zip(bottom, vals)]
    bx.set_ylabel("MiB")
    bx.set_title("memory by component")
    bx.legend(fontsize=8)
    bx.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    atomic_write(base + ".png", lambda tmp: fig.savefig(tmp, format="png", dpi=100))  # no half-written PNG
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
