"""What fourbit's own ops allocate inside, which their fake implementations do not show.

`fourbit::matmul_4bit` and `fourbit::matmul_4bit_backward` are custom ops: under FakeTensorMode
they run their registered fake implementation, which returns an output of the right shape and
allocates nothing else. The real ones decode the weight first:

    CPU (the reference, fourbit/nf4/matmul.py)   chunked decode buffers; a weight of one chunk, and
                                                 every backward, decode a whole dense W for the call
    CUDA (fourbit/kernels/matmul.py)             the fused routes allocate only the output; the
                                                 "dequantize+cublas" route decodes W into a buffer
                                                 kept per (device, dtype) and grown to the largest
                                                 weight seen (`_workspace`), which stays allocated

Where dispatch runs the reference (the CPU, and on CUDA a weight whose K the fused kernels do not
take) the planner runs it on the fake tensors (`dispatch.matmul`), inside the tracker, so every
buffer it makes is counted for as long as it lives. Otherwise it asks
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
        self.workspace: dict[torch.dtype, torch.Tensor] = {}  # CUDA: the kept dequantize buffer per dtype

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

    def _grow(self, dtype: torch.dtype, numel: int, device: torch.device, mode: LiveBytes) -> None:
        held = self.workspace.get(dtype)
        if held is None or held.numel() < numel:
            with mode:
                self.workspace[dtype] = torch.empty(numel, dtype=dtype, device=device)

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
