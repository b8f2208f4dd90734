"""Run bitsandbytes' own 4-bit ops on fourbit's kernels: code that imports bitsandbytes stays as it
is, and its `Linear4bit`, `quantize_4bit`, `matmul_4bit`, ... compute with fourbit.

    import bitsandbytes as bnb
    from fourbit.integrations import bitsandbytes as fourbit_bnb
    fourbit_bnb.install()              # or: with fourbit_bnb.installed(): ...
    layer = bnb.nn.Linear4bit(4096, 4096, quant_type="nf4").to("cuda")   # fourbit quantizes
    y = layer(x)                       # fourbit's fused matmul (Triton on CUDA)
    fourbit_bnb.uninstall()            # bitsandbytes' own kernels again

How: bitsandbytes 0.50 names each op once (`torch.library.define("bitsandbytes::quantize_4bit", ...)`
in bitsandbytes/_ops.py) and each backend registers a kernel for it per device. `install()` adds
fourbit's kernels for the CPU and CUDA dispatch keys through one `torch.library.Library`; the
dispatcher runs the newest registration for a key, and `uninstall()` deletes ours, which brings
bitsandbytes' back. The ops taken over (everything a 4-bit layer's forward and backward and
`quantize_4bit` with double quantization call):

    quantize_4bit          A -> packed codes, float32 absmax           fourbit.dispatch.quantize
    dequantize_4bit(.out)  packed, absmax -> dense                     fourbit.dispatch.dequantize
    gemm_4bit              A @ W^T + bias, nested absmax decoded in    fourbit.dispatch.matmul
    gemv_4bit(.out)        the same with a float32 absmax              fourbit.dispatch.matmul
    quantize_blockwise     8-bit blockwise codes (nested absmax)       fourbit.dispatch.quantize_blockwise
    dequantize_blockwise(.out)                                         fourbit.dispatch.dequantize_blockwise

So results follow fourbit, i.e. bitsandbytes' CUDA rounding rules everywhere: on CPU they differ
from bitsandbytes' own CPU build exactly where that build differs from its CUDA kernels (SPEC §3,
§4), and a bitsandbytes layer then computes bit for bit what `fourbit.nn.Linear4bit` computes.
The 8-bit and optimizer ops stay bitsandbytes'.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from .. import dispatch
from ..nf4.codes import FP4_CODE, NF4_CODE
from ..nf4.state import QuantState

__all__ = ["OPS", "install", "installed", "is_installed", "uninstall"]

_DISPATCH_KEYS = ("CPU", "CUDA")
_LIB: torch.library.Library | None = None


def _quant_type_of(code: torch.Tensor) -> str:
    """gemv_4bit gets the 16-entry table, not its name."""
    table = code.detach().float().cpu()
    for name, ref in (("nf4", NF4_CODE), ("fp4", FP4_CODE)):
        if torch.equal(table, ref):
            return name
    raise ValueError(f"gemv_4bit: the code table is neither nf4 nor fp4: {table.tolist()}")


def _state(shape, dtype, blocksize, quant_type, absmax, absmax_8bit=None, absmax_code=None, absmax_offset=None) -> QuantState:
    """bitsandbytes' op arguments as a fourbit QuantState. With double quantization bitsandbytes
    passes the nested float32 scales as `absmax` and the 8-bit codes as `absmax_8bit`."""
    if absmax_8bit is None:
        return QuantState.from_tensors(absmax, None, None, None, shape=shape, dtype=dtype, blocksize=blocksize, quant_type=quant_type)
    return QuantState.from_tensors(absmax_8bit, absmax, absmax_code, absmax_offset, shape=shape, dtype=dtype,
                                   blocksize=blocksize, quant_type=quant_type)


def _quantize_4bit(A, blocksize, quant_type, quant_storage):
    packed, state = dispatch.quantize(A, blocksize=blocksize, quant_type=quant_type, double_quant=False, quant_storage=quant_storage)
    return packed, state.absmax


def _dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype):
    return dispatch.dequantize(A.reshape(-1, 1), _state(shape, dtype, blocksize, quant_type, absmax), dtype=dtype)


def _dequantize_4bit_out(A, absmax, blocksize, quant_type, shape, dtype, out):
    out.copy_(_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype))


def _gemm_4bit(A, B, shapeB, absmax, blocksize, quant_type, bias=None, absmax_8bit=None, absmax_code=None, absmax_offset=None):
    state = _state(shapeB, A.dtype, blocksize, quant_type, absmax, absmax_8bit, absmax_code, absmax_offset)
    return dispatch.matmul(A, B.reshape(-1, 1), state, bias)


def _gemv_4bit(A, B, shapeB, absmax, code, blocksize):
    state = _state(shapeB, A.dtype, blocksize, _quant_type_of(code), absmax)
    return dispatch.matmul(A, B.reshape(-1, 1), state, None)


def _gemv_4bit_out(A, B, shapeB, absmax, code, blocksize, out):
    out.copy_(_gemv_4bit(A, B, shapeB, absmax, code, blocksize))


def _quantize_blockwise(A, code, blocksize):
    return dispatch.quantize_blockwise(A, code, blocksize)


def _dequantize_blockwise(A, absmax, code, blocksize, dtype):
    return dispatch.dequantize_blockwise(A, absmax, code, blocksize, dtype)


def _dequantize_blockwise_out(A, absmax, code, blocksize, dtype, out):
    out.copy_(_dequantize_blockwise(A, absmax, code, blocksize, dtype))


# bitsandbytes op name (overload included) -> fourbit kernel. Each entry looks its fourbit function
# up when called, so a test can count calls by patching fourbit.dispatch.
OPS = {
    "quantize_4bit": _quantize_4bit,
    "dequantize_4bit": _dequantize_4bit,
    "dequantize_4bit.out": _dequantize_4bit_out,
    "gemm_4bit": _gemm_4bit,
    "gemv_4bit": _gemv_4bit,
    "gemv_4bit.out": _gemv_4bit_out,
    "quantize_blockwise": _quantize_blockwise,
    "dequantize_blockwise": _dequantize_blockwise,
    "dequantize_blockwise.out": _dequantize_blockwise_out,
}


def is_installed() -> bool:
    return _LIB is not None


def install() -> None:
    """Register fourbit's kernels for bitsandbytes' 4-bit ops on CPU and CUDA (idempotent)."""
    global _LIB
    if _LIB is not None:
        return
    try:
        import bitsandbytes  # noqa: F401  (defines the bitsandbytes:: ops)
    except ImportError:
        raise ImportError(
            "fourbit.integrations.bitsandbytes.install() runs bitsandbytes' ops on fourbit and needs bitsandbytes "
            "(pip install 'bitsandbytes==0.50.*'); without it, `import fourbit as bnb` gives the same names"
        ) from None
    missing = [name for name in OPS if not hasattr(torch.ops.bitsandbytes, name.split(".")[0])]
    if missing:
        raise RuntimeError(f"this bitsandbytes ({bitsandbytes.__version__}) defines no {missing}; fourbit targets 0.50")
    lib = torch.library.Library("bitsandbytes", "IMPL")
    with warnings.catch_warnings():
        # the dispatcher warns that we override bitsandbytes' kernel for the key: that is the point
        warnings.simplefilter("ignore", UserWarning)
        for name, kernel in OPS.items():
            for key in _DISPATCH_KEYS:
                lib.impl(name, kernel, key)
    _LIB = lib


def uninstall() -> None:
    """Remove fourbit's registrations; bitsandbytes' own kernels answer again."""
    global _LIB
    if _LIB is not None:
        _LIB._destroy()
        _LIB = None


@contextlib.contextmanager
def installed():
    """`install()` for the duration of a with-block (left installed if it already was)."""
    was = is_installed()
    install()
    try:
        yield
    finally:
        if not was:
            uninstall()
