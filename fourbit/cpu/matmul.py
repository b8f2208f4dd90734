"""CPU kernels for the 4-bit matmul, same names and signatures as fourbit.nf4.matmul.

    y = matmul(x, packed, state, bias)        # x @ dequantize(W).T + bias, x: (..., K), W: [N, K]
    dx = matmul_backward(dy, packed, state)   # dy @ dequantize(W)

Two ways, chosen by the number of rows M of x (`GEMV_MAX_M`):
  * M <= GEMV_MAX_M: the fused GEMV (csrc/gemv4.c) decodes W in registers and never writes it; float32
    arithmetic, so it equals the reference within F.linear's tolerance, not bit for bit. Measured on
    one core here (4096 x 4096, float32 x), GEMV against decode + F.linear: M = 1 2.6 vs 7.7 ms,
    M = 16 17.8 vs 27.3 ms, M = 32 36.1 vs 35.4 ms: the crossover sits between 16 and 32.
  * otherwise the reference's own plan: W decoded in cache-sized chunks of rows into x's dtype, each
    chunk multiplied by F.linear, here with the C decoder into a reused buffer. Same bits as the
    reference for float32 x (its decode is bit-identical and the chunks are the same).
matmul_backward decodes one dense W in dy's dtype and multiplies, as the reference: for float32 the
same bits.

bfloat16 / float16 x: torch's half-precision GEMM on a CPU without native half matrix instructions
(AVX512-BF16 / AMX, AVX512-FP16) runs far below its float32 GEMM (one core here, 4096 x 4096 weight,
M = 32: 111 ms bf16 against 35 ms fp32), so on such CPUs both the chunked forward and the backward
multiply in float32 (x and W widened exactly, one rounding of the result to x's dtype): within the
reference's tolerance and more accurate than it, not its bits. float64 x (gradcheck) takes the
reference.
"""

from __future__ import annotations

import threading

import torch

from ..nf4 import matmul as reference
from ..nf4.matmul import _chunk_rows, check_matmul_args
from ..nf4.state import QuantState
from . import _lib
from .quant import _check_cpu, _constants, _ptr, _scale_args, dequantize_into

__all__ = ["matmul", "matmul_backward", "compute_dtype", "GEMV_MAX_M"]

GEMV_MAX_M = 16
_WORKSPACE_MAX = 1 << 24  # values: a decoded W up to 64 MiB (float32) reuses one buffer per thread
_LOCAL = threading.local()
_CPU_FLAGS: dict[str, frozenset] = {}


def _workspace(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat buffer of `numel` values, reused by later calls on this thread (no page faults on a fresh
    allocation each call); consume it before the next call."""
    if numel > _WORKSPACE_MAX:
        return torch.empty(numel, dtype=dtype)
    buffers = _LOCAL.__dict__.setdefault("buffers", {})
    buf = buffers.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = buffers[dtype] = torch.empty(max(numel, 1 << 16), dtype=dtype)
    return buf[:numel]


def _native_half() -> frozenset:
    """The half dtypes this CPU multiplies natively (then torch's half GEMM is the fast one)."""
    if "native" not in _CPU_FLAGS:
        flags: set[str] = set()
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("flags"):
                        flags = set(line.split(":", 1)[1].split())
                        break
        except OSError:
            pass
        native = set()
        if flags & {"avx512_bf16", "amx_bf16"}:
            native.add(torch.bfloat16)
        if flags & {"avx512_fp16", "amx_fp16"}:
            native.add(torch.float16)
        _CPU_FLAGS["native"] = frozenset(native)
    return _CPU_FLAGS["native"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the dense products run in for x of `dtype` (module docstring)."""
    return dtype if dtype == torch.float32 or dtype in _native_half() else torch.float32


def _gemv(x2: torch.Tensor, packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None,
          y: torch.Tensor) -> None:
    m, k = x2.shape
    n = int(state.shape[0])
    absmax, qabs, absmax2, code8, offset, nbs = _scale_args(state)
    code, _, _ = _constants(state.quant_type)
    b = None if bias is None else bias.to(x2.dtype).float().contiguous()  # the reference adds bias in x's dtype
    data = packed.contiguous().view(-1).view(torch.uint8)
    _lib.library().fourbit_gemv_4bit(
        x2.data_ptr(), _lib.dtype_code(x2.dtype), m, k, data.data_ptr(), n, state.blocksize, code.data_ptr(),
        _ptr(absmax), _ptr(qabs), _ptr(absmax2), _ptr(code8), offset, nbs, _ptr(b), y.data_ptr(),
        _lib.dtype_code(y.dtype), _lib.threads())


def matmul(x: torch.Tensor, packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None = None, *,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ dequantize(W).T + bias.  x: (..., K) float; W: [N, K] quantized; y: (..., N) in x.dtype.
    `out`, if given, is a contiguous (..., N) tensor of x's dtype that receives y."""
    check_matmul_args(x, packed, state, bias)
    if x.dtype == torch.float64:
        return reference.matmul(x, packed, state, bias, out=out)
    if x.device.type != "cpu" or state.absmax.device.type != "cpu":  # check_matmul_args: packed is on x's device
        _check_cpu(x=x, absmax=state.absmax)
    n_out, k = (int(d) for d in state.shape)
    m = x.shape[:-1].numel()
    shape = (*x.shape[:-1], n_out)
    if out is not None and (tuple(out.shape) != shape or out.dtype != x.dtype or out.device != x.device
                            or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape {shape} on {x.device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    x2 = x.reshape(m, k)  # (M, K)
    if 0 < m <= GEMV_MAX_M and n_out and k:
        y = torch.empty(shape, dtype=x.dtype) if out is None else out
        _gemv(x2.contiguous(), packed, state, bias, y.view(m, n_out))
        return y
    rows = _chunk_rows(n_out, k, state.blocksize)
    work = compute_dtype(x.dtype)
    xw = x2 if work == x.dtype else x2.to(work)
    if out is None and rows >= n_out:  # one chunk: y needs no copy (the reference's plan)
        w = dequantize_into(packed, state, _workspace(n_out * k, work)).view(n_out, k)
        b = None if bias is None else bias.to(x.dtype).to(work)
        return torch.nn.functional.linear(xw, w, b).to(x.dtype).view(shape)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype)
    y = out.view(-1, n_out)  # (M, N)
    for r0 in range(0, n_out, rows):
        r1 = min(n_out, r0 + rows)
        w = dequantize_into(packed, state, _workspace((r1 - r0) * k, work), start=r0 * k).view(r1 - r0, k)
        b = None if bias is None else bias[r0:r1].to(x.dtype).to(work)
        y[:, r0:r1] = torch.nn.functional.linear(xw, w, b)  # (M, R), rounded to x's dtype on the copy
    return out


def matmul_backward(grad_y: torch.Tensor, packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """grad_x = grad_y @ dequantize(W) in grad_y's dtype; grad_y: (..., N), grad_x: (..., K)."""
    if not isinstance(state, QuantState) or len(state.shape) != 2:
        raise ValueError("matmul_backward needs a QuantState of a 2-D weight [N, K]")
    n_out, k = (int(d) for d in state.shape)
    if grad_y.shape[-1] != n_out:
        raise ValueError(f"grad_y has {grad_y.shape[-1]} features in its last dimension but the weight has N={n_out}")
    if grad_y.dtype == torch.float64:
        return reference.matmul_backward(grad_y, packed, state)
    work = compute_dtype(grad_y.dtype)
    w = dequantize_into(packed, state, _workspace(n_out * k, work)).view(n_out, k)
    if work == grad_y.dtype:
        return grad_y @ w  # (..., N) @ (N, K)
    return (grad_y.to(work) @ w).to(grad_y.dtype)
