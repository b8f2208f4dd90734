"""Test-only: the GEMV kernel as it was before issue 12's rebuild, frozen so the cost model's test
can keep ranking it against whatever the library's GEMV becomes (tests/test_costmodel.py).

Hand count of its sm_90a loop (issue 12): ~750 thread-instructions per 32 weights, ~47 per packed
weight byte: 16 global 8-byte gathers from the 256-entry pair table, 224 shuffles and 12 barriers
per trip, because the K reduction runs across threads on every step; 15-25 % of the HBM roofline
from issue alone. `frozen_plan` is rated beside the library's plans by tests/kernel_builds.py.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _block_scales(absmax_ptr, absmax2_ptr, code8_ptr, offset, blk, mask, NESTED: tl.constexpr):
    """float32 scales of blocks `blk` (any shape): stored, or rebuilt from the nested 8-bit codes."""
    if NESTED:
        q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        s = tl.load(code8_ptr + q) * tl.load(absmax2_ptr + blk // 256, mask=mask, other=0.0)
        return s + offset
    else:
        return tl.load(absmax_ptr + blk, mask=mask, other=0.0)


@triton.jit
def _decode_tile(packed_ptr, table_ptr, absmax_ptr, absmax2_ptr, code8_ptr, offset, rn, n_mask, k0, K,
                 BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Rows rn (BLOCK_N,), columns k0 .. k0+BLOCK_K of W, dequantized to float32 (BLOCK_N, BLOCK_K)."""
    row = rn.to(tl.int64)
    rb = tl.arange(0, BLOCK_K // 2)
    # K % 64 == 0 (launcher), so each row's bytes and each tile start 16-byte aligned: tell the
    # compiler, so the byte tile is read with 128-bit loads (it can only infer 8-byte alignment).
    start = tl.multiple_of(row * (K // 2) + k0 // 2, 16)  # (BN,)
    byte = tl.load(packed_ptr + start[:, None] + rb[None, :], mask=n_mask[:, None], other=0)  # (BN, BK/2) uint8
    pair = tl.load(table_ptr + byte.to(tl.int32))  # (BN, BK/2) int64: two float32 codes
    hi = (pair & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)  # even k: high nibble
    lo = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)  # odd k: low nibble
    codes = tl.interleave(hi, lo)  # (BN, BK)
    if BLOCK_K <= BLOCKSIZE:
        blk = (row * K + k0) // BLOCKSIZE  # (BN,) the tile lies inside one block per row
        scale = _block_scales(absmax_ptr, absmax2_ptr, code8_ptr, offset, blk, n_mask, NESTED)
        return codes * scale[:, None]
    else:
        SUB: tl.constexpr = BLOCK_K // BLOCKSIZE
        blk = (row[:, None] * K + k0) // BLOCKSIZE + tl.arange(0, SUB)[None, :]  # (BN, SUB)
        scale = _block_scales(absmax_ptr, absmax2_ptr, code8_ptr, offset, blk, n_mask[:, None], NESTED)
        w = tl.reshape(codes, (BLOCK_N, SUB, BLOCKSIZE)) * scale[:, :, None]
        return tl.reshape(w, (BLOCK_N, BLOCK_K))


@triton.jit
def _gemv_kernel(x_ptr, packed_ptr, table_ptr, absmax_ptr, absmax2_ptr, code8_ptr, offset_ptr, bias_ptr, y_ptr,
                 M, N, K, stride_xm,
                 BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (n-tile, k-slice): y[:, n-tile] (SPLIT == False) or its fp32 partial sum into
    y[k-slice] of a (splits, M, N) buffer (SPLIT). Slices are whole BLOCK_K tiles; the last may be short."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), tl.num_programs(1)) * BLOCK_K
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_mask = rn < N
    offset = tl.load(offset_ptr) if NESTED else 0.0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        x = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :], mask=rm[:, None] < M, other=0.0)
        w = _decode_tile(packed_ptr, table_ptr, absmax_ptr, absmax2_ptr, code8_ptr, offset, rn, n_mask, k0, K,
                         BLOCKSIZE, NESTED, BLOCK_N, BLOCK_K)  # (BN, BK) float32
        w = w.to(x_ptr.dtype.element_ty).to(tl.float32)  # round to x's dtype, as the reference
        acc += tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)  # (BM, BN)
    out = rm[:, None] * N + rn[None, :]
    mask = (rm[:, None] < M) & n_mask[None, :]
    if SPLIT:
        tl.store(y_ptr + pid_k.to(tl.int64) * M * N + out, acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + out, acc.to(y_ptr.dtype.element_ty), mask=mask)



def frozen_plan(n: int, k: int, sms: int = 132):
    """The launch the old launcher made at M = 1: 32x128 tiles, 4 warps, 3 stages (its first
    autotune config, the one its split-K sizing assumed), split-K to ~2 programs per SM."""
    from fourbit.kernels._triton_utils import KernelSpec
    from fourbit.kernels.compile import Launch, Plan

    cdiv = lambda a, b: -(-a // b)  # noqa: E731
    programs, split = cdiv(n, 32), 1
    while programs * split < 2 * sms and k // (2 * split * 128) >= 4:
        split *= 2
    state = {"packed_ptr": "*u8", "table_ptr": "*i64", "absmax_ptr": "*u8", "absmax2_ptr": "*fp32",
             "code8_ptr": "*fp32", "offset_ptr": "*fp32"}
    spec = KernelSpec(
        name=f"frozen_gemv[bf16,bs64,dq,m1,32x128,w4s3{',split' if split > 1 else ''}]",
        kernel=_gemv_kernel,
        signature={"x_ptr": "*bf16", **state, "bias_ptr": "*bf16", "y_ptr": "*fp32" if split > 1 else "*bf16",
                   "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32",
                   **dict.fromkeys(["BLOCKSIZE", "NESTED", "HAS_BIAS", "SPLIT", "BLOCK_M", "BLOCK_N", "BLOCK_K"], "constexpr")},
        constexprs={"BLOCKSIZE": 64, "NESTED": True, "HAS_BIAS": False, "SPLIT": split > 1, "BLOCK_M": 1,
                    "BLOCK_N": 32, "BLOCK_K": 128},
        num_warps=4, num_stages=3,
    )  # fmt: skip
    blocks = n * k // 64
    hbm = n * k // 2 + blocks + 4 * cdiv(blocks, 256) + 2 * k + (4 * split * n if split > 1 else 2 * n)
    launch = Launch(spec=spec, grid=(programs, split), iterations=cdiv(cdiv(k, 128), split),
                    weight_bytes_per_iteration=32 * 128 // 2, hbm_bytes=hbm, gather_table_bytes=256 * 8)
    return Plan(op="gemv", path="fused", config=f"frozen,32x128,w4s3,split{split}", launches=(launch,))
