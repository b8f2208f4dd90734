"""fourbit.cpu: C kernels for CPU tensors (AVX2 / AVX-512 / portable), same names and signatures as the
reference in fourbit.nf4, chosen by fourbit.dispatch (FOURBIT_BACKEND=auto takes them for CPU tensors
when they load; =cpu forces them; =reference never touches them).

    packed, state = quantize(w)                 # bit-identical to fourbit.nf4.quantize
    w_hat = dequantize(packed, state)           # bit-identical
    y = matmul(x, packed, state, bias)          # M <= GEMV_MAX_M: fused GEMV (float32, within tolerance);
                                                # otherwise the reference's plan with the C decoder (same bits)
    adamw_update_32bit / adamw_update_8bit      # bit-identical fused steps (_many: a group in one call)
    any_nonfinite                               # which tensors hold NaN / inf
    quantize_blockwise / dequantize_blockwise   # bit-identical 8-bit codes

The library is compiled on first use and cached per machine (fourbit/cpu/_lib.py); `available()`
says whether it loaded and, if not, why.
"""

from __future__ import annotations

from ..errors import Unavailable
from . import _lib
from .adamw import adamw_update_8bit, adamw_update_8bit_many, adamw_update_32bit, adamw_update_32bit_many, any_nonfinite
from .blockwise import dequantize_blockwise, quantize_blockwise
from .matmul import GEMV_MAX_M, matmul, matmul_backward
from .quant import dequantize, dequantize_into, quantize

__all__ = [
    "GEMV_MAX_M",
    "adamw_update_32bit",
    "adamw_update_32bit_many",
    "adamw_update_8bit",
    "adamw_update_8bit_many",
    "any_nonfinite",
    "available",
    "dequantize",
    "dequantize_blockwise",
    "dequantize_into",
    "matmul",
    "matmul_backward",
    "quantize",
    "quantize_blockwise",
]


def available() -> tuple[bool, str]:
    """(True, instruction set) once the kernels are loaded, or (False, the one-line reason)."""
    try:
        _lib.library()
    except Unavailable as err:
        return False, str(err)
    return True, _lib.isa_name()
