"""CPU kernels for 4-bit quantize / dequantize, same names and signatures as fourbit.nf4.quant, and
equal to it bit for bit (csrc/quant4.c states the arithmetic).

    packed, state = quantize(w, blocksize=64, quant_type="nf4", double_quant=True)
    w_hat = dequantize(packed, state)                      # a new tensor, as the reference
    dequantize_into(packed, state, out)                    # into a caller's buffer (the matmul's)

Double quantization's mean stays torch's own reduction (`absmax.mean()`, the reference's summation
order); its 8-bit codes come from `fourbit.cpu.blockwise.quantize_blockwise`.
"""

from __future__ import annotations

import torch

from ..nf4.checks import FLOAT_DTYPES, check_blocksize, check_finite, check_float_dtype, check_float_tensor
from ..nf4.checks import check_quant_type, check_scales_fit, check_storage
from ..nf4.codes import FP4_MAGNITUDE_TO_BITS, FP4_THRESHOLDS, NF4_THRESHOLDS, code_for, dynamic_map
from ..nf4.quant import check_packed
from ..nf4.state import NESTED_BLOCKSIZE, QuantState
from . import _lib
from .blockwise import quantize_blockwise

__all__ = ["quantize", "dequantize", "dequantize_into"]

_CONSTANTS: dict[str, tuple[torch.Tensor, ...]] = {}


def _constants(quant_type: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(code (16,), thresholds, fp4 magnitude bits (8,)) as contiguous CPU tensors, made once."""
    if quant_type not in _CONSTANTS:
        thresholds = NF4_THRESHOLDS if quant_type == "nf4" else FP4_THRESHOLDS
        _CONSTANTS[quant_type] = (code_for(quant_type).contiguous(), thresholds.contiguous(),
                                  FP4_MAGNITUDE_TO_BITS.contiguous())
    return _CONSTANTS[quant_type]


def _check_cpu(**tensors: torch.Tensor | None) -> None:
    """Raise ValueError naming the first tensor that is not on the CPU."""
    for name, t in tensors.items():
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"the CPU kernels need CPU tensors; {name} is on {t.device}")


def quantize(x: torch.Tensor, *, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = True,
             quant_storage: torch.dtype = torch.uint8) -> tuple[torch.Tensor, QuantState]:
    """Quantize `x` to packed 4-bit codes; returns (packed, QuantState), as `fourbit.nf4.quantize`."""
    check_float_tensor(x)
    check_blocksize(blocksize)
    check_quant_type(quant_type)
    _check_cpu(x=x)
    n = x.numel()
    nbytes = (n + 1) // 2
    check_storage(quant_storage, nbytes)
    lib = _lib.library()
    src = x.contiguous() if x.dtype in (torch.float32, torch.float16, torch.bfloat16) else x.float().contiguous()
    packed = torch.empty(nbytes, 1, dtype=torch.uint8)
    nb = -(-n // blocksize)
    absmax = torch.empty(nb, dtype=torch.float32)
    _, thresholds, bits = _constants(quant_type)
    if n:
        bad = lib.fourbit_quantize_4bit(src.data_ptr(), _lib.dtype_code(src.dtype), n, blocksize,
                                        int(quant_type == "fp4"), thresholds.data_ptr(), bits.data_ptr(),
                                        packed.data_ptr(), absmax.data_ptr(), _lib.threads())
        if bad:
            check_finite(x)  # raises, naming how many and where the first is
    if quant_storage != torch.uint8:
        packed = packed.view(-1).view(quant_storage).view(-1, 1)
    state = QuantState(absmax=absmax, shape=x.shape, dtype=x.dtype, blocksize=blocksize, quant_type=quant_type,
                       code=code_for(quant_type))
    if double_quant:
        offset = absmax.mean() if nb else absmax.new_zeros(())
        code8 = dynamic_map(signed=True)
        qabs, absmax2 = quantize_blockwise(absmax - offset, code8, NESTED_BLOCKSIZE)
        state.absmax, state.offset = qabs, offset
        state.nested = QuantState.nested_state(absmax2, nb, code8)
        check_scales_fit(x, state)
    return packed, state


def _scale_args(state: QuantState) -> tuple:
    """The C side's scale arguments: (absmax | None, qabs | None, absmax2, code8, offset, nested blocksize),
    with the tensors made contiguous float32 / uint8 (kept alive by the caller through the tuple)."""
    absmax, absmax2, code8, offset = state.as_tensors()
    nb = -(-state.numel // state.blocksize)
    if absmax2 is None:
        absmax = absmax.float().contiguous()
        if absmax.numel() != nb:
            raise ValueError(f"absmax holds {absmax.numel()} scales but {state.numel} values in blocks of "
                             f"{state.blocksize} need {nb}")
        return (absmax, None, None, None, 0.0, NESTED_BLOCKSIZE)
    qabs = absmax.contiguous()
    if qabs.dtype != torch.uint8 or qabs.numel() != nb:
        raise ValueError(f"the nested scale codes must be {nb} uint8 values, got {qabs.numel()} {qabs.dtype}")
    nbs = state.nested.blocksize
    absmax2, code8 = absmax2.float().contiguous(), code8.float().contiguous()
    if absmax2.numel() != -(-nb // nbs) or code8.numel() != 256:
        raise ValueError(f"the nested state needs {-(-nb // nbs)} absmax2 values and a 256-entry code, got "
                         f"{absmax2.numel()} and {code8.numel()}")
    return (None, qabs, absmax2, code8, float(offset), nbs)


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def dequantize_into(packed: torch.Tensor, state: QuantState, out: torch.Tensor, *, start: int = 0) -> torch.Tensor:
    """Write the dequantized weight's flat elements [start, start + out.numel()) into `out` (contiguous
    float32 / float16 / bfloat16 / float64, any shape; `start` a multiple of the blocksize: the
    matmul's chunks) and return it."""
    data = check_packed(packed, state)
    count = out.numel()
    if out.dtype not in FLOAT_DTYPES + (torch.float64,) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float tensor, got {out.dtype} (contiguous: {out.is_contiguous()})")
    if start < 0 or start % state.blocksize or start + count > state.numel:
        raise ValueError(f"elements [{start}, {start + count}) are not a block-aligned range of the {state.numel} "
                         f"values in blocks of {state.blocksize}")
    _check_cpu(packed=data, out=out, absmax=state.absmax)
    scales = _scale_args(state)
    code, _, _ = _constants(state.quant_type)
    if count:
        absmax, qabs, absmax2, code8, offset, nbs = scales
        _lib.library().fourbit_dequantize_4bit(
            data.data_ptr(), start, count, state.blocksize, code.data_ptr(), _ptr(absmax), _ptr(qabs), _ptr(absmax2),
            _ptr(code8), offset, nbs, out.data_ptr(), _lib.dtype_code(out.dtype), _lib.threads())
    return out


def dequantize(packed: torch.Tensor, state: QuantState, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense tensor of `state.shape` in `dtype` (default: the dtype that was quantized)."""
    if not isinstance(state, QuantState):
        check_packed(packed, state)  # raises TypeError
    dtype = dtype or state.dtype
    check_float_dtype(dtype, allowed=FLOAT_DTYPES + (torch.float64,))
    out = torch.empty(state.numel, dtype=dtype)
    return dequantize_into(packed, state, out).view(state.shape)
