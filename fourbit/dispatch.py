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
ValueError on what it cannot do, and this module decides what runs instead. The Triton matmul needs
K % blocksize == 0 and K % 64 == 0 (`fused_shape_supported`); other weights take the reference
(dequantize in chunks + torch.matmul), as bitsandbytes does for them. Among the Triton matmul's
routes, `matmul_route` picks by the number of rows M of x (crossovers below, from the static cost
model `fourbit.kernels.analysis.costmodel` until a GPU measurement replaces them):

    M <= GEMV_MAX_M (16)         ("gemv", "fused")               the tensor-core GEMV (bf16/fp16 x, blocksize
                                                                 % 64 == 0), capability >= 8.0 (predicted
                                                                 fractions: docs/kernels.md); fp32 x, blocksize 32:
                                                                 the SIMT GEMV up to SIMT_GEMV_MAX_M (2)
    M <= FUSED_MAX_M (64)        ("gemm" | "backward", "fused")  tensor cores on tiles decoded in registers
    SWAP_MIN_M (1024) <= M       ("gemm" | "backward", "fused")  Hopper, bf16/fp16: the swapped tiles, W from
      < SWAP_MAX_M (8192)                                        registers into async wgmma: 0.97 of dense
                                                                 bf16 cuBLAS at M = 1024-4096
    otherwise                    (..., "dequantize+cublas")      one decode pass + cuBLAS: 0.82 of dense
                                                                 bf16 at M = 1024, 0.90 at 2048, 0.97 at 8192
Predicted on the five Llama-3 shapes (sm_90a): the tensor-core GEMV decodes a packed byte with three
instructions and leaves the multiply-adds to mma.sync, so its cost barely grows with M (5.5 loop
instructions per byte at M <= 8, 6.2-6.7 at M = 16, where x's second 8-row tile makes it L1-bound);
the fused GEMM it replaced up to M = 16 was predicted at 0.30-0.51 of the roofline there. The SIMT
GEMV (8.6 instructions per byte at M = 1, 0.90) is L1-bound from M = 4 on (221 us summed over the
five shapes against 159 us for the fused GEMM). The fused kernels beat dequantize + cuBLAS up to
M = 128 (4096x4096, M = 16: 6.8 vs 17.7 us; 28672x8192: 56 vs 247 us) and tie at 256; that
crossover sits at 64, one step on the safe side, because the model is optimistic for the fused
decode. The swapped tiles are tensor-bound where they fill the SMs (256 x 128 tiles: from M = 1024
on every shape) and beat dequantize + cuBLAS there, whose decode pass costs 2.5 bytes of HBM traffic
per weight, M-independent: 0.82 of dense at M = 1024, 0.90 at 2048. At M = 8192 the two tie by the
model (0.970 against 0.973; the fused tiles lose 3 % to wave quantization), so the measured cuBLAS
path keeps the largest M. On sm_80/89 (no register-operand wgmma) and for fp32 x every M above 64
takes dequantize + cuBLAS.

Gates (`matmul_gates` reports them for a device): below capability 8.0 (T4, V100) there is no
mma.sync.m16n8k16 and no bf16 tensor core, so the tensor-core GEMV and the fused tiles do not build;
the SIMT GEMV keeps M <= SIMT_GEMV_MAX_M and everything else takes dequantize + cuBLAS. The swapped
tiles run only on a Triton version whose build passes the static hazard check
(`fourbit.kernels.analysis.hazards`; `matmul_plan.SWAP_TRITON`): Triton 3.6's build rewrites the
registers of wgmmas still in flight. The cost model asks `matmul_route`, so it rates the same gates.

Imports are lazy and plain (inside each function): with FOURBIT_BACKEND=reference, or on CPU under
auto, Triton is never imported.
"""

from __future__ import annotations

import os

import torch

__all__ = [
    "FUSED_MAX_M",
    "SWAP_MAX_M",
    "GEMV_MAX_M",
    "SIMT_GEMV_MAX_M",
    "adamw_update_32bit",
    "adamw_update_8bit",
    "backend_for",
    "dequantize",
    "matmul",
    "matmul_backward",
    "matmul_gates",
    "matmul_route",
    "quantize",
]

GEMV_MAX_M = 16  # route to the tensor-core GEMV up to here (bf16/fp16 x, blocksize % 64 == 0)
SIMT_GEMV_MAX_M = 2  # the SIMT GEMV (fp32 x or blocksize 32) up to here (it takes up to 4)
FUSED_MAX_M = 64  # above, dequantize + cuBLAS (module docstring)
SWAP_MAX_M = 8192  # from here dequantize + cuBLAS again: the model ties them (0.973 vs 0.970)

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
    if backend_for(x) == "triton":
        from .kernels.matmul import fused_shape_supported, matmul as kernel

        if fused_shape_supported(state):
            n, k = (int(d) for d in state.shape)
            route = matmul_route(x.numel() // max(k, 1), n, k, dtype=x.dtype, blocksize=state.blocksize, device=x.device)
            return kernel(x, packed, state, bias, out=out, route=route)
    from .nf4.matmul import matmul as reference

    return reference(x, packed, state, bias, out=out)


def matmul_backward(grad_y: torch.Tensor, packed: torch.Tensor, state) -> torch.Tensor:
    """grad_x = grad_y @ dequantize(W); grad_y: (..., N), grad_x: (..., K) in grad_y.dtype."""
    if backend_for(grad_y) == "triton":
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
