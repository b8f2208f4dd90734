"""CPU kernels for 8-bit blockwise quantization with a 256-entry code (nested scales, 8-bit optimizer
states): same names and signatures as fourbit.nf4.blockwise, equal to it bit for bit (csrc/blockwise8.c,
csrc/nearest.h)."""

from __future__ import annotations

import torch

from . import _lib

__all__ = ["quantize_blockwise", "dequantize_blockwise"]

_IN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize `x` (any shape, float) to uint8 codes, one float32 absmax per block of the flat tensor."""
    if blocksize <= 0:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    if code.numel() != 256:
        raise ValueError(f"code must have 256 entries, got {code.numel()}")
    if x.device.type != "cpu" or code.device.type != "cpu":
        raise ValueError(f"the CPU kernels need CPU tensors; x is on {x.device}, code on {code.device}")
    src = (x if x.dtype in _IN_DTYPES else x.float()).contiguous()
    n = src.numel()
    q = torch.empty(x.shape, dtype=torch.uint8)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
    table = code.float().contiguous()
    if n and _lib.library().fourbit_quantize_blockwise(src.data_ptr(), _lib.dtype_code(src.dtype), n, blocksize,
                                                       table.data_ptr(), q.data_ptr(), absmax.data_ptr(),
                                                       _lib.threads()):
        raise MemoryError("quantize_blockwise: no memory for the code's search table")
    return q, absmax


def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int = 256,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `quantize_blockwise`: fl32(code[q] * absmax[block]), then one rounding to `dtype`."""
    n = q.numel()
    nb = absmax.numel()
    if nb != -(-n // blocksize):
        raise ValueError(f"absmax has {nb} blocks but {n} codes in blocks of {blocksize} need {-(-n // blocksize)}")
    if dtype not in _IN_DTYPES + (torch.float64,):
        raise ValueError(f"dtype must be float32/float16/bfloat16/float64, got {dtype}")
    if q.device.type != "cpu" or absmax.device.type != "cpu":
        raise ValueError(f"the CPU kernels need CPU tensors; q is on {q.device}, absmax on {absmax.device}")
    codes = q.contiguous().view(torch.uint8) if q.dtype == torch.uint8 else q.to(torch.uint8).contiguous()
    scales, table = absmax.float().contiguous(), code.float().contiguous()
    out = torch.empty(q.shape, dtype=dtype)
    if n:
        _lib.library().fourbit_dequantize_blockwise(codes.data_ptr(), n, blocksize, table.data_ptr(),
                                                    scales.data_ptr(), out.data_ptr(), _lib.dtype_code(dtype),
                                                    _lib.threads())
    return out
