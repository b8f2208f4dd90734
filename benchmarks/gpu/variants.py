"""Correctness of every matmul kernel variant the dispatcher can pick for what the session times,
before any timing, and the swapped tiles' exact integer test.

Variants. The timings run the GEMV at M = 1 and 16 and the forward and backward at M = 2048 on the
five Llama-3 shapes (bf16 x, nested scales, blocksize 64); a user's decode step also runs every M
from 1 to 16, ragged K and N, a bias and views. Each case names its (M, N, K) and extras, runs
through `fourbit.dispatch` with the allocator poisoned, and must stay within the rounding bound of
float64 per element (W rounded to the activations' dtype: 2^-8 of sum |x w| for bf16, plus the
output's rounding). The line records the route and the kernel (with its runtime specialization,
e.g. `{M=1}`), and a last check proves that every (route, kernel) the timed shapes pick was run:
  * the GEMV for each M in 1..16 (one or two 8-row mma tiles; M = 1 is a compile-time constant),
    8 warps (N = 4096) and 4 warps (N = 14336, N >= 6336), a ragged last trip (K = 4160: 65 blocks,
    not a multiple of 2 x warps), N not a multiple of 16, a bias (also strided), x as rows of a
    wider buffer and at an unaligned offset (the launcher copies it);
  * M = 2048 forward and backward on every timed shape (the swapped tiles on Hopper with a Triton
    that passes the hazard check, else dequantize + cuBLAS), and a ragged 1100 x 4100 with a bias.
Exact test. A hazard like Triton 3.6's (the next trip's decode rewriting the registers of a wgmma
still in flight) gives wrong numbers only sometimes. With FP4 codes scaled to integers (every
block's scale 192) and integer x (-4..4) every product and partial sum is an exact integer in
float32 (below 2^24 at K = 4096), whatever the order,
so the output must equal the exact result rounded once to the output dtype, bit for bit: at
M = 2048, forward and backward, 20 times. Where the gate routes dequantize + cuBLAS (Triton 3.6),
the swapped tiles also run by an explicit route, as an informative check of the hazard itself.
The dry run does the same with tiny shapes under the interpreter (2 repetitions).
"""

from __future__ import annotations

import importlib

import torch

import fourbit.nf4 as reference
from fourbit import dispatch
from fourbit.nf4 import QuantState

from .common import DRY_SHAPES, DRY_TRAIN_M, GEMV_MS, LLAMA_SHAPES, TRAIN_M, Session

kern = importlib.import_module("fourbit.kernels.matmul")

BLOCKSIZE = 64


def cases(dry: bool) -> list[dict]:
    """[{m, n, k, backward, bias, x}] (bias: None | "plain" | "strided"; x: "plain" | "rows" | "offset")."""
    c = lambda m, n, k, backward=False, bias=None, x="plain": dict(m=m, n=n, k=k, backward=backward, bias=bias, x=x)  # noqa: E731
    shapes, train_m = (DRY_SHAPES, DRY_TRAIN_M) if dry else (LLAMA_SHAPES, TRAIN_M)
    (n, k), wide = shapes[0], (40, 128) if dry else (14336, 4096)  # wide: the 4-warp GEMV (N >= 6336)
    # one or two 8-row tiles, 8 warps (the interpreter: one M of each specialization, M = 1 a constant)
    out = [c(m, n, k) for m in ((1, 5, 8, 9, 16) if dry else range(1, 17))]
    out += [c(m, *wide) for m in ((1, 9) if dry else (1, 8, 9, 16))]
    out += [c(1, n, k + 64), c(16, n, k + 64), c(16, n + 4, k)]  # a ragged last trip; N % 16 != 0
    out += [c(1, n, k, bias="plain"), c(16, n, k, bias="strided"), c(3, n, k, x="rows"), c(7, n, k, x="offset")]
    out += [c(train_m, *shape, backward=b) for shape in shapes for b in (False, True)]
    ragged = (train_m + 52, n + 4, k) if not dry else (train_m + 7, n + 4, k)
    out += [c(*ragged, bias="plain"), c(*ragged, backward=True)]
    return out


def timed_kernels(dry: bool) -> set[tuple]:
    """Every (op, path, kernel) the dispatcher picks for the shapes and M the timings run."""
    shapes, train_m = (DRY_SHAPES, DRY_TRAIN_M) if dry else (LLAMA_SHAPES, TRAIN_M)
    picks = set()
    for n, k in shapes:
        for m, backward in [(m, False) for m in GEMV_MS] + [(train_m, b) for b in (False, True)]:
            picks.add(_kernel(m, n, k, backward, torch.float16 if dry else torch.bfloat16))
    return picks


def _kernel(m: int, n: int, k: int, backward: bool, dtype: torch.dtype) -> tuple:
    op, path = dispatch.matmul_route(m, n, k, backward=backward, dtype=dtype)
    plan = kern.plan(op, m, n, k, dtype=dtype, path=path)
    return op, path, plan.launches[0].compiled_spec.name


def _bound(terms: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per element: W rounded to the activations' dtype (2x slack), plus the output's rounding (the
    interpreter truncates bf16); tests/helpers.assert_within_rounding is the same bound."""
    bound = (2.0**-8 if dtype == torch.bfloat16 else 2.0**-11) * terms
    return bound + (2.0**-7 if dtype == torch.bfloat16 else 2.0**-10) * want.abs() + 1e-6


def run_case(s: Session, case: dict) -> tuple:
    m, n, k, backward = case["m"], case["n"], case["k"], case["backward"]
    dtype, dev = s.dtype, s.device
    packed, state = dispatch.quantize(torch.randn(n, k, device=dev), blocksize=BLOCKSIZE, double_quant=True)
    w64 = reference.dequantize(packed, state, dtype=torch.float32).double()
    a = torch.randn(m, n if backward else k, device=dev).to(dtype)
    if case["x"] == "rows":  # rows of a buffer 64 elements wider
        buf = torch.full((m, a.shape[1] + 64), float("nan"), device=dev, dtype=dtype)
        buf[:, :a.shape[1]] = a
        a = buf[:, :a.shape[1]]
    elif case["x"] == "offset":  # one element into its buffer: unaligned
        buf = torch.full((a.numel() + 1,), float("nan"), device=dev, dtype=dtype)
        buf[1:] = a.reshape(-1)
        a = buf[1:].view(m, -1)
    bias = None
    if case["bias"]:
        bias = torch.randn(n, device=dev).to(dtype)
        if case["bias"] == "strided":
            bias = torch.stack([bias, torch.full_like(bias, float("nan"))], dim=1)[:, 0]
    kernel = _kernel(m, n, k, backward, dtype)
    if backward:
        want, terms = a.double() @ w64, a.double().abs() @ w64.abs()
        torch.full((m * k,), float("nan"), dtype=dtype, device=dev)  # poison the block the output reuses
        got = dispatch.matmul_backward(a, packed, state)
    else:
        want = a.double() @ w64.T + (0 if bias is None else bias.double())
        terms = a.double().abs() @ w64.abs().T
        torch.full((m * n,), float("nan"), dtype=dtype, device=dev)
        got = dispatch.matmul(a, packed, state, bias)
    ratio = float(((got.double() - want).abs() / _bound(terms, want, dtype)).max())
    extras = ",".join([f"bias={case['bias']}"] * bool(case["bias"]) + [f"x={case['x']}"] * (case["x"] != "plain"))
    s.check(f"variant {'backward' if backward else 'forward'} {m}x{n}x{k}{' ' + extras if extras else ''}",
            bool(ratio <= 1.0), error_over_bound=ratio, route=list(kernel[:2]), kernel=kernel[2])
    return kernel


def integer_weight(n: int, k: int, device: str) -> tuple[torch.Tensor, QuantState]:
    """Random FP4 codes with every scale 192: bitsandbytes' FP4 values are 0, 1/192 and multiples of
    1/6, so fl32(code * 192) is an integer (0, 1, 32, 48, 64, 96, 128, 192 and negatives)."""
    packed = torch.randint(0, 256, (n * k // 2,), dtype=torch.uint8, device=device)
    state = QuantState.from_tensors(torch.full((n * k // BLOCKSIZE,), 192.0, device=device), None, None, None,
                                    shape=(n, k), dtype=torch.bfloat16, blocksize=BLOCKSIZE, quant_type="fp4")
    return packed, state


def swapped_exact(s: Session, repeats: int) -> None:
    m, n, k = (40, 64, 128) if s.dry_run else (TRAIN_M, 4096, 4096)
    dtype, dev = s.dtype, s.device
    packed, state = integer_weight(n, k, dev)
    w64 = reference.dequantize(packed, state, dtype=torch.float32).double()
    routes = {"routed": (None, None, None)}
    if s.dry_run or not dispatch.matmul_gates()["swapped_tiles"]:  # the swapped tiles themselves, explicitly
        configs = ((32, 32, 64, 4, 1, True), (32, 32, 128, 4, 1, True)) if s.dry_run else kern.swapped_configs()
        routes["swapped"] = (("gemm", "fused"), ("backward", "fused"), configs)
    for label, (fwd_route, bwd_route, configs) in routes.items():
        bad_fwd = bad_bwd = 0
        for _ in range(repeats):
            span = 1 if s.dry_run else 4  # |sum| <= 192 * span * K: below 2^24 (exact in float32), and fp16's range
            x = torch.randint(-span, span + 1, (m, k), device=dev).to(dtype)
            dy = torch.randint(-span, span + 1, (m, n), device=dev).to(dtype)
            if fwd_route is None:
                y, dx = dispatch.matmul(x, packed, state), dispatch.matmul_backward(dy, packed, state)
            else:
                y = kern.matmul(x, packed, state, route=fwd_route, config=configs[0])
                dx = kern.matmul_backward(dy, packed, state, route=bwd_route, config=configs[1])
            bad_fwd += int((y != (x.double() @ w64.T).to(dtype)).sum())
            bad_bwd += int((dx != (dy.double() @ w64).to(dtype)).sum())
        kernels = _kernel(m, n, k, False, dtype)[1:] if fwd_route is None else ("fused", str(configs))
        s.check(f"swapped tiles exact on integers, {label}, {m}x{n}x{k} x{repeats}", bad_fwd == 0 and bad_bwd == 0,
                required=label == "routed", forward_mismatches=bad_fwd, backward_mismatches=bad_bwd,
                route=list(kernels), gates=dispatch.matmul_gates())


def run(s: Session) -> None:
    """Every variant, the coverage check, then the exact test (each failure recorded, the next runs)."""
    ran, failures = set(), []
    for case in cases(s.dry_run):
        try:
            ran.add(run_case(s, case))
        except Exception as error:  # a crash is a failed required check; the next case runs
            failures.append(repr(error)[:300])
            s.check(f"variant {case} runs", False, error=repr(error)[:500])
    missing = sorted(timed_kernels(s.dry_run) - ran)
    s.check("variants cover every kernel the timed shapes pick", not missing, missing=[list(x) for x in missing],
            kernels=len(ran))
    swapped_exact(s, 2 if s.dry_run else 20)
