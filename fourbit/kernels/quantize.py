"""Triton 4-bit blockwise quantization (NF4 / FP4) with double-quantized scales.

Must equal `fourbit.nf4.quantize` byte for byte: packed codes, absmax, and with double quantization
the 8-bit scale codes, the nested absmax and the offset. The math (SPEC §2-3):

    flat      = x.reshape(-1) widened to float32                  (n,)  blocks run across rows
    absmax[b] = max |flat[b*bs : (b+1)*bs]|                       (nb,) float32
    s[i]      = flat[i] * fl32(1 / max(absmax[b], 1e-38))               correctly rounded division
    NF4 code  = number of the 15 float32 midpoints of the table strictly below s   (a tie goes down)
    FP4 code  = (s < 0) << 3 | bits(number of CUDA's 7 magnitude thresholds strictly below |s|)
    packed[j] = code[2j] << 4 | code[2j+1]                        ((n+1)//2, 1) uint8

Launch plan. The 8-bit stage needs the mean of *all* absmax values before any scale can be coded,
and SPEC §0.3 asks for that mean from `torch.mean` on the device (its reduction order decides the
last bit, and bitsandbytes uses it). So double quantization takes three launches, the fewest the data
dependency allows when the mean must be torch's:
  1. `_quantize_4bit_kernel`: one program per ROWS blocks: load (ROWS, bs) values, block absmax,
     reciprocal, codes, pack pairs, store bytes and the float32 absmax.        reads n, writes n/2
  2. `absmax.mean()`: torch's own reduction over nb = n/bs floats.
  3. `_quantize_nested_kernel`: one program per ROWS groups of 256 scales: subtract the offset,
     absmax2 per group, reciprocal, nearest code of the signed dynamic map (ties to the even index,
     as bitsandbytes' CUDA binary search), store uint8 codes and absmax2.       reads and writes nb
Steps 2-3 touch 1/bs of the data, so the cost is launch latency, not bandwidth.

The nearest-code search in step 3 is `_triton_utils.nearest_code`, a branch-free binary search over
the 255 midpoints fl32(code[j] + code[j+1]) * 0.5: eight probes find how many midpoints lie strictly
below s, a ninth detects an exact tie (then an odd count moves up by one, so ties land on the even index).

Configuration: no autotuning. Each program handles 4096 values (ROWS = 4096 // bs blocks, at least
one) with 4 warps (32 values per thread, loaded 128 bits at a time), or 8 warps for bs >= 1024 and
16 for bs 4096, where the compile report showed spills with fewer (sm_80; sm_90a under Triton 3.6).
The same fixed choice runs under TRITON_INTERPRET=1, where autotune cannot run. Offsets are int64 (the program id is widened first),
so tensors past 2**31 elements are addressed correctly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..nf4.checks import ALLOWED_BLOCKSIZES, check_blocksize, check_finite, check_float_tensor, check_quant_type
from ..nf4.blockwise import code_midpoints
from ..nf4.checks import check_storage
from ..nf4.codes import FP4_THRESHOLDS, NF4_THRESHOLDS, code_for, dynamic_map
from ..nf4.state import NESTED_BLOCKSIZE, QuantState
from ._triton_utils import LAUNCH_OPTIONS, POINTER_TYPES, KernelSpec, check_launch_device, nearest_code

__all__ = ["quantize", "compile_specs"]

VALUES_PER_PROGRAM = 4096  # 32 values per thread with 4 warps
NUM_WARPS = 4
NESTED_ROWS = 4  # groups of 256 scales per program in step 3


def _rows(blocksize: int) -> int:
    return max(1, VALUES_PER_PROGRAM // blocksize)


def _num_warps(blocksize: int) -> int:
    # sm_80's ptxas spilled 8 B (bs 1024) and 84 B (bs 2048) with 4 warps: a block spans several
    # warps there and the cross-warp reduction keeps more live; 8 warps halve the values per thread.
    # With Triton 3.6, bs 4096 still spilled 4 B on sm_90a with 8 warps: 16 there.
    return 16 if blocksize >= 4096 else 8 if blocksize >= 1024 else NUM_WARPS


@triton.jit
def _quantize_4bit_kernel(
    x_ptr,  # (n,) fp32 / fp16 / bf16, contiguous
    packed_ptr,  # (nbytes,) uint8 out
    absmax_ptr,  # (nb,) fp32 out
    thresholds_ptr,  # (NUM_THRESHOLDS,) fp32, ascending
    n,
    nbytes,
    nb,
    BLOCKSIZE: tl.constexpr,
    ROWS: tl.constexpr,
    NUM_THRESHOLDS: tl.constexpr,  # 15 for NF4, 7 for FP4
    FP4: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)  # (ROWS,) block indices, int64
    offs = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]  # (ROWS, bs)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)  # zero pad -> code of 0.0

    absmax = tl.max(tl.abs(x), axis=1)  # (ROWS,)
    tl.store(absmax_ptr + rows, absmax, mask=rows < nb)
    # 1e-38 is below float32's normal range, so a bare literal would become an fp64 constant
    tiny = tl.full((ROWS,), 1e-38, tl.float32)
    recip = tl.math.div_rn(1.0, tl.maximum(absmax, tiny))  # (ROWS,) correctly rounded
    s = x * recip[:, None]  # (ROWS, bs) in [-1, 1]

    compared = tl.abs(s) if FP4 else s
    rank = tl.zeros((ROWS, BLOCKSIZE), dtype=tl.int32)
    for k in tl.static_range(NUM_THRESHOLDS):
        rank += (compared > tl.load(thresholds_ptr + k)).to(tl.int32)
    if FP4:
        # magnitude rank 0..7 -> low three bits {000,001,110,111,100,101,010,011}: flip bit 2
        # exactly when bit 1 is set. The sign is that of s (a tiny x can round to -0.0 in s).
        code = (rank ^ ((rank & 2) << 1)) | ((s < 0).to(tl.int32) << 3)
    else:
        code = rank

    high, low = tl.split(tl.reshape(code, (ROWS, BLOCKSIZE // 2, 2)))  # even / odd elements
    byte_offs = rows[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]  # (ROWS, bs/2)
    tl.store(packed_ptr + byte_offs, ((high << 4) | low).to(tl.uint8), mask=byte_offs < nbytes)


@triton.jit
def _quantize_nested_kernel(
    absmax_ptr,  # (nb,) fp32: the 4-bit stage's scales
    offset_ptr,  # () fp32: their mean
    midpoints_ptr,  # (255,) fp32: fl32(code[j] + code[j+1]) * 0.5 of the signed dynamic map
    q_ptr,  # (nb,) uint8 out
    absmax2_ptr,  # (nb2,) fp32 out
    nb,
    nb2,
    NESTED_BLOCKSIZE: tl.constexpr,  # 256 scales per nested block
    ROWS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)  # (ROWS,) nested block indices
    offs = rows[:, None] * NESTED_BLOCKSIZE + tl.arange(0, NESTED_BLOCKSIZE)[None, :]  # (ROWS, 256)
    mask = offs < nb
    offset = tl.load(offset_ptr)
    v = tl.where(mask, tl.load(absmax_ptr + offs, mask=mask, other=0.0) - offset, 0.0)  # pad with 0

    absmax2 = tl.max(tl.abs(v), axis=1)  # (ROWS,)
    tl.store(absmax2_ptr + rows, absmax2, mask=rows < nb2)
    s = v * tl.math.div_rn(1.0, absmax2)[:, None]  # NaN where absmax2 == 0 (fixed below)

    q = nearest_code(s, midpoints_ptr)  # (ROWS, 256) int32
    q = tl.where(absmax2[:, None] == 0.0, 0, q)
    tl.store(q_ptr + offs, q.to(tl.uint8), mask=mask)


def quantize(
    x: torch.Tensor,
    *,
    blocksize: int = 64,
    quant_type: str = "nf4",
    double_quant: bool = True,
    quant_storage: torch.dtype = torch.uint8,
) -> tuple[torch.Tensor, QuantState]:
    """Quantize `x` to packed 4-bit codes on the GPU (or Triton's interpreter); returns
    (packed, QuantState), equal to `fourbit.nf4.quantize` with the same arguments."""
    check_float_tensor(x)
    check_blocksize(blocksize)
    check_quant_type(quant_type)
    n = x.numel()
    nbytes = (n + 1) // 2
    itemsize = check_storage(quant_storage, nbytes)
    check_finite(x)
    device = check_launch_device(input=x)

    flat = x.contiguous().view(-1)  # (n,) row-major, as the reference's reshape
    nb = -(-n // blocksize)
    packed = torch.empty(nbytes, dtype=torch.uint8, device=device)
    absmax = torch.empty(nb, dtype=torch.float32, device=device)
    fp4 = quant_type == "fp4"
    thresholds = (FP4_THRESHOLDS if fp4 else NF4_THRESHOLDS).to(device)
    rows = _rows(blocksize)
    if n:
        _quantize_4bit_kernel[(triton.cdiv(nb, rows),)](
            flat, packed, absmax, thresholds, n, nbytes, nb,
            BLOCKSIZE=blocksize, ROWS=rows, NUM_THRESHOLDS=thresholds.numel(), FP4=fp4,
            num_warps=_num_warps(blocksize), **LAUNCH_OPTIONS,
        )  # fmt: skip
    packed = packed.view(nbytes, 1)
    if quant_storage != torch.uint8:
        packed = packed.view(-1).view(quant_storage).view(nbytes // itemsize, 1)

    state = QuantState(
        absmax=absmax,
        shape=x.shape,
        dtype=x.dtype,
        blocksize=blocksize,
        quant_type=quant_type,
        code=code_for(quant_type).to(device),
    )
    if double_quant:
        state.absmax, state.offset, state.nested = _double_quantize(absmax)
    return packed, state


def _double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, QuantState]:
    """Launches 2 and 3 of the plan above: (uint8 codes (nb,), offset (), nested QuantState)."""
    nb = absmax.numel()
    nb2 = -(-nb // NESTED_BLOCKSIZE)
    code8 = dynamic_map(signed=True).to(absmax.device)
    midpoints = code_midpoints(code8)  # (255,) exactly as the reference's nearest_code
    offset = absmax.mean() if nb else absmax.new_zeros(())
    q = torch.empty(nb, dtype=torch.uint8, device=absmax.device)
    absmax2 = torch.empty(nb2, dtype=torch.float32, device=absmax.device)
    if nb:
        _quantize_nested_kernel[(triton.cdiv(nb2, NESTED_ROWS),)](
            absmax, offset, midpoints, q, absmax2, nb, nb2,
            NESTED_BLOCKSIZE=NESTED_BLOCKSIZE, ROWS=NESTED_ROWS, num_warps=NUM_WARPS, **LAUNCH_OPTIONS,
        )  # fmt: skip
    return q, offset, QuantState.nested_state(absmax2, nb, code8)


def compile_specs() -> list[KernelSpec]:
    """Every (kernel, config) the launchers above may run: the 4-bit kernel for each block size
    (its ROWS follows from bs) in NF4 from fp32, plus FP4 and 16-bit inputs at the default bs 64,
    and the nested kernel."""
    specs = []
    variants = [(bs, "nf4", torch.float32) for bs in ALLOWED_BLOCKSIZES]
    variants += [(64, "fp4", torch.float32), (64, "nf4", torch.float16), (64, "nf4", torch.bfloat16)]
    for bs, quant_type, dtype in variants:
        fp4 = quant_type == "fp4"
        specs.append(
            KernelSpec(
                name=f"quantize_4bit[{quant_type},{str(dtype)[6:]},bs{bs}]",
                kernel=_quantize_4bit_kernel,
                signature={
                    "x_ptr": POINTER_TYPES[dtype], "packed_ptr": "*u8", "absmax_ptr": "*fp32", "thresholds_ptr": "*fp32",
                    "n": "i32", "nbytes": "i32", "nb": "i32",
                    "BLOCKSIZE": "constexpr", "ROWS": "constexpr", "NUM_THRESHOLDS": "constexpr", "FP4": "constexpr",
                },  # fmt: skip
                constexprs={"BLOCKSIZE": bs, "ROWS": _rows(bs), "NUM_THRESHOLDS": 7 if fp4 else 15, "FP4": fp4},
                num_warps=_num_warps(bs),
                expect_vector_bits=128,
            )
        )
    specs.append(
        KernelSpec(
            name="quantize_nested[bs256]",
            kernel=_quantize_nested_kernel,
            signature={
                "absmax_ptr": "*fp32", "offset_ptr": "*fp32", "midpoints_ptr": "*fp32", "q_ptr": "*u8",
                "absmax2_ptr": "*fp32", "nb": "i32", "nb2": "i32", "NESTED_BLOCKSIZE": "constexpr", "ROWS": "constexpr",
            },  # fmt: skip
            constexprs={"NESTED_BLOCKSIZE": NESTED_BLOCKSIZE, "ROWS": NESTED_ROWS},
            num_warps=NUM_WARPS,
            expect_vector_bits=128,
        )
    )
    return specs
