"""The one place that chooses between the PyTorch reference (`fourbit.nf4`), Triton (`fourbit.kernels`)
and the C kernels for CPU tensors (`fourbit.cpu`).

Every backend-dependent operation is exported here with the signature all implementations share:

    op                    reference                       Triton kernel                          CPU kernel
    quantize              fourbit.nf4.quant.quantize      fourbit.kernels.quantize.quantize      fourbit.cpu.quantize
    dequantize            fourbit.nf4.quant.dequantize    fourbit.kernels.dequantize.dequantize  fourbit.cpu.dequantize
    matmul                fourbit.nf4.matmul.matmul       fourbit.kernels.matmul.matmul          fourbit.cpu.matmul
    matmul_backward       fourbit.nf4.matmul...           fourbit.kernels.matmul.matmul_backward fourbit.cpu.matmul_backward
    adamw_update_32bit    fourbit.nf4.adamw...            fourbit.kernels.adamw.adamw_update_32bit  fourbit.cpu...
    adamw_update_8bit     fourbit.nf4.adamw...            fourbit.kernels.adamw.adamw_update_8bit   fourbit.cpu...
    quantize_blockwise    fourbit.nf4.blockwise...        (the reference on CUDA tensors)        fourbit.cpu...
    dequantize_blockwise  fourbit.nf4.blockwise...        (the reference on CUDA tensors)        fourbit.cpu...

FOURBIT_BACKEND = auto (default) | reference | triton | cpu
    auto       Triton for CUDA tensors; the CPU kernels for CPU tensors when they build and load,
               else the reference (one line on stderr says why, once per process).
    reference  always the reference.
    triton     always Triton; on CPU tensors this needs TRITON_INTERPRET=1.
    cpu        the CPU kernels for CPU tensors (an error, with the reason, if they cannot load).
The environment is read on every call, so tests may switch it with monkeypatch. The CPU kernels are
bit-identical to the reference except the fused GEMV (M <= fourbit.cpu.GEMV_MAX_M rows of x), which
computes in float32 and agrees within F.linear's tolerance.

Rules beyond the environment live here too, never inside a kernel module: a kernel launcher raises
ValueError on what it cannot do, and this module decides what runs instead. The Triton matmul needs
K % blocksize == 0 and K % 64 == 0 (`fused_shape_supported`); other weights take the reference
(dequantize in chunks + torch.matmul), as bitsandbytes does for them. Among the Triton matmul's
routes, `matmul_route` picks by the number of rows M of x (crossovers below, from the static cost
model `fourbit.kernels.analysis.costmodel` until a GPU measurement replaces them):

    M <= GEMV_MAX_M              ("gemv", "fused")               the tensor-core GEMV (bf16/fp16 x, blocksize
                                                                 % 64 == 0, capability >= 8.0); fp32 x or
                                                                 blocksize 32: the SIMT GEMV up to SIMT_GEMV_MAX_M
    M <= FUSED_MAX_M             ("gemm" | "backward", "fused")  tensor cores on tiles decoded in registers
    SWAP_MIN_M <= M < SWAP_MAX_M ("gemm" | "backward", "fused")  Hopper, bf16/fp16: the swapped tiles, W from
                                                                 registers into async wgmma
    otherwise                    (..., "dequantize+cublas")      one decode pass + cuBLAS
Why each crossover sits where it does (the cost model's predicted fractions of the roofline and of
dense cuBLAS per shape, and the margins left on the safe side) is in docs/kernels.md, generated from
benchmarks/results/sm_90a/costmodel.json; a GPU measurement replaces them. On sm_80/89 (no
register-operand wgmma) and for fp32 x every M above FUSED_MAX_M takes dequantize + cuBLAS.

Gates (`matmul_gates` reports them for a device): below capability 8.0 (T4, V100) there is no
mma.sync.m16n8k16 and no bf16 tensor core, so the tensor-core GEMV and the fused tiles do not build;
the SIMT GEMV keeps M <= SIMT_GEMV_MAX_M and everything else takes dequantize + cuBLAS. The swapped
tiles run only on a Triton version whose build passes the static hazard check
(`fourbit.kernels.analysis.hazards`; `matmul_plan.SWAP_TRITON`): Triton 3.6's build rewrites the
registers of wgmmas still in flight. The cost model asks `matmul_route`, so it rates the same gates.

Imports are lazy and plain (inside each function): with FOURBIT_BACKEND=reference, or on CPU under
auto, Triton is never imported; with FOURBIT_BACKEND=reference the CPU kernels are never built.
"""

from __future__ import annotations

import os
import sys

import torch

__all__ = [
    "FUSED_MAX_M",
    "SWAP_MAX_M",
    "GEMV_MAX_M",
    "SIMT_GEMV_MAX_M",
    "adamw_update_32bit",
    "adamw_update_8bit",
    "backend_for",
    "cpu_kernels_available",
    "dequantize",
    "dequantize_blockwise",
    "matmul",
    "matmul_backward",
    "matmul_gates",
    "matmul_route",
    "quantize",
    "quantize_blockwise",
]

GEMV_MAX_M = 16  # route to the tensor-core GEMV up to here (bf16/fp16 x, blocksize % 64 == 0)
SIMT_GEMV_MAX_M = 2  # the SIMT GEMV (fp32 x or blocksize 32) up to here (it takes up to 4)
FUSED_MAX_M = 64  # above, dequantize + cuBLAS (module docstring)
SWAP_MAX_M = 8192  # from here dequantize + cuBLAS again: the model ties them (0.973 vs 0.970)

_BACKENDS = ("auto", "reference", "triton", "cpu")
_CPU: dict[str, object] = {}  # the CPU kernels' verdict for this process: {"ok": bool, "module": fourbit.cpu}


def cpu_kernels_available() -> bool:
    """Whether fourbit.cpu's kernels are built and loaded (built on the first call; the verdict is kept).
    If they cannot be, one line on stderr says why, once per process."""
    if "ok" not in _CPU:
        from . import cpu

        ok, why = cpu.available()
        _CPU["ok"], _CPU["module"] = ok, cpu
        if not ok:
            print(f"fourbit: CPU kernels unavailable ({why}); using the PyTorch reference", file=sys.stderr)
    return bool(_CPU["ok"])


def _cpu():
    """The fourbit.cpu package, imported once: an optimizer calls dispatch per tensor (420 per LoRA
    step), and a `from .cpu import name` per call cost more than the kernel for small tensors."""
    module = _CPU.get("module")
    if module is None:
        from . import cpu as module

        _CPU["module"] = module
    return module


def _has_data(t: torch.Tensor) -> bool:
    """False for a fake tensor (`fourbit.plan` traces a training step under FakeTensorMode): the C
    kernels and Triton's interpreter read and write memory through data_ptr(), which a fake tensor
    does not have, while the reference's torch ops trace."""
    if type(t) is torch.Tensor:  # a fake tensor is a subclass
        return True
    from torch._subclasses.fake_tensor import is_fake

    return not is_fake(t)


def backend_for(t: torch.Tensor) -> str:
    """"reference", "triton" or "cpu" for an operation on tensor t."""
    choice = os.environ.get("FOURBIT_BACKEND", "auto").strip().lower() or "auto"
    if choice not in _BACKENDS:
        raise ValueError(f"FOURBIT_BACKEND must be one of {list(_BACKENDS)}, got {choice!r}")
    if not t.is_cuda and not _has_data(t):  # a fake CPU tensor: neither C nor the interpreter can run it
        return "reference"
    if choice == "auto":
        if t.is_cuda:
            return "triton"
        return "cpu" if t.device.type == "cpu" and cpu_kernels_available() else "reference"
    if choice == "cpu":
        if t.device.type != "cpu":
            raise ValueError(f"FOURBIT_BACKEND=cpu runs CPU tensors only, got one on {t.device}")
        _cpu()._lib.loaded()  # raises Unavailable, with the reason, if the kernels cannot be built or loaded
        return "cpu"
    if choice == "triton" and not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "FOURBIT_BACKEND=triton on a CPU tensor needs Triton's interpreter: set TRITON_INTERPRET=1 "
            "before importing triton, or move the tensors to a CUDA device"
        )
    return choice


def quantize(x: torch.Tensor, **kwargs):
    """(packed, QuantState) of x; keywords as `fourbit.nf4.quantize`."""
    backend = backend_for(x)
    if backend == "triton":
        from .kernels.quantize import quantize as impl
    elif backend == "cpu":
        impl = _cpu().quantize
    else:
        from .nf4.quant import quantize as impl
    return impl(x, **kwargs)


def dequantize(packed: torch.Tensor, state, **kwargs) -> torch.Tensor:
    """The dense tensor of `state.shape`; keywords as `fourbit.nf4.dequantize`."""
    backend = backend_for(packed)
    if backend == "triton":
        from .kernels.dequantize import dequantize as impl
    elif backend == "cpu":
        impl = _cpu().dequantize
    else:
        from .nf4.quant import dequantize as impl
    return impl(packed, state, **kwargs)


def matmul_route(m: int, n: int, k: int, *, backward: bool = False, dtype: torch.dtype = torch.bfloat16,
                 blocksize: int = 64, device: torch.device | str | None = None) -> tuple[str, str]:
    """(op, path) of the Triton matmul for x: (m, k), W: (n, k) (backward: dx = dy @ W, dy: (m, n)):
    op "gemv" | "gemm" | "backward", path "fused" | "dequantize+cublas" (see the module docstring).
    x's dtype and the blocksize choose between the two GEMVs. Gates, as `matmul_gates` reports them:
    below capability 8.0 (`device`, default the current CUDA device) no mma.sync, so only the SIMT GEMV
    is fused; the swapped tiles only on a Triton whose build passes the hazard check."""
    from .kernels.matmul_plan import SWAP_MIN_M, device_arch, mma_gemv_supported, swap_gemm_supported  # Triton only

    arch = device_arch(device)
    gemv_max = GEMV_MAX_M if mma_gemv_supported(dtype, blocksize, arch) else SIMT_GEMV_MAX_M
    op = "backward" if backward else ("gemv" if m <= gemv_max else "gemm")
    swapped = SWAP_MIN_M <= m < SWAP_MAX_M and swap_gemm_supported(dtype, k, backward, device)
    fused = op == "gemv" or (m <= FUSED_MAX_M and arch != "sm75") or swapped
    return op, ("fused" if fused else "dequantize+cublas")


def matmul_gates(device: torch.device | str | None = None) -> dict[str, object]:
    """Which kernel paths the Triton matmul may take on `device` (default: the current CUDA device):
    {"arch", "triton", "tensor_core_gemv", "fused_tiles", "swapped_tiles"}, for logs and the GPU session."""
    from .kernels.matmul_plan import device_arch, mma_gemv_supported, swap_gemm_supported, triton_version

    arch = device_arch(device)
    return {"arch": arch, "triton": ".".join(map(str, triton_version())),
            "tensor_core_gemv": mma_gemv_supported(torch.bfloat16, 64, arch), "fused_tiles": arch != "sm75",
            "swapped_tiles": swap_gemm_supported(torch.bfloat16, 128, True, device)}


def matmul(x: torch.Tensor, packed: torch.Tensor, state, bias: torch.Tensor | None = None, *,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ dequantize(W).T + bias; x: (..., K), W: [N, K], y: (..., N) in x.dtype."""
    backend = backend_for(x)
    if backend == "cpu":
        return _cpu().matmul(x, packed, state, bias, out=out)
    if backend == "triton":
        from .kernels.matmul import fused_shape_supported, matmul as kernel

        if fused_shape_supported(state):
            n, k = (int(d) for d in state.shape)
            route = matmul_route(x.numel() // max(k, 1), n, k, dtype=x.dtype, blocksize=state.blocksize, device=x.device)
            return kernel(x, packed, state, bias, out=out, route=route)
    from .nf4.matmul import matmul as reference

    return reference(x, packed, state, bias, out=out)


def matmul_backward(grad_y: torch.Tensor, packed: torch.Tensor, state) -> torch.Tensor:
    """grad_x = grad_y @ dequantize(W); grad_y: (..., N), grad_x: (..., K) in grad_y.dtype."""
    backend = backend_for(grad_y)
    if backend == "cpu":
        return _cpu().matmul_backward(grad_y, packed, state)
    if backend == "triton":
        from .kernels.matmul import fused_shape_supported, matmul_backward as kernel

        if fused_shape_supported(state):
            n, k = (int(d) for d in state.shape)
            m = grad_y.numel() // max(n, 1)
            return kernel(grad_y, packed, state, route=matmul_route(m, n, k, backward=True, device=grad_y.device))
    from .nf4.matmul import matmul_backward as reference

    return reference(grad_y, packed, state)


def adamw_update_32bit(p, g, m, v, **hyper) -> None:
    """One AdamW step in place on flat p, m, v (float32 states); keywords lr, beta1, beta2, eps,
    weight_decay, step."""
    backend = backend_for(p)
    if backend == "triton":
        from .kernels.adamw import adamw_update_32bit as impl
    elif backend == "cpu":
        impl = _cpu().adamw_update_32bit
    else:
        from .nf4.adamw import adamw_update_32bit as impl
    impl(p, g, m, v, **hyper)


def adamw_update_8bit(p, g, q1, q2, absmax1, absmax2, qmap1, qmap2, **hyper) -> None:
    """One AdamW step in place on flat p and the 8-bit blockwise states (see `fourbit.nf4.adamw`)."""
    backend = backend_for(p)
    if backend == "triton":
        from .kernels.adamw import adamw_update_8bit as impl
    elif backend == "cpu":
        impl = _cpu().adamw_update_8bit
    else:
        from .nf4.adamw import adamw_update_8bit as impl
    impl(p, g, q1, q2, absmax1, absmax2, qmap1, qmap2, **hyper)


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes of x's shape, float32 absmax per block) with a 256-entry code (`fourbit.nf4.quantize_blockwise`)."""
    if backend_for(x) == "cpu":
        impl = _cpu().quantize_blockwise
    else:
        from .nf4.blockwise import quantize_blockwise as impl
    return impl(x, code, blocksize)


def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int = 256,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """fl32(code[q] * absmax[block]) rounded to `dtype` (`fourbit.nf4.dequantize_blockwise`)."""
    if backend_for(q) == "cpu":
        impl = _cpu().dequantize_blockwise
    else:
        from .nf4.blockwise import dequantize_blockwise as impl
    return impl(q, absmax, code, blocksize, dtype)
