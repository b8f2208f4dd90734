"""LoRA adapter files in PEFT's format, so PEFT loads ours and we load PEFT's.

A directory holds two files (PEFT 0.21 `save_pretrained` layout):
    adapter_model.safetensors   "base_model.model.<module>.lora_A.weight"  (r, K)
                                "base_model.model.<module>.lora_B.weight"  (N, r)
                                where <module> is the qualified name of the wrapped layer in the
                                base model ("model.layers.0.self_attn.q_proj" for a Llama);
                                metadata {"format": "pt", "base_model_type": <config.model_type>}
    adapter_config.json         peft_type "LORA", r, lora_alpha, lora_dropout, use_rslora,
                                target_modules, task_type, ... (PEFT fills fields we omit with
                                its defaults)

The "base_model_type" metadata entry is ours (PEFT ignores safetensors metadata); it lets
`load_adapter` refuse an adapter trained for another architecture. Both files are written
atomically.
"""

from __future__ import annotations

import json
import os

import safetensors
import torch
from torch import nn

from ..errors import BadFile, InvalidInput, MissingFile, output_error
from ..nf4.files import atomic_write, safetensors_bytes, write_bytes
from .layers import Linear4bit
from .lora_linear import LoRALinear, check_lora_args
from .surgery import lora_layers

__all__ = ["save_adapter", "load_adapter", "WEIGHTS_NAME", "CONFIG_NAME"]

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
_PREFIX = "base_model.model."
_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def _uniform(layers: dict[str, LoRALinear], attr: str):
    values = {name: getattr(m, attr) for name, m in layers.items()}
    distinct = set(values.values())
    if len(distinct) != 1:
        raise InvalidInput(f"LoRA layers disagree on {attr} ({values}); one adapter file needs a single value")
    return distinct.pop()


def save_adapter(model: nn.Module, directory: str | os.PathLike, *, base_model_name_or_path: str | None = None) -> None:
    """Write the LoRA weights of `model` and a PEFT adapter_config.json into `directory`."""
    layers = lora_layers(model)
    if not layers:
        raise InvalidInput("model has no LoRALinear layers; call add_lora(model, ...) first")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as err:
        raise output_error(directory, err) from err
    tensors = {}
    for name, layer in layers.items():
        tensors[_PREFIX + name + ".lora_A.weight"] = layer.lora_A.weight.detach().contiguous().cpu()  # (r, K)
        tensors[_PREFIX + name + ".lora_B.weight"] = layer.lora_B.weight.detach().contiguous().cpu()  # (N, r)
    dropout = {m.dropout.p if isinstance(m.dropout, nn.Dropout) else 0.0 for m in layers.values()}
    if len(dropout) != 1:
        raise InvalidInput(f"LoRA layers disagree on dropout ({sorted(dropout)}); one adapter file needs a single value")
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": _uniform(layers, "r"),
        "lora_alpha": _uniform(layers, "alpha"),
        "lora_dropout": dropout.pop(),
        "use_rslora": _uniform(layers, "use_rslora"),
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in layers}),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    metadata = {"format": "pt"}
    if _model_type(model) is not None:
        metadata["base_model_type"] = _model_type(model)
    write_bytes(os.path.join(directory, WEIGHTS_NAME), safetensors_bytes(tensors, metadata))
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"

    def write_config(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(os.path.join(directory, CONFIG_NAME), write_config)


def read_adapter_config(directory: str | os.PathLike) -> dict:
    """adapter_config.json of an adapter directory, checked; errors name the file and the fix."""
    directory = os.fspath(directory)
    if os.path.isfile(directory):
        raise InvalidInput(
            f"{directory} is a file; an adapter is a directory holding {CONFIG_NAME} and {WEIGHTS_NAME}",
            f"pass the directory that contains it ({os.path.dirname(directory) or '.'})",
        )
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.exists(path):
        raise MissingFile(
            f"{path} not found: an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}",
            "pass the adapter directory a run wrote (e.g. runs/finetune/adapter)",
        )
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadFile(f"{path} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise BadFile(f"{path} holds a JSON {type(config).__name__}, not an object")
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise BadFile(f"{path}: base_model_name_or_path is a JSON {type(base).__name__}, not a string (a model path or name)")
    if config.get("peft_type") != "LORA":
        raise InvalidInput(f"{path}: peft_type is {config.get('peft_type')!r}; only 'LORA' adapters can be loaded")
    unsupported = {
        "use_dora": (config.get("use_dora", False), False),
        "bias": (config.get("bias", "none"), "none"),
        "fan_in_fan_out": (config.get("fan_in_fan_out", False), False),
        "modules_to_save": (config.get("modules_to_save") or None, None),
        "rank_pattern": (config.get("rank_pattern") or {}, {}),
        "alpha_pattern": (config.get("alpha_pattern") or {}, {}),
    }
    for field, (value, supported) in unsupported.items():
        if value != supported:
            raise InvalidInput(f"{path}: {field}={value!r} is not supported (only {supported!r})")
    check_lora_args(config.get("r"), config.get("lora_alpha"), config.get("lora_dropout", 0.0))
    return config


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a PEFT LoRA adapter (ours or PEFT's) into `model` in place and return it.

    Layers the adapter names that are not yet wrapped are wrapped in LoRALinear with the file's r,
    alpha, dropout and rsLoRA setting (every other parameter is then frozen, as `add_lora` does);
    already wrapped layers must have the file's rank, and take its alpha and scaling.
    Errors name the first key whose module is missing or whose shape or rank does not match.
    """
    directory = os.fspath(directory)
    config = read_adapter_config(directory)
    r, alpha = config["r"], config["lora_alpha"]
    dropout, use_rslora = config.get("lora_dropout", 0.0), bool(config.get("use_rslora", False))
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.exists(path):
        raise MissingFile(f"{path} not found", "adapters saved as adapter_model.bin are not supported: re-save with safetensors")
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            keys = list(f.keys())
            tensors = {k: f.get_tensor(k) for k in keys}
    except safetensors.SafetensorError as err:  # empty, truncated or not safetensors at all
        raise BadFile(f"{path} is not a readable safetensors file ({err})") from None
    saved_type, model_type = metadata.get("base_model_type"), _model_type(model)
    if saved_type is not None and model_type is not None and saved_type != model_type:
        raise InvalidInput(f"{path} was saved from a {saved_type!r} model; this model is {model_type!r}")

    plan: dict[str, dict[str, torch.Tensor]] = {}
    for key in keys:
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if not key.startswith(_PREFIX) or suffix is None:
            raise InvalidInput(f"{path}: key {key!r} is not '{_PREFIX}<module>.lora_A.weight' or '.lora_B.weight'")
        name = key[len(_PREFIX) : -len(suffix)]
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise InvalidInput(f"{path}: key {key!r} names module {name!r}, which this model does not have") from None
        base = module.base if isinstance(module, LoRALinear) else module
        if not isinstance(base, (Linear4bit, nn.Linear)):
            raise InvalidInput(f"{path}: key {key!r} names {name!r}, a {type(base).__name__}, not a linear layer")
        if isinstance(module, LoRALinear) and module.r != r:
            raise InvalidInput(f"{path}: key {key!r}: the model's layer has rank {module.r}, the adapter has r={r}")
        expected = (r, base.in_features) if suffix == ".lora_A.weight" else (base.out_features, r)
        if tuple(tensors[key].shape) != expected:
            raise InvalidInput(f"{path}: key {key!r} has shape {tuple(tensors[key].shape)}, this model needs {expected}")
        plan.setdefault(name, {})[suffix] = tensors[key]
    for name, pair in plan.items():
        if len(pair) != 2:
            raise InvalidInput(f"{path}: module {name!r} has {sorted(pair)} but needs both lora_A and lora_B")
    missing = sorted(set(lora_layers(model)) - set(plan))
    if missing:
        raise InvalidInput(f"{path} has no weights for the model's LoRA layers {missing[:4]}{' ...' if len(missing) > 4 else ''}")

    if any(not isinstance(model.get_submodule(name), LoRALinear) for name in plan):
        for p in model.parameters():
            p.requires_grad_(False)
    for name, pair in plan.items():
        layer = model.get_submodule(name)
        if not isinstance(layer, LoRALinear):
            layer = LoRALinear(layer, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        layer.set_alpha(alpha, use_rslora=use_rslora)
        layer.set_dropout(dropout)
        with torch.no_grad():
            layer.lora_A.weight.copy_(pair[".lora_A.weight"])
            layer.lora_B.weight.copy_(pair[".lora_B.weight"])
    return model
