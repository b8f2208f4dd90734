"""What a kernel file declares so the compile report can build it for real GPUs without one.

Each kernel module defines `compile_specs() -> list[CompileSpec]`: one entry per (kernel, config)
that its launcher may use. `fourbit.kernels.report` compiles each with `triton.compile` for
sm_80 / sm_89 / sm_90a and checks the expectations recorded here.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class CompileSpec:
    name: str  # row label, e.g. "dequantize[bf16,bs64]"
    kernel: Any  # the @triton.jit function
    signature: dict[str, str]  # argument -> Triton type: "*fp32", "*u8", "i32", "i64", "fp32", "constexpr"
    constexprs: dict[str, Any]  # values of the constexpr arguments
    num_warps: int = 4
    num_stages: int = 3
    expect_vector_bits: int | None = None  # widest global load the hot loop must use (e.g. 128)
    expect_tensor_cores: bool = False  # HMMA (sm_80/89) / HGMMA (sm_90a) must appear
