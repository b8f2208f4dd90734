"""What a kernel file declares so the compile report can build it for real GPUs without one.

Each kernel module defines `compile_specs() -> list[CompileSpec]`: one entry per (kernel, config)
that its launcher may use. `fourbit.kernels.analysis.report` compiles each with `triton.compile` for
sm_80 / sm_89 / sm_90a and checks the expectations recorded here. `Launch` and `Plan` describe how
a launcher would use those kernels on one problem size, for the static cost model
(`fourbit.kernels.analysis.costmodel`, whose docstring states the contract).
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
    archs: tuple[str, ...] | None = None  # the report's targets this spec runs on (None: all)
    # integer arguments Triton may assume divisible by 16; None: every one (sizes that are multiples of
    # 16, the report's generic build). `specialize` sets it from one launch's values.
    divisible: tuple[str, ...] | None = None


def specialize(spec: CompileSpec, ints: dict[str, int]) -> CompileSpec:
    """`spec` as Triton's launcher compiles it for these runtime integer arguments: an argument equal
    to 1 becomes a constant, one divisible by 16 is marked so, any other is not (Triton 3.6 and 3.9
    alike). The name says where the build differs from the generic one, e.g. `...{M=1}`, `{M%16}`."""
    ints = {name: int(v) for name, v in ints.items() if name in spec.signature and spec.signature[name][0] in "iu"}
    ones = sorted(name for name, v in ints.items() if v == 1)
    ragged = sorted(name for name, v in ints.items() if v != 1 and v % 16)
    if not ones and not ragged:
        return spec
    signature = {name: ("constexpr" if name in ones else t) for name, t in spec.signature.items()}
    divisible = tuple(name for name, t in signature.items() if t[0] in "iu" and name not in ragged)
    tag = ",".join([f"{name}=1" for name in ones] + [f"{name}%16" for name in ragged])
    return dataclasses.replace(spec, name=f"{spec.name}{{{tag}}}", signature=signature,
                               constexprs={**spec.constexprs, **{name: 1 for name in ones}}, divisible=divisible)


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch as the launcher would issue it, for the static cost model
    (`fourbit.kernels.analysis.costmodel`): which compiled kernel, how many programs, and what one trip of
    its steady-state loop (the K loop of a GEMV/GEMM, the N loop of the backward; the whole program
    when the kernel has no loop) consumes."""

    spec: CompileSpec  # kernel + constexprs + warps + stages, exactly as launched
    grid: tuple[int, ...]  # programs per grid axis
    iterations: int  # loop trips per program (1 for straight-line kernels)
    weight_bytes_per_iteration: int  # packed weight bytes one program consumes per trip (BLOCK_N*BLOCK_K/2)
    hbm_bytes: int  # compulsory DRAM traffic of the whole launch: weights once, scales, activations in and out
    gather_table_bytes: int = 0  # size of the table the loop gathers from with data-dependent addresses
    iterations_in_flight: int | None = None  # trips whose weight loads are in flight at once; None: derived
    int_args: tuple[tuple[str, int], ...] = ()  # the launch's integer arguments (name, value)

    @property
    def compiled_spec(self) -> CompileSpec:
        """The spec specialized as Triton compiles it for this launch's integer arguments."""
        return specialize(self.spec, dict(self.int_args))


@dataclasses.dataclass(frozen=True)
class Plan:
    """One way the library may compute an op for one (M, N, K): its Triton launches in order, then
    optionally a cuBLAS matmul (torch.matmul) of shape (M, N, K) on the dequantized weight."""

    op: str  # "gemv" | "gemm" | "backward" | "dequantize"
    path: str  # "fused" | "dequantize+cublas"
    config: str  # short label of the configuration, e.g. "32x128,w4s3,split4"
    launches: tuple[Launch, ...]
    cublas_mnk: tuple[int, int, int] | None = None
