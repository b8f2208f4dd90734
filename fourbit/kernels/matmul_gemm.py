"""Fused dequantize-matmul on tensor cores, for M between the GEMV and the dequantize + cuBLAS path.

    forward  y[m, n]  = sum_k x[m, k] * w[n, k] (+ bias[n])    x: (M, K), y: (M, N), fp32 accumulate
    backward dx[m, k] = sum_n dy[m, n] * w[n, k]                dy: (M, N), dx: (M, K)
    decode   w[n, k] = fl32(code[q[n, k]] * absmax_hat[(n*K + k) // blocksize])   float32, exact

Each program decodes the [BLOCK_N, BLOCK_K] tile of W it needs in registers and feeds it to `tl.dot`
(HMMA on sm_80/89, HGMMA on sm_90a) after rounding it to x's dtype, exactly as the reference rounds
the dequantized weight, so the product equals `fourbit.nf4.matmul` up to the summation order.
Launches pass `enable_fp_fusion=False` so nested scales keep their two float32 roundings.

Decoding: the codes come from the register-resident table through warp shuffles
(`_decode.lookup_bytes`, no memory instruction; the 256-entry pair-table gather it replaced touched
~14 L1 lines per warp and instruction). The tile's rows start 16-byte aligned (the launcher
requires K % 64 == 0) and hold one scale per row (BLOCK_K <= blocksize) or BLOCK_K / blocksize of
them. The backward reads the same row-major [BN, BK] tiles: the blocks run along K in both
products, only the reduction runs over the tile's rows (`tl.dot(dy_tile, w_tile)`).

Swapped tiles (SWAP, Hopper): the program computes y^T = W x^T (backward: dx^T = W^T dy^T), so the
decoded W is wgmma's A operand, which Hopper takes from registers (after one conversion through
shared memory into the fragment layout), and only x's tile, loaded by the pipeline into rotating
shared-memory buffers, is read by the tensor cores. Triton then issues the MMA asynchronously, split
in two halves along BLOCK_K with `wgmma.wait_group 1` between them: the decode of the next tile
runs while the current tile's second half is in the tensor cores. In the unswapped tiles the decoded
W is the shared-memory B operand in a single buffer, so every HGMMA is waited for before the next
decode overwrites it (`WARPGROUP.DEPBAR.LE gsb0, 0x0`). Cost model (sm_90a, M = 2048, 256 x 128
tiles, 64-wide K steps, 8 warps): 0.97x dense cuBLAS, tensor-bound (L1 80 us, issue 34 us against
90 us of MMA at 4096x4096), where the unswapped 128x128 tiles reach 0.57x and dequantize + cuBLAS
0.90x.

Where this path runs (`fourbit.dispatch.matmul_route`): forward 17 <= M <= 64 for bf16/fp16 x (3 <= M
<= 64 for fp32 x or blocksize 32, below the tensor-core GEMV), backward M <= 64, and the swapped
tiles for 1024 <= M < 8192 on Hopper with bf16/fp16 x. At small M the cost model finds it memory- or
L1-bound and ahead of dequantize + cuBLAS (M = 16, 28672x8192: 56 vs 247 us), which writes and
re-reads a dense W.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._decode import block_scales, lane_table, lookup_bytes

__all__ = ["decode_tile", "gemm_kernel", "backward_kernel"]


@triton.jit
def decode_tile(packed_ptr, code_ptr, table, absmax_ptr, absmax2_ptr, code8_ptr, offset, rn, n_mask, k0, K,
                BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, SHFL: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """Rows rn (BLOCK_N,), columns k0 .. k0+BLOCK_K of W, dequantized to float32 (BLOCK_N, BLOCK_K).
    table: `_decode.lane_table` of shape (BLOCK_N, BLOCK_K // 2), built once before the loop."""
    row = rn.to(tl.int64)
    rb = tl.arange(0, BLOCK_K // 2)
    # K % 64 == 0 (launcher), so each row's bytes and each tile start 16-byte aligned: tell the
    # compiler, so the byte tile is read with 128-bit loads (it can only infer 8-byte alignment).
    start = tl.multiple_of(row * (K // 2) + k0 // 2, 16)  # (BN,)
    byte = tl.load(packed_ptr + start[:, None] + rb[None, :], mask=n_mask[:, None], other=0)  # (BN, BK/2) uint8
    hi, lo = lookup_bytes(byte, table, code_ptr, SHFL)  # (BN, BK/2) float32: even k, odd k
    codes = tl.interleave(hi, lo)  # (BN, BK)
    if BLOCK_K <= BLOCKSIZE:
        blk = (row * K + k0) // BLOCKSIZE  # (BN,) the tile lies inside one block per row
        scale = block_scales(absmax_ptr, absmax2_ptr, code8_ptr, offset, blk, n_mask, NESTED)
        return codes * scale[:, None]
    else:
        SUB: tl.constexpr = BLOCK_K // BLOCKSIZE
        blk = (row[:, None] * K + k0) // BLOCKSIZE + tl.arange(0, SUB)[None, :]  # (BN, SUB)
        scale = block_scales(absmax_ptr, absmax2_ptr, code8_ptr, offset, blk, n_mask[:, None], NESTED)
        w = tl.reshape(codes, (BLOCK_N, SUB, BLOCKSIZE)) * scale[:, :, None]
        return tl.reshape(w, (BLOCK_N, BLOCK_K))


@triton.jit
def gemm_kernel(x_ptr, packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code8_ptr, offset_ptr, bias_ptr, y_ptr,
                 M, N, K, stride_xm, M_BUCKET,
                 BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, SHFL: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                 SWAP: tl.constexpr = False):
    """Program = one (BM, BN) tile of y; tiles grouped GROUP_M at a time along M so that the W tiles
    a group shares are still in L2. M_BUCKET (next power of two of M) only keys the autotuner.
    SWAP computes the tile transposed, y^T = W x^T (see the module docstring)."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    group_m = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_m
    pid_n = (pid % (GROUP_M * tiles_n)) // group_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_mask = rn < N
    offset = tl.load(offset_ptr) if NESTED else 0.0
    table = lane_table(code_ptr, tl.zeros((BLOCK_N, BLOCK_K // 2), tl.int32), SHFL)
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        # K > 0 (the launcher returns early otherwise). Without this the zero-trip path defines the
        # accumulator registers with plain moves before the loop's final wgmma wait, and ptxas then
        # serializes every wgmma of the kernel (C7515: WARPGROUP.DEPBAR.LE gsb0, 0x0 after each HGMMA).
        # The unswapped tiles wait for every wgmma anyway; the hint costs them 0.4 % (16.1 -> 16.3 i/B).
        tl.assume(K > 0)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + (k0 + rk)[None, :], mask=rm[:, None] < M, other=0.0)
        w = decode_tile(packed_ptr, code_ptr, table, absmax_ptr, absmax2_ptr, code8_ptr, offset, rn, n_mask, k0, K,
                        BLOCKSIZE, NESTED, SHFL, BLOCK_N, BLOCK_K)  # (BN, BK) float32
        if SWAP:  # W from registers, x^T from shared memory: (BN, BM)
            acc = tl.dot(w.to(x_ptr.dtype.element_ty), tl.trans(x), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(x, tl.trans(w.to(x_ptr.dtype.element_ty)), acc, input_precision=PRECISION)  # (BM, BN)
    if SWAP:
        acc = tl.trans(acc)  # (BM, BN)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    mask = (rm[:, None] < M) & n_mask[None, :]
    tl.store(y_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def backward_kernel(dy_ptr, packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code8_ptr, offset_ptr, dx_ptr,
                     M, N, K, stride_dym, M_BUCKET,
                     BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, PRECISION: tl.constexpr, SHFL: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWAP: tl.constexpr = False):
    """Program = one (BM, BK) tile of dx = dy @ W, reducing over N in BN-row tiles of W; SWAP computes
    it transposed, dx^T = W^T dy^T, with W^T from registers."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = pid_k * BLOCK_K
    rk = k0 + tl.arange(0, BLOCK_K)
    offset = tl.load(offset_ptr) if NESTED else 0.0
    table = lane_table(code_ptr, tl.zeros((BLOCK_N, BLOCK_K // 2), tl.int32), SHFL)
    if SWAP:
        acc = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
        tl.assume(N > 0)  # the launcher returns early otherwise; see gemm_kernel
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_mask = rn < N
        dy = tl.load(dy_ptr + rm[:, None].to(tl.int64) * stride_dym + rn[None, :],
                     mask=(rm[:, None] < M) & n_mask[None, :], other=0.0)  # (BM, BN)
        w = decode_tile(packed_ptr, code_ptr, table, absmax_ptr, absmax2_ptr, code8_ptr, offset, rn, n_mask, k0, K,
                        BLOCKSIZE, NESTED, SHFL, BLOCK_N, BLOCK_K)  # (BN, BK) float32
        if SWAP:  # (BK, BM)
            acc = tl.dot(tl.trans(w.to(dy_ptr.dtype.element_ty)), tl.trans(dy), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(dy, w.to(dy_ptr.dtype.element_ty), acc, input_precision=PRECISION)  # (BM, BK)
    if SWAP:
        acc = tl.trans(acc)  # (BM, BK)
    tl.store(dx_ptr + rm[:, None].to(tl.int64) * K + rk[None, :], acc.to(dx_ptr.dtype.element_ty), mask=rm[:, None] < M)
