"""Model surgery: swap nn.Linear for Linear4bit, wrap targets in LoRALinear, count parameters.

Works on any nn.Module (transformers' LlamaForCausalLM included): modules are found by their
qualified names from `named_modules()` and replaced on their parent with setattr.

Names match the way PEFT matches `target_modules`: an entry t selects the module called `name` when
name == t or name ends with "." + t; so "q_proj" selects "model.layers.3.self_attn.q_proj".
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterable

import torch
from torch import nn

from .layers import Linear4bit
from .lora_linear import LoRALinear, check_lora_args

__all__ = [
    "ParameterCount",
    "adapters_disabled",
    "add_lora",
    "lora_layers",
    "name_matches",
    "quantize_model",
    "trainable_parameters",
]

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def name_matches(name: str, patterns: Iterable[str]) -> bool:
    """True if `name` is one of `patterns` or ends with "." + one of them."""
    return any(name == p or name.endswith("." + p) for p in patterns)


def _as_tuple(patterns, what: str) -> tuple[str, ...]:
    if isinstance(patterns, str):
        patterns = (patterns,)
    patterns = tuple(patterns)
    if not all(isinstance(p, str) and p for p in patterns):
        raise TypeError(f"{what} must be module names (non-empty strings), got {patterns!r}")
    return patterns


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize_model(
    model: nn.Module,
    *,
    skip: Iterable[str] = ("lm_head",),
    quant_type: str = "nf4",
    double_quant: bool = True,
    blocksize: int = 64,
    compute_dtype: torch.dtype | None = None,
    quant_storage: torch.dtype = torch.uint8,
) -> nn.Module:
    """Replace every nn.Linear (except names matched by `skip`) with a Linear4bit, in place.

    Layer by layer: each dense weight is quantized, the module swapped, and the dense layer dropped
    before the next one, so peak memory stays about one dense layer above the quantized model
    (provided the caller holds no other reference to the dense layers). A module registered under
    two names is quantized once and both names point at the same Linear4bit.

    A model without weights yet (built on "meta", e.g. under `accelerate.init_empty_weights()`, as
    bitsandbytes' `replace_with_bnb_linear` accepts) gets lazy Linear4bit layers on "meta": each
    quantizes when its weight arrives, by `load_state_dict(dense_checkpoint, assign=True)` or by
    `to_empty(device=...)` then `load_state_dict`, giving the bytes that quantizing the loaded dense
    model gives (the checkpoint's weight is cast to the layer's dtype first, as nn.Linear's load does). Sets
    `model.is_loaded_in_4bit = True` (as transformers does for a 4-bit load) when anything was
    quantized. Returns `model`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_model needs an nn.Module, got {type(model).__name__}")
    skip = _as_tuple(skip, "skip")
    names = [
        name
        for name, module in model.named_modules(remove_duplicate=False)
        if type(module) is nn.Linear and name and not name_matches(name, skip)
    ]
    done: dict[int, Linear4bit] = {}
    for name in names:
        dense = model.get_submodule(name)
        settings = dict(quant_type=quant_type, double_quant=double_quant, blocksize=blocksize,
                        compute_dtype=compute_dtype, quant_storage=quant_storage)
        if id(dense) in done:
            pass
        elif dense.weight.is_meta:
            done[id(dense)] = _lazy(dense, settings)
        else:
            done[id(dense)] = Linear4bit.from_linear(dense, **settings)
        _replace(model, name, done[id(dense)])
        del dense
    if done:
        model.is_loaded_in_4bit = True  # the flag PEFT's prepare_model_for_kbit_training and TRL read
    return model


def _lazy(dense: nn.Linear, settings: dict) -> Linear4bit:
    """A Linear4bit on "meta" that quantizes when a checkpoint is loaded into it; the bias is shared."""
    layer = Linear4bit(dense.in_features, dense.out_features, bias=False, device="meta", dtype=dense.weight.dtype, **settings)
    if dense.bias is not None:
        layer.bias = dense.bias
    return layer


def add_lora(
    model: nn.Module,
    *,
    r: int = 16,
    alpha: float = 16,
    dropout: float = 0.0,
    target_modules: Iterable[str] = DEFAULT_TARGETS,
    use_rslora: bool = False,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Wrap every Linear4bit / nn.Linear whose name matches `target_modules` in a LoRALinear,
    freeze every other parameter, and return `model` (changed in place).

    After this call the only parameters with requires_grad=True are the lora_A / lora_B weights.
    Raises ValueError if nothing matches (listing the module names seen) or if a target is not a
    linear layer or is already wrapped.
    """
    check_lora_args(r, alpha, dropout)
    targets = _as_tuple(target_modules, "target_modules")
    matched = [name for name, module in model.named_modules() if name and name_matches(name, targets)]
    if not matched:
        seen = sorted({name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name})
        raise ValueError(f"target_modules {list(targets)} match no module; module names seen (last component): {seen}")
    for name in matched:
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            raise ValueError(f"{name} already has a LoRA adapter; add_lora was called twice on this model")
        if not isinstance(module, (Linear4bit, nn.Linear)):
            raise ValueError(f"{name} matches target_modules but is a {type(module).__name__}, not a linear layer")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in matched:
        base = model.get_submodule(name)
        _replace(model, name, LoRALinear(base, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, dtype=dtype))
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Qualified name -> LoRALinear, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Context in which every LoRALinear of `model` computes its base layer only (evaluation of the
    base model; PEFT's `disable_adapter()`). Each layer's previous state is restored on exit."""
    with contextlib.ExitStack() as stack:
        for layer in lora_layers(model).values():
            stack.enter_context(layer.disabled())
        yield model


@dataclasses.dataclass(frozen=True)
class ParameterCount:
    """Trainable and total parameter counts; a 4-bit weight counts as its N*K logical weights."""

    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || trainable%: {100 * self.fraction:.4f}"


def trainable_parameters(model: nn.Module) -> ParameterCount:
    """Count parameters like PEFT's `print_trainable_parameters` (str() gives its line).

    Packed 4-bit weights are counted as the weights they stand for (N*K), not as stored bytes.
    """
    logical = {id(m.weight): m.out_features * m.in_features for m in model.modules() if isinstance(m, Linear4bit)}
    trainable = total = 0
    for p in model.parameters():
        n = logical.get(id(p), p.numel())
        total += n
        if p.requires_grad:
            trainable += n
    return ParameterCount(trainable=trainable, total=total)
