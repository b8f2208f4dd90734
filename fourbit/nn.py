"""bitsandbytes-compatible module names: `fourbit.nn.Linear4bit / LinearNF4 / LinearFP4 / Params4bit`
take bitsandbytes 0.50's arguments and defaults, so `import bitsandbytes as bnb` code keeps working
with `bnb.nn` pointed here.

Trap kept for compatibility: `Linear4bit` and `Params4bit` default to quant_type="fp4". QLoRA
uses nf4; pass quant_type="nf4" (or use LinearNF4 / fourbit.lora.Linear4bit, which default to nf4).

One implementation: these are `fourbit.lora.Linear4bit` / `fourbit.lora.params.Params4bit` (an
`nn.Linear` subclass with bitsandbytes' life cycle: dense until `.to(device)`, a load or the first
forward quantizes it) under bitsandbytes' spelling:
  * `compress_statistics` is `double_quant`; blocksize is 64, as bitsandbytes' layer fixes it.
  * `weight.quant_state` and `layer.quant_state` are one `fourbit.functional.QuantState`, which
    answers to bitsandbytes' names (`state2`, `as_dict`, `quant_state.bitsandbytes__nf4`).
  * With compute_dtype=None the first float32/bfloat16 input fixes the compute dtype for good, and
    the bias Parameter is converted in place to the compute dtype, both as in bitsandbytes.
The deliberate differences from bitsandbytes are listed in fourbit/lora/layers.py.
"""

from __future__ import annotations

import torch

from .functional import QuantState
from .lora import layers as _layers
from .lora import params as _params

__all__ = ["Linear4bit", "LinearFP4", "LinearNF4", "Params4bit"]


class Params4bit(_params.Params4bit):
    """fourbit's Params4bit with bitsandbytes' default quant_type ("fp4") and QuantState class."""

    def __new__(
        cls,
        data: torch.Tensor | None = None,
        requires_grad: bool = False,
        quant_state: QuantState | None = None,
        blocksize: int | None = None,
        compress_statistics: bool = True,
        quant_type: str = "fp4",
        quant_storage: torch.dtype = torch.uint8,
        module=None,
        bnb_quantized: bool = False,
        **kwargs,
    ) -> "Params4bit":
        return super().__new__(cls, data, requires_grad, quant_state, blocksize, compress_statistics, quant_type,
                               quant_storage, module, bnb_quantized, **kwargs)

    @classmethod
    def _adopt_state(cls, state):
        return QuantState.adopt(state)

    @classmethod
    def _state_from_dict(cls, d, device):
        return QuantState.from_dict(d, device=device)


class Linear4bit(_layers.Linear4bit):
    """bitsandbytes' Linear4bit signature over fourbit's layer (see the module docstring)."""

    _params_class = Params4bit

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compute_dtype is None and x.dtype in (torch.float32, torch.bfloat16):
            self.compute_dtype = x.dtype
        compute = self.compute_dtype or x.dtype
        if self.bias is not None and self.bias.dtype != compute:
            self.bias.data = self.bias.data.to(compute)
        return super().forward(x)


class LinearNF4(Linear4bit):
    def __init__(self, input_features, output_features, bias=True, compute_dtype=None, compress_statistics=True, quant_storage=torch.uint8, device=None):
        super().__init__(input_features, output_features, bias, compute_dtype, compress_statistics, "nf4", quant_storage, device)


class LinearFP4(Linear4bit):
    def __init__(self, input_features, output_features, bias=True, compute_dtype=None, compress_statistics=True, quant_storage=torch.uint8, device=None):
        super().__init__(input_features, output_features, bias, compute_dtype, compress_statistics, "fp4", quant_storage, device)
