"""GEMV for 4-bit weights, M <= 4 rows of x (decode): y = x @ dequantize(W).T + bias.

At M = 1 the weight stream is the whole cost: 0.516 bytes per weight (4.127 bits with nested scales
at blocksize 64) against 2 bytes per x element that every row shares. An H200 SM must consume about
16.4 weight bytes per clock to reach its share of the HBM roofline (4.3 TB/s / 132 SMs / ~1.98 GHz)
and issues at most 128 thread-instructions per clock, so the loop may spend ~7.8 thread-instructions
per packed byte at perfect issue. The kernel is built around that budget:

  * A program owns BLOCK_N rows of W and walks the whole of K: no split-K, no partial sums in memory
    (the launcher halves BLOCK_N from 16 down to 4 until N / BLOCK_N >= 132 SMs; N >= 528 fills them). A step reads a [BLOCK_N, BLOCK_W]
    tile of int32 words (8 codes each); every thread holds 4 contiguous words (one 128-bit,
    evict-first load) of each of its rows: a "run" of 32 weights that lies inside one quantization
    block (blocksize >= 32, K % 64 == 0), so its scale is fetched once per run, not per weight.
  * Codes come from a register-resident table through one warp shuffle each (`_decode.lookup_word`),
    exact float32 values, no memory instruction.
  * x is read once per step as 8 float32 vectors (x0..x7, element e of every word), shared by all
    BLOCK_N rows; per run the 32 products are summed in-thread (an FMA chain), multiplied by the run's
    scale and added to a [BLOCK_N, BLOCK_W/4] float32 accumulator. The cross-thread reduction
    (shuffles) happens once, after the loop.

Hand count (sm_90a, Triton 3.9, cuobjdump -sass; bf16 x, nested scales, blocksize 64, M = 1, BLOCK_N
= 16, BLOCK_W = 128 words, 4 warps): the loop between its label and back-edge holds 553 instructions
for the 64 packed bytes a thread consumes per trip (4 rows x 16 B), 8.6 per byte: SHFL 128 + SHF 121
(the lookups: 3.75 per byte), FFMA 120 + FMUL 16 + FADD 12 (the products and run sums: 2.3 per
byte), the x vectors' conversion and their trip through shared memory (BAR 16, STSM 8, LDS 8, ~0.6
per byte: Triton lays x out one word per thread, the codes four words per thread), scale loads and
addresses (~1.5 per byte; the nested scales' share is 38 instructions, 0.6 per byte, after
`blk >> 8` replaced a signed `blk // 256`: 1.7 % predicted between DQ on and off). The kernel this replaced (32x128 tile, split-K) spent 737 instructions on
16 bytes per thread, 46.1 per byte: SHFL 224 and BAR 12 for a cross-thread reduction every step,
FADD 226, 21 LDG including the pair-table gathers. The static cost model
(`python -m fourbit.kernels.analysis.costmodel`) reads the same loops; it predicts 0.88 of the 4.127-bit HBM
roofline at M = 1 for the five Llama shapes (0.88-0.90), issue-bound (the goal of 6 instructions per byte is
not reached: lookups + one FMA per weight alone cost 5.75). Tried and dropped: 32-byte runs (two
interleaved 16-byte halves per thread, one scale per bs-64 block) reach 8.1 per byte at M = 1 but
double the x conversions through shared memory: 12.5 at M = 2 and local-memory use at M = 4.

Numerics: the scale multiplies a partial sum of 32 products code*x instead of each code, and W is
never rounded to x's dtype, so y is not bit-identical to the reference; each product and sum is
float32, which bounds the difference by the float32 summation error (plus the output rounding to
x's dtype) — tighter than the reference's own rounding of W to bf16/fp16. FMA contraction is on
for this kernel (enable_fp_fusion=True): a nested scale may then be rebuilt with one rounding
instead of two (1 ulp of float32), inside the same bound.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._decode import block_scales, lane_table, lookup_word

__all__ = ["HAND_COUNT", "gemv_kernel"]

# Thread-instructions per packed weight byte in the hot loop (sm_90a SASS, counted between the loop
# label and its back-edge; cuobjdump -sass of `python -m fourbit.kernels.analysis.costmodel --save-binaries`).
HAND_COUNT = {"old_gemv_32x128_split_w4s3": 46.1, "gemv_m1_16x512B_w4": 8.6}


@triton.jit
def _x_words(x_ptrs, mask, EVEN: tl.constexpr):
    """x[8w + e] for the step's words w, as eight float32 vectors x0..x7 (element e of every word).
    x_ptrs: (BLOCK_W, 8) pointers."""
    if EVEN:
        x = tl.load(x_ptrs).to(tl.float32)
    else:
        x = tl.load(x_ptrs, mask=mask[:, None], other=0.0).to(tl.float32)
    xa, xb = tl.split(tl.reshape(x, (x.shape[0], 2, 2, 2)))  # e = 4a + 2b + c: c = 0 | 1
    xa0, xa1 = tl.split(xa)
    xb0, xb1 = tl.split(xb)
    x0, x4 = tl.split(xa0)
    x2, x6 = tl.split(xa1)
    x1, x5 = tl.split(xb0)
    x3, x7 = tl.split(xb1)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _run_sums(c0, c1, c2, c3, c4, c5, c6, c7, x_ptrs, mask, EVEN: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_W: tl.constexpr):
    """(BLOCK_N, BLOCK_W/4) sums of code * x over each run of 4 words (32 weights) for one row of x."""
    x0, x1, x2, x3, x4, x5, x6, x7 = _x_words(x_ptrs, mask, EVEN)
    p = c0 * x0[None, :] + c1 * x1[None, :] + c2 * x2[None, :] + c3 * x3[None, :]
    p = p + c4 * x4[None, :] + c5 * x5[None, :] + c6 * x6[None, :] + c7 * x7[None, :]  # (BN, BW) FMA chain
    return tl.sum(tl.reshape(p, (BLOCK_N, BLOCK_W // 4, 4)), axis=2)


@triton.jit
def gemv_kernel(x_ptr, packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code8_ptr, offset_ptr, bias_ptr, y_ptr,
                M, N, K, stride_xm,
                BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr, SHFL: tl.constexpr,
                EVEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    """Program = BLOCK_N rows of W (all of K) for the M <= BLOCK_M <= 4 rows of x. EVEN: K is a
    multiple of 8 * BLOCK_W (no masks in the loop); otherwise the last step masks its words (the
    launcher guarantees K % 64 == 0, so runs never straddle the end). Rows past N are clamped to
    N - 1 for loading (no masks in the loop) and dropped at the store."""
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    row = tl.minimum(rn, N - 1).to(tl.int64)
    kw = K // 8  # words per row
    rw = tl.arange(0, BLOCK_W)
    rr = tl.arange(0, BLOCK_W // 4)
    # rows start 16-byte aligned (K % 64 == 0): 128-bit loads
    word_ptrs = packed_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + tl.multiple_of(row * kw, 4)[:, None] + rw[None, :]
    x_ptrs = x_ptr + rw[:, None] * 8 + tl.arange(0, 8)[None, :]  # (BW, 8)
    blk_row = row * (K // BLOCKSIZE)  # (BN,) first block of each row
    table = lane_table(code_ptr, tl.zeros((BLOCK_N, BLOCK_W), tl.int32), SHFL)
    offset = tl.load(offset_ptr) if NESTED else 0.0
    acc0 = tl.zeros((BLOCK_N, BLOCK_W // 4), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, BLOCK_W // 4), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, BLOCK_W // 4), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N, BLOCK_W // 4), dtype=tl.float32)
    word = tl.load(word_ptrs, mask=(rw < kw)[None, :], other=0, eviction_policy="evict_first")  # (BN, BW) int32
    for w0 in range(0, kw, BLOCK_W):
        w_mask = w0 + rw < kw  # (BW,) all true when EVEN
        # prefetch the next step's words: two steps of loads in flight per program
        following = tl.load(word_ptrs + BLOCK_W, mask=(w0 + BLOCK_W + rw < kw)[None, :], other=0,
                            eviction_policy="evict_first")
        c0, c1, c2, c3, c4, c5, c6, c7 = lookup_word(word, table, code_ptr, SHFL)  # (BN, BW) float32 each
        blk = blk_row[:, None] + ((w0 + rr * 4) * 8 // BLOCKSIZE)[None, :]  # (BN, BW/4): one block per run
        run_ok = (w0 + rr * 4 < kw)[None, :] | EVEN  # (1, BW/4)
        scale = block_scales(absmax_ptr, absmax2_ptr, code8_ptr, offset, blk, run_ok, NESTED)
        acc0 += _run_sums(c0, c1, c2, c3, c4, c5, c6, c7, x_ptrs, w_mask, EVEN, BLOCK_N, BLOCK_W) * scale
        if BLOCK_M > 1:
            acc1 += _run_sums(c0, c1, c2, c3, c4, c5, c6, c7, x_ptrs + stride_xm, w_mask & (rw * 0 + 1 < M), False,
                              BLOCK_N, BLOCK_W) * scale
        if BLOCK_M > 2:
            acc2 += _run_sums(c0, c1, c2, c3, c4, c5, c6, c7, x_ptrs + 2 * stride_xm, w_mask & (rw * 0 + 2 < M), False,
                              BLOCK_N, BLOCK_W) * scale
            acc3 += _run_sums(c0, c1, c2, c3, c4, c5, c6, c7, x_ptrs + 3 * stride_xm, w_mask & (rw * 0 + 3 < M), False,
                              BLOCK_N, BLOCK_W) * scale
        word = following
        word_ptrs += BLOCK_W
        x_ptrs += 8 * BLOCK_W
    bias = tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32) if HAS_BIAS else tl.zeros((BLOCK_N,), tl.float32)
    out_ty = y_ptr.dtype.element_ty
    tl.store(y_ptr + rn, (tl.sum(acc0, axis=1) + bias).to(out_ty), mask=n_mask)
    if BLOCK_M > 1:
        tl.store(y_ptr + N + rn, (tl.sum(acc1, axis=1) + bias).to(out_ty), mask=n_mask & (rn * 0 + 1 < M))
    if BLOCK_M > 2:
        tl.store(y_ptr + 2 * N + rn, (tl.sum(acc2, axis=1) + bias).to(out_ty), mask=n_mask & (rn * 0 + 2 < M))
        tl.store(y_ptr + 3 * N + rn, (tl.sum(acc3, axis=1) + bias).to(out_ty), mask=n_mask & (rn * 0 + 3 < M))
