"""Small helpers every Triton launcher in fourbit.kernels shares.

* `interpreting()`: is Triton's CPU interpreter on? Triton decides this when `@triton.jit` runs, i.e.
  when the kernel module (and triton.language itself) is imported, so TRITON_INTERPRET=1 must be set
  before the first `import triton`; flipping the variable later does not turn compiled kernels into
  interpreted ones.
* `check_launch_device(...)`: every tensor on one device, and a device the kernels can run on.
* `KernelSpec`: a `CompileSpec` that also carries the compile options the launcher passes (for
  example `enable_fp_fusion=False`), so the compile report builds exactly what runs.
* `LAUNCH_OPTIONS`: those options. fourbit's kernels must equal the reference bit for bit, so no
  multiply-add may be contracted into an FMA (one rounding instead of two); Triton 3.9 also warns when
  a launch leaves the choice unspecified.
* `POINTER_TYPES`: Triton's pointer type for each float dtype a kernel takes (compile signatures).
* `nearest_code(s, mid_ptr)`: the 8-bit nearest-code search inside a kernel, the twin of
  `fourbit.nf4.blockwise.nearest_code` (used by double quantization and the 8-bit AdamW states).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
import triton
import triton.language as tl

from ..nf4.checks import check_same_device
from .compile import CompileSpec

__all__ = ["interpreting", "check_launch_device", "KernelSpec", "LAUNCH_OPTIONS", "POINTER_TYPES", "nearest_code"]

LAUNCH_OPTIONS: dict[str, Any] = {"enable_fp_fusion": False}
POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


def interpreting() -> bool:
    """True when Triton runs kernels in its Python interpreter.

    Triton fixes the mode when `@triton.jit` runs, so the environment variable alone can lie (it may
    have been set after triton was imported). We ask triton.language itself: its own jit helpers
    (`tl.cdiv`) are interpreted functions exactly when kernels decorated alongside them are."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.cdiv, InterpretedFunction)


def _interpreter_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_launch_device(**tensors: torch.Tensor | None) -> torch.device:
    """The one device of `tensors`; raises if they are split across devices or if the kernels
    cannot run there (CPU tensors need the interpreter, CUDA tensors need it off)."""
    device = check_same_device(**tensors)
    if _interpreter_env() != interpreting():
        raise RuntimeError(
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r} but triton was imported "
            f"{'with' if interpreting() else 'without'} its interpreter: Triton fixes the mode at its first import, "
            "so set (or unset) TRITON_INTERPRET before anything imports triton (bitsandbytes and torch.compile do)"
        )
    if device.type == "cuda":
        if interpreting():
            raise RuntimeError(
                "Triton's interpreter (TRITON_INTERPRET=1) runs kernels on CPU tensors only; move the tensors "
                "to the CPU or unset TRITON_INTERPRET before importing triton"
            )
        return device
    if device.type == "cpu":
        if not interpreting():
            raise RuntimeError(
                "fourbit's Triton kernels got CPU tensors. Run them on a CUDA device, or start Python with "
                "TRITON_INTERPRET=1 (set before triton is imported) to use Triton's CPU interpreter, or use the "
                "reference implementation (fourbit.nf4 / FOURBIT_BACKEND=reference)"
            )
        return device
    raise RuntimeError(f"fourbit's Triton kernels run on CUDA (or CPU under TRITON_INTERPRET=1), got {device}")


@dataclasses.dataclass(frozen=True)
class KernelSpec(CompileSpec):
    """CompileSpec plus the keyword options the launcher passes to the kernel launch."""

    options: dict[str, Any] = dataclasses.field(default_factory=lambda: dict(LAUNCH_OPTIONS))


@triton.jit
def nearest_code(s, mid_ptr):
    """Index (int32, s's shape) of the nearest of 256 sorted codes for float32 s, ties to the even
    index, as bitsandbytes' CUDA binary search. mid_ptr holds the 255 float32 midpoints
    fl32(code[j] + code[j+1]) * 0.5 (`fourbit.nf4.blockwise.code_midpoints`). Eight branch-free
    probes count the midpoints strictly below s; a ninth detects an exact tie, where an odd count
    moves up by one."""
    below = tl.zeros(s.shape, dtype=tl.int32)  # midpoints strictly below s, 0..255
    for i in tl.static_range(8):  # steps 128, 64, ..., 1
        probe = tl.load(mid_ptr + below + ((128 >> i) - 1))
        below = tl.where(probe < s, below + (128 >> i), below)
    at = tl.load(mid_ptr + below, mask=below < 255, other=0.0)
    tie = (below < 255) & (at == s)
    return tl.where(tie & ((below & 1) == 1), below + 1, below)
