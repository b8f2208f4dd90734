"""4-bit matmul on the GPU: y = x @ dequantize(W).T + bias and its input gradient dx = dy @ W.

W is [N, K] (out, in) as bitsandbytes stores it: packed row-major, two codes per byte (the even
element in the high nibble), one float32 scale per `blocksize` flat elements (nested: 8-bit codes,
a float32 scale per 256 blocks and an offset). x: (..., K) fp32/fp16/bf16; y: (..., N) in x's dtype.

Three ways to compute it, named by (op, path) as `fourbit.dispatch.matmul_route` chooses them:
  * ("gemv", "fused"), M <= GEMV_MAX_M (16), bf16/fp16 x, blocksize % 64 == 0:
    `matmul_gemv_mma.gemv_mma_kernel`, built for the HBM roofline: a packed byte becomes an mma
    register through a shared-memory table of code pairs, mma.sync does the multiply-adds, one
    reduction at the end, no split-K. fp32 x or blocksize 32, M <= SIMT_GEMV_MAX_M (4):
    `matmul_gemv.gemv_kernel` (codes looked up with warp shuffles, FMA per weight). Neither is
    bit-identical to the reference: the scale multiplies partial sums (see their modules).
  * ("gemm" | "backward", "fused"): `matmul_gemm`, tensor cores on tiles decoded in registers with
    the same shuffle lookups, small-M tiles that fill the SMs; the dispatcher's choice for the forward
    at 3 <= M <= 64 and the backward at M <= 64 (memory-bound there: W is read once, 4.127 bits each),
    and on Hopper for 1024 <= M < 8192: swapped tiles (y^T = W x^T) that feed the decoded W to async
    wgmma from registers, so the decode hides under the MMA (predicted 0.97x dense cuBLAS at M = 2048).
  * ("gemm" | "backward", "dequantize+cublas"): the one-launch Triton dequantize writes W in x's
    dtype into a workspace reused across calls (one per device and dtype, grown on demand), then
    cuBLAS: torch.addmm / torch.mm. Bit-identical to the reference (`fourbit.nf4.matmul`), which is
    F.linear on the weight dequantized into x's dtype; dx = dy @ W the same way. The decode costs one
    extra pass over W (read 0.5 B, write 2 B per weight) next to 2*M FLOP per weight: 0.90x dense at
    M = 2048, 0.97x at 8192, where the dispatcher takes it again.
The workspace is only valid until the next call on the same stream; cuBLAS consumes it in stream
order right after the decode, so a caller never sees it.

Plans, configurations and the compile report's specs live in `matmul_plan`; this module tunes and
launches.
"""

from __future__ import annotations

import torch
import triton

from ..nf4.matmul import check_matmul_args
from ..nf4.quant import check_packed
from ..nf4.state import QuantState
from ._triton_utils import check_launch_device, interpreting
from .compile import Plan
from .dequantize import dequantize_into
from .matmul_gemv_mma import pair_table
from .matmul_plan import (_DOT_PRECISION, GEMV_MAX_M, SIMT_GEMV_MAX_M, SMS,
                          _gemv_candidates, _m_bucket, compile_specs, default_route, device_arch, fused_shape_supported,
                          gemv_max_m, launch_plans, mma_gemv_supported, plan, shortlist, swapped_configs)
from .matmul_tune import _tune_store, tune_cache_path

__all__ = ["matmul", "matmul_backward", "plan", "launch_plans", "default_route", "fused_shape_supported",
           "compile_specs", "tune", "tune_cache_path", "gemv_max_m", "shortlist", "swapped_configs", "GEMV_MAX_M",
           "SIMT_GEMV_MAX_M", "SMS"]


def tune(op: str, a: torch.Tensor, packed: torch.Tensor, state: QuantState, *, bench=None) -> tuple:
    """Time this module's short candidate list for op "gemv" (a = x), "gemm" (a = x) or "backward"
    (a = dy) on a's GPU, keep the fastest in the tuning cache (one JSON file) and return it. At
    most four configurations, each timed by `bench` (default triton.testing.do_bench, ~0.1 s): a
    few seconds per shape, run once, by choice (the launchers never tune)."""
    if interpreting() or not a.is_cuda:
        raise ValueError("tuning times kernels on a GPU; it cannot run under TRITON_INTERPRET=1 or on CPU tensors")
    n, k = (int(d) for d in state.shape)
    m = a.numel() // a.shape[-1]
    nested, arch = state.nested is not None, device_arch(a.device)
    if op == "gemv" and mma_gemv_supported(a.dtype, state.blocksize, arch):
        key = ("gemv_mma", 1 if m <= 8 else 2, n, k, str(a.dtype), nested, state.blocksize, arch)
        candidates = _gemv_candidates(m, n, k, a.dtype, state.blocksize, arch)
    elif op == "gemv":
        key, candidates = ("gemv", m, n, k, str(a.dtype), nested, state.blocksize, arch), _gemv_candidates(m, n, k)
    elif op in ("gemm", "backward"):
        key = (op, _m_bucket(m), n, k, str(a.dtype), nested, state.blocksize, arch)
        candidates = [c for c in shortlist(op, arch) if k % c[2] == 0]
        if not candidates:
            raise ValueError(f"no fused {op} configuration for {arch} with K={k} (capability < 8.0 has none)")
    else:
        raise ValueError(f"op must be gemv, gemm or backward, got {op!r}")
    bench = bench or triton.testing.do_bench
    if op == "backward":
        run = lambda cfg: matmul_backward(a, packed, state, route=("backward", "fused"), config=cfg)  # noqa: E731
    else:
        run = lambda cfg: matmul(a, packed, state, route=(op, "fused"), config=cfg)  # noqa: E731
    best = _tune_store(key, candidates, lambda cfg: bench(lambda: run(cfg)))
    plan.cache_clear()  # plans read the cache
    return best


# ---- launchers ----------------------------------------------------------------------------------
_WORKSPACES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _workspace(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat buffer of at least `numel` elements, one per (device, dtype), grown on demand and kept:
    the dense copy of the largest weight seen (bitsandbytes allocates one per call instead)."""
    buf = _WORKSPACES.get((device, dtype))
    if buf is None or buf.numel() < numel:
        buf = _WORKSPACES[(device, dtype)] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else SMS


def _state_args(packed: torch.Tensor, state: QuantState) -> tuple:
    """(packed bytes, 16 codes, absmax, absmax2, code8, offset) pointers; unused ones alias absmax.
    The kernels index every one as a flat contiguous array, so views with strides are copied."""
    data = check_packed(packed, state)  # (N*K/2,) uint8
    code = state.code.to(device=data.device, dtype=torch.float32).contiguous()
    absmax, absmax2, code8, offset = state.as_tensors()
    absmax = absmax.contiguous()
    if absmax2 is None:
        return data, code, absmax, absmax, absmax, absmax
    return (data, code, absmax, absmax2.contiguous(), code8.to(torch.float32).contiguous(),
            offset.to(device=data.device, dtype=torch.float32).reshape(1))


def _route(route, m: int, state: QuantState, backward: bool, dtype: torch.dtype, arch: str) -> tuple[str, str]:
    if not fused_shape_supported(state):
        raise ValueError(f"the Triton matmul needs K % blocksize == 0 and K % 64 == 0, got K={int(state.shape[-1])} "
                         f"with blocksize {state.blocksize} (fourbit.dispatch.matmul runs the reference for these)")
    op, path = route or default_route(m, backward=backward, dtype=dtype, blocksize=state.blocksize, arch=arch)
    if (op == "backward") != backward or op not in ("gemv", "gemm", "backward") or path not in ("fused", "dequantize+cublas"):
        raise ValueError(f"route {(op, path)!r} is not one of this launcher's: "
                         f"{'(backward, fused | dequantize+cublas)' if backward else '(gemv, fused), (gemm, fused | dequantize+cublas)'}")
    if op == "gemv" and m > gemv_max_m(dtype, state.blocksize, arch):
        raise ValueError(f"the GEMV takes at most {gemv_max_m(dtype, state.blocksize, arch)} rows of {dtype} x with "
                         f"blocksize {state.blocksize}, got M={m}")
    return op, path


def _launch(kernel_plan: Plan, *args, **runtime) -> None:
    launch = kernel_plan.launches[0]
    spec = launch.spec
    constexprs = {**spec.constexprs, **runtime}
    for flag in ("SHFL", "ASM"):  # inline assembly only where it is compiled
        if flag in constexprs:
            constexprs[flag] = not interpreting()
    spec.kernel[launch.grid](*args, **constexprs, num_warps=spec.num_warps, num_stages=spec.num_stages, **spec.options)


def matmul(x: torch.Tensor, packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None = None, *,
           out: torch.Tensor | None = None, route: tuple[str, str] | None = None,
           config: tuple | None = None) -> torch.Tensor:
    """y = x @ dequantize(W).T + bias. x: (..., K) fp32/fp16/bf16; y: (..., N) in x.dtype. `out`, if
    given, is a contiguous (..., N) tensor of x's dtype that receives y. `route` (op, path) as
    `fourbit.dispatch.matmul_route` returns it (default: `default_route`); `config` is for `tune`."""
    check_matmul_args(x, packed, state, bias)
    if x.dtype not in _DOT_PRECISION:
        raise TypeError(f"the Triton matmul takes float32/float16/bfloat16 x, got {x.dtype} (use the reference)")
    device = check_launch_device(x=x, packed=packed, absmax=state.absmax, bias=bias)
    n, k = (int(d) for d in state.shape)
    x2 = x.reshape(x.shape[:-1].numel(), k)  # (-1, k) is ambiguous when k == 0
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = _output(out, (*x.shape[:-1], n), x)
    if m == 0 or n == 0:
        return y
    if k == 0:  # no products, only the bias (the swapped tiles' loop assumes K > 0)
        return y.copy_(bias.to(x.dtype).expand_as(y)) if bias is not None else y.zero_()
    arch = device_arch(device)
    op, path = _route(route, m, state, backward=False, dtype=x.dtype, arch=arch)
    nested, has_bias = state.nested is not None, bias is not None
    # rounded to x's dtype first, as the reference; contiguous: the kernels index bias_ptr + n
    bias_arg = bias.to(x.dtype).contiguous() if has_bias else None
    y2 = y.view(m, n)
    if path == "dequantize+cublas":
        w = dequantize_into(packed, state, _workspace(n * k, x.dtype, device)).view(n, k)  # (N, K) x.dtype
        if has_bias:
            torch.addmm(bias_arg, x2, w.t(), out=y2)  # what F.linear runs: bias added before the one rounding
        else:
            torch.mm(x2, w.t(), out=y2)
        return y
    p = plan(op, m, n, k, dtype=x.dtype, nested=nested, blocksize=state.blocksize, path=path, sms=_sms(device),
             arch=arch, config=config)
    args = _state_args(packed, state)
    bias_ptr = bias_arg if has_bias else y
    if op == "gemv" and p.config.startswith("mma"):
        data, _, *scales = args
        if data.data_ptr() % 8:  # 64-bit weight loads
            data = data.clone()
        if x2.data_ptr() % 8 or x2.stride(0) % 4:  # 64-bit x loads
            x2 = x2.clone()
        _launch(p, x2, data, pair_table(state.code, x.dtype, device), *scales, bias_ptr, y2, m, n, k, x2.stride(0),
                HAS_BIAS=has_bias)
    elif op == "gemv":
        _launch(p, x2, *args, bias_ptr, y2, m, n, k, x2.stride(0), HAS_BIAS=has_bias)
    else:
        _launch(p, x2, *args, bias_ptr, y2, m, n, k, x2.stride(0), _m_bucket(m), HAS_BIAS=has_bias,
                PRECISION=_DOT_PRECISION[x.dtype])
    return y


def matmul_backward(grad_y: torch.Tensor, packed: torch.Tensor, state: QuantState, *,
                    out: torch.Tensor | None = None, route: tuple[str, str] | None = None,
                    config: tuple | None = None) -> torch.Tensor:
    """grad_x = grad_y @ dequantize(W). grad_y: (..., N); grad_x: (..., K) in grad_y.dtype."""
    if not isinstance(state, QuantState) or len(state.shape) != 2:
        raise ValueError(f"matmul_backward needs a 2-D quantized weight [N, K], got shape {tuple(getattr(state, 'shape', ()))}")
    n, k = (int(d) for d in state.shape)
    if grad_y.shape[-1] != n:
        raise ValueError(f"grad_y has {grad_y.shape[-1]} features in its last dimension but the weight has N={n}")
    if grad_y.dtype not in _DOT_PRECISION:
        raise TypeError(f"grad_y must be float32/float16/bfloat16, got {grad_y.dtype}")
    device = check_launch_device(grad_y=grad_y, packed=packed, absmax=state.absmax)
    dy = grad_y.reshape(grad_y.shape[:-1].numel(), n)  # (-1, n) is ambiguous when n == 0
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    m = dy.shape[0]
    dx = _output(out, (*grad_y.shape[:-1], k), grad_y)
    if m == 0:
        return dx
    if n == 0:
        return dx.zero_()
    arch = device_arch(device)
    _, path = _route(route, m, state, backward=True, dtype=dy.dtype, arch=arch)
    dx2 = dx.view(m, k)
    if path == "dequantize+cublas":
        w = dequantize_into(packed, state, _workspace(n * k, dy.dtype, device)).view(n, k)  # (N, K)
        torch.mm(dy, w, out=dx2)
        return dx
    p = plan("backward", m, n, k, dtype=dy.dtype, nested=state.nested is not None, blocksize=state.blocksize,
             path="fused", sms=_sms(device), arch=arch, config=config)
    args = _state_args(packed, state)
    _launch(p, dy, *args, dx2, m, n, k, dy.stride(0), _m_bucket(m), PRECISION=_DOT_PRECISION[dy.dtype])
    return dx


def _output(out: torch.Tensor | None, shape: tuple, like: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if tuple(out.shape) != tuple(shape) or out.dtype != like.dtype or out.device != like.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {like.dtype} tensor of shape {tuple(shape)} on {like.device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    return out

