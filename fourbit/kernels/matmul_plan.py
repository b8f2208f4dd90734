"""Launch plans of the 4-bit matmul (`fourbit.kernels.matmul`): kernel specs, configurations, routes.

Plans. `plan(op, m, n, k, ...)` returns the `compile.Plan` a launcher runs: the kernel spec as
compiled (constexprs, warps, stages), the grid, the loop trips and the weight bytes per trip;
the launchers read their launch parameters from it, and the static cost model
(`fourbit.kernels.analysis.costmodel`) compiles and scores the same objects (`launch_plans`), so the model
evaluates exactly what runs. Configurations come from a short per-architecture rule; a GPU run may
override them from a tuning cache on disk (`tune_cache_path()`, written by `tune`), never tuning
implicitly: a first call costs no benchmarking, and the interpreter never tunes (`matmul_tune`).
"""

from __future__ import annotations

import functools

import torch
import triton

from ..nf4.state import QuantState
from ._triton_utils import POINTER_TYPES, KernelSpec, interpreting
from .compile import Launch, Plan, specialize
from .dequantize import dequantize_launch
from .matmul_gemm import backward_kernel, gemm_kernel
from .matmul_gemv import gemv_kernel
from .matmul_gemv_mma import gemv_mma_kernel
from .matmul_tune import _tuned

__all__ = ["plan", "launch_plans", "default_route", "device_arch", "fused_shape_supported", "gemv_max_m",
           "mma_gemv_supported", "shortlist", "swap_gemm_supported", "swapped_configs", "triton_version",
           "compile_specs", "GEMV_MAX_M", "SIMT_GEMV_MAX_M", "SWAP_MIN_M", "SWAP_TRITON", "SMS"]

GEMV_MAX_M = 16  # the tensor-core GEMV (bf16/fp16 x, blocksize % 64 == 0): two 8-row mma tiles
SIMT_GEMV_MAX_M = 4  # fp32 x or blocksize 32: the SIMT GEMV, FMA-bound above (4 FFMA per byte per row of x)
SWAP_MIN_M = 1024  # the swapped (y^T = W x^T) tiles from here: 256 x-rows per program fill 132 SMs
SMS = 132  # H200 / H100 SXM; plans for a real device use its count
# Triton (major, minor) versions whose builds of the swapped tiles pass the hazard check
# (`fourbit.kernels.analysis.hazards`, run in CI on 3.9 and 3.6; docs/kernels.md). Triton 3.6 issues
# four register-A wgmmas per trip, each followed by wait_group 3, and the next trip's decode rewrites
# the A registers of the three still in flight; its build also lacks fence.proxy.async before the
# wgmma reads the cp.async-written x tile. Elsewhere large M takes dequantize + cuBLAS.
SWAP_TRITON = ((3, 9),)
_PTR = POINTER_TYPES
_MMA_ARCHS = ("sm_80", "sm_89", "sm_90a")  # mma.sync.m16n8k16 and bf16 tensor cores: capability >= 8.0
_SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_SIZE = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}
_DOT_PRECISION = {torch.float32: "ieee", torch.float16: "tf32", torch.bfloat16: "tf32"}  # fp32 stays exact
_GEMV_OPTIONS = {"enable_fp_fusion": True}  # products and sums as FMA chains; see matmul_gemv

# Fused GEMM/backward shortlists (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages[, SWAP]), spill-free
# on sm_80/89/90a per the compile report (128x128x64 needs 8 warps on sm_80/89, 128x256 BLOCK_K = 32).
# SWAP tiles (sm_90, bf16/fp16, M >= SWAP_MIN_M) hand the decoded W to wgmma as its register operand,
# so the decode of the next tile overlaps the MMA (matmul_gemm's docstring).
_GEMM_CONFIGS = {
    "sm80": [(128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (16, 64, 128, 4, 4), (32, 64, 128, 4, 4)],
    "sm90": [(256, 128, 64, 8, 3, True), (128, 256, 32, 8, 3), (128, 128, 64, 8, 4), (16, 128, 128, 4, 4),
             (16, 64, 128, 4, 4),
             (16, 32, 128, 4, 4), (32, 128, 64, 4, 4)],
}
# backward: (16, 128, 32) used local memory on sm_90a (LDL/STL 3), so small M takes 64x128 tiles
_BACKWARD_CONFIGS = {"sm80": [(64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (16, 64, 128, 4, 4)]}
_BACKWARD_CONFIGS["sm90"] = _BACKWARD_CONFIGS["sm80"] + [(256, 64, 128, 8, 3, True)]


def shortlist(op: str, arch: str) -> list[tuple]:
    """The fused configurations of op "gemm" | "backward" for `device_arch` "sm75" | "sm80" | "sm90"
    (tune's candidates): none below capability 8.0, the swapped tiles only on a Triton in SWAP_TRITON."""
    configs = (_GEMM_CONFIGS if op == "gemm" else _BACKWARD_CONFIGS).get(arch, [])
    return [c for c in configs if not _swapped(c) or triton_version() in SWAP_TRITON]


def _swapped(cfg: tuple) -> bool:
    return len(cfg) > 5 and bool(cfg[5])


def swapped_configs() -> tuple[tuple, tuple]:
    """The swapped tiles' (forward, backward) configurations, whether or not SWAP_TRITON lets the
    dispatcher pick them (the hazard tests and the GPU session build them on any Triton)."""
    return (next(c for c in _GEMM_CONFIGS["sm90"] if _swapped(c)), next(c for c in _BACKWARD_CONFIGS["sm90"] if _swapped(c)))


def triton_version() -> tuple[int, int]:
    """(major, minor) of the Triton that compiles the kernels."""
    return tuple(int(v) for v in triton.__version__.split(".")[:2])


def device_arch(device: torch.device | str | None = None) -> str:
    """The shortlists' key for a CUDA device (default: the current one): "sm90" from Hopper on, "sm80"
    for Ampere and Ada, "sm75" below capability 8.0, which has no mma.sync.m16n8k16 and no bf16 tensor
    cores (T4, V100): there the tensor-core GEMV and the fused tiles do not build, and only the SIMT
    GEMV and dequantize + cuBLAS run. Without a CUDA device, or under the interpreter, "sm90": the
    interpreter and the cost model plan for the H200."""
    if not torch.cuda.is_available() or interpreting():
        return "sm90"
    major = torch.cuda.get_device_capability(device)[0]
    return "sm90" if major >= 9 else "sm80" if major >= 8 else "sm75"


def fused_shape_supported(state: QuantState) -> bool:
    """The launchers need K % blocksize == 0 (blocks inside rows) and K % 64 == 0 (rows start 16-byte
    aligned, runs of 32 weights); `fourbit.dispatch` sends other weights to the reference."""
    k = int(state.shape[-1])
    return len(state.shape) == 2 and k % state.blocksize == 0 and k % 64 == 0


def swap_gemm_supported(dtype: torch.dtype, k: int, backward: bool = False,
                        device: torch.device | str | None = None) -> bool:
    """Whether the swapped tiles may run: a Triton in SWAP_TRITON, Hopper (wgmma takes a register
    operand; the interpreter and the cost model plan for the H200), bf16/fp16 x, and K a multiple of
    the backward's 128-wide output tiles. Blackwell's tensor cores work differently (tcgen05): there
    the tiles are neither modelled nor measured, so dequantize + cuBLAS keeps large M."""
    hopper = device_arch(device) == "sm90" and (not torch.cuda.is_available() or interpreting()
                                                or torch.cuda.get_device_capability(device)[0] == 9)
    return (triton_version() in SWAP_TRITON and dtype in (torch.bfloat16, torch.float16) and hopper
            and (not backward or k % 128 == 0))


def default_route(m: int, *, backward: bool = False, dtype: torch.dtype = torch.bfloat16,
                  blocksize: int = 64, arch: str | None = None) -> tuple[str, str]:
    """What this module runs when the caller names no route: the GEMV where it applies, otherwise
    dequantize + cuBLAS. The dispatcher (`fourbit.dispatch.matmul_route`) owns the crossovers."""
    if backward:
        return "backward", "dequantize+cublas"
    if m <= gemv_max_m(dtype, blocksize, arch):
        return "gemv", "fused"
    return "gemm", "dequantize+cublas"


# ---- plans --------------------------------------------------------------------------------------
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _weight_bytes(n: int, k: int, nested: bool, blocksize: int) -> int:
    blocks = _cdiv(n * k, blocksize)
    return n * k // 2 + (blocks + 4 * _cdiv(blocks, 256) if nested else 4 * blocks)


def _state_signature(nested: bool) -> dict[str, str]:
    return {"packed_ptr": "*u8", "code_ptr": "*fp32", "absmax_ptr": "*u8" if nested else "*fp32",
            "absmax2_ptr": "*fp32", "code8_ptr": "*fp32", "offset_ptr": "*fp32"}


def _gemv_spec(dtype, nested, blocksize, block_m, block_n, block_w, num_warps, even) -> KernelSpec:
    sig = {"x_ptr": _PTR[dtype], **_state_signature(nested), "bias_ptr": _PTR[dtype], "y_ptr": _PTR[dtype],
           "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32"}
    constexprs = {"BLOCKSIZE": blocksize, "NESTED": nested, "HAS_BIAS": False, "SHFL": True, "EVEN": even,
                  "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_W": block_w}
    name = (f"matmul_gemv[{_SHORT[dtype]},bs{blocksize}{',dq' if nested else ''},m{block_m},{block_n}x{4 * block_w}B,"
            f"w{num_warps}{'' if even else ',tail'}]")
    return KernelSpec(name=name, kernel=gemv_kernel, signature={**sig, **dict.fromkeys(constexprs, "constexpr")},
                      constexprs=constexprs, num_warps=num_warps, num_stages=1, expect_vector_bits=128,
                      options=dict(_GEMV_OPTIONS))


def mma_gemv_supported(dtype: torch.dtype, blocksize: int, arch: str | None = None) -> bool:
    """The tensor-core GEMV takes bf16/fp16 x and blocks of whole 64-weight chunks, on capability
    >= 8.0 (mma.sync.m16n8k16; `device_arch`, default the current device's)."""
    return dtype in (torch.bfloat16, torch.float16) and blocksize % 64 == 0 and (arch or device_arch()) != "sm75"


def _gemv_mma_spec(dtype, nested, blocksize, tiles, num_warps, even=True) -> KernelSpec:
    sig = {"x_ptr": _PTR[dtype], "packed_ptr": "*u8", "lut_ptr": "*i32", **_state_signature(nested),
           "bias_ptr": _PTR[dtype], "y_ptr": _PTR[dtype], "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32"}
    del sig["code_ptr"]
    constexprs = {"BLOCKSIZE": blocksize, "NESTED": nested, "HAS_BIAS": False, "ASM": True,
                  "FP16": dtype == torch.float16, "TILES": tiles, "WARPS": num_warps, "EVEN": even}
    name = (f"matmul_gemv_mma[{_SHORT[dtype]},bs{blocksize}{',dq' if nested else ''},m{8 * tiles},w{num_warps}"
            f"{'' if even else ',tail'}]")
    return KernelSpec(name=name, kernel=gemv_mma_kernel, signature={**sig, **dict.fromkeys(constexprs, "constexpr")},
                      constexprs=constexprs, num_warps=num_warps, num_stages=1, expect_vector_bits=64,
                      expect_tensor_cores=True, options=dict(_GEMV_OPTIONS), archs=_MMA_ARCHS)


def _mma_gemv_warps(n: int, sms: int) -> int:
    """4 warps, or 8 (K split eight ways) when there are fewer than 3 programs of 16 rows per SM:
    a program keeps two trips of 1 KB per warp in flight, and an SM needs ~19.5 KB in flight to
    cover HBM latency (cost model: N = 4096 is latency-bound at 0.81 of the roofline with 4 warps)."""
    return 8 if _cdiv(n, 16) < 3 * sms else 4


def _gemv_config(m: int, n: int, k: int, sms: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_W, num_warps). BLOCK_W = 128 words (512 B of a row per step: each of
    a warp's 32 threads streams 16 B); BLOCK_N = 16 rows (4 per thread; M = 4: 8, which keeps its
    4 x 8 FMAs per word spill-free), halved while that leaves fewer programs than SMs."""
    block_m = triton.next_power_of_2(max(m, 1))
    block_w = min(128, triton.next_power_of_2(max(k // 8, 8)))
    block_n = 8 if block_m == 4 else 16
    while block_n > 4 and _cdiv(n, block_n) < sms:
        block_n //= 2
    return block_m, block_n, block_w, 4


def _gemm_spec(dtype, nested, blocksize, cfg, backward: bool) -> KernelSpec:
    bm, bn, bk, w, s = cfg[:5]
    swap = len(cfg) > 5 and bool(cfg[5])
    constexprs = {"BLOCKSIZE": blocksize, "NESTED": nested, "PRECISION": _DOT_PRECISION[dtype], "SHFL": True,
                  "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SWAP": swap}
    if backward:
        sig = {"dy_ptr": _PTR[dtype], **_state_signature(nested), "dx_ptr": _PTR[dtype], "M": "i32", "N": "i32",
               "K": "i32", "stride_dym": "i32", "M_BUCKET": "i32"}
        name, kernel = "matmul_backward", backward_kernel
    else:
        constexprs |= {"HAS_BIAS": False, "GROUP_M": 8}
        sig = {"x_ptr": _PTR[dtype], **_state_signature(nested), "bias_ptr": _PTR[dtype], "y_ptr": _PTR[dtype],
               "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "M_BUCKET": "i32"}
        name, kernel = "matmul_gemm", gemm_kernel
    return KernelSpec(name=f"{name}[{_SHORT[dtype]},bs{blocksize}{',dq' if nested else ''},{bm}x{bn}x{bk},w{w}s{s}"
                           f"{',swap' if swap else ''}]",
                      kernel=kernel, signature={**sig, **dict.fromkeys(constexprs, "constexpr")}, constexprs=constexprs,
                      num_warps=w, num_stages=s, expect_tensor_cores=True,
                      archs=("sm_90a",) if swap else _MMA_ARCHS)  # swap spills on sm_80/89 (255 registers), never routed there


def _gemm_default(op: str, m: int, n: int, k: int, arch: str, sms: int, dtype: torch.dtype = torch.bfloat16) -> tuple:
    """The shortlist entry the rule picks (BLOCK_K must divide K). Fitted to the cost model's ranking
    on the five Llama-3 shapes at M = 16 and 64 (sm_90a): the GEMM takes small-M tiles up to M = 64,
    32-row tiles first above M = 16, and the first tile that gives at least half the SMs a program
    (M = 16, 4096x4096: 16x32 tiles, 128 programs, 6.8 us against 14.0 us for 16x128); the backward
    takes 64x128 tiles, or 16x64x128 at M <= 16 when K >= 3N (more programs along K). From M =
    SWAP_MIN_M on Hopper with bf16/fp16 x both take the swapped 256-row tiles (tensor-bound there)."""
    fits = [c for c in shortlist(op, arch) if k % c[2] == 0]
    swapped = [c for c in fits if _swapped(c)]  # only in the sm90 lists, on a Triton in SWAP_TRITON
    if swapped and m >= SWAP_MIN_M and swap_gemm_supported(dtype, k, op == "backward"):
        return swapped[0]
    fits = [c for c in fits if c not in swapped]
    if op == "backward":
        narrow = [c for c in fits if c[:3] == (16, 64, 128)]
        return narrow[0] if narrow and m <= 16 and k >= 3 * n else fits[0]
    small = sorted((c for c in fits if c[0] <= 32), key=lambda c: c[0] != (32 if m > 16 else 16))
    if m > 64 or not small:
        small = [c for c in fits if c[0] > 32] or fits
    for c in small:
        if _cdiv(m, c[0]) * _cdiv(n, c[1]) >= sms // 2:
            return c
    return max(small, key=lambda c: _cdiv(m, c[0]) * _cdiv(n, c[1]))


@functools.lru_cache(maxsize=4096)
def plan(op: str, m: int, n: int, k: int, *, dtype: torch.dtype = torch.bfloat16, nested: bool = True,
         blocksize: int = 64, path: str | None = None, sms: int = SMS, arch: str = "sm90",
         config: tuple | None = None) -> Plan:
    """The launch(es) `matmul` (op "gemv" | "gemm") or `matmul_backward` (op "backward") runs for
    x: (m, k), W: (n, k); path "fused" | "dequantize+cublas" (default: `default_route`). `config`
    overrides the configuration (what `tune` times); otherwise the tuning cache, then the rule."""
    if op not in ("gemv", "gemm", "backward"):
        raise ValueError(f"op must be 'gemv', 'gemm' or 'backward', got {op!r}")
    path = path or default_route(m, backward=op == "backward", dtype=dtype, blocksize=blocksize, arch=arch)[1]
    if path not in ("fused", "dequantize+cublas"):
        raise ValueError(f"path must be 'fused' or 'dequantize+cublas', got {path!r}")
    io = _SIZE[dtype] * (m * k + m * n)
    weights = _weight_bytes(n, k, nested, blocksize)
    if op == "gemv":
        if path != "fused" or m > GEMV_MAX_M:
            raise ValueError(f"the GEMV is fused and takes M <= {GEMV_MAX_M}, got M={m}, path {path!r}")
        if mma_gemv_supported(dtype, blocksize, arch):
            tiles = 1 if m <= 8 else 2
            tuned = _tuned(("gemv_mma", tiles, n, k, str(dtype), nested, blocksize, arch))
            (warps,) = config or tuned or (_mma_gemv_warps(n, sms),)
            spec = _gemv_mma_spec(dtype, nested, blocksize, tiles, warps, (k // 64) % (2 * warps) == 0)
            launch = Launch(spec=spec, grid=(_cdiv(n, 16),), iterations=_cdiv(k // 64, 2 * warps),
                            weight_bytes_per_iteration=warps * 16 * 64, hbm_bytes=weights + io,
                            iterations_in_flight=2,  # each trip loads the next trip's words before decoding
                            int_args=_ints(m, n, k, k))
            return Plan(op="gemv", path="fused", config=f"mma,m{8 * tiles},16x{128 * warps},w{warps}", launches=(launch,))
        if m > SIMT_GEMV_MAX_M:
            raise ValueError(f"the GEMV takes M <= {SIMT_GEMV_MAX_M} for {dtype} x with blocksize {blocksize}, got M={m} "
                             f"(M <= {GEMV_MAX_M} needs bf16/fp16 x and blocksize % 64 == 0)")
        tuned = _tuned(("gemv", m, n, k, str(dtype), nested, blocksize, arch))
        block_m, block_n, block_w, warps = config or tuned or _gemv_config(m, n, k, sms)
        spec = _gemv_spec(dtype, nested, blocksize, block_m, block_n, block_w, warps, k % (8 * block_w) == 0)
        launch = Launch(spec=spec, grid=(_cdiv(n, block_n),), iterations=_cdiv(k // 8, block_w),
                        weight_bytes_per_iteration=block_n * block_w * 4, hbm_bytes=weights + io,
                        iterations_in_flight=2, int_args=_ints(m, n, k, k))  # the loop prefetches the next step's words
        return Plan(op="gemv", path="fused", config=f"m{block_m},{block_n}x{4 * block_w}B,w{warps}", launches=(launch,))
    if path == "dequantize+cublas":
        launch = dequantize_launch(n * k, dtype=dtype, nested=nested, blocksize=blocksize)
        mnk = (m, n, k) if op == "gemm" else (m, k, n)
        return Plan(op=op, path=path, config=f"dequantize[{launch.spec.name}]+cublas", launches=(launch,),
                    cublas_mnk=mnk)
    if not shortlist(op, arch):
        raise ValueError(f"the fused {op} needs tensor cores of capability >= 8.0 (got {arch}); "
                         "fourbit.dispatch routes it to dequantize + cuBLAS")
    cfg = (config or _tuned((op, _m_bucket(m), n, k, str(dtype), nested, blocksize, arch))
           or _gemm_default(op, m, n, k, arch, sms, dtype))
    return _fused_plan(op, m, n, k, dtype, nested, blocksize, tuple(cfg))


def _fused_plan(op, m, n, k, dtype, nested, blocksize, cfg) -> Plan:
    spec = _gemm_spec(dtype, nested, blocksize, cfg, op == "backward")
    bm, bn, bk = cfg[:3]
    grid, trips = ((_cdiv(m, bm) * _cdiv(n, bn),), _cdiv(k, bk)) if op == "gemm" else ((_cdiv(m, bm), _cdiv(k, bk)), _cdiv(n, bn))
    io = _SIZE[dtype] * (m * k + m * n)
    launch = Launch(spec=spec, grid=grid, iterations=trips, weight_bytes_per_iteration=bn * bk // 2,
                    hbm_bytes=_weight_bytes(n, k, nested, blocksize) + io,
                    int_args=_ints(m, n, k, n if op == "backward" else k) + (("M_BUCKET", _m_bucket(m)),))
    swap = ",swap" if len(cfg) > 5 and cfg[5] else ""
    return Plan(op=op, path="fused", config=f"{bm}x{bn}x{bk},w{cfg[3]}s{cfg[4]}{swap}", launches=(launch,))


def launch_plans(op: str, m: int, n: int, k: int, *, sms: int = SMS) -> list[Plan]:
    """Every alternative the launchers may run for bf16 x, nested scales, blocksize 64 (the cost
    model's contract): the GEMV for op "gemv" (M <= GEMV_MAX_M, else []); for "gemm"/"backward"
    the fused kernel's shortlist and dequantize + cuBLAS; for "dequantize" its one launch."""
    if op == "gemv":
        return [plan("gemv", m, n, k, sms=sms)] if m <= GEMV_MAX_M else []
    if op == "dequantize":
        launch = dequantize_launch(n * k, dtype=torch.bfloat16, nested=True, blocksize=64)
        return [Plan(op="dequantize", path="fused", config=launch.spec.name, launches=(launch,))]
    if op not in ("gemm", "backward"):
        raise ValueError(f"op must be gemv, gemm or backward, got {op!r}")
    configs = shortlist(op, "sm90")
    plans = [_fused_plan(op, m, n, k, torch.bfloat16, True, 64, cfg) for cfg in configs if k % cfg[2] == 0]
    plans.append(plan(op, m, n, k, path="dequantize+cublas", sms=sms))
    return plans


def _ints(m: int, n: int, k: int, stride: int) -> tuple[tuple[str, int], ...]:
    """The integer arguments a launcher passes (x's or dy's row stride as the contiguous case's)."""
    return (("M", m), ("N", n), ("K", k), ("stride_xm", stride), ("stride_dym", stride))


def _m_bucket(m: int) -> int:
    return min(triton.next_power_of_2(max(m, 1)), 8192)


# ---- tuning -------------------------------------------------------------------------------------
def _gemv_candidates(m: int, n: int, k: int, dtype: torch.dtype = torch.float32, blocksize: int = 64,
                     arch: str = "sm90") -> list[tuple]:
    if mma_gemv_supported(dtype, blocksize, arch):  # the tensor-core GEMV: (warps,)
        return [(_mma_gemv_warps(n, SMS),), (12 - _mma_gemv_warps(n, SMS),)]
    bm, bn, bw, w = _gemv_config(m, n, k, SMS)
    return list(dict.fromkeys([(bm, bn, bw, w), (bm, max(4, bn // 2), bw, w), (bm, bn, max(8, bw // 2), w),
                               (bm, min(bn, 8), bw, 2)]))


def gemv_max_m(dtype: torch.dtype, blocksize: int, arch: str | None = None) -> int:
    """The most rows of x the GEMV takes for this x dtype and blocksize on `arch` (`device_arch`)."""
    return GEMV_MAX_M if mma_gemv_supported(dtype, blocksize, arch) else SIMT_GEMV_MAX_M


# ---- compile report -----------------------------------------------------------------------------
def compile_specs() -> list[KernelSpec]:
    """Every GEMV configuration the rule picks (bf16, nested, blocksize 64: M = 1, 2, 4 and the
    halved BLOCK_N for small N), its fp16 / fp32 / plain-scale / ragged-K variants, the decode
    GEMVs as Triton specializes them at M = 1 (a constant; the generic rows assume multiples of 16),
    and the fused GEMM and backward shortlists (bf16 nested, plus fp16 and plain scales for the
    first GEMM; the swapped tiles only on a Triton in SWAP_TRITON)."""
    specs = []
    for block_m, block_n in ((1, 16), (1, 8), (1, 4), (2, 16), (2, 8), (2, 4), (4, 8), (4, 4)):
        specs.append(_gemv_spec(torch.bfloat16, True, 64, block_m, block_n, 128, 4, True))
    specs += [_gemv_spec(torch.float16, True, 64, 1, 16, 128, 4, True), _gemv_spec(torch.float32, True, 64, 1, 16, 128, 4, True),
              _gemv_spec(torch.bfloat16, False, 64, 1, 16, 128, 4, True), _gemv_spec(torch.bfloat16, True, 64, 1, 16, 128, 4, False)]
    for dtype, nested, tiles, warps, even in ((torch.bfloat16, True, 1, 4, True), (torch.bfloat16, True, 1, 8, True),
                                              (torch.bfloat16, True, 2, 4, True), (torch.bfloat16, True, 2, 8, True),
                                              (torch.float16, True, 1, 4, True), (torch.bfloat16, False, 1, 4, True),
                                              (torch.bfloat16, True, 1, 4, False)):
        specs.append(_gemv_mma_spec(dtype, nested, 64, tiles, warps, even))
    specs += [specialize(_gemv_spec(torch.bfloat16, True, 64, 1, 16, 128, 4, True), {"M": 1}),
              specialize(_gemv_mma_spec(torch.bfloat16, True, 64, 1, 4), {"M": 1}),
              specialize(_gemv_mma_spec(torch.bfloat16, True, 64, 1, 8), {"M": 1})]
    gemm = list(dict.fromkeys(shortlist("gemm", "sm80") + shortlist("gemm", "sm90")))
    specs += [_gemm_spec(torch.bfloat16, True, 64, cfg, False) for cfg in gemm]
    specs += [_gemm_spec(torch.float16, True, 64, gemm[0], False), _gemm_spec(torch.bfloat16, False, 64, gemm[0], False)]
    specs += [_gemm_spec(torch.bfloat16, True, 64, cfg, True) for cfg in shortlist("backward", "sm90")]
    return specs
