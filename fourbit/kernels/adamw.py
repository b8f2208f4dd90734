"""Triton fused AdamW steps: 8-bit blockwise states (dequantize, update, requantize in one pass),
and the same step with 32-bit states.

Each must equal its namesake in `fourbit.nf4.adamw` (the reference) bit for bit (same name, same
signature). Per element i of block b (256 elements), with fl = one float32 rounding and every
constant rounded to float32 first, exactly as torch's CPU ops round (see fourbit/nf4/adamw.py):

  8-bit, `adamw_update_8bit`:
    m  = fl(qmap1[q1[i]] * absmax1[b]);  v = fl(qmap2[q2[i]] * absmax2[b])      dequantize
    m  = fma(g, 1 - beta1, fl(m * beta1))                                       first moment
    v  = fma(fl((1 - beta2) * g), g, fl(v * beta2))                            second moment
    d  = fl(fl(sqrt(v) / c2) + eps)                                             c2 = sqrt(1 - beta2^t)
    P  = fl(P * (1 - lr wd));   P = fl(P + fl(fl(-lr / c1 * m) / d))            c1 = 1 - beta1^t
    absmax1[b] = max |m|, q1[i] = nearest(qmap1, fl(m * fl(1 / absmax1[b])))    requantize (signed map)
    absmax2[b] = max |v|, q2[i] = nearest(qmap2, fl(v * fl(1 / absmax2[b])))    (unsigned map)

  32-bit, `adamw_update_32bit`: m and v as above, read and written as float32, then
    P  = fl(P * (1 - lr wd));   P = fma(fl(m / fl(sqrt(v) + fl(eps c2))), -lr c2 / c1, P)

`nearest` is the nearest code with exact ties going to the even index (bitsandbytes' CUDA search,
`_triton_utils.nearest_code`): eight binary-search probes into the 255 float32 midpoints count those
strictly below s, a ninth probe detects a tie. An all-zero block gets absmax 0 and codes 0.

Memory traffic per element with fp32 p and g: 8-bit reads p, g, q1, q2 (10 bytes) and writes p, q1,
q2 (6): 16 bytes, against 28 for 32-bit states (reads p, g, m, v; writes p, m, v). The absmax
scales and the 2 KiB of maps (cached) are negligible. Both kernels are bandwidth bound. Division
and square root are the correctly rounded `div_rn` / `sqrt_rn` (not CUDA's fast-math
approximations), and no multiply-add is contracted into an FMA (LAUNCH_OPTIONS), so the GPU gives
the CPU reference's bits. One launch per state segment replaces the ~13 torch ops of the reference.

Configuration: one program per 1024 elements (8-bit: ROWS = 4 quantization blocks), 4 warps, 8
elements per thread. No autotuning, so the same choice runs under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..nf4.adamw import QBLOCK
from ..nf4.blockwise import code_midpoints
from ..nf4.checks import FLOAT_DTYPES
from ._triton_utils import LAUNCH_OPTIONS, POINTER_TYPES, KernelSpec, check_launch_device, nearest_code

__all__ = ["adamw_update_8bit", "adamw_update_32bit", "compile_specs"]

ROWS = 4
BLOCK_32 = 1024
NUM_WARPS = 4


@triton.jit
def _adamw_8bit_kernel(
    p_ptr,  # (n,) fp32 / fp16 / bf16, updated in place
    g_ptr,  # (n,) gradient, any float dtype
    q1_ptr,  # (n,) uint8 first-moment codes, in place
    q2_ptr,  # (n,) uint8 second-moment codes, in place
    absmax1_ptr,  # (nb,) fp32, in place
    absmax2_ptr,  # (nb,) fp32, in place
    qmap1_ptr,  # (256,) fp32 signed dynamic map
    qmap2_ptr,  # (256,) fp32 unsigned dynamic map
    mid1_ptr,  # (255,) fp32 midpoints of qmap1
    mid2_ptr,  # (255,) fp32 midpoints of qmap2
    beta1,  # fp32 scalars, each the float32 rounding of the Python float (as torch rounds them)
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    c2,  # sqrt(1 - beta2^t)
    eps,
    decay,  # 1 - lr * weight_decay
    step_size,  # -lr / (1 - beta1^t)
    n,
    nb,
    QBLOCK: tl.constexpr,
    ROWS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)  # (ROWS,) block indices
    offs = rows[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]  # (ROWS, 256)
    mask = offs < n
    row_mask = rows < nb

    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    param = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    q1 = tl.load(q1_ptr + offs, mask=mask, other=0).to(tl.int32)
    q2 = tl.load(q2_ptr + offs, mask=mask, other=0).to(tl.int32)
    a1 = tl.load(absmax1_ptr + rows, mask=row_mask, other=0.0)  # (ROWS,)
    a2 = tl.load(absmax2_ptr + rows, mask=row_mask, other=0.0)
    m = tl.load(qmap1_ptr + q1) * a1[:, None]  # (ROWS, 256) dequantized
    v = tl.load(qmap2_ptr + q2) * a2[:, None]

    m = tl.fma(g, one_minus_beta1, m * beta1)
    v = tl.fma(one_minus_beta2 * g, g, v * beta2)
    m = tl.where(mask, m, 0.0)  # padding must not reach the block maxima
    v = tl.where(mask, v, 0.0)
    denom = tl.math.div_rn(tl.math.sqrt_rn(v), c2) + eps
    param = param * decay
    param = param + tl.math.div_rn(step_size * m, denom)
    tl.store(p_ptr + offs, param.to(p_ptr.dtype.element_ty), mask=mask)

    new_a1 = tl.max(tl.abs(m), axis=1)  # (ROWS,)
    new_a2 = tl.max(v, axis=1)  # v >= 0
    s1 = m * tl.math.div_rn(1.0, new_a1)[:, None]  # NaN in an all-zero block (fixed below)
    s2 = v * tl.math.div_rn(1.0, new_a2)[:, None]
    c1 = tl.where(new_a1[:, None] == 0.0, 0, nearest_code(s1, mid1_ptr))
    c2_code = tl.where(new_a2[:, None] == 0.0, 0, nearest_code(s2, mid2_ptr))
    tl.store(q1_ptr + offs, c1.to(tl.uint8), mask=mask)
    tl.store(q2_ptr + offs, c2_code.to(tl.uint8), mask=mask)
    tl.store(absmax1_ptr + rows, new_a1, mask=row_mask)
    tl.store(absmax2_ptr + rows, new_a2, mask=row_mask)


@triton.jit
def _adamw_32bit_kernel(
    p_ptr,  # (n,) fp32 / fp16 / bf16, updated in place
    g_ptr,  # (n,) gradient, any float dtype
    m_ptr,  # (n,) fp32 first moment, in place
    v_ptr,  # (n,) fp32 second moment, in place
    beta1,  # fp32 scalars, as in the 8-bit kernel
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps_c2,  # eps * sqrt(1 - beta2^t)
    decay,  # 1 - lr * weight_decay
    step_size,  # -lr * sqrt(1 - beta2^t) / (1 - beta1^t)
    n,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    param = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    m = tl.fma(g, one_minus_beta1, m * beta1)
    v = tl.fma(one_minus_beta2 * g, g, v * beta2)
    update = tl.math.div_rn(m, tl.math.sqrt_rn(v) + eps_c2)
    param = tl.fma(update, step_size, param * decay)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    tl.store(p_ptr + offs, param.to(p_ptr.dtype.element_ty), mask=mask)


def _check(name: str, t: torch.Tensor, dtype: tuple[torch.dtype, ...], numel: int) -> None:
    if t.dtype not in dtype or t.numel() != numel or not t.is_contiguous():
        raise ValueError(
            f"{name} must be a contiguous {' or '.join(map(str, dtype))} tensor of {numel} elements, "
            f"got {t.dtype} with {t.numel()} elements (contiguous={t.is_contiguous()})"
        )


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
    """One AdamW step in place on p and the 8-bit states (flat tensors; see the module docstring)."""
    n = p.numel()
    nb = -(-n // QBLOCK)
    _check("p", p, FLOAT_DTYPES, n)
    _check("g", g, FLOAT_DTYPES, n)
    for name, t in (("q1", q1), ("q2", q2)):
        _check(name, t, (torch.uint8,), n)
    for name, t in (("absmax1", absmax1), ("absmax2", absmax2)):
        _check(name, t, (torch.float32,), nb)
    for name, t in (("qmap1", qmap1), ("qmap2", qmap2)):
        _check(name, t, (torch.float32,), 256)
    if step < 1:
        raise ValueError(f"step counts from 1, got {step}")
    check_launch_device(p=p, g=g, q1=q1, q2=q2, absmax1=absmax1, absmax2=absmax2, qmap1=qmap1, qmap2=qmap2)
    c1, c2 = 1.0 - beta1**step, math.sqrt(1.0 - beta2**step)
    constants = [beta1, 1.0 - beta1, beta2, 1.0 - beta2, c2, eps, 1.0 - lr * weight_decay, -lr / c1]
    scalars = torch.tensor(constants, dtype=torch.float32).tolist()  # each rounded once to fp32, like torch
    mid1, mid2 = code_midpoints(qmap1), code_midpoints(qmap2)  # (255,) each, as the reference's nearest_code
    if n:
        _adamw_8bit_kernel[(triton.cdiv(nb, ROWS),)](
            p, g, q1, q2, absmax1, absmax2, qmap1, qmap2, mid1, mid2, *scalars, n, nb,
            QBLOCK=QBLOCK, ROWS=ROWS, num_warps=NUM_WARPS, **LAUNCH_OPTIONS,
        )  # fmt: skip


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
    """One AdamW step in place on p and the float32 states m, v (flat tensors; see the docstring)."""
    n = p.numel()
    _check("p", p, FLOAT_DTYPES, n)
    _check("g", g, FLOAT_DTYPES, n)
    for name, t in (("m", m), ("v", v)):
        _check(name, t, (torch.float32,), n)
    if step < 1:
        raise ValueError(f"step counts from 1, got {step}")
    check_launch_device(p=p, g=g, m=m, v=v)
    c1, c2 = 1.0 - beta1**step, math.sqrt(1.0 - beta2**step)
    constants = [beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps * c2, 1.0 - lr * weight_decay, -lr * c2 / c1]
    scalars = torch.tensor(constants, dtype=torch.float32).tolist()
    if n:
        _adamw_32bit_kernel[(triton.cdiv(n, BLOCK_32),)](
            p, g, m, v, *scalars, n, BLOCK=BLOCK_32, num_warps=NUM_WARPS, **LAUNCH_OPTIONS
        )


def compile_specs() -> list[KernelSpec]:
    """Both kernels for fp32 / bf16 / fp16 parameters (gradient in the parameter's dtype)."""
    specs = []
    for dtype, ptr in POINTER_TYPES.items():
        specs.append(
            KernelSpec(
                name=f"adamw_8bit[{str(dtype)[6:]}]",
                kernel=_adamw_8bit_kernel,
                signature={
                    "p_ptr": ptr, "g_ptr": ptr, "q1_ptr": "*u8", "q2_ptr": "*u8", "absmax1_ptr": "*fp32",
                    "absmax2_ptr": "*fp32", "qmap1_ptr": "*fp32", "qmap2_ptr": "*fp32", "mid1_ptr": "*fp32",
                    "mid2_ptr": "*fp32", "beta1": "fp32", "one_minus_beta1": "fp32", "beta2": "fp32",
                    "one_minus_beta2": "fp32", "c2": "fp32", "eps": "fp32", "decay": "fp32", "step_size": "fp32",
                    "n": "i32", "nb": "i32",
                    "QBLOCK": "constexpr", "ROWS": "constexpr",
                },  # fmt: skip
                constexprs={"QBLOCK": QBLOCK, "ROWS": ROWS},
                num_warps=NUM_WARPS,
            )
        )
        specs.append(
            KernelSpec(
                name=f"adamw_32bit[{str(dtype)[6:]}]",
                kernel=_adamw_32bit_kernel,
                signature={
                    "p_ptr": ptr, "g_ptr": ptr, "m_ptr": "*fp32", "v_ptr": "*fp32", "beta1": "fp32",
                    "one_minus_beta1": "fp32", "beta2": "fp32", "one_minus_beta2": "fp32", "eps_c2": "fp32",
                    "decay": "fp32", "step_size": "fp32", "n": "i32", "BLOCK": "constexpr",
                },  # fmt: skip
                constexprs={"BLOCK": BLOCK_32},
                num_warps=NUM_WARPS,
                expect_vector_bits=128 if dtype == torch.float32 else None,
            )
        )
    return specs
