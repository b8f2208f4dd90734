"""4-bit matmul: the chunked reference (fourbit.nf4.matmul) and the fused Triton kernels
(fourbit.kernels.matmul, run by Triton's interpreter on CPU), both against float64.

Tolerances (relative Frobenius norm against x64 @ w64.T with w64 the exact dequantized weight):
float32 computes with 24-bit significands, so 1e-5 leaves room for K-long sums; float16 rounds W
and the output (2^-11 each, random signs), so 2e-3; bfloat16 (8-bit significand) 1.6e-2.
"""

import importlib
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fourbit.kernels._triton_utils import interpreting
from fourbit.nf4 import dequantize, quantize
from helpers import rel_err

ref = importlib.import_module("fourbit.nf4.matmul")  # the module: fourbit.nf4.matmul is also the function
kern = importlib.import_module("fourbit.kernels.matmul")

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DEVICE = "cpu" if interpreting() or not torch.cuda.is_available() else "cuda"
KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])  # interpreter: no bf16 math
needs_triton = pytest.mark.skipif(DEVICE == "cpu" and not interpreting(),
                                  reason="triton was imported without TRITON_INTERPRET=1 and there is no GPU")


def weight(n, k, bs=64, dq=True, quant_type="nf4", device="cpu"):
    packed, state = quantize(torch.randn(n, k, device=device), blocksize=bs, double_quant=dq, quant_type=quant_type)
    return packed, state, dequantize(packed, state, dtype=torch.float32).double()  # w64: (N, K) exact


# ---- reference ---------------------------------------------------------------------------------
@given(
    n=st.integers(1, 40), k=st.integers(1, 200), bs=st.sampled_from([32, 64, 256]), dq=st.booleans(),
    quant_type=st.sampled_from(["nf4", "fp4"]), lead=st.sampled_from([(1,), (3,), (2, 5), (0,)]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), has_bias=st.booleans(),
)
def test_reference_equals_dequantize_then_linear(n, k, bs, dq, quant_type, lead, dtype, has_bias):
    """Bit-exact with bitsandbytes' CPU path (F.linear on the weight dequantized into x's dtype),
    including K not a multiple of the blocksize, where blocks cross rows."""
    packed, state, _ = weight(n, k, bs, dq, quant_type)
    x = torch.randn(*lead, k).to(dtype)
    bias = torch.randn(n) if has_bias else None
    want = torch.nn.functional.linear(x, dequantize(packed, state, dtype=dtype), None if bias is None else bias.to(dtype))
    assert torch.equal(ref.matmul(x, packed, state, bias), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_against_float64_many_chunks(dtype, monkeypatch):
    monkeypatch.setattr(ref, "_CHUNK_VALUES", 1000)  # (300, 100) bs 64 -> 32-row chunks on block edges
    packed, state, w64 = weight(300, 100)
    x = torch.randn(2, 7, 100).to(dtype)
    bias = torch.randn(300)
    want = x.double() @ w64.T + bias.to(dtype).double()
    assert rel_err(ref.matmul(x, packed, state, bias), want) < TOL[dtype]


@pytest.mark.parametrize("k", [128, 100])
def test_reference_backward(k, monkeypatch):
    monkeypatch.setattr(ref, "_CHUNK_VALUES", 2000)
    packed, state, w64 = weight(45, k)
    gy = torch.randn(3, 2, 45)
    assert rel_err(ref.matmul_backward(gy, packed, state), gy.double() @ w64) < TOL[torch.float32]


def test_reference_out_argument_and_errors():
    packed, state, _ = weight(8, 64)
    x = torch.randn(3, 64)
    out = torch.full((3, 8), float("nan"))
    assert ref.matmul(x, packed, state, out=out) is out and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="K=64"):
        ref.matmul(torch.randn(3, 65), packed, state)
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        ref.matmul(x, packed, state, torch.randn(9))
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        ref.matmul(x.long(), packed, state)
    with pytest.raises(ValueError, match="out must be"):
        ref.matmul(x, packed, state, out=torch.empty(3, 9))
    p3, s3 = quantize(torch.randn(2, 4, 64))
    with pytest.raises(ValueError, match="2-D quantized weight"):
        ref.matmul(x, p3, s3)


# ---- Triton kernels ----------------------------------------------------------------------------
# (x shape, N, K, blocksize, double quant, bias): M in {1, 3, 16, 17, 64}, odd N, a tile larger than
# the block (bs 32) and smaller (bs 256), split-K (N = 9, K = 1024). Weights the kernels refuse
# (K % blocksize != 0, K % 64 != 0) go to the reference in fourbit.dispatch: tests/test_dispatch.py.
CASES = [
    ((1, 128), 33, 128, 64, True, True),  # GEMV
    ((3, 1, 256), 17, 256, 32, False, False),  # GEMV, BLOCK_K > blocksize, plain fp32 scales, 3-D
    ((2, 8, 192), 33, 192, 64, True, True),  # M = 16: GEMM, 3-D
    ((17, 512), 31, 512, 256, True, False),  # GEMM, BLOCK_K < blocksize
    ((64, 128), 9, 128, 64, True, True),  # GEMM, several M tiles
    ((2, 1024), 9, 1024, 64, True, True),  # GEMV with split-K
]


@needs_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("xshape,n,k,bs,dq,has_bias", CASES)
def test_kernel_forward_against_float64(xshape, n, k, bs, dq, has_bias, dtype):
    packed, state, w64 = weight(n, k, bs, dq, device=DEVICE)
    x = torch.randn(xshape, device=DEVICE).to(dtype)
    bias = torch.randn(n, device=DEVICE).to(dtype) if has_bias else None
    out = torch.full((*xshape[:-1], n), float("nan"), dtype=dtype, device=DEVICE)  # poisoned
    y = kern.matmul(x, packed, state, bias, out=out)
    assert y is out and y.dtype == dtype and y.shape == (*xshape[:-1], n)
    want = x.double() @ w64.T + (0 if bias is None else bias.double())
    assert rel_err(y, want) < TOL[dtype]
    assert rel_err(kern.matmul(x, packed, state, bias), y.double()) < TOL[dtype]  # allocating call agrees


@needs_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("xshape,n,k,bs,dq", [c[:5] for c in CASES[:5]])
def test_kernel_backward_against_float64(xshape, n, k, bs, dq, dtype):
    packed, state, w64 = weight(n, k, bs, dq, device=DEVICE)
    gy = torch.randn(*xshape[:-1], n, device=DEVICE).to(dtype)
    out = torch.full(xshape, float("nan"), dtype=dtype, device=DEVICE)  # poisoned
    gx = kern.matmul_backward(gy, packed, state, out=out)
    assert gx is out
    assert rel_err(gx, gy.double() @ w64) < TOL[dtype]


@needs_triton
def test_kernel_fp4_and_fused_shape_rule():
    packed, state, w64 = weight(20, 128, 64, True, "fp4", device=DEVICE)
    x = torch.randn(5, 128, device=DEVICE)
    assert rel_err(kern.matmul(x, packed, state), x.double() @ w64.T) < TOL[torch.float32]
    assert kern.fused_shape_supported(state)
    assert not kern.fused_shape_supported(weight(4, 100, device=DEVICE)[1])


@needs_triton
def test_kernel_errors():
    packed, state, _ = weight(8, 64, device=DEVICE)
    with pytest.raises(TypeError, match="use the reference"):
        kern.matmul(torch.randn(2, 64, dtype=torch.float64, device=DEVICE), packed, state)
    with pytest.raises(ValueError, match="K=64"):
        kern.matmul(torch.randn(2, 32, device=DEVICE), packed, state)
    with pytest.raises(ValueError, match="N=8"):
        kern.matmul_backward(torch.randn(2, 9, device=DEVICE), packed, state)
    with pytest.raises(ValueError, match="out must be"):
        kern.matmul(torch.randn(2, 64, device=DEVICE), packed, state, out=torch.empty(2, 8, dtype=torch.float16))


REPORT_SPECS = ["matmul_gemm[bf16,bs64,dq,128x128x64,w8s4]", "matmul_backward[bf16,bs64,dq,64x128x64,w4s4]",
                "matmul_gemv[bf16,bs64,dq,m1,32x128,w4s3]"]


def test_compile_report_tensor_cores_no_spills(tmp_path):
    """GPU builds without a GPU (child process: an interpreted triton cannot compile): the GEMM and
    the backward use HGMMA on sm_90a and HMMA on sm_80, the GEMV reads W with 128-bit loads, none spill."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "fourbit.kernels.report", "--module", "fourbit.kernels.matmul", "--arch", "sm_80",
           "sm_90a", "--json", str(out)]
    for name in REPORT_SPECS:
        cmd += ["--only", name]
    child = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                           timeout=600)
    assert child.returncode == 0, child.stdout + child.stderr
    rows = {(r["kernel"], r["arch"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {(name, arch) for name in REPORT_SPECS for arch in ("sm_80", "sm_90a")}
    for (name, arch), r in rows.items():
        assert r["ok"] and r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        if "gemv" in name:
            assert r["widest_ldg"] == 128
        else:
            assert r["hgmma" if arch == "sm_90a" else "hmma"] > 0


def test_autotune_prune_keeps_tiles_that_divide_k():
    import triton

    configs = [triton.Config({"BLOCK_N": 32, "BLOCK_K": bk}) for bk in (64, 128, 256)]
    assert [c.kwargs["BLOCK_K"] for c in kern._prune(None, configs, {"K": 192})] == [64]
    assert [c.kwargs["BLOCK_K"] for c in kern._prune(None, configs, {"K": 4096})] == [64, 128, 256]


def test_split_k_only_when_n_gives_too_few_programs():
    cpu = torch.device("cpu")  # counts as 4 SMs: the (2, 1024) x 9 case in CASES runs 4 K slices
    assert kern._splits(9, 1024, 16, 64, cpu) == 4
    assert kern._splits(4096, 4096, 32, 128, cpu) == 1
    assert kern._splits(9, 128, 16, 64, cpu) == 1  # too few K tiles to share


def test_compile_specs_cover_every_launch_config():
    specs = kern.compile_specs()
    names = [s.name for s in specs]
    assert len(names) == len(set(names))
    gemm = {(s.constexprs["BLOCK_M"], s.constexprs["BLOCK_N"], s.constexprs["BLOCK_K"], s.num_warps, s.num_stages)
            for s in specs if s.kernel is kern._gemm_kernel}
    assert gemm == set(kern._GEMM_CONFIGS["sm80"] + kern._GEMM_CONFIGS["sm90"])
    assert all(s.expect_tensor_cores for s in specs if s.kernel in (kern._gemm_kernel, kern._backward_kernel))
    gemv = {(s.constexprs["BLOCK_N"], s.constexprs["BLOCK_K"], s.num_warps, s.num_stages)
            for s in specs if s.kernel is kern._gemv_kernel}
    assert gemv == set(kern._GEMV_CONFIGS)


def test_bench_matmul_smoke(tmp_path):
    """The benchmark still runs: correctness checks, one repetition per provider, JSON + table."""
    import json

    from benchmarks import bench_matmul

    assert bench_matmul.main(["--smoke", "--dtype", "bfloat16", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "matmul.json").read_text())
    assert {r["provider"] for r in rows} == {"fourbit-reference", "bitsandbytes", "dense"}
    assert {r["shape"] for r in rows} == {"1x96x128", "17x96x128"}
    assert bench_matmul.main(["--smoke", "--dtype", "float32", "--ms", "3", "--shapes", "40x64", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "matmul.json").read_text())
    assert {(r["shape"], r["dtype"]) for r in rows} == {("3x40x64", "float32")}
    with pytest.raises(SystemExit):
        bench_matmul.main(["--smoke", "--shapes", "40by64"])
    assert (tmp_path / "matmul.md").exists()
