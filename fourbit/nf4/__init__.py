"""fourbit.nf4: the 4-bit format in plain PyTorch (the reference every kernel must equal).

    packed, state = quantize(w, blocksize=64, quant_type="nf4", double_quant=True)
    w_hat = dequantize(packed, state)            # same shape and dtype as w
    y = matmul(x, packed, state, bias)           # x @ w_hat.T + bias
"""

from .blockwise import dequantize_blockwise, nearest_code, quantize_blockwise
from .checks import ALLOWED_BLOCKSIZES
from .codes import FP4_CODE, NF4_CODE, code_for, derive_nf4, dynamic_map
from .files import load_file, save_file
from .matmul import matmul
from .quant import dequantize, quantize
from .state import QuantState

__all__ = [
    "ALLOWED_BLOCKSIZES",
    "FP4_CODE",
    "NF4_CODE",
    "QuantState",
    "code_for",
    "dequantize",
    "dequantize_blockwise",
    "derive_nf4",
    "dynamic_map",
    "load_file",
    "matmul",
    "nearest_code",
    "quantize",
    "quantize_blockwise",
    "save_file",
]
