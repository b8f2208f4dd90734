"""The one place that chooses between the PyTorch reference (`fourbit.nf4`) and Triton (`fourbit.kernels`).

Every backend-dependent operation is exported here with the signature both implementations share:

    op                    reference                       Triton kernel
    quantize              fourbit.nf4.quant.quantize      fourbit.kernels.quantize.quantize
    dequantize            fourbit.nf4.quant.dequantize    fourbit.kernels.dequantize.dequantize
    matmul                fourbit.nf4.matmul.matmul       fourbit.kernels.matmul.matmul
    matmul_backward       fourbit.nf4.matmul...           fourbit.kernels.matmul.matmul_backward
    adamw_update_32bit    fourbit.nf4.adamw...            fourbit.kernels.adamw.adamw_update_32bit
    adamw_update_8bit     fourbit.nf4.adamw...            fourbit.kernels.adamw.adamw_update_8bit

FOURBIT_BACKEND = auto (default) | reference | triton
    auto       Triton for CUDA tensors, the reference otherwise.
    reference  always the reference.
    triton     always Triton; on CPU tensors this needs TRITON_INTERPRET=1.
The environment is read on every call, so tests may switch it with monkeypatch.

Rules beyond the environment live here too, never inside a kernel module: a kernel launcher raises
ValueError on what it cannot do, and this module decides what runs instead. Today one such rule
exists: the fused matmul needs K % blocksize == 0 and K % 64 == 0 (`fused_shape_supported`); other
weights take the reference (dequantize in chunks + torch.matmul), as bitsandbytes does for them.

Imports are lazy and plain (inside each function): with FOURBIT_BACKEND=reference, or on CPU under
auto, Triton is never imported.
"""

from __future__ import annotations

import os

import torch

__all__ = [
    "adamw_update_32bit",
    "adamw_update_8bit",
    "backend_for",
    "dequantize",
    "matmul",
    "matmul_backward",
    "quantize",
]

_BACKENDS = ("auto", "reference", "triton")


def backend_for(t: torch.Tensor) -> str:
    """"reference" or "triton" for an operation on tensor t."""
    choice = os.environ.get("FOURBIT_BACKEND", "auto").strip().lower() or "auto"
    if choice not in _BACKENDS:
        raise ValueError(f"FOURBIT_BACKEND must be one of {list(_BACKENDS)}, got {choice!r}")
    if choice == "auto":
        return "triton" if t.is_cuda else "reference"
    if choice == "triton" and not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "FOURBIT_BACKEND=triton on a CPU tensor needs Triton's interpreter: set TRITON_INTERPRET=1 "
            "before importing triton, or move the tensors to a CUDA device"
        )
    return choice


def quantize(x: torch.Tensor, **kwargs):
    """(packed, QuantState) of x; keywords as `fourbit.nf4.quantize`."""
    if backend_for(x) == "triton":
        from .kernels.quantize import quantize as impl
    else:
        from .nf4.quant import quantize as impl
    return impl(x, **kwargs)


def dequantize(packed: torch.Tensor, state, **kwargs) -> torch.Tensor:
    """The dense tensor of `state.shape`; keywords as `fourbit.nf4.dequantize`."""
    if backend_for(packed) == "triton":
        from .kernels.dequantize import dequantize as impl
    else:
        from .nf4.quant import dequantize as impl
    return impl(packed, state, **kwargs)


def matmul(x: torch.Tensor, packed: torch.Tensor, state, bias: torch.Tensor | None = None, *,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ dequantize(W).T + bias; x: (..., K), W: [N, K], y: (..., N) in x.dtype."""
    if backend_for(x) == "triton":
        from .kernels.matmul import fused_shape_supported, matmul as kernel

        if fused_shape_supported(state):
            return kernel(x, packed, state, bias, out=out)
    from .nf4.matmul import matmul as reference

    return reference(x, packed, state, bias, out=out)


def matmul_backward(grad_y: torch.Tensor, packed: torch.Tensor, state) -> torch.Tensor:
    """grad_x = grad_y @ dequantize(W); grad_y: (..., N), grad_x: (..., K) in grad_y.dtype."""
    if backend_for(grad_y) == "triton":
        from .kernels.matmul import fused_shape_supported, matmul_backward as kernel

        if fused_shape_supported(state):
            return kernel(grad_y, packed, state)
    from .nf4.matmul import matmul_backward as reference

    return reference(grad_y, packed, state)


def adamw_update_32bit(p, g, m, v, **hyper) -> None:
    """One AdamW step in place on flat p, m, v (float32 states); keywords lr, beta1, beta2, eps,
    weight_decay, step."""
    if backend_for(p) == "triton":
        from .kernels.adamw import adamw_update_32bit as impl
    else:
        from .nf4.adamw import adamw_update_32bit as impl
    impl(p, g, m, v, **hyper)


def adamw_update_8bit(p, g, q1, q2, absmax1, absmax2, qmap1, qmap2, **hyper) -> None:
    """One AdamW step in place on flat p and the 8-bit blockwise states (see `fourbit.nf4.adamw`)."""
    if backend_for(p) == "triton":
        from .kernels.adamw import adamw_update_8bit as impl
    else:
        from .nf4.adamw import adamw_update_8bit as impl
    impl(p, g, q1, q2, absmax1, absmax2, qmap1, qmap2, **hyper)
