"""The parts of a run's setup that `fourbit.plan` repeats on a model without memory, so that what it
plans is what `Trainer` does: the records, the autocast rule, LoRA and gradient checkpointing on the
loaded base, the optimizer.
"""

from __future__ import annotations

import torch

from ..errors import InvalidInput
from ..lora import add_lora, trainable_parameters
from . import optim
from .config import TrainConfig
from .data import read_jsonl
from .task import date_task

__all__ = ["build_optimizer", "prepare_model", "split_records", "use_checkpointing", "uses_autocast"]


def split_records(config: TrainConfig) -> tuple[list, list]:
    """(train, eval) records of the run: the embedded date task, or the JSONL file shuffled with the
    seed, its first min(eval_examples, 10 %) records held out."""
    if config.data == "dates":
        return date_task(n_eval=config.eval_examples)
    records = read_jsonl(config.data, on_bad_line=config.on_bad_line)
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(config.seed)).tolist()
    records = [records[i] for i in order]
    n_eval = min(config.eval_examples, len(records) // 10)
    return records[n_eval:], records[:n_eval]


def uses_autocast(config: TrainConfig, device: torch.device) -> bool:
    """bf16 autocast: asked for, or "auto" on CUDA."""
    return config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")


def prepare_model(model, config: TrainConfig) -> tuple[str, bool]:
    """What every run does to its loaded base before wrapping it: LoRA adapters (seeded), then
    gradient checkpointing when asked for or when the model is big. `fourbit.plan` calls it on a
    model without memory. Returns (the parameter summary line, whether checkpointing is on)."""
    torch.manual_seed(config.seed)  # the LoRA init must not depend on what loading consumed
    try:
        add_lora(model, r=config.r, alpha=config.alpha, dropout=config.dropout, target_modules=config.targets)
    except ValueError as err:  # --targets that this architecture does not have (the message lists its names)
        raise InvalidInput(f"--model {config.model}: {err}", "pass --targets with names of this model's linear layers") from None
    count = trainable_parameters(model)
    return str(count), use_checkpointing(model, config, count.total)


def use_checkpointing(model, config: TrainConfig, trainable: int) -> bool:
    """Gradient checkpointing when asked for, or under "auto" when the trainable parameters are many;
    turned on in the model here. Returns whether it is on."""
    on = config.grad_checkpointing == "on" or (config.grad_checkpointing == "auto" and trainable > config.checkpointing_above)
    if on:
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return on


def build_optimizer(config: TrainConfig, params):
    if config.optimizer == "torch_adamw":  # PyTorch's own, e.g. for parameters another engine shards
        return torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=config.weight_decay)
    cls = {
        "paged_adamw": optim.PagedAdamW,
        "adamw": optim.AdamW,
        "paged_adamw8bit": optim.PagedAdamW8bit,
        "adamw8bit": optim.AdamW8bit,
    }[config.optimizer]
    kwargs = dict(lr=config.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=config.weight_decay)
    if config.optimizer.startswith("paged") and config.paging_budget_mb is not None:
        kwargs["device_budget_bytes"] = int(config.paging_budget_mb * 2**20)
    return cls(params, **kwargs)
