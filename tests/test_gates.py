"""The kernel gates of `fourbit.dispatch.matmul_route` (and `matmul_gates`): what was verified runs.

* Capability < 8.0 (T4 7.5, V100 7.0): no mma.sync.m16n8k16 and no bf16 tensor cores, so the
  tensor-core GEMV and the fused tiles do not build (ptxas rejects the GEMV for sm_75). Those GPUs
  get the SIMT GEMV for M <= SIMT_GEMV_MAX_M and dequantize + cuBLAS for everything else: routes,
  plans and launchers agree, the interpreter computes the results, and the kernels they launch are
  compiled for sm_75 (a child process, like the compile report).
* The swapped tiles only on a Triton version in `matmul_plan.SWAP_TRITON` (those whose builds pass
  the hazard check, tests/test_hazards.py): on any other, large M takes dequantize + cuBLAS, the
  shortlists and the compile report leave them out, and an explicit fused route gets unswapped tiles.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fourbit import dispatch
from fourbit.kernels import matmul_plan as mp
from fourbit.kernels._triton_utils import interpreting
from fourbit.nf4 import dequantize, quantize

kern = importlib.import_module("fourbit.kernels.matmul")
REPO = Path(__file__).resolve().parents[1]
SHAPE = (4096, 4096)


@pytest.fixture
def pre_ampere(monkeypatch):
    """Every device looks like capability 7.5."""
    monkeypatch.setattr(mp, "device_arch", lambda device=None: "sm75")
    kern.plan.cache_clear()
    yield
    kern.plan.cache_clear()


def test_pre_ampere_routes_and_plans(pre_ampere):
    routes = {(m, b): dispatch.matmul_route(m, *SHAPE, backward=b) for m in (1, 2, 3, 16, 64, 2048) for b in (False, True)}
    assert routes[(1, False)] == routes[(2, False)] == ("gemv", "fused")  # the SIMT GEMV
    assert all(path == "dequantize+cublas" for (m, b), (_, path) in routes.items() if b or m > 2), routes
    assert dispatch.matmul_route(2, *SHAPE, dtype=torch.float32) == ("gemv", "fused")
    assert dispatch.matmul_gates() == {"arch": "sm75", "triton": dispatch.matmul_gates()["triton"],
                                       "tensor_core_gemv": False, "fused_tiles": False,
                                       "swapped_tiles": dispatch.matmul_gates()["swapped_tiles"]}
    for m, dtype in ((1, torch.bfloat16), (2, torch.float16), (1, torch.float32)):
        spec = kern.plan("gemv", m, *SHAPE, dtype=dtype, arch="sm75").launches[0].spec
        assert spec.name.startswith("matmul_gemv[") and spec.archs is None, spec.name  # not the mma GEMV
    for op in ("gemm", "backward"):
        with pytest.raises(ValueError, match="capability >= 8.0"):
            kern.plan(op, 16, *SHAPE, path="fused", arch="sm75")
    with pytest.raises(ValueError, match="M <= 4"):
        kern.plan("gemv", 5, *SHAPE, path="fused", arch="sm75")


@pytest.mark.skipif(not interpreting(), reason="needs triton imported with TRITON_INTERPRET=1")
@pytest.mark.parametrize("m", [1, 2, 3, 9])
def test_pre_ampere_results(pre_ampere, monkeypatch, m):
    """Through dispatch, as a T4 would run them: the SIMT GEMV (M <= 2) or dequantize + matmul."""
    monkeypatch.setenv("FOURBIT_BACKEND", "triton")
    packed, state = quantize(torch.randn(24, 128), blocksize=64, double_quant=True)
    w64 = dequantize(packed, state, dtype=torch.float32).double()
    x = torch.randn(m, 128).to(torch.float16)
    y = dispatch.matmul(x, packed, state)
    assert float((y.double() - x.double() @ w64.T).norm() / (x.double() @ w64.T).norm()) < 2e-3
    gy = torch.randn(m, 24).to(torch.float16)
    gx = dispatch.matmul_backward(gy, packed, state)
    assert float((gx.double() - gy.double() @ w64).norm() / (gy.double() @ w64).norm()) < 2e-3


def test_pre_ampere_kernels_compile_for_sm75(tmp_path, pre_ampere):
    """The kernels a capability-7.5 GPU launches build for sm_75 without spills (the compile report
    in a child; the mma GEMV would fail there: `PTXASError` on mma.sync.m16n8k16)."""
    names = {kern.plan("gemv", m, *SHAPE, arch="sm75").launches[0].spec.name for m in (1, 2)}
    # dequantize (and quantize) for sm_75: tests/test_kernels_report.py builds them for every arch
    assert kern.plan("gemm", 64, *SHAPE, arch="sm75").launches[0].spec.archs is None
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "fourbit.kernels.analysis.report", "--arch", "sm_75", "--json", str(out),
           "--module", "fourbit.kernels.matmul"]
    for name in sorted(names):
        cmd += ["--only", name]
    child = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stdout[-4000:] + child.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["kernel"] for r in rows} >= names and all(r["arch"] == "sm_75" and r["ok"] for r in rows), rows


def test_swapped_tiles_need_a_verified_triton(monkeypatch):
    assert mp.SWAP_TRITON == ((3, 9),)
    monkeypatch.setattr(mp, "triton_version", lambda: (3, 6))
    kern.plan.cache_clear()
    try:
        assert not mp.swap_gemm_supported(torch.bfloat16, 4096, True)
        assert not any(mp._swapped(c) for op in ("gemm", "backward") for c in mp.shortlist(op, "sm90"))
        assert not any(",swap]" in s.name for s in mp.compile_specs())
        assert dispatch.matmul_route(2048, *SHAPE) == ("gemm", "dequantize+cublas")
        assert dispatch.matmul_route(2048, *SHAPE, backward=True) == ("backward", "dequantize+cublas")
        assert dispatch.matmul_gates()["swapped_tiles"] is False
        for op in ("gemm", "backward"):  # an explicit fused route gets tiles that wait for every wgmma
            assert not kern.plan(op, 2048, *SHAPE, path="fused").config.endswith(",swap")
    finally:
        kern.plan.cache_clear()
    monkeypatch.setattr(mp, "triton_version", lambda: (3, 9))
    assert dispatch.matmul_route(2048, *SHAPE) == ("gemm", "fused") and dispatch.matmul_gates()["swapped_tiles"]
    assert kern.plan("gemm", 2048, *SHAPE, path="fused").config.endswith(",swap")
