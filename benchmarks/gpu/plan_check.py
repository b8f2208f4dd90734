"""The GPU session's "plan" stage: `fourbit plan` against torch.cuda.max_memory_allocated.

    python -m benchmarks.gpu.plan_check --out OUT [--dry-run]

A Llama-3-8B-shaped model (its published dimensions, 4 decoder layers: the whole vocabulary and
every layer shape, at a size that builds in seconds), random weights quantized to NF4 on the GPU,
LoRA r = 16 on every projection, paged AdamW, batch 1 x 2048 tokens, bf16 autocast: the optimizer
step of `fourbit finetune` (Trainer.step_on, three steps, so the states exist during the last ones),
measured by the caching allocator's peak. The plan is made twice: traced on fake CUDA tensors (what
`fourbit plan` does on a GPU machine) and traced on the CPU with CUDA's rules (what it does on a
machine without one). The dry run does the same on the CPU with a 2-layer model, measured by the
profiler's allocator events (benchmarks.bench_plan).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from benchmarks.bench_plan import measure_step
from benchmarks.gpu.common import append_line
from fourbit.plan import Target, plan
from fourbit.plan.source import ModelSource
from fourbit.plan.presets import preset_config
from fourbit.train.config import TrainConfig
from fourbit.train.data import IGNORE

STAGE = "plan"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu.plan_check")
    parser.add_argument("--out", required=True)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    if args.dry_run:
        import transformers

        hf = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=512)
        source, tokens, name = ModelSource("tiny", hf, None, None, True), 64, "tiny-llama 2 layers"
    else:
        source, tokens, name = ModelSource("llama-3-8b:4", preset_config("llama-3-8b", layers=4), None, None, True), 2048, \
            "llama-3-8b shaped, 4 layers"
    config = TrainConfig(model=source.name, batch_size=1, max_length=tokens, r=16, optimizer="paged_adamw")
    rows = [[(7 * i) % 500 + 1 for i in range(tokens)]]
    labels = [[IGNORE] + r[1:] for r in rows]  # every position but the first: as measure_step trains
    device = "cpu" if args.dry_run else "cuda"
    capacity = torch.cuda.get_device_properties(0).total_memory if device == "cuda" else 2**40
    target = Target(f"{device} ({capacity / 2**30:.1f} GiB)", device, capacity)
    plans = {}
    for how in (["cuda", "cpu"] if device == "cuda" else ["cpu"]):
        t0 = time.perf_counter()
        p = plan(config, target=target, suggest=False, source=source, _batches=(rows, labels, [], []),
                 _trace_on=how)
        plans[how] = p
        append_line(args.out, STAGE, "fact", f"planned peak, traced on {how}", value=p.peak, where=p.where,
                    breakdown=p.breakdown, seconds=round(time.perf_counter() - t0, 2), model=name)
    measured, by = measure_step(config, source, rows, steps=3, device=device)
    append_line(args.out, STAGE, "fact", "measured peak", value=measured, measured_by=by, model=name)
    for how, p in plans.items():
        error = (p.peak - measured) / measured
        append_line(args.out, STAGE, "check", f"plan within 3 % of the measured peak (traced on {how})",
                    ok=abs(error) <= 0.03, required=False, error=round(error, 5), predicted=p.peak, measured=measured)
    return 0


if __name__ == "__main__":
    sys.exit(main())
