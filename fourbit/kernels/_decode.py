"""Triton helpers that decode NF4/FP4 codes, shared by the GEMV, the fused GEMM and dequantize.

The 16-entry code table lives in registers: lane j of every warp holds code[j % 16] in one register
(`lane_table`, loaded once before the hot loop), and a lookup is one warp shuffle
`shfl.sync.idx(table, nibble)`. The shuffle reads only the low five bits of its lane operand and the
upper sixteen lanes repeat the table, so the nibble needs no mask: `word >> shift` is the index.
One 32-bit word of packed weights (8 codes) thus costs 7 shifts + 8 shuffles and no memory
instruction; the value is the exact float32 code, so decoding stays bit-identical to
`fourbit.nf4.dequantize`. Measured alternatives, compiled for sm_90a (instructions per packed
weight byte in a GEMV loop): the 16-entry table gathered from global memory (one LDG + a 64-bit
address per nibble) 20.4; `tl.gather` from a register tensor (select trees) 145; this shuffle 6-7.

Triton's interpreter has no inline assembly, so under TRITON_INTERPRET=1 (`SHFL=False`) the same
values are gathered from the table in memory: both paths return identical float32 codes, which is
what the interpreter tests check. The shuffle needs all 32 lanes of a warp converged, which holds
because every caller runs the decode unconditionally (masks act on loads and stores only).

Word layout (little-endian): byte i of a word holds elements 2i (high nibble, bits 8i+4..8i+7) and
2i+1 (low nibble, bits 8i..8i+3), so element e sits at shift 8*(e//2) + 4*(1 - e%2).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["block_scales", "lane_table", "lookup_word", "lookup_bytes", "WORD_ASM", "BYTES_ASM"]

# The lookups' PTX, module constants so that tests can replay them on the host (tests/test_matmul.py).
# $8: the packed word (4 bytes), $9: this lane's table entry code[lane % 16]. Seven shifts bring each
# nibble to the low bits (a shuffle reads only the low five bits of its lane operand); shuffle e
# reads element e's code (byte e//2, high nibble first) into output $out[e].
def _lookup_asm(out: list[int]) -> str:
    shifts = "".join(f"\n            shr.b32 s{i}, $8, {4 * (i + 1)};" for i in range(7))
    index = ["s0", "$8", "s2", "s1", "s4", "s3", "s6", "s5"]  # element e sits at shift 8*(e//2) + 4*(1 - e%2)
    shuffles = "".join(f"\n            shfl.sync.idx.b32 ${out[e]}, $9, {index[e]}, 31, -1;" for e in range(8))
    return "{\n            .reg .b32 s<7>;" + shifts + shuffles + "\n            }"


WORD_ASM = tl.constexpr(_lookup_asm([0, 1, 2, 3, 4, 5, 6, 7]))  # $e = code of element e
BYTES_ASM = tl.constexpr(_lookup_asm([0, 4, 1, 5, 2, 6, 3, 7]))  # $0..$3 = high nibbles of bytes 0..3, $4..$7 = low


@triton.jit
def block_scales(absmax_ptr, absmax2_ptr, code8_ptr, offset, blk, mask, NESTED: tl.constexpr):
    """float32 scales of blocks `blk` (any shape): stored, or rebuilt from the nested 8-bit codes
    (code8[q] * absmax2[blk // 256] + offset, two roundings as the reference when the launch
    disables FMA contraction)."""
    if NESTED:
        q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        s = tl.load(code8_ptr + q) * tl.load(absmax2_ptr + (blk >> 8), mask=mask, other=0.0)  # blk >= 0: // 256
        return s + offset
    else:
        return tl.load(absmax_ptr + blk, mask=mask, other=0.0)


@triton.jit
def lane_table(code_ptr, like, SHFL: tl.constexpr):
    """code[lane % 16] for every element of `like` (int32, the shape of the words to decode): each
    thread's copy of its lane's table entry. Without SHFL nothing is needed (returns `like`)."""
    if SHFL:
        lane = tl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [like], dtype=tl.int32, is_pure=True, pack=1)
        return tl.load(code_ptr + (lane & 15))
    else:
        return like


@triton.jit
def lookup_word(word, table, code_ptr, SHFL: tl.constexpr):
    """The 8 float32 codes (c0, ..., c7) of int32 words (any shape), in element order."""
    if SHFL:
        return tl.inline_asm_elementwise(
            WORD_ASM,
            "=r,=r,=r,=r,=r,=r,=r,=r,r,r",
            [word, table],
            dtype=(tl.float32,) * 8,
            is_pure=True,
            pack=1,
        )
    else:
        c0 = tl.load(code_ptr + ((word >> 4) & 15))
        c1 = tl.load(code_ptr + (word & 15))
        c2 = tl.load(code_ptr + ((word >> 12) & 15))
        c3 = tl.load(code_ptr + ((word >> 8) & 15))
        c4 = tl.load(code_ptr + ((word >> 20) & 15))
        c5 = tl.load(code_ptr + ((word >> 16) & 15))
        c6 = tl.load(code_ptr + ((word >> 28) & 15))
        c7 = tl.load(code_ptr + ((word >> 24) & 15))
        return c0, c1, c2, c3, c4, c5, c6, c7


@triton.jit
def lookup_bytes(byte, table, code_ptr, SHFL: tl.constexpr):
    """(high, low): the float32 codes of the high and low nibble of uint8 `byte` (any shape; with
    SHFL the 4 bytes of one 32-bit register are decoded together: 7 shifts + 8 shuffles)."""
    if SHFL:
        return tl.inline_asm_elementwise(
            BYTES_ASM,
            "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r",
            [byte, table],
            dtype=(tl.float32, tl.float32),
            is_pure=True,
            pack=4,
        )
    else:
        b = byte.to(tl.int32)
        return tl.load(code_ptr + (b >> 4)), tl.load(code_ptr + (b & 15))
