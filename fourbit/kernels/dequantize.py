"""Triton 4-bit dequantization (NF4 / FP4), nested scales decoded inline, in one launch.

Must equal `fourbit.nf4.dequantize` bit for bit (SPEC §3-4):

    absmax_hat[b] = fl32(fl32(code8[qabs[b]] * absmax2[b // 256]) + offset)   double quantization
                  = absmax[b]                                                  otherwise
    out[i]        = round_to(dtype, fl32(code[nibble(i)] * absmax_hat[i // bs]))
    nibble(2j) = packed[j] >> 4,  nibble(2j+1) = packed[j] & 15

bitsandbytes rebuilds the float32 absmax vector in memory first (dequantize_blockwise, then an add
of the offset) and only then decodes the weight: three launches and an extra round trip of nb
floats. Here each program rebuilds the scales of its own blocks from the 8-bit codes, so the whole
dequantization is a single launch that reads n/2 packed bytes plus ~n/bs scale bytes and writes n
values.

The reconstruction is two float32 roundings (multiply, then add). A GPU compiler would happily fuse
them into one FMA, which differs in the last bit for some scales, so every launch passes
`enable_fp_fusion=False` (Triton then also asks ptxas for --fmad=false).

Layout and configuration: one program decodes 2048 packed bytes = ROWS whole blocks of bs/2 bytes
(ROWS = 4096 // bs) with 4 warps, so every thread loads 16 contiguous bytes (one 128-bit load) and
stores the 32 values they hold (fp32: eight 128-bit stores; fp16/bf16: four). Because blocks hold at
least 32 values, all 32 values of a thread share one scale: the scale is one load per thread (plus,
with double quantization, its code byte, the code8 entry and absmax2). The 16-entry code table sits
in registers, one entry per lane, and each nibble is looked up with one warp shuffle
(`_decode.lookup_bytes`): no memory instruction per value. Under the interpreter (no inline
assembly) the same float32 codes are gathered from the table in memory. `dequantize_into` writes
into a caller's buffer: the matmul's dequantize + cuBLAS path reuses one workspace per dtype. No
autotuning: the same config runs under TRITON_INTERPRET=1. Offsets are int64 (the program id is widened first).

Interpreter note: Triton 3.9's interpreter truncates fp32 -> bf16 instead of rounding to nearest
even. This kernel keeps the native cast (correctly rounded on GPUs); the tests compare bf16 outputs
under the interpreter against either rounding of the bit-exact fp32 result.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..nf4.checks import ALLOWED_BLOCKSIZES, FLOAT_DTYPES, check_float_dtype
from ..nf4.quant import check_packed
from ..nf4.state import NESTED_BLOCKSIZE, QuantState
from ._decode import lane_table, lookup_bytes
from ._triton_utils import LAUNCH_OPTIONS, POINTER_TYPES, KernelSpec, check_launch_device, interpreting
from .compile import Launch

__all__ = ["dequantize", "dequantize_into", "dequantize_launch", "compile_specs"]

BYTES_PER_PROGRAM = 2048  # 16 bytes per thread with 4 warps
NUM_WARPS = 4


def _rows(blocksize: int) -> int:
    return max(1, BYTES_PER_PROGRAM // (blocksize // 2))


@triton.jit
def _dequantize_4bit_kernel(
    packed_ptr,  # (nbytes,) uint8: two codes per byte, the even element in the high nibble
    code_ptr,  # (16,) fp32: the NF4 / FP4 table
    absmax_ptr,  # (nb,) fp32 scales, or (nb,) uint8 scale codes when NESTED
    absmax2_ptr,  # (ceil(nb / NESTED_BLOCKSIZE),) fp32 nested scales (NESTED only)
    code8_ptr,  # (256,) fp32 signed dynamic map (NESTED only)
    offset_ptr,  # () fp32 mean of the scales (NESTED only)
    out_ptr,  # (n,) fp32 / fp16 / bf16 out
    n,
    nbytes,
    nb,
    BLOCKSIZE: tl.constexpr,
    ROWS: tl.constexpr,
    NESTED: tl.constexpr,  # the scales are double-quantized
    NESTED_BLOCKSIZE: tl.constexpr,  # 256
    SHFL: tl.constexpr,  # codes by warp shuffle (GPU) or table gather (interpreter)
):
    HALF: tl.constexpr = BLOCKSIZE // 2
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)  # (ROWS,) block indices, int64
    byte_offs = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]  # (ROWS, bs/2)
    packed = tl.load(packed_ptr + byte_offs, mask=byte_offs < nbytes, other=0)  # (ROWS, bs/2) uint8
    table = lane_table(code_ptr, tl.zeros((ROWS, HALF), tl.int32), SHFL)
    high, low = lookup_bytes(packed, table, code_ptr, SHFL)  # (ROWS, bs/2) fp32: elements 2j, 2j+1

    in_range = rows < nb
    if NESTED:
        qabs = tl.load(absmax_ptr + rows, mask=in_range, other=0).to(tl.int32)
        absmax2 = tl.load(absmax2_ptr + rows // NESTED_BLOCKSIZE, mask=in_range, other=0.0)
        scale = tl.load(code8_ptr + qabs) * absmax2 + tl.load(offset_ptr)  # (ROWS,) two roundings
    else:
        scale = tl.load(absmax_ptr + rows, mask=in_range, other=0.0)  # (ROWS,)

    values = tl.interleave(high * scale[:, None], low * scale[:, None])  # (ROWS, bs) in element order
    offs = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    tl.store(out_ptr + offs, values.to(out_ptr.dtype.element_ty), mask=offs < n)


def dequantize(packed: torch.Tensor, state: QuantState, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense tensor of `state.shape` in `dtype` (default: the dtype that was quantized), equal to
    `fourbit.nf4.dequantize` bit for bit."""
    dtype = dtype or state.dtype
    check_float_dtype(dtype)
    out = torch.empty(state.numel, dtype=dtype, device=packed.device)
    return dequantize_into(packed, state, out).view(state.shape)


def dequantize_into(packed: torch.Tensor, state: QuantState, out: torch.Tensor) -> torch.Tensor:
    """Write the dequantized weight into `out`, a contiguous float tensor of `state.numel` elements
    (any shape; the matmul's reused workspace), and return it."""
    data = check_packed(packed, state)  # (nbytes,) uint8 view; packed and absmax on one device
    if out.dtype not in FLOAT_DTYPES or out.numel() != state.numel or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32/float16/bfloat16 tensor of {state.numel} elements, "
                         f"got {out.dtype} with {out.numel()} elements (contiguous: {out.is_contiguous()})")
    n, bs = state.numel, state.blocksize
    nb = _check_scales(state)
    absmax, absmax2, code8, offset = state.as_tensors()
    nested = absmax2 is not None
    check_launch_device(packed=data, out=out, absmax=absmax, code=state.code, offset=offset, nested_absmax=absmax2,
                        nested_code=code8)
    code = state.code.contiguous()
    absmax = absmax.contiguous()
    if nested:
        absmax2, code8, offset = absmax2.contiguous(), code8.contiguous(), offset.reshape(())
    else:
        absmax2, code8, offset = absmax, absmax, absmax  # unused when NESTED is False
    rows = _rows(bs)
    if n:
        _dequantize_4bit_kernel[(triton.cdiv(nb, rows),)](
            data, code, absmax, absmax2, code8, offset, out, n, data.numel(), nb,
            BLOCKSIZE=bs, ROWS=rows, NESTED=nested, NESTED_BLOCKSIZE=NESTED_BLOCKSIZE, SHFL=not interpreting(),
            num_warps=NUM_WARPS, **LAUNCH_OPTIONS,
        )  # fmt: skip
    return out


def _check_scales(state: QuantState) -> int:
    """The number of blocks, after checking that the state's tensors have the dtypes and sizes the
    kernel indexes (it does not bounds-check its gathers)."""
    if state.blocksize not in ALLOWED_BLOCKSIZES:
        raise ValueError(f"state.blocksize must be one of {list(ALLOWED_BLOCKSIZES)}, got {state.blocksize}")
    nb = -(-state.numel // state.blocksize)
    if state.code.dtype != torch.float32 or state.code.numel() != 16:
        raise ValueError(f"state.code must be 16 float32 values, got {state.code.numel()} {state.code.dtype}")
    want = torch.uint8 if state.nested is not None else torch.float32
    if state.absmax.dtype != want or state.absmax.numel() != nb:
        raise ValueError(
            f"state.absmax must be {nb} {want} values for {state.numel} elements in blocks of {state.blocksize}, "
            f"got {state.absmax.numel()} {state.absmax.dtype}"
        )
    nested = state.nested
    if nested is None:
        return nb
    if nested.blocksize != NESTED_BLOCKSIZE:
        raise ValueError(f"nested blocksize must be {NESTED_BLOCKSIZE} (as bitsandbytes), got {nested.blocksize}")
    nb2 = -(-nb // NESTED_BLOCKSIZE)
    if nested.absmax.dtype != torch.float32 or nested.absmax.numel() != nb2:
        raise ValueError(f"nested absmax must be {nb2} float32 values, got {nested.absmax.numel()} {nested.absmax.dtype}")
    if nested.code.dtype != torch.float32 or nested.code.numel() != 256:
        raise ValueError(f"nested code must be 256 float32 values, got {nested.code.numel()} {nested.code.dtype}")
    if state.offset is None or state.offset.numel() != 1 or state.offset.dtype != torch.float32:
        raise ValueError("double quantization needs a float32 scalar offset (the mean of the scales)")
    return nb


def _spec(bs: int, dtype: torch.dtype, double: bool) -> KernelSpec:
    return KernelSpec(
        name=f"dequantize_4bit[{str(dtype)[6:]},bs{bs}{',dq' if double else ''}]",
        kernel=_dequantize_4bit_kernel,
        signature={
            "packed_ptr": "*u8", "code_ptr": "*fp32", "absmax_ptr": "*u8" if double else "*fp32",
            "absmax2_ptr": "*fp32", "code8_ptr": "*fp32", "offset_ptr": "*fp32", "out_ptr": POINTER_TYPES[dtype],
            "n": "i32", "nbytes": "i32", "nb": "i32",
            "BLOCKSIZE": "constexpr", "ROWS": "constexpr", "NESTED": "constexpr", "NESTED_BLOCKSIZE": "constexpr",
            "SHFL": "constexpr",
        },  # fmt: skip
        constexprs={"BLOCKSIZE": bs, "ROWS": _rows(bs), "NESTED": double, "NESTED_BLOCKSIZE": NESTED_BLOCKSIZE, "SHFL": True},
        num_warps=NUM_WARPS,
        expect_vector_bits=128,
    )


def dequantize_launch(numel: int, *, dtype: torch.dtype, nested: bool, blocksize: int) -> Launch:
    """The launch `dequantize_into` issues for `numel` weights, for the static cost model: one
    straight-line program per BYTES_PER_PROGRAM packed bytes; compulsory traffic = packed bytes +
    scales + the dense output."""
    nb = -(-numel // blocksize)
    scales = nb + 4 * -(-nb // NESTED_BLOCKSIZE) if nested else 4 * nb
    size = torch.empty((), dtype=dtype).element_size()
    return Launch(spec=_spec(blocksize, dtype, nested), grid=(-(-nb // _rows(blocksize)),), iterations=1,
                  weight_bytes_per_iteration=_rows(blocksize) * blocksize // 2,
                  hbm_bytes=-(-numel // 2) + scales + size * numel,
                  int_args=(("n", numel), ("nbytes", -(-numel // 2)), ("nb", nb)))


def compile_specs() -> list[KernelSpec]:
    """Every config the launcher may run: each block size (ROWS follows from it) with nested scales
    and bf16 output (the QLoRA case), plus fp32/fp16 output and plain fp32 scales at bs 64."""
    variants = [(bs, torch.bfloat16, True) for bs in ALLOWED_BLOCKSIZES]
    variants += [(64, torch.float32, True), (64, torch.float16, True), (64, torch.bfloat16, False)]
    return [_spec(bs, dtype, double) for bs, dtype, double in variants]
