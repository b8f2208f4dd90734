"""CPU kernels for one AdamW step on flat tensors, same names and signatures as fourbit.nf4.adamw and
equal to it bit for bit (csrc/adamw.c): one pass over p, g and the states instead of the reference's
~13 torch ops (the 8-bit step also dequantizes and requantizes its states in that pass).

The float32 constants are computed here exactly as the reference's torch ops round their Python
scalars: a Python float expression in double precision, then one rounding to float32. The kernels
write through raw pointers, outside autograd, as the reference's in-place ops under no_grad."""

from __future__ import annotations

import math

import torch

from ..nf4.checks import FLOAT_DTYPES
from . import _lib

__all__ = ["adamw_update_32bit", "adamw_update_8bit"]

QBLOCK = 256
_F32, _U8 = (torch.float32,), (torch.uint8,)


def _check(numel: int, **tensors: tuple[torch.Tensor, tuple[torch.dtype, ...], int]) -> None:
    """Each tensor: one of its allowed dtypes, the expected element count, contiguous, on the CPU. The
    optimizer calls these per parameter (420 tensors per LoRA step), so the check costs ~1 us."""
    for name, (t, dtypes, n) in tensors.items():
        if t.dtype not in dtypes or t.numel() != n or not t.is_contiguous() or t.device.type != "cpu":
            if t.dtype not in dtypes:
                raise TypeError(f"{name} must be one of {[str(d) for d in dtypes]}, got {t.dtype}")
            if t.numel() != n:
                raise ValueError(f"{name} has {t.numel()} elements, expected {n}")
            raise ValueError(f"{name} must be a contiguous CPU tensor (got device {t.device}, contiguous {t.is_contiguous()})")


def _corrections(beta1: float, beta2: float, step: int) -> tuple[float, float]:
    return 1.0 - beta1**step, math.sqrt(1.0 - beta2**step)


def adamw_update_32bit(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, *, lr: float, beta1: float,
                       beta2: float, eps: float, weight_decay: float, step: int) -> None:
    """In place on p (any float dtype, (n,)), m and v (float32, (n,)); g has p's shape."""
    n = p.numel()
    _check(n, p=(p, FLOAT_DTYPES, n), g=(g, FLOAT_DTYPES, n), m=(m, _F32, n), v=(v, _F32, n))
    c1, c2 = _corrections(beta1, beta2, step)
    if n:
        _lib.loaded().fourbit_adamw_32bit(
            p.data_ptr(), _lib.dtype_code(p.dtype), g.data_ptr(), _lib.dtype_code(g.dtype), m.data_ptr(), v.data_ptr(),
            n, beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps * c2, 1.0 - lr * weight_decay, int(weight_decay > 0.0),
            -lr * c2 / c1, _lib.threads())


def adamw_update_8bit(p: torch.Tensor, g: torch.Tensor, q1: torch.Tensor, q2: torch.Tensor, absmax1: torch.Tensor,
                      absmax2: torch.Tensor, qmap1: torch.Tensor, qmap2: torch.Tensor, *, lr: float, beta1: float,
                      beta2: float, eps: float, weight_decay: float, step: int) -> None:
    """In place on p ((n,)), q1/q2 (uint8, (n,)) and absmax1/absmax2 (float32, (ceil(n/256),)).

    qmap1 is the signed dynamic map (for m), qmap2 the unsigned one (for v), each (256,) float32.
    """
    n = p.numel()
    nb = -(-n // QBLOCK)
    _check(n, p=(p, FLOAT_DTYPES, n), g=(g, FLOAT_DTYPES, n), q1=(q1, _U8, n), q2=(q2, _U8, n),
           absmax1=(absmax1, _F32, nb), absmax2=(absmax2, _F32, nb), qmap1=(qmap1, _F32, 256), qmap2=(qmap2, _F32, 256))
    map1, map2 = qmap1, qmap2
    c1, c2 = _corrections(beta1, beta2, step)
    if n and _lib.loaded().fourbit_adamw_8bit(
            p.data_ptr(), _lib.dtype_code(p.dtype), g.data_ptr(), _lib.dtype_code(g.dtype), q1.data_ptr(),
            q2.data_ptr(), absmax1.data_ptr(), absmax2.data_ptr(), map1.data_ptr(), map2.data_ptr(), n, beta1,
            1.0 - beta1, beta2, 1.0 - beta2, c2, eps, 1.0 - lr * weight_decay, int(weight_decay > 0.0), -lr / c1,
            _lib.threads()):
        raise MemoryError("adamw_update_8bit: no memory for the maps' search tables")
