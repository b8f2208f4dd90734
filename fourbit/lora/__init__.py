"""fourbit.lora: QLoRA building blocks on top of the 4-bit format.

    model = quantize_model(model)                          # nn.Linear -> Linear4bit (NF4, double quant)
    model = add_lora(model, r=16, alpha=16)                # wrap q/k/v/o/gate/up/down in LoRALinear
    print(trainable_parameters(model))                     # "trainable params: ... || all params: ..."
    save_adapter(model, "out/")                            # PEFT-format adapter directory
    load_adapter(model, "out/")
    with adapters_disabled(model): ...                     # the base model alone, for evaluation

`matmul_4bit` (fourbit.lora.autograd) is the autograd op the layers run on.
"""

from .adapters import load_adapter, save_adapter
from .autograd import matmul_4bit
from .layers import Linear4bit
from .lora_linear import LoRALinear
from .surgery import ParameterCount, adapters_disabled, add_lora, lora_layers, quantize_model, trainable_parameters

__all__ = [
    "Linear4bit",
    "LoRALinear",
    "ParameterCount",
    "adapters_disabled",
    "add_lora",
    "load_adapter",
    "lora_layers",
    "matmul_4bit",
    "quantize_model",
    "save_adapter",
    "trainable_parameters",
]
