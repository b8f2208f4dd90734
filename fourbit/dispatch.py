"""Backend choice between the PyTorch reference (`fourbit.nf4`) and Triton (`fourbit.kernels`).

FOURBIT_BACKEND = auto (default) | reference | triton
    auto       Triton for CUDA tensors, the reference otherwise.
    reference  always the reference.
    triton     always Triton; on CPU tensors this needs TRITON_INTERPRET=1.
The environment is read on every call, so tests may switch it with monkeypatch.
"""

from __future__ import annotations

import importlib
import os

import torch

__all__ = ["backend_for", "implementation", "quantize", "dequantize", "matmul"]

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


def implementation(name: str, t: torch.Tensor):
    """The function `name` from the backend chosen for t."""
    module = "fourbit.nf4" if backend_for(t) == "reference" else "fourbit.kernels"
    mod = importlib.import_module(module)
    if not hasattr(mod, name):
        raise NotImplementedError(f"{module} has no {name!r} yet; use FOURBIT_BACKEND=reference")
    return getattr(mod, name)


def quantize(x, **kwargs):
    return implementation("quantize", x)(x, **kwargs)


def dequantize(packed, state, **kwargs):
    return implementation("dequantize", packed)(packed, state, **kwargs)


def matmul(x, packed, state, bias=None):
    return implementation("matmul", x)(x, packed, state, bias)
