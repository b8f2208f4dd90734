"""fourbit: NF4 quantization and QLoRA fine-tuning, bit-compatible with bitsandbytes.

Subpackages: `fourbit.nf4` (format + pure-PyTorch reference), `fourbit.kernels` (Triton),
`fourbit.lora` (layers, surgery, adapters), `fourbit.train` (optimizers, loop, CLI).
`fourbit.dispatch` picks the implementation (FOURBIT_BACKEND=auto|reference|triton).
"""

from .nf4 import QuantState, dequantize, quantize

__version__ = "0.1.0"
__all__ = ["FourbitConfig", "QuantState", "dequantize", "matmul_4bit", "quantize", "__version__"]


def __getattr__(name):
    """Names imported on first use: `fourbit.FourbitConfig` (imports transformers), and
    bitsandbytes' top-level names `fourbit.matmul_4bit` and the submodules `fourbit.functional`,
    `fourbit.nn`, `fourbit.optim` (so `import fourbit as bnb` followed by
    `bnb.optim.PagedAdamW(...)` works without importing them one by one)."""
    if name == "FourbitConfig":  # imports transformers, and registers the config with it
        from .integrations.transformers import FourbitConfig

        return FourbitConfig
    if name == "matmul_4bit":
        from .functional import matmul_4bit

        return matmul_4bit
    if name in ("functional", "nn", "optim"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'fourbit' has no attribute {name!r}")
