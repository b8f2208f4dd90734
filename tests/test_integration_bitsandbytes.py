"""fourbit.integrations.bitsandbytes: after install(), unmodified bitsandbytes code runs fourbit's
kernels (each call counted at fourbit's dispatch functions) with the results fourbit gives; after
uninstall(), bitsandbytes' own kernels answer again."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch
from torch import nn

import fourbit.functional as FF
import fourbit.nn as fnn
from fourbit import dispatch

bnb = pytest.importorskip("bitsandbytes")
from fourbit.integrations import bitsandbytes as fourbit_bnb  # noqa: E402  (needs bitsandbytes)

pytestmark = pytest.mark.bnb


@pytest.fixture
def calls(monkeypatch):
    """Counter of calls into fourbit's quantize / dequantize / matmul / blockwise functions."""
    counter: collections.Counter = collections.Counter()
    for module, name in ((dispatch, "quantize"), (dispatch, "dequantize"), (dispatch, "matmul"),
                         (dispatch, "quantize_blockwise"), (dispatch, "dequantize_blockwise")):
        real = getattr(module, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            counter[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    yield counter
    fourbit_bnb.uninstall()  # never leak the registration into other tests


def train_step(ns, w, b, x):
    """A bitsandbytes user's layer, forward and backward (train mode: SPEC §6)."""
    layer = ns.Linear4bit(w.shape[1], w.shape[0], bias=True, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = ns.Params4bit(w.clone(), requires_grad=False, quant_type="nf4")
    layer.bias = nn.Parameter(b.clone())
    layer = layer.to("cpu").train()  # bitsandbytes quantizes here
    layer.support_avx512bf16_for_cpu = False
    xg = x.clone().requires_grad_(True)
    y = layer(xg)
    y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
    return {"y": y.detach(), "dx": xg.grad, "dbias": layer.bias.grad, "packed": layer.weight.data,
            "absmax": layer.weight.quant_state.absmax}


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_bitsandbytes_layer_runs_on_fourbit_with_equal_results(calls, backend, monkeypatch):
    """Under install() a float32 layer on CPU gives bitsandbytes' own results bit for bit on either
    backend: its matmuls decode W (fourbit's kernels) and run F.linear, as bitsandbytes' CPU build does.
    fourbit's own layer equals them too, except the forward output under the CPU kernels, whose fused
    GEMV computes this 5-row input in float32 (fourbit.cpu.matmul): within F.linear's tolerance."""
    if backend == "cpu" and not dispatch.cpu_kernels_available():
        pytest.skip("the CPU kernels did not load")
    monkeypatch.setenv("FOURBIT_BACKEND", backend)
    g = torch.Generator().manual_seed(0)
    w, x, b = torch.randn(48, 128, generator=g), torch.randn(5, 128, generator=g), torch.randn(48, generator=g)
    native = train_step(bnb.nn, w, b, x)
    assert sum(calls.values()) == 0
    with fourbit_bnb.installed():
        assert fourbit_bnb.is_installed()
        hooked = train_step(bnb.nn, w, b, x)
    # quantize + nested 8-bit scales, the forward's and the backward's decode
    assert calls == {"quantize": 1, "quantize_blockwise": 1, "dequantize_blockwise": 1, "dequantize": 2}
    assert not fourbit_bnb.is_installed()
    ours = train_step(fnn, w, b, x)
    for key in native:
        # these shapes and this seed avoid the CPU build's rounding quirks (SPEC §3, §4): all equal
        assert torch.equal(hooked[key], native[key]), key
        if backend == "cpu" and key == "y":
            assert ((ours[key] - native[key]).norm() / native[key].norm()).item() < 1e-6
            continue
        assert torch.equal(hooked[key], ours[key]), key
    calls.clear()
    train_step(bnb.nn, w, b, x)
    assert calls["quantize"] == 0  # uninstalled: bitsandbytes' kernels again (only fourbit's layer counts)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
def test_functional_ops_go_to_fourbit(calls, quant_type, storage):
    w = torch.randn(64, 96, dtype=torch.bfloat16)
    x = torch.randn(1, 96, dtype=torch.bfloat16)
    ours_packed, ours_state = FF.quantize_4bit(w, quant_type=quant_type, compress_statistics=True, quant_storage=storage)
    ours_dense = FF.dequantize_4bit(ours_packed, ours_state)
    ours_y = FF.matmul_4bit(x, ours_packed.t(), ours_state)
    calls.clear()
    fourbit_bnb.install()
    fourbit_bnb.install()  # idempotent
    packed, state = bnb.functional.quantize_4bit(w, quant_type=quant_type, compress_statistics=True, quant_storage=storage)
    assert packed.dtype == storage and torch.equal(packed.view(torch.uint8), ours_packed.view(torch.uint8))  # bytes: a bf16 view holds NaNs
    assert torch.equal(state.absmax, ours_state.absmax)
    assert torch.equal(state.state2.absmax, ours_state.state2.absmax) and state.offset.item() == ours_state.offset.item()
    out = torch.empty_like(w)
    dense = bnb.functional.dequantize_4bit(packed, state, out=out)
    assert dense is out and torch.equal(out, ours_dense)
    y = bnb.functional.gemv_4bit(x, packed.t(), state=state)
    assert torch.equal(y, ours_y)
    # dequantize_4bit and gemv_4bit each decode the nested scales first (bitsandbytes' Python side)
    assert calls == {"quantize": 1, "quantize_blockwise": 1, "dequantize": 1, "matmul": 1, "dequantize_blockwise": 2}


def test_uninstall_brings_back_bitsandbytes_and_nesting_keeps_an_outer_install(calls):
    w = torch.randn(32, 64)
    fourbit_bnb.install()
    with fourbit_bnb.installed():
        bnb.functional.quantize_4bit(w, quant_type="nf4")
    assert fourbit_bnb.is_installed() and calls["quantize"] == 1  # the outer install() still holds
    fourbit_bnb.uninstall()
    fourbit_bnb.uninstall()  # harmless twice
    bnb.functional.quantize_4bit(w, quant_type="nf4")
    assert not fourbit_bnb.is_installed() and calls["quantize"] == 1


def test_readme_snippet_runs_on_fourbit(calls):
    """docs/ecosystem.md's bitsandbytes block, exactly as printed there."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "ecosystem.md").read_text()
    marker = "<!-- test: tests/test_integration_bitsandbytes.py -->"
    block = page.split(marker, 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(block, "docs/ecosystem.md", "exec"), namespace)
    # on CPU a float32 forward decodes and runs F.linear (fourbit/integrations/bitsandbytes.py); on CUDA the fused matmul
    forward = "matmul" if torch.cuda.is_available() else "dequantize"
    assert calls["quantize"] == 1 and calls[forward] >= 1 and calls["dequantize"] >= 1
    assert namespace["x"].grad is not None and not fourbit_bnb.is_installed()
