"""fourbit.plan: the peak memory of a QLoRA run, known before the run starts.

    fourbit plan --model llama-3-8b --max-length 2048 --gpu 4090        # will it fit? what to change?
    fourbit plan --model llama-65b --r 64 --grad-checkpointing on --batch-size 1 --compare

    from fourbit.plan import plan, gpu_target
    p = plan(TrainConfig(...), target=gpu_target("H100"))
    p.peak, p.where, p.breakdown, p.fits, p.suggestions

The run `fourbit finetune` would do with the same TrainConfig is built on fake tensors (sizes, no
memory) and its evaluation and optimizer step are traced while a dispatch mode counts the bytes of
every live tensor. The package sits above fourbit.train in the import order (it runs the Trainer's
own step) and below the CLI; docs/plan.md explains how to read a plan.

    tracker   LiveBytes: live storage bytes by category, the peak and where it happened
    trace     the model built as finetune builds it, on fake tensors; the traced eval and step
    ops       what fourbit's matmul ops allocate inside (the reference's decode, Triton's workspace)
    states    optimizer state bytes from the layouts (GPU plans)
    source    --model without weights: presets, the embedded SmolLM2, directories, GGUF files
    presets   published architecture dimensions (LLaMA 7B-65B, Llama 2/3, Mistral, SmolLM2)
    gpus      --gpu / --gpu-memory / this machine
    planner   plan(), compare(), the verdict and the changes that make a run fit
    gate      what `fourbit finetune` checks before it loads anything
    report    the terminal table, JSON, PNG

The names below load their module on first use, so `fourbit --help` does not import torch.
"""

import importlib

_NAMES = {
    "GPUS": "gpus", "Target": "gpus", "gpu_target": "gpus", "local_target": "gpus", "memory_target": "gpus",
    "parse_size": "gpus", "MODES": "planner", "Plan": "planner", "Suggestion": "planner", "compare": "planner",
    "plan": "planner", "PRESETS": "presets",
}
__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name not in _NAMES:
        raise AttributeError(f"module 'fourbit.plan' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
