"""Correctness on the GPU, before any timing: a small set of cases, few kernel compiles.

1. Bytes. fourbit's quantize equals the reference (`fourbit.nf4`, plain torch on the same device)
   byte for byte, with and without double quantization, and its dequantize equals it for fp32,
   fp16 and bf16 outputs. Against bitsandbytes' CUDA kernels on an 8192 x 8192 weight: bitsandbytes
   normalises with an approximate reciprocal (--use_fast_math, SPEC §0.2) where fourbit divides
   correctly, so a code may flip where s = x / absmax lies within an ulp or two of a decision
   threshold; every differing code is measured in float32 ulps from the nearest threshold and a
   flip farther than 2 ulps fails. Dequantizing bitsandbytes' own bytes must equal theirs exactly.
2. A tensor past 2**31 elements (int64 offsets): its last blocks equal the reference's.
3. bf16 cast rounding: a GPU rounds fp32 -> bf16 to nearest-even, the reference does the same; the
   interpreter truncates (see fourbit.kernels.dequantize), so on the dry run this is informative.
4. matmul forward and backward (bf16; fp16 on the dry run: the interpreter has no bf16 dot) against float64 on a few shapes, one per kernel path (GEMV,
   small-M GEMM, M = 2048, a bias), relative-norm error under 1e-2 (bf16 operands, METHOD.md).
   The allocator is poisoned with NaN first, so an output element nobody wrote cannot pass.
5. Every matmul kernel variant the dispatcher can pick for the timed shapes (GEMV warps, M = 1..16,
   ragged K and N, bias, views; M = 2048 forward and backward) and the swapped tiles' exact
   integer-input test, 20 times (benchmarks/gpu/variants.py).
"""

from __future__ import annotations

import torch

import fourbit.nf4 as reference
from fourbit import dispatch
from fourbit.nf4 import QuantState
from fourbit.nf4.codes import NF4_THRESHOLDS

from . import variants
from .common import Session, peer, rel_err

BLOCKSIZE = 64
MATMUL_TOL = 1e-2  # bf16 operands: 1e-3..1e-2 (METHOD.md); measured values are recorded beside it
# (M, N, K, bias): GEMV, the M = 5..16 path, the training shape, a ragged M with a bias
MATMUL_CASES = [(1, 4096, 4096, False), (16, 4096, 14336, False), (2048, 14336, 4096, False), (37, 1024, 4096, True)]
DRY_MATMUL_CASES = [(1, 64, 128, False), (16, 96, 192, False), (33, 64, 128, True)]


def poison_allocator(numel: int, dtype: torch.dtype, device: str) -> None:
    """Fill a freed block of this size with NaN: the caching allocator hands it to the next
    allocation of the same size, so an output element the kernel never writes stays NaN."""
    torch.full((numel,), float("nan"), dtype=dtype, device=device)


def nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(2 * nbytes,) codes in element order (high nibble first)."""
    b = packed.reshape(-1).view(torch.uint8)
    return torch.stack([b >> 4, b & 15], dim=1).reshape(-1)


def ulps_to_threshold(x: torch.Tensor, absmax: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """For the flat elements `where`: float32 ulps between s = x * fl32(1/absmax) and the nearest
    NF4 threshold (the distance a rounding difference in the reciprocal has to cover)."""
    xs = x.reshape(-1)[where].float()
    s = xs * (1.0 / absmax.clamp(min=1e-38))[where // BLOCKSIZE]
    t = NF4_THRESHOLDS.to(x.device)
    nearest = t[(s[:, None] - t[None, :]).abs().argmin(dim=1)]
    return (s.view(torch.int32).long() - nearest.view(torch.int32).long()).abs()


def bytes_vs_reference(s: Session, w: torch.Tensor) -> None:
    label = f"{'x'.join(map(str, w.shape))} {str(w.dtype)[6:]}"
    for dq in (False, True):
        ours, state = dispatch.quantize(w, blocksize=BLOCKSIZE, quant_type="nf4", double_quant=dq)
        want, want_state = reference.quantize(w, blocksize=BLOCKSIZE, quant_type="nf4", double_quant=dq)
        s.check(f"quantize == reference {label} dq={dq}", torch.equal(ours, want) and state.equal(want_state))
        for out in (torch.float32, torch.float16, torch.bfloat16):
            got = dispatch.dequantize(want, want_state, dtype=out)
            same = torch.equal(got, reference.dequantize(want, want_state, dtype=out))
            # the interpreter truncates fp32 -> bf16 where a GPU rounds: informative on the dry run
            s.check(f"dequantize == reference {label} dq={dq} -> {str(out)[6:]}", same,
                    required=not (s.dry_run and out == torch.bfloat16))


def bytes_vs_bitsandbytes(s: Session, w: torch.Tensor) -> None:
    label = f"{'x'.join(map(str, w.shape))} {str(w.dtype)[6:]}"
    _, bnbf = peer()
    if bnbf is None:
        s.emit("note", f"bitsandbytes parity {label}", text="bitsandbytes missing: parity not checked")
        return
    n = w.numel()
    ours, state = dispatch.quantize(w, blocksize=BLOCKSIZE, quant_type="nf4", double_quant=False)
    theirs, their_state = bnbf.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=False)
    s.check(f"bnb absmax equal {label}", torch.equal(state.absmax, their_state.absmax.reshape(-1)))
    differ = torch.nonzero(nibbles(ours)[:n] != nibbles(theirs)[:n]).reshape(-1)
    far = 0
    if differ.numel():
        far = int((ulps_to_threshold(w, state.absmax, differ[:1_000_000]) > 2).sum())
    s.check(f"bnb codes equal up to <=2-ulp threshold flips {label}", far == 0, values=n,
            code_mismatches=int(differ.numel()), mismatches_beyond_2_ulps=far)

    theirs_dq, their_dq = bnbf.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True)
    _, state_dq = dispatch.quantize(w, blocksize=BLOCKSIZE, quant_type="nf4", double_quant=True)
    nested_codes = int((state_dq.absmax != their_dq.absmax).sum())
    s.check(f"bnb nested scales {label}", nested_codes == 0, required=False, nested_code_mismatches=nested_codes,
            offset_equal=bool(torch.equal(state_dq.offset.reshape(()), their_dq.offset.reshape(()))))
    imported = QuantState.from_dict(their_dq.as_dict(packed=True)).to(w.device)  # their bytes, our kernel
    mismatches = int((dispatch.dequantize(theirs_dq, imported) != bnbf.dequantize_4bit(theirs_dq, their_dq)).sum())
    # the dry run meets bitsandbytes' CPU backend (its own nested-scale arithmetic, SPEC §2-3), not CUDA
    s.check(f"dequantize of bnb bytes == bnb {label}", mismatches == 0, required=not s.dry_run, mismatches=mismatches)


def large_tensor(s: Session) -> None:
    """A tensor past 2**31 elements (dry run: 4096); its last 64 blocks equal the reference run on
    just those blocks (plain scales, so blocks are independent)."""
    n = 4096 if s.dry_run else (1 << 31) + 64 * 1024
    w = torch.randn(n, device=s.device, dtype=torch.bfloat16)
    packed, state = dispatch.quantize(w, blocksize=BLOCKSIZE, double_quant=False)
    tail = 64 * BLOCKSIZE
    want_packed, want_state = reference.quantize(w[-tail:], blocksize=BLOCKSIZE, double_quant=False)
    quant_ok = torch.equal(packed[-tail // 2:], want_packed) and torch.equal(state.absmax[-64:], want_state.absmax)
    del w
    out = dispatch.dequantize(packed, state, dtype=torch.float32)
    dequant_ok = torch.equal(out[-tail:], reference.dequantize(want_packed, want_state, dtype=torch.float32))
    del out, packed
    s.check(f"past 2**31 elements: quantize tail == reference ({n} values)", quant_ok)
    s.check(f"past 2**31 elements: dequantize tail == reference ({n} values)", dequant_ok)


def bf16_rounding(s: Session) -> None:
    """fp32 -> bf16 inside the kernel rounds to nearest-even: the bf16 output equals the fp32
    output cast by torch, on values spread over many binades (absmax from 1e-3 to 1e3)."""
    n = 1 << (12 if s.dry_run else 24)
    w = torch.randn(n // BLOCKSIZE, BLOCKSIZE, device=s.device) * torch.logspace(-3, 3, n // BLOCKSIZE, device=s.device)[:, None]
    packed, state = dispatch.quantize(w, blocksize=BLOCKSIZE, double_quant=True)
    want = dispatch.dequantize(packed, state, dtype=torch.float32).to(torch.bfloat16)
    got = dispatch.dequantize(packed, state, dtype=torch.bfloat16)
    differ = int((got.view(torch.int16) != want.view(torch.int16)).sum())
    s.check("bf16 output rounds to nearest-even", differ == 0, required=not s.dry_run, values=n, differing=differ)


def matmul_case(s: Session, m: int, n: int, k: int, with_bias: bool) -> None:
    dtype = s.dtype
    packed, state = dispatch.quantize(torch.randn(n, k, device=s.device), blocksize=BLOCKSIZE, double_quant=True)
    w64 = reference.dequantize(packed, state, dtype=torch.float32).double()  # (N, K), exact
    x = torch.randn(m, k, device=s.device).to(dtype)
    bias = torch.randn(n, device=s.device).to(dtype) if with_bias else None
    want = x.double() @ w64.T + (bias.double() if with_bias else 0)
    poison_allocator(m * n, dtype, s.device)
    err = rel_err(dispatch.matmul(x, packed, state, bias), want)
    s.check(f"matmul forward {m}x{n}x{k}{' +bias' if with_bias else ''} {str(dtype)[6:]} vs float64", err < MATMUL_TOL,
            rel_err=err, tol=MATMUL_TOL)
    grad_y = torch.randn(m, n, device=s.device).to(dtype)
    poison_allocator(m * k, dtype, s.device)
    err = rel_err(dispatch.matmul_backward(grad_y, packed, state), grad_y.double() @ w64)
    s.check(f"matmul backward {m}x{n}x{k} {str(dtype)[6:]} vs float64", err < MATMUL_TOL, rel_err=err, tol=MATMUL_TOL)


def guarded(s: Session, name: str, fn, *args) -> None:
    """Run one group of checks; an exception is a failed required check, and the next group runs."""
    try:
        fn(s, *args)
    except Exception as error:
        s.check(f"{name} runs", False, error=repr(error)[:500])


def run(s: Session) -> None:
    torch.manual_seed(0)
    shape = (48, 80) if s.dry_run else (8192, 8192)
    for dtype in (torch.bfloat16, torch.float32):
        w = torch.randn(shape, device=s.device).to(dtype)
        guarded(s, f"bytes vs reference {dtype}", bytes_vs_reference, w)
        guarded(s, f"bytes vs bitsandbytes {dtype}", bytes_vs_bitsandbytes, w)
        del w
    guarded(s, "bf16 rounding", bf16_rounding)
    for m, n, k, with_bias in DRY_MATMUL_CASES if s.dry_run else MATMUL_CASES:
        guarded(s, f"matmul {m}x{n}x{k} vs float64", matmul_case, m, n, k, with_bias)
    guarded(s, "matmul variants", variants.run)  # every kernel the timings pick, and the exact integer test
    guarded(s, "past 2**31 elements", large_tensor)  # last: 4 GiB of bf16 and its copies, the slowest
