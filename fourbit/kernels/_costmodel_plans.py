"""Launch plans of the matmul kernels as written before issue 12's rebuild, for the cost model.

`fourbit.kernels.costmodel` asks `fourbit.kernels.matmul.launch_plans` and
`fourbit.dispatch.matmul_route` what would run (its docstring states the contract). Until those
exist, this adapter derives the same answers from the launchers' logic: GEMV (split-K by
`_splits`) for M <= GEMV_MAX_M, the fused GEMM above, the fused backward everywhere, each over its
autotune shortlist for sm_90; plus a dequantize + cuBLAS plan built from the one-launch dequantize
kernel, which the dispatcher of that time never chose. The kernel modules replace this file's
functions by their own `launch_plans` / `matmul_route`; it then only serves old checkouts.
"""

from __future__ import annotations

import importlib

from .compile import Launch, Plan

__all__ = ["launch_plans", "matmul_route", "dequantize_plan"]

BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
PAIR_TABLE_BYTES = 256 * 8  # the GEMV/GEMM decode table: one int64 (two fp32 codes) per byte value
CODE8_BYTES = 256 * 4  # nested-scale code table


def _mod(name: str):
    return importlib.import_module(f"fourbit.kernels.{name}")


def _specs(module: str) -> dict:
    return {s.name: s for s in _mod(module).compile_specs()}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _scale_bytes(n: int, k: int) -> int:
    blocks = n * k // BLOCKSIZE
    return blocks + 4 * _cdiv(blocks, NESTED_BLOCKSIZE)  # uint8 codes + fp32 nested scales


def _gemv_splits(n: int, k: int, sms: int) -> int:
    """`matmul._splits` for a CUDA device with `sms` SMs (it always sizes with the 32x128 tile)."""
    programs, split = _cdiv(n, 32), 1
    while programs * split < 2 * sms and k // (2 * split * 128) >= 4:
        split *= 2
    return split


def matmul_route(m: int, n: int, k: int, *, backward: bool = False) -> tuple[str, str]:
    if backward:
        return "backward", "fused"
    return ("gemv" if m <= _mod("matmul").GEMV_MAX_M else "gemm"), "fused"


def dequantize_plan(n: int, k: int) -> Plan:
    dq = _mod("dequantize")
    spec = _specs("dequantize")["dequantize_4bit[bfloat16,bs64,dq]"]
    per_program = dq.BYTES_PER_PROGRAM
    launch = Launch(spec=spec, grid=(_cdiv(n * k // 2, per_program),), iterations=1,
                    weight_bytes_per_iteration=per_program, hbm_bytes=n * k // 2 + _scale_bytes(n, k) + 2 * n * k,
                    gather_table_bytes=64)
    return Plan(op="dequantize", path="fused", config=f"bs64,{per_program}B/program,w{dq.NUM_WARPS}", launches=(launch,))


def launch_plans(op: str, m: int, n: int, k: int, *, sms: int = 132) -> list[Plan]:
    """Every (kernel, config) the launchers of that time could run for bf16 x, nested scales, bs 64."""
    mm = _mod("matmul")
    weights = n * k // 2 + _scale_bytes(n, k)
    if op == "gemv":
        if not 1 <= m <= mm.GEMV_MAX_M:
            return []
        specs, block_m, split = _specs("matmul"), 1 << (m - 1).bit_length(), _gemv_splits(n, k, sms)
        plans = []
        for bn, bk, w, s in mm._GEMV_CONFIGS:
            spec = specs[f"matmul_gemv[bf16,bs64,dq,m{block_m},{bn}x{bk},w{w}s{s}{',split' if split > 1 else ''}]"]
            hbm = weights + 2 * m * k + (4 * split * m * n if split > 1 else 2 * m * n)
            launch = Launch(spec=spec, grid=(_cdiv(n, bn), split), iterations=_cdiv(_cdiv(k, bk), split),
                            weight_bytes_per_iteration=bn * bk // 2, hbm_bytes=hbm,
                            gather_table_bytes=PAIR_TABLE_BYTES)
            plans.append(Plan(op="gemv", path="fused", config=f"m{block_m},{bn}x{bk},w{w}s{s},split{split}", launches=(launch,)))
        return plans
    if op not in ("gemm", "backward"):
        raise ValueError(f"op must be gemv, gemm or backward, got {op!r}")
    if m <= mm.GEMV_MAX_M and op == "gemm":
        return []
    specs, plans = _specs("matmul"), []
    configs = mm._GEMM_CONFIGS["sm90"] if op == "gemm" else mm._BACKWARD_CONFIGS
    for bm, bn, bk, w, s in configs:
        if op == "gemm":
            spec = specs[f"matmul_gemm[bf16,bs64,dq,{bm}x{bn}x{bk},w{w}s{s}]"]
            grid, trips = (_cdiv(m, bm) * _cdiv(n, bn),), _cdiv(k, bk)
        else:
            spec = specs[f"matmul_backward[bf16,bs64,dq,{bm}x{bn}x{bk},w{w}s{s}]"]
            grid, trips = (_cdiv(m, bm), _cdiv(k, bk)), _cdiv(n, bn)
        launch = Launch(spec=spec, grid=grid, iterations=trips, weight_bytes_per_iteration=bn * bk // 2,
                        hbm_bytes=weights + 2 * (m * k + m * n), gather_table_bytes=PAIR_TABLE_BYTES)
        plans.append(Plan(op=op, path="fused", config=f"{bm}x{bn}x{bk},w{w}s{s}", launches=(launch,)))
    dq = dequantize_plan(n, k).launches
    plans.append(Plan(op=op, path="dequantize+cublas", config=f"dequantize[{dq[0].spec.name}]+cublas", launches=dq,
                      cublas_mnk=(m, n, k) if op == "gemm" else (m, k, n)))
    return plans
