"""CPU kernels for one AdamW step on flat tensors, same names and signatures as fourbit.nf4.adamw and
equal to it bit for bit (csrc/adamw.c): one pass over p, g and the states instead of the reference's
~13 torch ops (the 8-bit step also dequantizes and requantizes its states in that pass).

The float32 constants are computed here exactly as the reference's torch ops round their Python
scalars: a Python float expression in double precision, then one rounding to float32. The kernels
write through raw pointers, outside autograd, as the reference's in-place ops under no_grad."""

from __future__ import annotations

import ctypes
import math

import torch

from ..nf4.checks import FLOAT_DTYPES
from . import _lib

__all__ = ["adamw_update_32bit", "adamw_update_32bit_many", "adamw_update_8bit", "adamw_update_8bit_many",
           "any_nonfinite"]

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


def _ptrs(tensors) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*(t.data_ptr() for t in tensors))


def _codes(tensors) -> ctypes.Array:
    return (ctypes.c_int * len(tensors))(*(_lib.dtype_code(t.dtype) for t in tensors))


def _sizes(tensors) -> ctypes.Array:
    return (ctypes.c_int64 * len(tensors))(*(t.numel() for t in tensors))


def adamw_update_32bit_many(ps: list, gs: list, ms: list, vs: list, *, lr: float, beta1: float, beta2: float,
                            eps: float, weight_decay: float, step: int) -> None:
    """`adamw_update_32bit` on every (p, g, m, v) in one call (the same bytes as one call each)."""
    if not (len(ps) == len(gs) == len(ms) == len(vs)):
        raise ValueError(f"adamw_update_32bit_many: {len(ps)} params, {len(gs)} grads, {len(ms)} and {len(vs)} states")
    keep = []
    for i, (p, g, m, v) in enumerate(zip(ps, gs, ms, vs)):
        n = p.numel()
        # the common case in one expression: this runs per tensor of every step
        if not (n == g.numel() == m.numel() == v.numel() and m.dtype is torch.float32 and v.dtype is torch.float32
                and p.dtype in FLOAT_DTYPES and g.dtype in FLOAT_DTYPES and p.is_cpu and g.is_cpu and m.is_cpu
                and v.is_cpu and p.is_contiguous() and g.is_contiguous() and m.is_contiguous() and v.is_contiguous()):
            _check(n, p=(p, FLOAT_DTYPES, n), g=(g, FLOAT_DTYPES, n), m=(m, _F32, n), v=(v, _F32, n))
        if n:
            keep.append(i)
    if not keep:
        return
    if len(keep) < len(ps):
        ps, gs, ms, vs = ([t[i] for i in keep] for t in (ps, gs, ms, vs))
    c1, c2 = _corrections(beta1, beta2, step)
    if _lib.loaded().fourbit_adamw_32bit_many(
            len(ps), _ptrs(ps), _codes(ps), _ptrs(gs), _codes(gs), _ptrs(ms), _ptrs(vs), _sizes(ps), beta1,
            1.0 - beta1, beta2, 1.0 - beta2, eps * c2, 1.0 - lr * weight_decay, int(weight_decay > 0.0),
            -lr * c2 / c1, _lib.threads()):
        raise MemoryError("adamw_update_32bit_many: no memory for the tensor table")


def adamw_update_8bit_many(ps: list, gs: list, q1s: list, q2s: list, absmax1s: list, absmax2s: list,
                           qmap1: torch.Tensor, qmap2: torch.Tensor, *, lr: float, beta1: float, beta2: float,
                           eps: float, weight_decay: float, step: int) -> None:
    """`adamw_update_8bit` on every tensor's (p, g, q1, q2, absmax1, absmax2) in one call, one pair of maps."""
    lists = (ps, gs, q1s, q2s, absmax1s, absmax2s)
    if len({len(t) for t in lists}) != 1:
        raise ValueError(f"adamw_update_8bit_many: lists of different lengths {[len(t) for t in lists]}")
    _check(256, qmap1=(qmap1, _F32, 256), qmap2=(qmap2, _F32, 256))
    keep = [i for i, p in enumerate(ps) if p.numel()]
    for i in keep:
        n = ps[i].numel()
        nb = -(-n // QBLOCK)
        _check(n, p=(ps[i], FLOAT_DTYPES, n), g=(gs[i], FLOAT_DTYPES, n), q1=(q1s[i], _U8, n), q2=(q2s[i], _U8, n),
               absmax1=(absmax1s[i], _F32, nb), absmax2=(absmax2s[i], _F32, nb))
    if not keep:
        return
    ps, gs, q1s, q2s, absmax1s, absmax2s = ([t[i] for i in keep] for t in lists)
    c1, c2 = _corrections(beta1, beta2, step)
    if _lib.loaded().fourbit_adamw_8bit_many(
            len(ps), _ptrs(ps), _codes(ps), _ptrs(gs), _codes(gs), _ptrs(q1s), _ptrs(q2s), _ptrs(absmax1s),
            _ptrs(absmax2s), qmap1.data_ptr(), qmap2.data_ptr(), _sizes(ps), beta1, 1.0 - beta1, beta2, 1.0 - beta2,
            c2, eps, 1.0 - lr * weight_decay, int(weight_decay > 0.0), -lr / c1, _lib.threads()):
        raise MemoryError("adamw_update_8bit_many: no memory for the maps' search tables")


def any_nonfinite(tensors: list[torch.Tensor]) -> list[bool]:
    """For each CPU tensor, whether it holds a NaN or an infinity (one pass, one call for all)."""
    for t in tensors:
        if t.dtype not in FLOAT_DTYPES + (torch.float64,) or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError(f"any_nonfinite: needs contiguous float CPU tensors, got {t.dtype} on {t.device}")
    if not tensors:
        return []
    bad = (ctypes.c_uint8 * len(tensors))()
    if _lib.loaded().fourbit_nonfinite_many(len(tensors), _ptrs(tensors), _codes(tensors), _sizes(tensors), bad,
                                            _lib.threads()):
        raise MemoryError("any_nonfinite: no memory for the tensor table")
    return [bool(b) for b in bad]
