"""PEFT, unchanged: `get_peft_model`, `merge_and_unload`, `save_pretrained`, `PeftModel.from_pretrained`
and multiple adapters on a model whose linear layers are fourbit `Linear4bit`s.

    import fourbit.integrations.peft      # or load with FourbitConfig, which imports it
    model = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear"))

Mechanism: a registered dispatcher, not a tensor-subclass weight. fourbit's `Linear4bit` is an
`nn.Linear` subclass whose weight is a `Params4bit` (bitsandbytes' design), so every
`isinstance(m, nn.Linear)` check in the ecosystem already finds it — `target_modules="all-linear"`
included — and PEFT's fallback dispatcher would wrap it in its dense `lora.Linear`. That layer's
forward and gradients would be right, but its merge adds the update to `weight.data` in place, i.e.
to packed 4-bit codes. A weight that is a tensor subclass dequantizing itself under every aten op
(torchao's `NF4Tensor`) would make that merge work too, but it would route every op on the
weight through `__torch_dispatch__`, change what `layer.weight` is for FSDP2, `torch.compile` and
the checkpoint code that fourbit already tests, and still need PEFT-specific handling to re-quantize
after a merge. So this module puts one dispatcher in front of PEFT's list (wrapping
`LoraModel._create_new_module`, the function that walks that list; PEFT has no public registry) that
builds `Linear4bit` below for fourbit's layers and defers to PEFT for everything else.

`Linear4bit` (the PEFT layer) is PEFT's `lora.Linear` with three changes:
  * forward: the adapter output is cast to the base output's dtype and then added, the order of
    PEFT's bitsandbytes layer and of fourbit's `LoRALinear` (PEFT's dense layer adds first and
    casts after, which rounds differently in bf16);
  * merge: dequantize -> add s*B@A in float32 -> cast to the weight's original dtype -> quantize
    again with the same settings, as PEFT's bitsandbytes layer does (`merge_and_unload` therefore
    returns a 4-bit model; the re-quantization adds the usual 4-bit rounding error, see
    `LoRALinear.merge_requantized` for its size). unmerge restores the exact bytes saved at merge
    time instead of subtracting and re-quantizing a second time;
  * LoRA variants that need the dense weight at every step (DoRA, aLoRA, ...) are refused with a
    ValueError instead of failing inside PEFT.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners.lora import model as _lora_model
from peft.tuners.lora.layer import Linear as _PeftLinear
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge

from .. import dispatch
from ..lora.layers import Linear4bit as _FourbitLinear4bit
from . import transformers as _transformers  # noqa: F401  (FourbitConfig registered, num_parameters fixed)

__all__ = ["Linear4bit", "dispatch_fourbit", "install"]


def _requantize(layer, dense: torch.Tensor) -> None:
    """Quantize `dense` (N, K) into `layer` with its settings, from the dtype it was quantized from."""
    state = layer.quant_state
    packed, new_state = dispatch.quantize(
        dense.to(state.dtype),
        blocksize=state.blocksize,
        quant_type=state.quant_type,
        double_quant=state.nested is not None,
        quant_storage=layer.weight.dtype,
    )
    layer._set_quantized(packed, new_state)


class Linear4bit(_PeftLinear):
    """PEFT's LoRA layer around a fourbit Linear4bit (see the module docstring)."""

    def __init__(self, base_layer, adapter_name: str, config, r: int = 0, lora_alpha: int = 1, **kwargs):
        if config.fan_in_fan_out:
            warnings.warn("fan_in_fan_out=True does not apply to a Linear4bit base layer; using False")
            config.fan_in_fan_out = False
        self._stashed: list[tuple[torch.Tensor, Any]] = []  # (packed, state) before each merge
        super().__init__(base_layer, adapter_name, config=config, r=r, lora_alpha=lora_alpha, **kwargs)

    def resolve_lora_variant(self, *, config, **kwargs):
        variant = super().resolve_lora_variant(config=config, **kwargs)
        if variant is not None:
            raise ValueError(
                f"{type(variant).__name__} is not supported on a fourbit Linear4bit base layer; "
                "fourbit's PEFT layer runs plain LoRA (rsLoRA included)"
            )
        return None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters or self.merged or args or kwargs:
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x)  # (..., N)
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            convert = not torch.is_autocast_enabled()
            h = self._cast_input_dtype(x, lora_A.weight.dtype) if convert else x
            out = lora_B(lora_A(self.lora_dropout[name](h))) * self.scaling[name]
            result = result + (out.to(result.dtype) if convert else out)
        return result

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """W <- Q(dequantize(W) + s B A) for each adapter; bias += s * lora_B.bias with lora_bias."""
        base = self.get_base_layer()
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.lora_A:
                continue
            merged = base.dequantize(torch.float32) + self.get_delta_weight(name).float()  # (N, K)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"merging adapter {name!r} gives non-finite weights; nothing was merged")
            self._stashed.append((base.weight.data, base.quant_state))
            _requantize(base, merged)
            if self.lora_bias[name]:
                base.bias.data += self.lora_B[name].bias * self.scaling[name]
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Put back the bytes and state saved by each merge, newest first (exact, no re-quantizing)."""
        if not self.merged:
            warnings.warn("no adapter is merged into this layer; unmerge() changed nothing")
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            packed, state = self._stashed.pop()
            base._set_quantized(packed, state)
            if name in self.lora_A and self.lora_bias[name]:
                base.bias.data -= self.lora_B[name].bias * self.scaling[name]


def dispatch_fourbit(target: torch.nn.Module, adapter_name: str, config, **kwargs):
    """PEFT dispatcher: a `Linear4bit` LoRA layer for a fourbit Linear4bit, None for anything else."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if not isinstance(base, _FourbitLinear4bit):
        return None
    if kwargs.pop("parameter_name", None) is not None:
        raise ValueError("target_parameters cannot target a fourbit Linear4bit's packed weight; target the module")
    kwargs.pop("is_target_conv_1d_layer", None)
    return Linear4bit(target, adapter_name, config=config, **kwargs)


def install() -> None:
    """Put `dispatch_fourbit` in front of PEFT's LoRA dispatchers (idempotent; importing this module
    does it)."""
    current = _lora_model.LoraModel._create_new_module
    if getattr(current, "_fourbit", False):
        return

    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        new_module = dispatch_fourbit(target, adapter_name, lora_config, **kwargs)
        if new_module is not None:
            return new_module
        return current(lora_config, adapter_name, target, **kwargs)

    _create_new_module._fourbit = True
    _lora_model.LoraModel._create_new_module = staticmethod(_create_new_module)


install()
