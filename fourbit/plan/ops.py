"""What fourbit's own ops allocate inside, which their fake implementations do not show.

`fourbit::matmul_4bit` and `fourbit::matmul_4bit_backward` are custom ops: under FakeTensorMode
they run their registered fake implementation, which returns an output of the right shape and
allocates nothing else. The real ones decode the weight first:

    CPU, reference (fourbit/nf4/matmul.py)       chunked decode buffers; a weight of one chunk, and
                                                 every backward, decode a whole dense W for the call
    CPU, C kernels (fourbit/cpu/matmul.py)       the GEMV (M <= its GEMV_MAX_M) only the output; else
                                                 the same decodes into one buffer per thread and dtype
                                                 (the compute dtype), kept and grown to the largest
                                                 decoded W up to its _WORKSPACE_MAX values, plus x or
                                                 dy widened to float32 and the float32 product where
                                                 the CPU has no native half-precision GEMM
    CUDA (fourbit/kernels/matmul.py)             the fused routes allocate only the output; the
                                                 "dequantize+cublas" route decodes W into a buffer
                                                 kept per (device, dtype) and grown to the largest
                                                 weight seen (`_workspace`), which stays allocated

Where dispatch runs the reference (a CPU without the C kernels, and on CUDA a weight whose K the
fused kernels do not take) the planner runs it on the fake tensors (`dispatch.matmul`), inside the
tracker, so every buffer it makes is counted for as long as it lives. The C kernels cannot run on
fake tensors (they write through data_ptr): their buffers are made here by the rules above. Otherwise it asks
`fourbit.dispatch.matmul_route` which route a call takes and keeps a fake buffer of the size
`_workspace` would hold; the route for another architecture than this machine's follows
`swap_gemm_supported`: the swapped fused tiles for large M exist on Hopper only.
"""

from __future__ import annotations

import torch

from .. import dispatch
from ..nf4.codes import code_for
from ..nf4.quant import pair_table
from ..nf4.state import QuantState
from .tracker import LiveBytes

__all__ = ["FourbitOps", "prewarm"]

_fourbit = torch.ops.fourbit


def prewarm(device: str) -> None:
    """Fill the reference's process-wide table caches with real tensors before anything fake runs:
    a cache filled inside FakeTensorMode would keep a fake tensor for every later real call."""
    for quant_type in ("nf4", "fp4"):
        pair_table(quant_type, device)


class FourbitOps:
    """The tracker's `on_op` hook for the two matmul ops; see the module docstring.

    `target`: "cpu" (run the reference) or "cuda" (model the Triton launcher). `hopper`: whether the
    target GPU is Hopper (capability 9), which decides the large-M route.
    """

    def __init__(self, target: str, *, hopper: bool = True):
        self.target = target
        self.hopper = hopper
        self.workspace: dict[torch.dtype, torch.Tensor] = {}  # the kept dequantize buffer per dtype (CUDA, C kernels)
        # what a real CPU run of this process takes (call outside FakeTensorMode: a real tensor asks)
        self.c_kernels = target == "cpu" and dispatch.backend_for(torch.empty(0)) == "cpu"

    def __call__(self, func, args, kwargs, mode: LiveBytes):
        if func is _fourbit.matmul_4bit.default:
            x, packed, absmax, nested_absmax, nested_code, offset, bias, shape, blocksize, quant_type, dtype = args
            backward = False
        elif func is _fourbit.matmul_4bit_backward.default:
            x, packed, absmax, nested_absmax, nested_code, offset, shape, blocksize, quant_type, dtype = args
            bias, backward = None, True
        else:
            return NotImplemented
        n, k = (int(d) for d in shape)
        fused_ok = k % blocksize == 0 and k % 64 == 0  # fourbit.kernels.matmul_plan.fused_shape_supported
        if self.c_kernels and x.dtype != torch.float64:  # (float64 takes the reference there too)
            return self._c_kernels(func, args, kwargs, mode, x, n, k, blocksize, backward)
        if self.target == "cpu" or not fused_ok:  # dispatch runs the reference: run it
            return self._reference(mode, x, packed, absmax, nested_absmax, nested_code, offset, bias, shape, blocksize,
                                   quant_type, dtype, backward)
        m = x.numel() // max(x.shape[-1], 1)
        _, path = dispatch.matmul_route(m, n, k, backward=backward, dtype=x.dtype, blocksize=blocksize)
        if not self.hopper and path == "fused" and m > dispatch.FUSED_MAX_M:
            path = "dequantize+cublas"  # the swapped tiles are Hopper's only
        if path == "dequantize+cublas":
            with mode.category("workspace"):
                self._grow(x.dtype, n * k, x.device, mode)
        return func(*args, **kwargs)

    def _grow(self, dtype: torch.dtype, numel: int, device: torch.device, mode: LiveBytes, least: int = 0) -> None:
        held = self.workspace.get(dtype)
        if held is None or held.numel() < numel:
            with mode:
                self.workspace[dtype] = torch.empty(max(numel, least), dtype=dtype, device=device)

    def _c_kernels(self, func, args, kwargs, mode: LiveBytes, x, n: int, k: int, blocksize: int, backward: bool):
        """fourbit.cpu.matmul's buffers around the op's output (module docstring)."""
        from ..cpu.matmul import _WORKSPACE_MAX, GEMV_MAX_M, compute_dtype
        from ..nf4.matmul import _chunk_rows

        m = x.numel() // max(x.shape[-1], 1)
        if not backward and 0 < m <= GEMV_MAX_M and n and k:  # the fused GEMV: only y
            return func(*args, **kwargs)
        work = compute_dtype(x.dtype)
        rows = n if backward else _chunk_rows(n, k, blocksize)
        temps = []
        with mode, mode.category("workspace"):
            if rows * k > _WORKSPACE_MAX:  # a fresh buffer per call, freed after it
                temps.append(torch.empty(rows * k, dtype=work, device=x.device))
            else:
                self._grow(work, rows * k, x.device, mode, least=1 << 16)
            if work != x.dtype:  # x (dy) widened, and the product before its rounding to x's dtype
                temps += [torch.empty(x.shape, dtype=work, device=x.device),
                          torch.empty((m, k if backward else rows), dtype=work, device=x.device)]
        out = func(*args, **kwargs)
        del temps
        return out

    @staticmethod
    def _reference(mode, x, packed, absmax, nested_absmax, nested_code, offset, bias, shape, blocksize, quant_type,
                   dtype, backward):
        # the 16-entry table passed in: from_tensors would otherwise cache a fake copy process-wide
        state = QuantState.from_tensors(absmax, nested_absmax, nested_code, offset, shape=shape, dtype=dtype,
                                        blocksize=blocksize, quant_type=quant_type, code=code_for(quant_type))
        current = mode.current_category
        with mode, mode.category("workspace"):
            out = dispatch.matmul_backward(x, packed, state) if backward else dispatch.matmul(x, packed, state, bias)
        mode.move(out, current)  # the result is the caller's (an activation, a gradient), not workspace
        return out
