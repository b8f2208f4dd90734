"""transformers, unchanged except the config: `from_pretrained(..., quantization_config=FourbitConfig(...))`.

    from fourbit import FourbitConfig
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=FourbitConfig(quant_type="nf4", double_quant=True, compute_dtype=torch.bfloat16))
    model.save_pretrained(out)       # bitsandbytes' keys and config: transformers + bitsandbytes load it

How it plugs in. transformers 5 keeps two registries, quant_method -> config class and
quant_method -> `HfQuantizer`; `register_quantization_config("fourbit")` / `register_quantizer("fourbit")`
add ours. The quantizer does what transformers' bitsandbytes quantizer does, with fourbit's layer:
  * before loading, every `nn.Linear` but the skipped ones (lm_head, tied and fp32-kept modules, as
    for bitsandbytes) becomes a `fourbit.nn.Linear4bit` built on the meta device (no memory, no
    quantizing of a random init);
  * while loading a dense checkpoint, transformers hands each weight to our quantize op one at a
    time (it loads synchronously whenever a quantizer quantizes on the fly), so the peak is the
    quantized model plus one dense weight, never the dense model;
  * a 4-bit checkpoint (bitsandbytes' keys: weight, weight.absmax, weight.quant_map,
    weight.nested_absmax, weight.nested_quant_map, weight.quant_state.bitsandbytes__nf4) goes
    through our deserialize op, which rebuilds the weight bit for bit;
  * afterwards `model.is_loaded_in_4bit = True` and `model.hf_quantizer` is set, so `Trainer`,
    PEFT's `prepare_model_for_kbit_training` and TRL treat the model as a 4-bit one; the PEFT layer
    of `fourbit.integrations.peft` is installed when PEFT is importable.

Checkpoints are bitsandbytes': `FourbitConfig.to_dict()` writes bitsandbytes' `quantization_config`
(quant_method "bitsandbytes", load_in_4bit, bnb_4bit_*), and the layers write bitsandbytes' keys.
Such a directory (or one bitsandbytes wrote) loads back through `FourbitConfig`: transformers would
refuse a config class that differs from the stored one, so importing this module wraps
`AutoHfQuantizer.merge_quantization_configs` to accept a FourbitConfig for a stored bitsandbytes
4-bit config. The format (quant type, double quantization, storage, skipped modules) then comes from
the checkpoint, the compute dtype from the FourbitConfig passed in.

Importing this module also replaces `PreTrainedModel.num_parameters` by a version that counts a
fourbit weight as the weights it holds: transformers' own imports bitsandbytes for any model with
`is_loaded_in_4bit`, and `Trainer` calls it every step (a FLOP estimate), so without this a
`Trainer` run fails where bitsandbytes is not installed. Other models get transformers' count.

`use_for_bitsandbytes_config()` points transformers' "bitsandbytes_4bit" quantizer at ours, so code
that passes `BitsAndBytesConfig(load_in_4bit=True, ...)` (or loads a bitsandbytes 4-bit checkpoint)
runs on fourbit; 8-bit configs stay with bitsandbytes.

Not supported (a clear error or bitsandbytes' behaviour, not fourbit's): `Conv1D` models (GPT-2),
disk offload of quantized layers, 8-bit.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import BitsAndBytesConfig, PreTrainedModel
from transformers.quantizers import auto as _auto
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name, should_convert_module
from transformers.utils.quantization_config import QuantizationConfigMixin

from .. import dispatch
from ..functional import QuantState
from ..lora.layers import Linear4bit as _BaseLinear4bit
from ..lora.params import Params4bit as _Params4bit
from ..nf4.checks import check_blocksize, check_quant_type
from ..nn import Linear4bit, Params4bit

try:  # transformers' base class for load-time ops; the import path is stable across 5.x
    from transformers.core_model_loading import ConversionOps
except ImportError:  # pragma: no cover - transformers < 5 has no such module; pyproject pins >= 5
    ConversionOps = object

__all__ = ["FourbitConfig", "FourbitHfQuantizer", "use_for_bitsandbytes_config"]

QUANT_METHOD = "fourbit"
_COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_STORAGE_DTYPES = (torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.float32, torch.float64)
_SERIALIZED = [
    "weight",
    "weight.absmax",
    "weight.quant_map",
    "weight.nested_absmax",
    "weight.nested_quant_map",
    "weight.quant_state.bitsandbytes__nf4",
    "weight.quant_state.bitsandbytes__fp4",
]


def _dtype(value, what: str, allowed) -> torch.dtype | None:
    """A torch dtype from a dtype or its name ("bfloat16", "torch.bfloat16"); ValueError otherwise."""
    if value is None or isinstance(value, torch.dtype):
        dtype = value
    elif isinstance(value, str):
        dtype = getattr(torch, value.removeprefix("torch."), None)
    else:
        dtype = "?"
    if dtype is not None and dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise ValueError(f"{what} must be one of {names}, got {value!r}")
    return dtype


class FourbitConfig(QuantizationConfigMixin):
    """What `from_pretrained(..., quantization_config=FourbitConfig(...))` quantizes to.

    quant_type      "nf4" (QLoRA) or "fp4"
    double_quant    quantize the block scales again (4.127 instead of 4.5 bits per weight)
    compute_dtype   dtype of the matmul (None: the input's dtype); float32, float16 or bfloat16
    blocksize       weights per absmax block (64, as bitsandbytes under transformers)
    quant_storage   dtype the packed bytes are viewed as (uint8; bfloat16 for FSDP with bf16 models)
    skip_modules    module names kept dense; None keeps transformers' default (lm_head, tied weights)
    """

    def __init__(
        self,
        quant_type: str = "nf4",
        double_quant: bool = True,
        compute_dtype: torch.dtype | str | None = None,
        blocksize: int = 64,
        quant_storage: torch.dtype | str = torch.uint8,
        skip_modules: list[str] | None = None,
        **kwargs,
    ):
        unknown = sorted(set(kwargs) - {"quant_method"})
        if unknown:
            raise ValueError(f"FourbitConfig got unknown arguments {unknown}; see help(FourbitConfig)")
        self.quant_method = QUANT_METHOD
        check_quant_type(quant_type)
        check_blocksize(blocksize)
        if not isinstance(double_quant, bool):
            raise ValueError(f"double_quant must be True or False, got {double_quant!r}")
        if skip_modules is not None and (isinstance(skip_modules, str) or not all(isinstance(m, str) for m in skip_modules)):
            raise ValueError(f"skip_modules must be a list of module names, got {skip_modules!r}")
        self.quant_type = quant_type
        self.double_quant = double_quant
        self.compute_dtype = _dtype(compute_dtype, "compute_dtype", _COMPUTE_DTYPES)
        self.blocksize = blocksize
        self.quant_storage = _dtype(quant_storage, "quant_storage", _STORAGE_DTYPES)
        self.skip_modules = None if skip_modules is None else list(skip_modules)

    @classmethod
    def from_bitsandbytes(cls, config, compute_dtype=...) -> "FourbitConfig":
        """The same format from a `BitsAndBytesConfig` or its dict (`config.json`'s quantization_config).
        Pass `compute_dtype` to override the stored one."""
        d = config.to_dict() if isinstance(config, QuantizationConfigMixin) else dict(config)
        if not d.get("load_in_4bit", False):
            raise ValueError(
                "fourbit handles 4-bit bitsandbytes configs only (load_in_4bit=True); this one is "
                + ("8-bit" if d.get("load_in_8bit") else f"{d.get('quant_method')!r} without load_in_4bit")
            )
        return cls(
            quant_type=d.get("bnb_4bit_quant_type", "fp4"),
            double_quant=bool(d.get("bnb_4bit_use_double_quant", False)),
            compute_dtype=d.get("bnb_4bit_compute_dtype") if compute_dtype is ... else compute_dtype,
            quant_storage=d.get("bnb_4bit_quant_storage") or torch.uint8,
            skip_modules=d.get("llm_int8_skip_modules"),
        )

    @classmethod
    def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
        """Also reads the bitsandbytes-style dict that `to_dict` writes."""
        if config_dict.get("quant_method") == "bitsandbytes" or "load_in_4bit" in config_dict:
            config = cls.from_bitsandbytes(config_dict)
            unused = {k: v for k, v in kwargs.items() if not hasattr(config, k)}
            config.update(**kwargs)
            return (config, unused) if return_unused_kwargs else config
        return super().from_dict(config_dict, return_unused_kwargs, **kwargs)

    def to_dict(self) -> dict:
        """bitsandbytes' `quantization_config`, so the saved directory loads with bitsandbytes too.
        (bitsandbytes under transformers always uses blocksize 64; a checkpoint with another
        blocksize carries it in each weight's quant_state entry, which bitsandbytes reads.)"""
        return {
            "quant_method": "bitsandbytes",
            "load_in_4bit": True,
            "load_in_8bit": False,
            "bnb_4bit_quant_type": self.quant_type,
            "bnb_4bit_use_double_quant": self.double_quant,
            "bnb_4bit_compute_dtype": str(self.compute_dtype or torch.float32).removeprefix("torch."),
            "bnb_4bit_quant_storage": str(self.quant_storage).removeprefix("torch."),
            "llm_int8_skip_modules": self.skip_modules,
            "llm_int8_threshold": 6.0,
            "llm_int8_has_fp16_weight": False,
            "llm_int8_enable_fp32_cpu_offload": False,
        }

    def __repr__(self):
        return (
            f"FourbitConfig(quant_type={self.quant_type!r}, double_quant={self.double_quant}, "
            f"compute_dtype={self.compute_dtype}, blocksize={self.blocksize}, quant_storage={self.quant_storage}, "
            f"skip_modules={self.skip_modules})"
        )


class FourbitQuantize(ConversionOps):
    """Load-time op: one dense checkpoint weight -> a quantized Params4bit on the same device."""

    def __init__(self, hf_quantizer):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, full_layer_name=None, model=None, **kwargs):
        config = self.hf_quantizer.quantization_config
        result = {}
        for name, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            module, _ = get_module_from_name(model, name)
            packed, state = dispatch.quantize(
                value.detach(),
                blocksize=config.blocksize,
                quant_type=config.quant_type,
                double_quant=config.double_quant,
                quant_storage=config.quant_storage,
            )
            param = Params4bit(
                packed,
                requires_grad=False,
                quant_state=QuantState.adopt(state),
                blocksize=config.blocksize,
                compress_statistics=config.double_quant,
                quant_type=config.quant_type,
                quant_storage=packed.dtype,
                module=module,
                bnb_quantized=True,
            )
            module._is_hf_initialized = True
            result[name] = param
        return result


class FourbitDeserialize(ConversionOps):
    """Load-time op: a checkpoint's packed weight and its quant-state entries -> a Params4bit."""

    def __init__(self, hf_quantizer):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, model=None, full_layer_name=None, **kwargs):
        if len(input_dict) == 1:  # a plain weight without quant-state entries: left to transformers
            return input_dict
        tensors = {k: v[0] if isinstance(v, list) else v for k, v in input_dict.items()}
        weight = tensors.pop("weight")
        module, _ = get_module_from_name(model, full_layer_name)
        param = Params4bit.from_prequantized(weight, tensors, device=weight.device, module=module)
        module._is_hf_initialized = True
        return {"weight": param}


def release_checkpoint_mapping(model: nn.Module) -> None:
    """Copy the dense tensors outside the Linear4bit layers into ordinary memory.

    transformers may hand out tensors that are views of the memory-mapped safetensors file; while
    one of them (the embedding, a norm) lives, the whole mapping stays, and every page of it read
    while loading counts in the process's RSS. Measured for SmolLM2-135M: file-backed RSS after
    loading 581 -> 176 MiB (dense load + quantize_model), USS after a FourbitConfig load 816 -> 518 MiB."""
    seen: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, _BaseLinear4bit):
                continue
            for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                if id(tensor) not in seen:
                    seen.add(id(tensor))
                    tensor.data = tensor.data.clone()


def replace_linear_layers(model: nn.Module, config: FourbitConfig, skip: list[str] | None) -> int:
    """Swap every plain nn.Linear not matched by `skip` for a meta-device fourbit Linear4bit; returns
    how many were swapped. The new layers hold no memory until their weights are loaded."""
    count = 0
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or not should_convert_module(name, skip):
            continue
        with torch.device("meta"):
            layer = Linear4bit(
                module.in_features,
                module.out_features,
                module.bias is not None,
                compute_dtype=config.compute_dtype,
                compress_statistics=config.double_quant,
                quant_type=config.quant_type,
                quant_storage=config.quant_storage,
            )
        layer.requires_grad_(False)
        model.set_submodule(name, layer)
        count += 1
    return count


class FourbitHfQuantizer(HfQuantizer):
    """transformers' quantizer interface over fourbit's Linear4bit (see the module docstring)."""

    requires_calibration = False
    serialized_names = {"weight": _SERIALIZED}

    def __init__(self, quantization_config, **kwargs):
        if isinstance(quantization_config, BitsAndBytesConfig):  # through use_for_bitsandbytes_config()
            quantization_config = FourbitConfig.from_bitsandbytes(quantization_config)
        super().__init__(quantization_config, **kwargs)

    @property
    def quantized_element_size(self) -> float:
        return 0.5

    def validate_environment(self, *args, **kwargs):
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("fourbit keeps 4-bit layers on a device; a device_map with 'disk' entries is not supported")

    def update_device_map(self, device_map):
        """As bitsandbytes: without a device_map the model loads (and quantizes) on the current GPU
        if there is one; on a CPU-only machine it stays None, which loads on the CPU."""
        if device_map is None and torch.cuda.is_available():
            device_map = {"": torch.cuda.current_device()}
        return device_map

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        module, name = get_module_from_name(model, param_name)
        return isinstance(module, _BaseLinear4bit) and name == "weight"

    def _process_model_before_weight_loading(self, model, device_map=None, **kwargs):
        self.modules_to_not_convert = self.get_modules_to_not_convert(
            model, self.quantization_config.skip_modules, model._keep_in_fp32_modules
        )
        if replace_linear_layers(model, self.quantization_config, self.modules_to_not_convert) == 0:
            raise ValueError(f"FourbitConfig found no nn.Linear to quantize in {type(model).__name__} (Conv1D models are not supported)")

    def _process_model_after_weight_loading(self, model, **kwargs):
        model.is_loaded_in_4bit = True
        release_checkpoint_mapping(model)
        # save_pretrained would try to reverse the deserialize op (transformers 5.24 has no reverse
        # for it, so re-saving a 4-bit load raises NotImplementedError, bitsandbytes' too); the
        # layers already write the checkpoint keys, so there is nothing to reverse
        model._weight_conversions = [
            c for c in getattr(model, "_weight_conversions", None) or []
            if not any(isinstance(op, FourbitDeserialize) for op in getattr(c, "operations", ()))
        ]
        try:
            from . import peft as _peft
        except ImportError:  # PEFT is optional
            return model
        _peft.install()
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    def _dequantize(self, model, dtype=None):
        """`model.dequantize()`: each Linear4bit back to an nn.Linear with the dequantized weight."""
        for name, module in list(model.named_modules()):
            if isinstance(module, _BaseLinear4bit):
                weight = module.dequantize(dtype)
                dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
                dense.weight = nn.Parameter(weight)
                if module.bias is not None:
                    dense.bias = module.bias
                model.set_submodule(name, dense)
        return model

    def get_quantize_ops(self):
        return FourbitQuantize(self)

    def get_load_operations(self):
        return {"deserialize": FourbitDeserialize}


def _is_bnb_4bit(stored) -> bool:
    d = stored if isinstance(stored, dict) else stored.to_dict()
    return bool(d.get("load_in_4bit")) or d.get("quant_method") == QUANT_METHOD


_original_merge = _auto.AutoHfQuantizer.merge_quantization_configs.__func__


def _merge_quantization_configs(cls, quantization_config, quantization_config_from_args):
    """transformers' rule (the stored config wins) with one addition: a FourbitConfig passed for a
    stored 4-bit bitsandbytes config loads it through fourbit (format from the checkpoint,
    compute dtype from the FourbitConfig) instead of failing on the differing class names."""
    if isinstance(quantization_config_from_args, FourbitConfig) and _is_bnb_4bit(quantization_config):
        return FourbitConfig.from_bitsandbytes(
            quantization_config, compute_dtype=quantization_config_from_args.compute_dtype
        )
    return _original_merge(cls, quantization_config, quantization_config_from_args)


_original_num_parameters = PreTrainedModel.num_parameters


def _num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
    """transformers' count, without its `import bitsandbytes` for a model with `is_loaded_in_4bit`
    (Trainer calls this every step for its FLOP estimate): a packed fourbit weight counts as the
    weights it holds, numel * 2 * element_size, as transformers counts bitsandbytes' ones."""
    if not any(isinstance(p, _Params4bit) for p in self.parameters()):
        return _original_num_parameters(self, only_trainable=only_trainable, exclude_embeddings=exclude_embeddings)
    skip = {f"{n}.weight" for n, m in self.named_modules() if isinstance(m, nn.Embedding)} if exclude_embeddings else set()
    total = 0
    for name, p in self.named_parameters():
        if name in skip or (only_trainable and not p.requires_grad):
            continue
        packed = isinstance(p, _Params4bit) and p.bnb_quantized
        total += p.numel() * 2 * p.element_size() if packed else p.numel()
    return total


def _register() -> None:
    if _auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not FourbitConfig:
        _auto.register_quantization_config(QUANT_METHOD)(FourbitConfig)
    if _auto.AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not FourbitHfQuantizer:
        _auto.register_quantizer(QUANT_METHOD)(FourbitHfQuantizer)
    _auto.AutoHfQuantizer.merge_quantization_configs = classmethod(_merge_quantization_configs)
    PreTrainedModel.num_parameters = _num_parameters


def use_for_bitsandbytes_config() -> None:
    """Make `from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True, ...))`, and
    loading a bitsandbytes 4-bit checkpoint, build fourbit's layers instead of bitsandbytes'. Idempotent;
    bitsandbytes itself need not be installed."""
    _auto.AUTO_QUANTIZER_MAPPING["bitsandbytes_4bit"] = FourbitHfQuantizer


_register()
