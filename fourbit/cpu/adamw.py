"""CPU kernels for one AdamW step on flat tensors, same names and signatures as fourbit.nf4.adamw and
equal to it bit for bit (csrc/adamw.c): one pass over p, g and the states instead of the reference's
~13 torch ops (the 8-bit step also dequantizes and requantizes its states in that pass).

The float32 constants are computed here exactly as the reference's torch ops round their Python
scalars: a Python float expression in double precision, then one rounding to float32."""

from __future__ import annotations

import math

import torch

from ..nf4.checks import FLOAT_DTYPES
from . import _lib

__all__ = ["adamw_update_32bit", "adamw_update_8bit"]

QBLOCK = 256


def _flat(name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...], numel: int) -> None:
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must be one of {[str(d) for d in dtypes]}, got {t.dtype}")
    if t.numel() != numel:
        raise ValueError(f"{name} has {t.numel()} elements, expected {numel}")
    if not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError(f"{name} must be a contiguous CPU tensor (got device {t.device}, contiguous {t.is_contiguous()})")


def _corrections(beta1: float, beta2: float, step: int) -> tuple[float, float]:
    return 1.0 - beta1**step, math.sqrt(1.0 - beta2**step)


@torch.no_grad()
def adamw_update_32bit(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, *, lr: float, beta1: float,
                       beta2: float, eps: float, weight_decay: float, step: int) -> None:
    """In place on p (any float dtype, (n,)), m and v (float32, (n,)); g has p's shape."""
    n = p.numel()
    _flat("p", p, FLOAT_DTYPES, n)
    _flat("g", g, FLOAT_DTYPES, n)
    _flat("m", m, (torch.float32,), n)
    _flat("v", v, (torch.float32,), n)
    c1, c2 = _corrections(beta1, beta2, step)
    if n:
        _lib.library().fourbit_adamw_32bit(
            p.data_ptr(), _lib.dtype_code(p.dtype), g.data_ptr(), _lib.dtype_code(g.dtype), m.data_ptr(), v.data_ptr(),
            n, beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps * c2, 1.0 - lr * weight_decay, int(weight_decay > 0.0),
            -lr * c2 / c1, _lib.threads())


@torch.no_grad()
def adamw_update_8bit(p: torch.Tensor, g: torch.Tensor, q1: torch.Tensor, q2: torch.Tensor, absmax1: torch.Tensor,
                      absmax2: torch.Tensor, qmap1: torch.Tensor, qmap2: torch.Tensor, *, lr: float, beta1: float,
                      beta2: float, eps: float, weight_decay: float, step: int) -> None:
    """In place on p ((n,)), q1/q2 (uint8, (n,)) and absmax1/absmax2 (float32, (ceil(n/256),)).

    qmap1 is the signed dynamic map (for m), qmap2 the unsigned one (for v), each (256,) float32.
    """
    n = p.numel()
    nb = -(-n // QBLOCK)
    _flat("p", p, FLOAT_DTYPES, n)
    _flat("g", g, FLOAT_DTYPES, n)
    _flat("q1", q1, (torch.uint8,), n)
    _flat("q2", q2, (torch.uint8,), n)
    _flat("absmax1", absmax1, (torch.float32,), nb)
    _flat("absmax2", absmax2, (torch.float32,), nb)
    map1, map2 = qmap1.float().contiguous(), qmap2.float().contiguous()
    if map1.numel() != 256 or map2.numel() != 256:
        raise ValueError(f"qmap1 and qmap2 must have 256 entries, got {map1.numel()} and {map2.numel()}")
    c1, c2 = _corrections(beta1, beta2, step)
    if n and _lib.library().fourbit_adamw_8bit(
            p.data_ptr(), _lib.dtype_code(p.dtype), g.data_ptr(), _lib.dtype_code(g.dtype), q1.data_ptr(),
            q2.data_ptr(), absmax1.data_ptr(), absmax2.data_ptr(), map1.data_ptr(), map2.data_ptr(), n, beta1,
            1.0 - beta1, beta2, 1.0 - beta2, c2, eps, 1.0 - lr * weight_decay, int(weight_decay > 0.0), -lr / c1,
            _lib.threads()):
        raise MemoryError("adamw_update_8bit: no memory for the maps' search tables")
