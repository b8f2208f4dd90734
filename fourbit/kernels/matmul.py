"""Fused NF4/FP4 dequant-matmul in Triton: y = x @ dequantize(W).T + bias, and its input gradient.

W is [N, K] (out, in) as bitsandbytes stores it: packed row-major, two codes per byte, the even
element in the high nibble, one float32 scale per `blocksize` flat elements (nested: 8-bit codes
plus a per-256 float32 scale and an offset). The dense W is never written to memory: each program
decodes the tile of W it needs in registers and feeds it straight to the multiply.

    decode   w[n, k] = fl32(code[q[n, k]] * absmax_hat[(n*K + k) // blocksize])   float32
             absmax_hat[b] = fl32(code8[qabs[b]] * absmax2[b // 256]) + offset    (nested, inline)
    forward  y[m, n]  = sum_k x[m, k] * w[n, k] (+ bias[n])    x: (M, K), y: (M, N), fp32 accumulate
    backward dx[m, k] = sum_n dy[m, n] * w[n, k]                dy: (M, N), dx: (M, K)

This equals `fourbit.nf4.matmul` (the reference) up to the summation order: w is rounded to x's
dtype before the multiply, exactly as the reference rounds the dequantized weight. Launches pass
`enable_fp_fusion=False` (LAUNCH_OPTIONS) so the nested scale keeps the reference's two float32
roundings instead of one FMA: the decoded W is bit-identical to `fourbit.nf4.dequantize`.

Decoding. A byte indexes a 256-entry int64 table (`fourbit.nf4.matmul.pair_table`) whose two 32-bit
halves are the float32 codes of its high and low nibble: one gather per byte, not one per nibble.
The two halves are interleaved back into k order ([BN, BK/2] x 2 -> [BN, BK]) and scaled. The
launcher requires K % blocksize == 0, so blocks never cross rows, and K % 64 == 0, so K splits
into whole tiles and every row of bytes starts 16-byte aligned (128-bit loads). A tile of BK
columns then holds one scale per row (BK <= blocksize) or BK/blocksize of them (BK > blocksize,
applied on a [BN, BK/bs, bs] view). The launchers raise ValueError on other shapes and
`fourbit.dispatch` runs the reference for them (dequantize + torch.matmul): blocks that cross rows
would need a scale per element, and such layers are rare (bitsandbytes falls back too).

Three kernels, each reading W in the same row-major [BN rows x BK/2 bytes] tiles:
  * `_gemv_kernel` (M <= 4, decode): each program owns BN output features and a slice of K
    (split-K when N alone gives too few programs), multiplies in registers with a broadcast
    [BM, BN, BK] product (no tensor cores: at M <= 4 the weight stream is the whole cost), fp32.
  * `_gemm_kernel` (M > 4, training/prefill): [BM, BN] output tiles, grouped along M for L2 reuse
    of W tiles, decoded W tile -> x's dtype -> `tl.dot` (HMMA on sm_80/89, HGMMA on sm_90a).
  * `_backward_kernel`: dx tiles [BM, BK], looping over N. The transposed product needs no
    transposed layout: the quantization blocks run along K in both products, so the backward reads
    the very same [BN, BK] row-major W tiles as the forward, only its reduction runs over the tile's
    rows instead of its columns (`tl.dot(dy_tile, w_tile)`). Row tiles of BK/2 bytes stay coalesced.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..nf4.matmul import check_matmul_args, pair_table
from ..nf4.quant import check_packed
from ..nf4.state import QuantState
from ._triton_utils import LAUNCH_OPTIONS, POINTER_TYPES, KernelSpec, check_launch_device, interpreting

__all__ = ["matmul", "matmul_backward", "compile_specs", "fused_shape_supported"]

GEMV_MAX_M = 4  # bitsandbytes also keeps its fused SIMT kernel to M <= 4

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). A shortlist per architecture: sm_90 gets the
# wide 128x256 tile wgmma likes, both get small-M tiles for M = 5..64. The compile report found
# 128x128x64 with 4 warps spilling on sm_80/89 (255 registers, 8-16 B) and 128x256x64 with 8 warps
# spilling there too, hence 8 warps for 128x128 and BLOCK_K = 32 for 128x256: all spill-free.
_GEMM_CONFIGS = {
    "sm80": [(128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 3), (16, 64, 128, 4, 4), (32, 64, 128, 4, 4)],
    "sm90": [(128, 256, 32, 8, 3), (128, 128, 64, 8, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (16, 128, 128, 4, 4), (32, 128, 64, 4, 4)],
}
_GEMV_CONFIGS = [(32, 128, 4, 3), (16, 256, 4, 3), (64, 64, 4, 4), (16, 128, 2, 4)]  # (BLOCK_N, BLOCK_K, warps, stages)
_BACKWARD_CONFIGS = [(128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 3), (16, 64, 128, 4, 4)]
_INTERPRETER_GEMM = (16, 32, 64, 4, 1)  # fixed, small configs for TRITON_INTERPRET=1 (no autotune)
_INTERPRETER_GEMV = (16, 64, 4, 1)
_DOT_PRECISION = {torch.float32: "ieee", torch.float16: "tf32", torch.bfloat16: "tf32"}  # fp32 stays exact


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


@triton.jit
def _gemm_kernel(x_ptr, packed_ptr, table_ptr, absmax_ptr, absmax2_ptr, code8_ptr, offset_ptr, bias_ptr, y_ptr,
                 M, N, K, stride_xm, M_BUCKET,
                 BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Program = one (BM, BN) tile of y; tiles grouped GROUP_M at a time along M so that the W tiles
    a group shares are still in L2. M_BUCKET (next power of two of M) only keys the autotuner."""
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
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + (k0 + rk)[None, :], mask=rm[:, None] < M, other=0.0)
        w = _decode_tile(packed_ptr, table_ptr, absmax_ptr, absmax2_ptr, code8_ptr, offset, rn, n_mask, k0, K,
                         BLOCKSIZE, NESTED, BLOCK_N, BLOCK_K)  # (BN, BK) float32
        acc = tl.dot(x, tl.trans(w.to(x_ptr.dtype.element_ty)), acc, input_precision=PRECISION)  # (BM, BN)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    mask = (rm[:, None] < M) & n_mask[None, :]
    tl.store(y_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(dy_ptr, packed_ptr, table_ptr, absmax_ptr, absmax2_ptr, code8_ptr, offset_ptr, dx_ptr,
                     M, N, K, stride_dym, M_BUCKET,
                     BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program = one (BM, BK) tile of dx = dy @ W, reducing over N in BN-row tiles of W."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = pid_k * BLOCK_K
    rk = k0 + tl.arange(0, BLOCK_K)
    offset = tl.load(offset_ptr) if NESTED else 0.0
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_mask = rn < N
        dy = tl.load(dy_ptr + rm[:, None].to(tl.int64) * stride_dym + rn[None, :],
                     mask=(rm[:, None] < M) & n_mask[None, :], other=0.0)  # (BM, BN)
        w = _decode_tile(packed_ptr, table_ptr, absmax_ptr, absmax2_ptr, code8_ptr, offset, rn, n_mask, k0, K,
                         BLOCKSIZE, NESTED, BLOCK_N, BLOCK_K)  # (BN, BK) float32
        acc = tl.dot(dy, w.to(dy_ptr.dtype.element_ty), acc, input_precision=PRECISION)  # (BM, BK)
    tl.store(dx_ptr + rm[:, None].to(tl.int64) * K + rk[None, :], acc.to(dx_ptr.dtype.element_ty), mask=rm[:, None] < M)


# ---- launchers ----------------------------------------------------------------------------------
def fused_shape_supported(state: QuantState) -> bool:
    """The kernels need K % blocksize == 0 (blocks inside rows) and K % 64 == 0 (whole K tiles)."""
    k = int(state.shape[-1])
    return len(state.shape) == 2 and k % state.blocksize == 0 and k % 64 == 0


def _check_fused_shape(state: QuantState) -> None:
    """ValueError for weights the kernels cannot run (fourbit.dispatch sends those to the reference)."""
    if not fused_shape_supported(state):
        raise ValueError(f"the fused matmul needs K % blocksize == 0 and K % 64 == 0, got K={int(state.shape[-1])} "
                         f"with blocksize {state.blocksize} (fourbit.dispatch.matmul runs the reference for these)")


def _prune(table: dict[str, list] | None, configs, named_args, **kwargs):
    """Keep the configs whose BLOCK_K divides K and, given a table, those of this GPU's shortlist."""
    fits = [c for c in configs if named_args["K"] % c.kwargs["BLOCK_K"] == 0]
    if table is None:
        return fits
    major, _ = torch.cuda.get_device_capability()
    wanted = set(table["sm90" if major >= 9 else "sm80"])
    kw = lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)  # noqa: E731
    return [c for c in fits if kw(c) in wanted] or fits


_TUNED: dict[str, object] = {}


def _tuned(name: str):
    """The autotuned kernel "gemv", "gemm" or "backward", built on first use (never under the
    interpreter, where autotuning does not work). GEMM/backward tune per power-of-two bucket of M."""
    if name not in _TUNED:
        if name == "gemv":
            kernel, table, key = _gemv_kernel, None, ["M", "N", "K", "BLOCKSIZE", "NESTED"]
            configs = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s) for bn, bk, w, s in _GEMV_CONFIGS]
        else:
            kernel, key = _gemm_kernel if name == "gemm" else _backward_kernel, ["M_BUCKET", "N", "K", "BLOCKSIZE", "NESTED"]
            table = _GEMM_CONFIGS if name == "gemm" else {"sm80": _BACKWARD_CONFIGS, "sm90": _BACKWARD_CONFIGS}
            configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
                       for bm, bn, bk, w, s in dict.fromkeys(table["sm80"] + table["sm90"])]
        prune = lambda cs, named, **kw: _prune(table, cs, named, **kw)  # noqa: E731
        _TUNED[name] = triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": prune})(kernel)
    return _TUNED[name]


def _state_args(packed: torch.Tensor, state: QuantState) -> tuple:
    """(packed bytes, pair table, absmax, absmax2, code8, offset) pointers; unused ones alias absmax."""
    data = check_packed(packed, state)  # (N*K/2,) uint8
    table = pair_table(state.quant_type, data.device)  # (256,) int64
    absmax, absmax2, code8, offset = state.as_tensors()
    if absmax2 is None:
        return data, table, absmax, absmax, absmax, absmax
    return data, table, absmax, absmax2, code8, offset.to(device=data.device, dtype=torch.float32).reshape(1)


def _m_bucket(m: int) -> int:
    return min(triton.next_power_of_2(max(m, 1)), 8192)


def _splits(n: int, k: int, block_n: int, block_k: int, device: torch.device) -> int:
    """Split K until there are about two programs per SM (decode shapes with small N), while each
    slice keeps at least four K tiles."""
    programs = triton.cdiv(n, block_n)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    split = 1
    while programs * split < 2 * sms and k // (2 * split * block_k) >= 4:
        split *= 2
    return split


def matmul(x: torch.Tensor, packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None = None, *,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ dequantize(W).T + bias, fused. x: (..., K) fp32/fp16/bf16; y: (..., N) in x.dtype.
    `out`, if given, is a contiguous (..., N) tensor of x's dtype that receives y."""
    check_matmul_args(x, packed, state, bias)
    if x.dtype not in _DOT_PRECISION:
        raise TypeError(f"the Triton matmul takes float32/float16/bfloat16 x, got {x.dtype} (use the reference)")
    check_launch_device(x=x, packed=packed, absmax=state.absmax, bias=bias)
    n, k = (int(d) for d in state.shape)
    _check_fused_shape(state)
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = _output(out, (*x.shape[:-1], n), x)
    if m == 0 or n == 0:
        return y
    args = _state_args(packed, state)
    nested, has_bias = state.nested is not None, bias is not None
    bias_arg = bias.to(x.dtype) if has_bias else y  # rounded to x's dtype first, as the reference
    if m <= GEMV_MAX_M:
        block_m = triton.next_power_of_2(m)
        common = dict(BLOCKSIZE=state.blocksize, NESTED=nested, HAS_BIAS=has_bias, BLOCK_M=block_m)
        if interpreting():
            bn, bk, w, s = _INTERPRETER_GEMV
            split = _splits(n, k, bn, bk, x.device)
            target = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else y
            _gemv_kernel[(triton.cdiv(n, bn), split)](x2, *args, bias_arg, target, m, n, k, x2.stride(0),
                                                      SPLIT=split > 1, BLOCK_N=bn, BLOCK_K=bk,
                                                      num_warps=w, num_stages=s, **common, **LAUNCH_OPTIONS)
        else:
            split = _splits(n, k, 32, 128, x.device)
            target = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else y
            grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), split)  # noqa: E731
            _tuned("gemv")[grid](x2, *args, bias_arg, target, m, n, k, x2.stride(0), SPLIT=split > 1,
                                **common, **LAUNCH_OPTIONS)
        if split > 1:  # (split, M, N) fp32 partials -> y
            total = target.sum(0)
            if has_bias:
                total += bias_arg.float()
            y.view(m, n).copy_(total)
        return y
    common = dict(BLOCKSIZE=state.blocksize, NESTED=nested, HAS_BIAS=has_bias, PRECISION=_DOT_PRECISION[x.dtype])
    if interpreting():
        bm, bn, bk, w, s = _INTERPRETER_GEMM
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
        _gemm_kernel[grid](x2, *args, bias_arg, y, m, n, k, x2.stride(0), _m_bucket(m),
                           BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                           num_warps=w, num_stages=s, **common, **LAUNCH_OPTIONS)
    else:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _tuned("gemm")[grid](x2, *args, bias_arg, y, m, n, k, x2.stride(0), _m_bucket(m), GROUP_M=8,
                             **common, **LAUNCH_OPTIONS)
    return y


def matmul_backward(grad_y: torch.Tensor, packed: torch.Tensor, state: QuantState, *,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """grad_x = grad_y @ dequantize(W), fused. grad_y: (..., N); grad_x: (..., K) in grad_y.dtype."""
    if len(state.shape) != 2:
        raise ValueError(f"matmul_backward needs a 2-D quantized weight [N, K], got shape {tuple(state.shape)}")
    n, k = (int(d) for d in state.shape)
    if grad_y.shape[-1] != n:
        raise ValueError(f"grad_y has {grad_y.shape[-1]} features in its last dimension but the weight has N={n}")
    if grad_y.dtype not in _DOT_PRECISION:
        raise TypeError(f"grad_y must be float32/float16/bfloat16, got {grad_y.dtype}")
    check_launch_device(grad_y=grad_y, packed=packed, absmax=state.absmax)
    _check_fused_shape(state)
    dy = grad_y.reshape(-1, n)
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    m = dy.shape[0]
    dx = _output(out, (*grad_y.shape[:-1], k), grad_y)
    if m == 0:
        return dx
    if n == 0:
        return dx.zero_()
    args = _state_args(packed, state)
    common = dict(BLOCKSIZE=state.blocksize, NESTED=state.nested is not None, PRECISION=_DOT_PRECISION[dy.dtype])
    if interpreting():
        bm, bn, bk, w, s = _INTERPRETER_GEMM
        _backward_kernel[(triton.cdiv(m, bm), triton.cdiv(k, bk))](dy, *args, dx, m, n, k, dy.stride(0), _m_bucket(m),
                                                                   BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                                                   num_warps=w, num_stages=s, **common, **LAUNCH_OPTIONS)
    else:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(k, meta["BLOCK_K"]))  # noqa: E731
        _tuned("backward")[grid](dy, *args, dx, m, n, k, dy.stride(0), _m_bucket(m), **common, **LAUNCH_OPTIONS)
    return dx


def _output(out: torch.Tensor | None, shape: tuple, like: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if tuple(out.shape) != tuple(shape) or out.dtype != like.dtype or out.device != like.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {like.dtype} tensor of shape {tuple(shape)} on {like.device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    return out


# ---- compile report -----------------------------------------------------------------------------
_PTR = POINTER_TYPES  # "*bf16"[1:] is also the short name


def _state_signature(nested: bool) -> dict[str, str]:
    return {"packed_ptr": "*u8", "table_ptr": "*i64", "absmax_ptr": "*u8" if nested else "*fp32",
            "absmax2_ptr": "*fp32", "code8_ptr": "*fp32", "offset_ptr": "*fp32"}


def compile_specs() -> list[KernelSpec]:
    """Every config the launchers may run on a GPU, for the QLoRA case (bf16 activations, nested
    scales, blocksize 64), plus fp16 and plain-scale variants of the first GEMM config. GEMM and
    backward specs must use tensor cores; the GEMV is SIMT by design."""
    specs = []
    gemm = list(dict.fromkeys(_GEMM_CONFIGS["sm80"] + _GEMM_CONFIGS["sm90"]))
    variants = [(cfg, torch.bfloat16, True) for cfg in gemm] + [(gemm[0], torch.float16, True), (gemm[0], torch.bfloat16, False)]
    for (bm, bn, bk, w, s), dtype, nested in variants:
        specs.append(KernelSpec(
            name=f"matmul_gemm[{_PTR[dtype][1:]},bs64{',dq' if nested else ''},{bm}x{bn}x{bk},w{w}s{s}]",
            kernel=_gemm_kernel,
            signature={"x_ptr": _PTR[dtype], **_state_signature(nested), "bias_ptr": _PTR[dtype], "y_ptr": _PTR[dtype],
                       "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "M_BUCKET": "i32",
                       **dict.fromkeys(["BLOCKSIZE", "NESTED", "HAS_BIAS", "PRECISION", "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"], "constexpr")},
            constexprs={"BLOCKSIZE": 64, "NESTED": nested, "HAS_BIAS": False, "PRECISION": "tf32",
                        "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
            num_warps=w, num_stages=s, expect_tensor_cores=True,
        ))
    for bm, bn, bk, w, s in _BACKWARD_CONFIGS:
        specs.append(KernelSpec(
            name=f"matmul_backward[bf16,bs64,dq,{bm}x{bn}x{bk},w{w}s{s}]",
            kernel=_backward_kernel,
            signature={"dy_ptr": "*bf16", **_state_signature(True), "dx_ptr": "*bf16",
                       "M": "i32", "N": "i32", "K": "i32", "stride_dym": "i32", "M_BUCKET": "i32",
                       **dict.fromkeys(["BLOCKSIZE", "NESTED", "PRECISION", "BLOCK_M", "BLOCK_N", "BLOCK_K"], "constexpr")},
            constexprs={"BLOCKSIZE": 64, "NESTED": True, "PRECISION": "tf32", "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk},
            num_warps=w, num_stages=s, expect_tensor_cores=True,
        ))
    for block_m in (1, 2, 4):
        for bn, bk, w, s in _GEMV_CONFIGS:
            for split in (False, True):
                specs.append(KernelSpec(
                    name=f"matmul_gemv[bf16,bs64,dq,m{block_m},{bn}x{bk},w{w}s{s}{',split' if split else ''}]",
                    kernel=_gemv_kernel,
                    signature={"x_ptr": "*bf16", **_state_signature(True), "bias_ptr": "*bf16",
                               "y_ptr": "*fp32" if split else "*bf16", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32",
                               **dict.fromkeys(["BLOCKSIZE", "NESTED", "HAS_BIAS", "SPLIT", "BLOCK_M", "BLOCK_N", "BLOCK_K"], "constexpr")},
                    constexprs={"BLOCKSIZE": 64, "NESTED": True, "HAS_BIAS": False, "SPLIT": split,
                                "BLOCK_M": block_m, "BLOCK_N": bn, "BLOCK_K": bk},
                    num_warps=w, num_stages=s, expect_vector_bits=128,
                ))
    return specs
