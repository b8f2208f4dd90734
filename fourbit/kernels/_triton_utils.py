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
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from ..nf4.checks import check_same_device
from .compile import CompileSpec

__all__ = ["interpreting", "check_launch_device", "KernelSpec", "LAUNCH_OPTIONS"]

LAUNCH_OPTIONS: dict[str, Any] = {"enable_fp_fusion": False}


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
