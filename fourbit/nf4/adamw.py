"""One AdamW step on flat tensors: the reference (plain PyTorch) for 32-bit and 8-bit states.

`fourbit.kernels.adamw` holds the Triton twins (same names, same signatures, same bits);
`fourbit.dispatch` picks one; the optimizers (`fourbit.train.optim`) call dispatch.

AdamW (Loshchilov & Hutter), in the form bitsandbytes computes on CPU (SPEC §7), step t >= 1:

    m  <- beta1 m + (1 - beta1) g                    first moment
    v  <- beta2 v + (1 - beta2) g^2                  second moment
    c1 = 1 - beta1^t,  c2 = sqrt(1 - beta2^t)        bias corrections (Python float64)
    P  <- P (1 - lr wd)                              decoupled weight decay, applied first
    P  <- P - (lr / c1) m / (sqrt(v) / c2 + eps)     (32 bits: the same, as lr c2/c1 m/(sqrt v + eps c2))

P is the parameter widened to float32; the result is rounded once to the parameter's dtype.

Exact floating-point semantics, measured on torch's CPU kernels and relied on by the tests and by
the Triton kernel (fl = one float32 rounding, fma = fused multiply-add, one rounding; Python scalars
are first rounded to float32):

    a.mul_(s)                   fl(a s)
    a.add_(b, alpha=s)          fma(b, s, a)
    a.addcmul_(b, c, value=s)   fma(fl(s b), c, a)
    a.addcdiv_(b, c, value=s)   fl(a + fl(fl(s b) / c))

    a / b, a * b, a + b         correctly rounded (IEEE)
    a.sqrt()                    NOT correctly rounded on CPU: torch's CPU build is one ulp off for
                                ~0.6 % of float32 inputs (per element, whatever the length)

Every op is a function of its own element only (no vector-width or thread-split dependence), so
updating a tensor chunk by chunk (the pager) gives the same bits as updating it whole. `sqrt_rn`
below repairs the CPU square root so that the CPU reference, CUDA (whose sqrt is IEEE) and the
Triton kernel (`sqrt_rn`) agree bit for bit. Otherwise this is bitsandbytes' CPU sequence; parameters
match bitsandbytes' CPU AdamW to ~1e-7 relative (the square root is the only difference).

8-bit states: m and v are stored as uint8 codes with one float32 absmax per 256-element block,
m with the signed dynamic map and v with the unsigned one (SPEC §1.3, §7). The step dequantizes,
updates as above (with the denominator written as sqrt(v)/c2 + eps, as bitsandbytes' CPU path
does), and requantizes with `fourbit.nf4.quantize_blockwise` (nearest code, ties to even: CUDA
semantics; bitsandbytes' CPU build uses its 65536-bin table instead, SPEC §3).
"""

from __future__ import annotations

import math

import torch

from .blockwise import dequantize_blockwise, quantize_blockwise

__all__ = ["adamw_update_32bit", "adamw_update_8bit", "sqrt_rn", "QBLOCK"]

QBLOCK = 256


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root of x >= 0 (float32, any shape).

    CUDA's sqrt is already correctly rounded. On CPU, take the float64 root and round it to float32.
    That double rounding is safe. Say sqrt(x) lies in [2^e, 2^(e+1)); the float32 rounding midpoints
    there are M = (2k+1) 2^(e-24), so M^2 / 2^(2e-48) is odd, while x / 2^(2e-48) is even (x is a
    float32 in [2^2e, 2^(2e+2)), a multiple of 2^(2e-23); subnormal x too). Hence x != M^2, and
    |x - M^2| >= 2^(2e-48), |sqrt(x) - M| = |x - M^2| / (sqrt(x) + M) >= 2^(2e-48) / 2^(e+2)
    = 2^(e-50): four float64 ulps. A float64 root within one ulp (torch's measured worst case)
    therefore rounds to the correct float32.
    """
    if x.is_cuda:
        return x.sqrt()
    return x.double().sqrt().float()


def _corrections(beta1: float, beta2: float, step: int) -> tuple[float, float]:
    return 1.0 - beta1**step, math.sqrt(1.0 - beta2**step)


@torch.no_grad()
def adamw_update_32bit(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
) -> None:
    """In place on p (any float dtype, (n,)), m and v (float32, (n,)); g has p's shape."""
    grad = g.float()  # (n,)
    param = p.float()  # (n,); p itself when p is float32
    m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    c1, c2 = _corrections(beta1, beta2, step)
    if weight_decay > 0.0:
        param.mul_(1.0 - lr * weight_decay)
    update = m / (sqrt_rn(v) + eps * c2)
    param.add_(update, alpha=-lr * c2 / c1)
    if param.data_ptr() != p.data_ptr():
        p.copy_(param)


@torch.no_grad()
def adamw_update_8bit(
    p: torch.Tensor,
    g: torch.Tensor,
    q1: torch.Tensor,
    q2: torch.Tensor,
    absmax1: torch.Tensor,
    absmax2: torch.Tensor,
    qmap1: torch.Tensor,
    qmap2: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
) -> None:
    """In place on p ((n,)), q1/q2 (uint8, (n,)) and absmax1/absmax2 (float32, (ceil(n/256),)).

    qmap1 is the signed dynamic map (for m), qmap2 the unsigned one (for v), each (256,) float32.
    """
    grad = g.float()  # (n,)
    param = p.float()  # (n,)
    m = dequantize_blockwise(q1, absmax1, qmap1, QBLOCK)  # (n,) float32
    v = dequantize_blockwise(q2, absmax2, qmap2, QBLOCK)
    m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    c1, c2 = _corrections(beta1, beta2, step)
    denom = (sqrt_rn(v) / c2).add_(eps)
    if weight_decay > 0.0:
        param.mul_(1.0 - lr * weight_decay)
    param.addcdiv_(m, denom, value=-lr / c1)
    if param.data_ptr() != p.data_ptr():
        p.copy_(param)
    new_q1, new_absmax1 = quantize_blockwise(m, qmap1, QBLOCK)
    new_q2, new_absmax2 = quantize_blockwise(v, qmap2, QBLOCK)
    q1.copy_(new_q1)
    q2.copy_(new_q2)
    absmax1.copy_(new_absmax1)
    absmax2.copy_(new_absmax2)


def adamw_update_32bit_many(ps: list, gs: list, ms: list, vs: list, **hyper) -> None:
    """`adamw_update_32bit` on each (p, g, m, v) in turn: a group of tensors sharing the hyperparameters
    (an optimizer's parameters), which a kernel can step in one call."""
    for p, g, m, v in zip(ps, gs, ms, vs, strict=True):
        adamw_update_32bit(p, g, m, v, **hyper)


def adamw_update_8bit_many(ps: list, gs: list, q1s: list, q2s: list, absmax1s: list, absmax2s: list,
                           qmap1: torch.Tensor, qmap2: torch.Tensor, **hyper) -> None:
    """`adamw_update_8bit` on each tensor's (p, g, q1, q2, absmax1, absmax2) in turn, one pair of maps."""
    for p, g, q1, q2, a1, a2 in zip(ps, gs, q1s, q2s, absmax1s, absmax2s, strict=True):
        adamw_update_8bit(p, g, q1, q2, a1, a2, qmap1, qmap2, **hyper)


@torch.no_grad()
def any_nonfinite(tensors: list[torch.Tensor]) -> list[bool]:
    """For each tensor, whether it holds a NaN or an infinity (the optimizer skips such a gradient).

    sum(0 * t) is 0 when every element is finite and NaN otherwise (0 * inf = NaN), and costs a fifth
    of isfinite(t).all(); one device-to-host transfer per device for all the flags."""
    flags = [False] * len(tensors)
    for device in {t.device for t in tensors}:
        index = [i for i, t in enumerate(tensors) if t.device == device]
        sums = torch.stack([tensors[i].mul(0).sum(dtype=torch.float32) for i in index])
        for i, ok in zip(index, (sums == 0).tolist()):
            flags[i] = not ok
    return flags
