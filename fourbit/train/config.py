"""TrainConfig: every knob of a QLoRA run in one frozen dataclass.

The CLI maps its flags one-to-one onto these fields (`fourbit finetune --lr 2e-4` sets `lr`), and
every checkpoint stores the config it ran with (`to_dict`), so a run can be reproduced and resumed.
The defaults are the main job: SmolLM2-135M-Instruct (embedded) on the embedded date task, sized to
finish on two CPU cores in a few minutes.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from ..errors import InvalidInput, Unavailable

__all__ = ["TrainConfig", "OPTIMIZERS", "SCHEDULES", "PRECISIONS", "BASE_WEIGHTS", "DEFAULT_TARGETS", "TORCHRUN_ENV"]

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

OPTIMIZERS = ("paged_adamw", "adamw", "paged_adamw8bit", "adamw8bit", "torch_adamw")
SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
CHECKPOINTING = ("auto", "on", "off")
# how the frozen base weights are held: NF4 + double quant (QLoRA), or dense (plain LoRA, for comparison)
BASE_WEIGHTS = ("nf4", "fp32", "bf16")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # what to train
    model: str = "smollm2"  # "smollm2" (embedded), a transformers directory, or a .gguf file
    data: str = "dates"  # "dates" (embedded task) or a JSONL file ({"prompt","response"} or {"messages"})
    output_dir: str = "runs/finetune"
    base_weights: str = "nf4"  # "nf4" (QLoRA) or a dense "fp32" / "bf16" base (plain LoRA)
    # LoRA
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    # optimisation
    lr: float = 1e-3
    schedule: str = "cosine"
    warmup: int = 2  # optimizer steps of linear warmup from 0
    steps: int = 12  # optimizer steps; 0 means "derive from epochs"
    epochs: float = 0.0  # used only when steps == 0
    batch_size: int = 8  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_length: int = 96  # tokens per example; longer ones are truncated (and counted)
    clip_norm: float = 1.0  # 0 disables clipping
    weight_decay: float = 0.0
    optimizer: str = "paged_adamw"
    paging_budget_mb: float | None = None  # device budget for paged optimizer states; None = all resident
    # numerics and memory
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    grad_checkpointing: str = "auto"  # auto: on for models above `checkpointing_above` parameters
    checkpointing_above: int = 500_000_000
    device: str = "auto"  # auto: cuda if available, else cpu
    distributed: str = "none"  # "ddp" or "fsdp" under torchrun (see docs/distributed.md)
    # bookkeeping
    seed: int = 0
    eval_interval: int = 0  # optimizer steps between exact-match evaluations; 0 = only before and after
    eval_examples: int = 48
    checkpoint_interval: int = 0  # optimizer steps between checkpoints; 0 = only at the end
    on_bad_line: str = "stop"  # "stop" or "skip" a JSONL line without the expected fields

    def __post_init__(self):
        def need(ok: bool, message: str):
            if not ok:
                flag = message.split(" ", 1)[0].replace("_", "-")
                raise InvalidInput(message, f"pass a valid --{flag} (fourbit finetune --help lists the defaults)")

        for f in dataclasses.fields(self):  # inf/NaN pass every range check below, then wreck the run
            value = getattr(self, f.name)
            need(not isinstance(value, float) or math.isfinite(value), f"{f.name} must be a finite number, got {value}")

        need(self.base_weights in BASE_WEIGHTS, f"base_weights must be one of {BASE_WEIGHTS}, got {self.base_weights!r}")
        need(self.r > 0, f"r must be a positive integer, got {self.r}")
        need(self.alpha > 0, f"alpha must be > 0, got {self.alpha}")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        need(len(self.targets) > 0, "targets must name at least one module (e.g. q_proj)")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        need(self.warmup >= 0, f"warmup must be >= 0 steps, got {self.warmup}")
        need(self.steps >= 0, f"steps must be >= 0, got {self.steps}")
        need(self.steps > 0 or self.epochs > 0, "steps must be > 0, or 0 with epochs > 0")
        need(self.batch_size > 0, f"batch_size must be > 0, got {self.batch_size}")
        need(self.grad_accum > 0, f"grad_accum must be > 0, got {self.grad_accum}")
        need(self.max_length >= 8, f"max_length must be >= 8 tokens, got {self.max_length}")
        need(self.clip_norm >= 0, f"clip_norm must be >= 0 (0 disables clipping), got {self.clip_norm}")
        need(self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        need(
            self.paging_budget_mb is None or self.paging_budget_mb > 0,
            f"paging_budget_mb must be > 0 or None, got {self.paging_budget_mb}",
        )
        need(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        need(
            self.grad_checkpointing in CHECKPOINTING,
            f"grad_checkpointing must be one of {CHECKPOINTING}, got {self.grad_checkpointing!r}",
        )
        need(
            self.distributed in ("none", "ddp", "fsdp"),
            f"distributed must be 'none', 'ddp' or 'fsdp', got {self.distributed!r}",
        )
        need(self.eval_interval >= 0, f"eval_interval must be >= 0, got {self.eval_interval}")
        need(self.eval_examples > 0, f"eval_examples must be > 0, got {self.eval_examples}")
        need(self.checkpoint_interval >= 0, f"checkpoint_interval must be >= 0, got {self.checkpoint_interval}")
        need(self.on_bad_line in ("stop", "skip"), f"on_bad_line must be 'stop' or 'skip', got {self.on_bad_line!r}")

    def check_environment(self) -> None:
        """Unavailable when this process cannot run the config as asked: a CUDA device without CUDA,
        or --distributed outside torchrun. Checked before anything is loaded or deleted."""
        import torch

        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise Unavailable(
                f"device {self.device!r} asked for, but CUDA is not available to this process",
                "use --device cpu (or auto), or run where torch sees a GPU",
            )
        missing = [k for k in TORCHRUN_ENV if k not in os.environ]
        if self.distributed != "none" and missing:
            raise Unavailable(
                f"--distributed {self.distributed} needs the torchrun environment, but {missing} are not set",
                f"launch with `torchrun --nproc_per_node N -m fourbit.cli finetune --distributed {self.distributed} ...`",
            )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InvalidInput(f"unknown TrainConfig fields {unknown}", f"use the known fields {sorted(known)}")
        d = dict(d)
        if "targets" in d:
            d["targets"] = tuple(d["targets"])
        return cls(**d)
