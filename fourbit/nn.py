"""bitsandbytes-compatible module names: `fourbit.nn.Linear4bit / LinearNF4 / LinearFP4 / Params4bit`
take bitsandbytes 0.50's arguments and defaults, so `import bitsandbytes as bnb` code keeps working
with `bnb.nn` pointed here.

Trap kept for compatibility: `Linear4bit` and `Params4bit` default to quant_type="fp4". QLoRA
uses nf4; pass quant_type="nf4" (or use LinearNF4 / fourbit.lora.Linear4bit, which default to nf4).

The layer is `fourbit.lora.Linear4bit` (one implementation) with these differences in spelling:
  * `compress_statistics` is `double_quant`; the weight Parameter is a `Params4bit` that carries
    `.quant_state`, `.blocksize`, `.quant_type`, ... as bitsandbytes' does.
  * Quantization happens when a dense weight arrives: at construction, when a dense `Params4bit`
    is assigned to `layer.weight`, or through `load_state_dict` of dense weights. bitsandbytes
    waits for the first `.to(device)` / `.cuda()`; the result is the same weight, and a later
    `.to(device)` here only moves bytes. A stand-alone dense `Params4bit` does quantize on
    `.to(device)`, as in bitsandbytes.
  * With compute_dtype=None the first float32/bfloat16 input fixes the compute dtype for good, as
    in bitsandbytes. The bias Parameter is not converted in place (bitsandbytes converts it).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .functional import QuantState, quantize_4bit
from .lora import layers as _layers

__all__ = ["Linear4bit", "LinearFP4", "LinearNF4", "Params4bit"]


class Params4bit(nn.Parameter):
    """A Parameter that holds either a dense weight waiting to be quantized (bnb_quantized=False)
    or packed 4-bit codes with their `quant_state` (bnb_quantized=True)."""

    def __new__(
        cls,
        data: torch.Tensor | None = None,
        requires_grad: bool = False,
        quant_state: QuantState | None = None,
        blocksize: int | None = None,
        compress_statistics: bool = True,
        quant_type: str = "fp4",
        quant_storage: torch.dtype = torch.uint8,
        module: nn.Module | None = None,
        bnb_quantized: bool = False,
        **kwargs,
    ) -> "Params4bit":
        # extra keywords are accepted and ignored, as bitsandbytes does: transformers re-creates
        # parameters with `Params4bit(data, **old_param.__dict__)`, which carries its own attributes
        data = torch.empty(0) if data is None else data
        self = torch.Tensor._make_subclass(cls, data, requires_grad)
        self.blocksize = 64 if blocksize is None else blocksize
        self.compress_statistics = compress_statistics
        self.quant_type = quant_type
        self.quant_state = quant_state
        self.quant_storage = quant_storage
        self.bnb_quantized = bnb_quantized
        self.module = module
        return self

    def __deepcopy__(self, memo):
        # through memo, a deep-copied layer's weight and the layer itself share one copied state
        return Params4bit(
            self.data.clone(),
            self.requires_grad,
            copy.deepcopy(self.quant_state, memo),
            self.blocksize,
            self.compress_statistics,
            self.quant_type,
            self.quant_storage,
            None,
            self.bnb_quantized,
        )

    @classmethod
    def from_prequantized(cls, data, quantized_stats, requires_grad=False, device="cuda", module=None, **kwargs) -> "Params4bit":
        """Wrap packed bytes and their serialized quant state (the `weight.*` checkpoint entries)."""
        state = QuantState.from_dict(quantized_stats, device=device)
        return cls(
            data.to(device),
            requires_grad,
            state,
            state.blocksize,
            state.nested is not None,
            state.quant_type,
            data.dtype,
            module,
            True,
        )

    def _quantize(self, device) -> "Params4bit":
        packed, state = quantize_4bit(
            self.data.contiguous().to(device),
            blocksize=self.blocksize,
            compress_statistics=self.compress_statistics,
            quant_type=self.quant_type,
            quant_storage=self.quant_storage,
        )
        return Params4bit(packed, False, state, self.blocksize, self.compress_statistics, self.quant_type, self.quant_storage, None, True)

    def to(self, *args, **kwargs):
        """Dense: quantize onto the device (bitsandbytes' behaviour). Quantized: move bytes and state."""
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if not self.bnb_quantized:
            if device is not None and device.type != "meta":
                return self._quantize(device)
            return Params4bit(
                super().to(device=device, dtype=dtype, non_blocking=non_blocking), self.requires_grad, None,
                self.blocksize, self.compress_statistics, self.quant_type, self.quant_storage, None, False,
            )
        state = self.quant_state if device is None else QuantState.adopt(self.quant_state).to(device)
        return Params4bit(
            self.data.to(device=device, non_blocking=non_blocking), self.requires_grad, state,
            self.blocksize, self.compress_statistics, self.quant_type, self.quant_storage, None, True,
        )

    def cpu(self):
        return self.to("cpu")

    def cuda(self, device=None, non_blocking=False):
        return self.to("cuda" if device is None else device, non_blocking=non_blocking)


class Linear4bit(_layers.Linear4bit):
    """bitsandbytes' Linear4bit signature over fourbit's layer (see the module docstring)."""

    def __init__(
        self,
        input_features: int,
        output_features: int,
        bias: bool = True,
        compute_dtype: torch.dtype | None = None,
        compress_statistics: bool = True,
        quant_type: str = "fp4",
        quant_storage: torch.dtype = torch.uint8,
        device=None,
    ):
        super().__init__(
            input_features,
            output_features,
            bias,
            quant_type=quant_type,
            double_quant=compress_statistics,
            blocksize=64,
            compute_dtype=compute_dtype,
            quant_storage=quant_storage,
            device=device,
        )

    def _set_quantized(self, packed, state):
        super()._set_quantized(packed, QuantState.adopt(state))  # one state object, shared with weight

    def _packed_parameter(self, packed, state):
        return Params4bit(packed, False, QuantState.adopt(state), state.blocksize, state.nested is not None, state.quant_type, packed.dtype, self, True)

    def __setattr__(self, name, value):
        if name == "weight" and isinstance(value, Params4bit) and "_parameters" in self.__dict__:
            if not value.bnb_quantized:
                value = value._quantize(value.device)
            self._set_quantized(value.data, value.quant_state)
            return
        super().__setattr__(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compute_dtype is None and x.dtype in (torch.float32, torch.bfloat16):
            self.compute_dtype = x.dtype
        return super().forward(x)


class LinearNF4(Linear4bit):
    def __init__(self, input_features, output_features, bias=True, compute_dtype=None, compress_statistics=True, quant_storage=torch.uint8, device=None):
        super().__init__(input_features, output_features, bias, compute_dtype, compress_statistics, "nf4", quant_storage, device)


class LinearFP4(Linear4bit):
    def __init__(self, input_features, output_features, bias=True, compute_dtype=None, compress_statistics=True, quant_storage=torch.uint8, device=None):
        super().__init__(input_features, output_features, bias, compute_dtype, compress_statistics, "fp4", quant_storage, device)
