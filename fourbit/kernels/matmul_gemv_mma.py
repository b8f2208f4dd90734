"""GEMV on tensor cores for 4-bit weights, 1 <= M <= 16 rows of bf16/fp16 x: y = x @ dequantize(W).T + bias.

Why not the SIMT GEMV (`matmul_gemv`): there every weight costs one warp-shuffle lookup, 7/8 of a
shift and one FFMA per row of x; 5.75 thread-instructions per packed byte before any overhead, 8.6
in its compiled loop, against a budget of ~6 for the HBM roofline on an H200 (128 thread-instructions
per clock per SM, 16.4 weight bytes per clock per SM). Here the multiply-adds go to the tensor cores
(`mma.sync.m16n8k16`, one instruction for 16 x 16 weights times up to 8 rows of x) and a packed byte
is decoded whole, in three instructions, from a table of code pairs:

  * The pair table. Byte b of W holds two codes (element 2i in the high nibble, 2i+1 in the low), so
    a 256-entry table of 32-bit pairs (code[b >> 4] in the low half, code[b & 15] in the high half,
    each rounded to x's dtype) turns one byte into one mma A register (two consecutive k of one row:
    the fragment layout of m16n8k16 pairs k = 2c, 2c + 1). The table sits in shared memory, 32
    copies side by side (entry b of copy l at word 32 b + l, 32 KB, declared in the kernel's PTX), so
    lane l always reads bank l: a warp's 32 lookups are one conflict-free wavefront whatever the
    bytes. A lookup is `prmt` (byte -> index), `mad` (index * 128 + lane offset) and one `ld.shared`.
    Each program fills its table once (32 KB, `_fill_table`) before its loop, after requesting its
    first trip's weights, so their DRAM latency runs under the fill's (docs/kernels.md, prologue).
  * The k mapping. Any permutation of k applied to W and x alike leaves y unchanged, so each thread
    reads what is cheapest: for the 64-weight block beta of rows n0 + g and n0 + g + 8 (g = lane / 4,
    c = lane % 4), the thread loads 8 contiguous bytes per row (one 64-bit load: weights 16c .. 16c+15
    of the block) and the 16 matching elements of x (32 contiguous bytes). mma j (0..3) of the block
    takes bytes 2j and 2j + 1 of both rows (k slots 2c, 2c+1 and 2c+8, 2c+9) and x elements
    16c + 4j .. 16c + 4j + 3 (the B registers). A block's 64 weights share one scale, so its 4 mmas
    accumulate into a zeroed C, which is then scaled in float32 (4 FFMA per thread per block).
  * Rows of x are the mma's N = 8 columns: M <= 8 uses one mma per k16 step, M <= 16 two (TILES = 2).
    The warps of a program split K: trip i of warp w takes blocks 2 (i * WARPS + w) and the next,
    the following trip's weights loaded before this one's are decoded (WARPS = 4, or 8 when there
    are fewer than 3 programs per SM, to keep enough bytes in flight); the partials are summed once
    at the end.

Hand count (sm_90a, Triton 3.9, cuobjdump -sass of `python -m fourbit.kernels.analysis.costmodel
--save-binaries`): a loop trip (2 blocks, 32 packed bytes per thread) of the M <= 8, 4-warp kernel
is 175 instructions, 5.5 per byte: 32 PRMT + 32 IMAD + 32 LDS for the lookups (3.0 per byte), 8
HMMA, 15 global loads (4 x 64-bit weights, 8 x 64-bit x, a scale code, its nested code and scale),
4 SHFL for the scales, 13 FP32 (scales and accumulation), the rest addresses and loop control.
M = 16 adds 8 HMMA, 8 x loads and 8 FFMA: 215, 6.7 per byte; 8 warps: 5.7 and 6.2. The SIMT GEMV
spends 8.6 per byte at M = 1. Before the loop each program loads the 1 KB pair table (one or two
loads per thread) and writes its 32 KB of lane copies: 2048 16-byte stores (16 per thread with 4
warps, 8 with 8), then a barrier; the cost model charges this prologue (its table-load latency, its
stores' issue and L1 slots), which at 4096 x 4096 is as large as the program's weight stream.

Programming model: every tensor of the kernel has WARPS * 32 elements, one per thread (element t is
lane t % 32 of warp t // 32 in Triton's blocked layout), so the inline assembly, which is per thread,
sees exactly the registers the mma fragment layout assigns to its lane. The table declaration
`.shared ... fourbit_gemv_lut` is emitted once per element a thread holds; a layout that gave a thread
two elements would declare it twice and fail to assemble, so that assumption cannot break silently.

Under TRITON_INTERPRET=1 (ASM=False) there is no inline assembly: lookups gather from the same pair
table in global memory and `_mma_emulated` computes the mma from the fragment definitions of the PTX
ISA ("Matrix Fragments for mma.m16n8k16 with floating point type") with reshapes, so the interpreter
tests check the k mapping, the fragments, the scales and the final reduction of the real kernel.

Numerics: codes rounded to x's dtype (bf16 2^-9, fp16 2^-12 relative), products exact, sums in
float32 (the tensor core's order), the scale applied in float32 to each block's partial sum: within
the bound of the reference, which rounds code * absmax to x's dtype once.
"""

from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl

from ._decode import block_scales

__all__ = ["HAND_COUNT", "gemv_mma_kernel", "pair_table", "LOOKUP_ASM", "MMA_ASM", "MMA_FP16_ASM"]

# Thread-instructions per packed weight byte in the loop (sm_90a SASS between the loop label and
# its back-edge, `python -m fourbit.kernels.analysis.costmodel --save-binaries`; bf16 x, nested scales, bs 64).
HAND_COUNT = {"m8_w4": 5.5, "m8_w8": 5.7, "m16_w4": 6.7, "m16_w8": 6.2}

# $4: a 32-bit word of packed weights (bytes 0..3), $5: this lane's table address (table + 4 * lane).
# Output $i: the pair of byte i. prmt 0x444i moves byte i to byte 0 and zeroes the rest.
LOOKUP_ASM = tl.constexpr("""{
            .reg .b32 i<4>;
            prmt.b32 i0, $4, 0, 0x4440;
            prmt.b32 i1, $4, 0, 0x4441;
            prmt.b32 i2, $4, 0, 0x4442;
            prmt.b32 i3, $4, 0, 0x4443;
            mad.lo.u32 i0, i0, 128, $5;
            mad.lo.u32 i1, i1, 128, $5;
            mad.lo.u32 i2, i2, 128, $5;
            mad.lo.u32 i3, i3, 128, $5;
            ld.shared.u32 $0, [i0];
            ld.shared.u32 $1, [i1];
            ld.shared.u32 $2, [i2];
            ld.shared.u32 $3, [i3];
            }""")
MMA_ASM = tl.constexpr("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                       "{$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, {$10, $11, $12, $13};")
MMA_FP16_ASM = tl.constexpr("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                            "{$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, {$10, $11, $12, $13};")
_DECLARE_ASM = tl.constexpr(".shared .align 16 .b8 fourbit_gemv_lut[32768];\n\tmov.u32 $0, fourbit_gemv_lut;")
_STORE_ASM = tl.constexpr("st.shared.v4.u32 [$1], {$2, $2, $2, $2};\n\tmov.u32 $0, 0;")

# code tensor -> {(its version, dtype, device): table}: built once per codebook tensor, so a decode
# step never copies the codes to the host (that would synchronize the stream on every call)
_TABLES: dict[int, tuple[weakref.ref, dict]] = {}  # id(code) -> (weak reference, tables)


def pair_table(code: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(256,) int32 on `device`: entry b = bits of code[b >> 4] in x's dtype | those of code[b & 15]
    << 16 (codes rounded to nearest-even, as torch casts); kept for as long as `code` lives unchanged."""
    entry = _TABLES.get(id(code))
    if entry is None or entry[0]() is not code:  # tensors compare elementwise: keyed by identity
        entry = _TABLES[id(code)] = (weakref.ref(code, lambda _, i=id(code): _TABLES.pop(i, None)), {})
    tables = entry[1]
    key = (code._version, dtype, torch.device(device))
    table = tables.get(key)
    if table is None:
        bits = code.detach().to("cpu", torch.float32).to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF
        b = torch.arange(256)
        table = tables[key] = (bits[b >> 4] | (bits[b & 15] << 16)).to(torch.int32).to(device)
    return table


@triton.jit
def _lookup(word, lane_addr, lut_ptr, ASM: tl.constexpr):
    """The pairs of the 4 bytes of int32 `word` (byte 0 first)."""
    if ASM:
        return tl.inline_asm_elementwise(LOOKUP_ASM, "=r,=r,=r,=r,r,r", [word, lane_addr], dtype=(tl.int32,) * 4,
                                         is_pure=False, pack=1)
    else:
        return (tl.load(lut_ptr + (word & 255)), tl.load(lut_ptr + ((word >> 8) & 255)),
                tl.load(lut_ptr + ((word >> 16) & 255)), tl.load(lut_ptr + ((word >> 24) & 255)))


@triton.jit
def _halves(r, FP16: tl.constexpr):
    """float32 values of the low and high 16-bit halves of int32 `r` (bf16 or fp16 bits)."""
    if FP16:
        lo = (r & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = ((r >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        lo = (r << 16).to(tl.float32, bitcast=True)
        hi = (r & -65536).to(tl.float32, bitcast=True)
    return lo, hi


@triton.jit
def _rows8(r, FP16: tl.constexpr, WARPS: tl.constexpr):
    """(WARPS, 8, 8): register r of every lane (g, c) as element [g, 2c + half]."""
    lo, hi = _halves(r, FP16)
    return tl.reshape(tl.join(tl.reshape(lo, (WARPS, 8, 4)), tl.reshape(hi, (WARPS, 8, 4))), (WARPS, 8, 8))


@triton.jit
def _cat8(a, b, WARPS: tl.constexpr):
    """(WARPS, 8, 16): [..., :8] = a, [..., 8:] = b."""
    return tl.reshape(tl.permute(tl.join(a, b), (0, 1, 3, 2)), (WARPS, 8, 16))


@triton.jit
def _mma_emulated(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, FP16: tl.constexpr, WARPS: tl.constexpr):
    """mma.m16n8k16 (row.col, float32 accumulate) per warp, from the PTX ISA fragment layout:
    lane (g, c) holds A[g][2c:2c+2] (a0), A[g+8][2c:2c+2] (a1), A[g][2c+8:2c+10] (a2), A[g+8][2c+8:2c+10]
    (a3), B[2c:2c+2][g] (b0), B[2c+8:2c+10][g] (b1) and D[g][2c], D[g][2c+1], D[g+8][2c], D[g+8][2c+1]."""
    top = _cat8(_rows8(a0, FP16, WARPS), _rows8(a2, FP16, WARPS), WARPS)  # (W, 8, 16): A rows g
    bottom = _cat8(_rows8(a1, FP16, WARPS), _rows8(a3, FP16, WARPS), WARPS)  # A rows g + 8
    a = tl.reshape(tl.permute(tl.join(top, bottom), (0, 3, 1, 2)), (WARPS, 16, 16))  # [w, row, k]
    bt = _cat8(_rows8(b0, FP16, WARPS), _rows8(b1, FP16, WARPS), WARPS)  # [w, n, k]
    d = tl.sum(a[:, :, None, :] * bt[:, None, :, :], axis=3)  # (W, 16, 8): [w, row, n]
    d = tl.permute(tl.reshape(d, (WARPS, 2, 8, 4, 2)), (0, 2, 3, 1, 4))  # [w, g, c, row // 8, n % 2]
    d_even, d_odd = tl.split(d)  # n = 2c, 2c + 1: each (W, 8, 4, 2) [w, g, c, row // 8]
    d0, d2 = tl.split(d_even)
    d1, d3 = tl.split(d_odd)
    nt: tl.constexpr = WARPS * 32
    return (c0 + tl.reshape(d0, (nt,)), c1 + tl.reshape(d1, (nt,)), c2 + tl.reshape(d2, (nt,)),
            c3 + tl.reshape(d3, (nt,)))


@triton.jit
def _mma(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, ASM: tl.constexpr, FP16: tl.constexpr, WARPS: tl.constexpr):
    if ASM:
        return tl.inline_asm_elementwise(MMA_FP16_ASM if FP16 else MMA_ASM, "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f",
                                         [a0, a1, a2, a3, b0, b1, c0, c1, c2, c3], dtype=(tl.float32,) * 4,
                                         is_pure=True, pack=1)
    else:
        return _mma_emulated(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, FP16, WARPS)


@triton.jit
def _block(wa, wb, x_ptrs, c0, c1, c2, c3, lane_addr, lut_ptr, ASM: tl.constexpr, FP16: tl.constexpr,
           WARPS: tl.constexpr):
    """The 4 mmas of one 64-weight block for one 8-row tile of x: wa, wb the int64 weight words of
    rows g and g + 8; x_ptrs the int64 pointers to x elements 16c .. 16c+3 of the block."""
    pa0, pa1, pa2, pa3 = _lookup(wa.to(tl.int32), lane_addr, lut_ptr, ASM)  # bytes 0..3 of row g
    pb0, pb1, pb2, pb3 = _lookup(wb.to(tl.int32), lane_addr, lut_ptr, ASM)
    qa0, qa1, qa2, qa3 = _lookup((wa >> 32).to(tl.int32), lane_addr, lut_ptr, ASM)  # bytes 4..7
    qb0, qb1, qb2, qb3 = _lookup((wb >> 32).to(tl.int32), lane_addr, lut_ptr, ASM)
    x0 = tl.load(x_ptrs)  # x row clamped to M - 1: columns of D past M are never stored
    x1 = tl.load(x_ptrs + 1)
    x2 = tl.load(x_ptrs + 2)
    x3 = tl.load(x_ptrs + 3)
    c0, c1, c2, c3 = _mma(pa0, pb0, pa1, pb1, x0.to(tl.int32), (x0 >> 32).to(tl.int32), c0, c1, c2, c3, ASM, FP16, WARPS)
    c0, c1, c2, c3 = _mma(pa2, pb2, pa3, pb3, x1.to(tl.int32), (x1 >> 32).to(tl.int32), c0, c1, c2, c3, ASM, FP16, WARPS)
    c0, c1, c2, c3 = _mma(qa0, qb0, qa1, qb1, x2.to(tl.int32), (x2 >> 32).to(tl.int32), c0, c1, c2, c3, ASM, FP16, WARPS)
    c0, c1, c2, c3 = _mma(qa2, qb2, qa3, qb3, x3.to(tl.int32), (x3 >> 32).to(tl.int32), c0, c1, c2, c3, ASM, FP16, WARPS)
    return c0, c1, c2, c3


@triton.jit
def _shfl(value, src_lane):
    return tl.inline_asm_elementwise("shfl.sync.idx.b32 $0, $1, $2, 31, -1;", "=f,f,r", [value, src_lane],
                                     dtype=tl.float32, is_pure=False, pack=1)


@triton.jit
def _scales(absmax_ptr, absmax2_ptr, code8_ptr, offset, n0, g, lane, beta, N, nblk, blocks_per_row,
            BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, EVEN: tl.constexpr, ASM: tl.constexpr):
    """float32 scales of blocks beta, beta + 1 of rows n0 + g, n0 + g + 8: (a0, b0, a1, b1), 0 for
    blocks past the row. With ASM lane l decodes the scale of row n0 + l % 16, block beta + l // 16
    (one nested decode per lane) and the four reach their threads by warp shuffles."""
    if ASM:
        row = tl.minimum(n0 + lane % 16, N - 1)
        blk = beta + lane // 16
        ok = (blk < nblk) | EVEN
        s = tl.where(ok, block_scales(absmax_ptr, absmax2_ptr, code8_ptr, offset,
                                      row * blocks_per_row + (blk * 64) // BLOCKSIZE, ok, NESTED), 0.0)
        return _shfl(s, g), _shfl(s, g + 8), _shfl(s, g + 16), _shfl(s, g + 24)
    else:
        row_a = tl.minimum(n0 + g, N - 1)
        row_b = tl.minimum(n0 + g + 8, N - 1)
        ok0 = (beta < nblk) | EVEN
        ok1 = (beta + 1 < nblk) | EVEN
        blk0 = (beta * 64) // BLOCKSIZE
        blk1 = ((beta + 1) * 64) // BLOCKSIZE
        a0 = block_scales(absmax_ptr, absmax2_ptr, code8_ptr, offset, row_a * blocks_per_row + blk0, ok0, NESTED)
        b0 = block_scales(absmax_ptr, absmax2_ptr, code8_ptr, offset, row_b * blocks_per_row + blk0, ok0, NESTED)
        a1 = block_scales(absmax_ptr, absmax2_ptr, code8_ptr, offset, row_a * blocks_per_row + blk1, ok1, NESTED)
        b1 = block_scales(absmax_ptr, absmax2_ptr, code8_ptr, offset, row_b * blocks_per_row + blk1, ok1, NESTED)
        return tl.where(ok0, a0, 0.0), tl.where(ok0, b0, 0.0), tl.where(ok1, a1, 0.0), tl.where(ok1, b1, 0.0)


@triton.jit
def _fill_table(t, lut_ptr, WARPS: tl.constexpr):
    """Declare the 32 KB shared table, copy the 256 pairs into it and return this lane's address in
    it. Thread t writes entry t (and t + 128 with 4 warps): one table load, then its 32 lane copies as
    8 16-byte stores, chunk (j + b) % 8 at step j, so a warp's 32 stores of one step cover every bank
    four times (the minimum for 512 bytes). One load per entry, all before any store: the fill waits
    for the table once."""
    base = tl.inline_asm_elementwise(_DECLARE_ASM, "=r,r", [t], dtype=tl.int32, is_pure=False, pack=1)
    nt: tl.constexpr = WARPS * 32
    tl.static_assert(256 % nt == 0 and 256 // nt <= 2, "the fill takes 4 or 8 warps")
    # volatile: after the weight loads the kernel issues first (see gemv_mma_kernel)
    pair0 = tl.load(lut_ptr + t, volatile=True)
    pair1 = tl.load(lut_ptr + nt + t, volatile=True) if nt == 128 else pair0
    for j in tl.static_range(8):
        tl.inline_asm_elementwise(_STORE_ASM, "=r,r,r", [base + t * 128 + ((j + t) % 8) * 16, pair0],
                                  dtype=tl.int32, is_pure=False, pack=1)
        if nt == 128:
            b = nt + t
            tl.inline_asm_elementwise(_STORE_ASM, "=r,r,r", [base + b * 128 + ((j + b) % 8) * 16, pair1],
                                      dtype=tl.int32, is_pure=False, pack=1)
    tl.debug_barrier()
    return base + (t % 32) * 4


@triton.jit
def gemv_mma_kernel(x_ptr, packed_ptr, lut_ptr, absmax_ptr, absmax2_ptr, code8_ptr, offset_ptr, bias_ptr, y_ptr,
                    M, N, K, stride_xm,
                    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr, ASM: tl.constexpr,
                    FP16: tl.constexpr, TILES: tl.constexpr, WARPS: tl.constexpr, EVEN: tl.constexpr):
    """Program = 16 rows of W, all of K, for M <= 8 * TILES rows of x. A loop trip of warp w takes
    blocks 2 (i * WARPS + w) and the next; EVEN: K / 64 is a multiple of 2 * WARPS (no masks). K % 64
    == 0, BLOCKSIZE % 64 == 0; x rows and the packed bytes 8-byte aligned (the launcher checks)."""
    nt: tl.constexpr = WARPS * 32
    t = tl.arange(0, nt)
    lane = t % 32
    g = lane // 4
    c = lane % 4
    n0 = tl.program_id(0) * 16
    w_ptr = packed_ptr.to(tl.pointer_type(tl.int64), bitcast=True)
    wa_ptrs = w_ptr + tl.minimum(n0 + g, N - 1).to(tl.int64) * (K // 16) + c  # word c of block 0 of the row
    wb_ptrs = w_ptr + tl.minimum(n0 + g + 8, N - 1).to(tl.int64) * (K // 16) + c
    xw_ptr = x_ptr.to(tl.pointer_type(tl.int64), bitcast=True)
    x1_ptrs = xw_ptr + tl.minimum(g, M - 1).to(tl.int64) * (stride_xm // 4) + 4 * c  # elements 16c.. of block 0
    x2_ptrs = xw_ptr + tl.minimum(g + 8, M - 1).to(tl.int64) * (stride_xm // 4) + 4 * c
    offset = tl.load(offset_ptr, volatile=True) if NESTED else 0.0
    blocks_per_row = K // BLOCKSIZE
    nblk = K // 64
    acc0 = tl.zeros((nt,), tl.float32)
    acc1 = tl.zeros((nt,), tl.float32)
    acc2 = tl.zeros((nt,), tl.float32)
    acc3 = tl.zeros((nt,), tl.float32)
    acc4 = tl.zeros((nt,), tl.float32)
    acc5 = tl.zeros((nt,), tl.float32)
    acc6 = tl.zeros((nt,), tl.float32)
    acc7 = tl.zeros((nt,), tl.float32)
    beta = 2 * (t // 32)  # this warp's first block
    last = nblk - 1  # blocks past the row are loaded clamped and given scale 0
    # The first trip's weights are requested before the table fill, so their DRAM latency runs under
    # the fill's own (its table loads) and its 16-byte stores. Volatile: ptxas keeps volatile accesses
    # in program order; plain loads it sinks below the fill's stores (then the weights' latency and
    # the table's add up).
    wa0 = tl.load(wa_ptrs + tl.minimum(beta, last) * 4, volatile=True)
    wb0 = tl.load(wb_ptrs + tl.minimum(beta, last) * 4, volatile=True)
    wa1 = tl.load(wa_ptrs + tl.minimum(beta + 1, last) * 4, volatile=True)
    wb1 = tl.load(wb_ptrs + tl.minimum(beta + 1, last) * 4, volatile=True)
    if ASM:
        lane_addr = _fill_table(t, lut_ptr, WARPS)
    else:
        lane_addr = t
    for _ in range(0, tl.cdiv(nblk, 2 * WARPS)):
        nxt = beta + 2 * WARPS  # the next trip's words, in flight while this trip decodes
        na0 = tl.load(wa_ptrs + tl.minimum(nxt, last) * 4, eviction_policy="evict_first")
        nb0 = tl.load(wb_ptrs + tl.minimum(nxt, last) * 4, eviction_policy="evict_first")
        na1 = tl.load(wa_ptrs + tl.minimum(nxt + 1, last) * 4, eviction_policy="evict_first")
        nb1 = tl.load(wb_ptrs + tl.minimum(nxt + 1, last) * 4, eviction_policy="evict_first")
        s_a0, s_b0, s_a1, s_b1 = _scales(absmax_ptr, absmax2_ptr, code8_ptr, offset, n0, g, lane, beta, N, nblk,
                                         blocks_per_row, BLOCKSIZE, NESTED, EVEN, ASM)
        zero = tl.zeros((nt,), tl.float32)
        blk0 = tl.minimum(beta, last) * 16
        blk1 = tl.minimum(beta + 1, last) * 16
        c0, c1, c2, c3 = _block(wa0, wb0, x1_ptrs + blk0, zero, zero, zero, zero, lane_addr, lut_ptr, ASM, FP16, WARPS)
        c0, c1, c2, c3 = c0 * s_a0, c1 * s_a0, c2 * s_b0, c3 * s_b0
        d0, d1, d2, d3 = _block(wa1, wb1, x1_ptrs + blk1, zero, zero, zero, zero, lane_addr, lut_ptr, ASM, FP16, WARPS)
        acc0 += c0 + d0 * s_a1
        acc1 += c1 + d1 * s_a1
        acc2 += c2 + d2 * s_b1
        acc3 += c3 + d3 * s_b1
        if TILES == 2:
            c0, c1, c2, c3 = _block(wa0, wb0, x2_ptrs + blk0, zero, zero, zero, zero, lane_addr, lut_ptr, ASM, FP16,
                                    WARPS)
            c0, c1, c2, c3 = c0 * s_a0, c1 * s_a0, c2 * s_b0, c3 * s_b0
            d0, d1, d2, d3 = _block(wa1, wb1, x2_ptrs + blk1, zero, zero, zero, zero, lane_addr, lut_ptr, ASM, FP16,
                                    WARPS)
            acc4 += c0 + d0 * s_a1
            acc5 += c1 + d1 * s_a1
            acc6 += c2 + d2 * s_b1
            acc7 += c3 + d3 * s_b1
        beta = nxt
        wa0, wb0, wa1, wb1 = na0, nb0, na1, nb1
    # one reduction over the warps; lane (g, c) then holds y[2c + i][n0 + g (+8)]
    r = tl.arange(0, 32)
    n_a = n0 + r // 4
    n_b = n_a + 8
    m0 = 2 * (r % 4)
    bias_a = tl.load(bias_ptr + n_a, mask=n_a < N, other=0.0).to(tl.float32) if HAS_BIAS else tl.zeros((32,), tl.float32)
    bias_b = tl.load(bias_ptr + n_b, mask=n_b < N, other=0.0).to(tl.float32) if HAS_BIAS else tl.zeros((32,), tl.float32)
    out_ty = y_ptr.dtype.element_ty
    _store(y_ptr, acc0, m0, n_a, bias_a, M, N, out_ty, WARPS)
    _store(y_ptr, acc1, m0 + 1, n_a, bias_a, M, N, out_ty, WARPS)
    _store(y_ptr, acc2, m0, n_b, bias_b, M, N, out_ty, WARPS)
    _store(y_ptr, acc3, m0 + 1, n_b, bias_b, M, N, out_ty, WARPS)
    if TILES == 2:
        _store(y_ptr, acc4, m0 + 8, n_a, bias_a, M, N, out_ty, WARPS)
        _store(y_ptr, acc5, m0 + 9, n_a, bias_a, M, N, out_ty, WARPS)
        _store(y_ptr, acc6, m0 + 8, n_b, bias_b, M, N, out_ty, WARPS)
        _store(y_ptr, acc7, m0 + 9, n_b, bias_b, M, N, out_ty, WARPS)


@triton.jit
def _store(y_ptr, acc, m, n, bias, M, N, out_ty: tl.constexpr, WARPS: tl.constexpr):
    total = tl.sum(tl.reshape(acc, (WARPS, 32)), axis=0) + bias
    tl.store(y_ptr + m * N + n, total.to(out_ty), mask=(m < M) & (n < N))
