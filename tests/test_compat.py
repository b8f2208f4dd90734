"""bitsandbytes-compatible names: the same research snippet runs once against `bitsandbytes` and
once against `fourbit.functional` / `fourbit.nn`, and the results are compared; signatures and
defaults (fp4 included) are bitsandbytes 0.50's."""

from __future__ import annotations

import copy
import inspect
import types

import pytest
import torch
from torch import nn

import fourbit.functional as FF
import fourbit.nn as fnn
from fourbit.lora import Linear4bit as CoreLinear4bit
from helpers import BOTH_BACKENDS, assert_gemv_parity, use_backend

bnb = pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.bnb

FOURBIT = types.SimpleNamespace(nn=fnn, functional=FF, matmul_4bit=FF.matmul_4bit)


def snippet(bnb, w, x, b, compress_statistics):
    """Code as a bitsandbytes user writes it; only the `bnb` namespace changes between runs."""
    F = bnb.functional
    out = {}
    packed, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=compress_statistics, quant_type="nf4")
    out["packed"], out["absmax"] = packed, qs.absmax
    if compress_statistics:
        out["nested_absmax"], out["offset"] = qs.state2.absmax, qs.offset
    out["dequantized"] = F.dequantize_4bit(packed, qs)
    out["matmul"] = bnb.matmul_4bit(x, packed.t(), quant_state=qs, bias=b)
    xg = x.clone().requires_grad_(True)
    bnb.matmul_4bit(xg, packed.t(), quant_state=qs).sum().backward()
    out["matmul_grad"] = xg.grad

    layer = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=True, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4", compress_statistics=compress_statistics)
    layer.bias = nn.Parameter(b.clone())
    layer = layer.to("cpu")  # bitsandbytes quantizes here
    layer.support_avx512bf16_for_cpu = False  # (a bitsandbytes attribute; harmless on fourbit's layer)
    out["layer"] = layer.train()(x)
    out["layer_dequantized"] = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    sd = layer.state_dict()
    out["state_dict_keys"] = list(sd)
    out["state_dict_blob"] = sd[f"weight.quant_state.bitsandbytes__nf4"]
    fp4_packed, fp4_state = F.quantize_4bit(w)  # the defaults: fp4, no double quantization
    out["default_quant_type"] = fp4_state.quant_type
    out["default_nested"] = bool(fp4_state.nested)
    return out


def compare(a: dict, b: dict, backend: str = "reference") -> None:
    """Everything equal; under the CPU kernels the forward outputs of these few-row inputs come from
    the fused GEMV (tests/helpers.py: assert_gemv_parity)."""
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
            if k in ("matmul", "layer"):
                assert_gemv_parity(b[k], a[k], backend, k)
            else:
                assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


@BOTH_BACKENDS
def test_snippet_fresh_data_single_quantization(backend, monkeypatch):
    """Fresh random data, no double quantization: every result bit-identical. (K and N*K are
    multiples of 64: bitsandbytes' CPU build divides in a partial last block and mis-indexes
    dequantization otherwise, SPEC §2, §4; fourbit follows the CUDA kernels.)"""
    w, x, b = torch.randn(48, 128), torch.randn(2, 5, 128), torch.randn(48)
    use_backend(monkeypatch, backend)
    compare(snippet(bnb, w, x, b, False), snippet(FOURBIT, w, x, b, False), backend)


@BOTH_BACKENDS
@pytest.mark.parametrize("seed", [4, 6])
def test_snippet_double_quantization(seed, backend, monkeypatch):
    """With double quantization bitsandbytes' CPU build picks a few nested 8-bit codes through a
    lookup table that CUDA (and fourbit) do not use (~0.15 % of codes, SPEC §3; seeds 0-3 and 5 each hit at least one
    among these 192 scales): seeds 4 and 6 give
    tensors where no code is affected, so the whole snippet is bit-identical."""
    g = torch.Generator().manual_seed(seed)
    w, x, b = torch.randn(64, 192, generator=g), torch.randn(3, 192, generator=g), torch.randn(64, generator=g)
    use_backend(monkeypatch, backend)
    compare(snippet(bnb, w, x, b, True), snippet(FOURBIT, w, x, b, True), backend)


def _params(fn):
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]


def test_signatures_and_defaults_match_bitsandbytes():
    for name in ("quantize_4bit", "dequantize_4bit", "quantize_nf4", "dequantize_nf4", "quantize_fp4", "dequantize_fp4"):
        assert _params(getattr(FF, name)) == _params(getattr(bnb.functional, name)), name
    assert _params(FF.matmul_4bit) == _params(bnb.matmul_4bit)
    for name in ("Linear4bit", "LinearNF4", "LinearFP4"):
        assert _params(getattr(fnn, name).__init__) == _params(getattr(bnb.nn, name).__init__), name
    assert _params(fnn.Params4bit.__new__) == _params(bnb.nn.Params4bit.__new__)
    assert _params(fnn.Params4bit.from_prequantized) == _params(bnb.nn.Params4bit.from_prequantized)
    theirs = _params(bnb.functional.QuantState.__init__)
    assert _params(FF.QuantState.__init__)[: len(theirs)] == theirs
    assert fnn.Linear4bit(64, 8).quant_type == "fp4"  # the trap, kept on purpose
    assert fnn.LinearNF4(64, 8).quant_type == "nf4"


def test_params4bit_quantizes_on_to_and_round_trips_prequantized():
    w = torch.randn(32, 64)
    p = fnn.Params4bit(w, quant_type="nf4")
    assert not p.bnb_quantized and p.dtype == torch.float32
    q = p.to("cpu")
    ref_packed, ref_state = bnb.functional.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    assert q.bnb_quantized and torch.equal(q.data, ref_packed)
    moved = q.to("cpu")
    assert torch.equal(moved.data, q.data) and moved.quant_state.equal(q.quant_state)  # no re-quantization
    again = fnn.Params4bit.from_prequantized(q.data, q.quant_state.as_dict(packed=True), device="cpu")
    assert again.quant_state.equal(q.quant_state) and again.quant_type == "nf4" and again.compress_statistics
    theirs = bnb.nn.Params4bit.from_prequantized(q.data, q.quant_state.as_dict(packed=True), device="cpu")
    assert torch.equal(theirs.quant_state.absmax, q.quant_state.absmax)
    assert torch.equal(theirs.quant_state.state2.absmax, q.quant_state.state2.absmax)


def test_quant_state_as_dict_matches_bitsandbytes():
    w = torch.randn(16, 64)
    _, ours = FF.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    _, theirs = bnb.functional.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    a, b = ours.as_dict(), theirs.as_dict()
    assert a.keys() == b.keys()
    for k in b:
        if isinstance(b[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        else:
            assert a[k] == b[k], k
    assert list(ours.as_dict(packed=True)) == list(theirs.as_dict(packed=True))
    for form in (ours.as_dict(), ours.as_dict(packed=True)):
        assert FF.QuantState.from_dict(form, device="cpu").equal(ours)
    back = bnb.functional.QuantState.from_dict(ours.as_dict(), device="cpu")  # bnb reads our unpacked form
    assert torch.equal(back.absmax, ours.absmax) and back.offset.item() == ours.offset.item()


def test_compat_layer_is_the_fourbit_layer():
    layer = fnn.LinearNF4(64, 16, compute_dtype=torch.float32).to("cpu")  # quantizes here, as bitsandbytes
    assert isinstance(layer, CoreLinear4bit) and isinstance(layer.weight, fnn.Params4bit)
    assert layer.weight.bnb_quantized and layer.weight.quant_state is layer.quant_state
    assert isinstance(layer.quant_state, FF.QuantState)
    x = torch.randn(3, 64)
    bytes_before = layer.weight.data.clone()
    layer.eval()
    with torch.no_grad():
        y = layer(x)
    layer.to("cpu")
    assert torch.equal(layer.weight.data, bytes_before) and torch.equal(layer(x), y)
    twin = copy.deepcopy(layer)
    assert twin.weight.quant_state is twin.quant_state and twin.quant_state is not layer.quant_state
    assert twin.quant_state.equal(layer.quant_state) and torch.equal(twin(x), y)


@pytest.mark.parametrize("ns", [bnb, FOURBIT], ids=["bitsandbytes", "fourbit"])
def test_bitsandbytes_life_cycle_and_bias_handling(ns):
    """The same user code on both: construction quantizes nothing, `.to()` quantizes the dense weight
    in place, the first float32 input fixes compute_dtype, and the forward converts the bias
    Parameter in place to it."""
    torch.manual_seed(0)
    layer = ns.nn.Linear4bit(128, 64, bias=True, quant_type="nf4", compress_statistics=False)
    assert isinstance(layer, nn.Linear) and layer.weight.dtype == torch.float32 and not layer.weight.bnb_quantized
    w = torch.randn(64, 128)
    layer.weight.detach().copy_(w)
    layer.bias = nn.Parameter(torch.randn(64).half())
    param = layer.weight
    layer = layer.to("cpu")
    assert layer.weight is param and param.bnb_quantized and param.dtype == torch.uint8
    assert torch.equal(param.data, FF.quantize_4bit(w, quant_type="nf4")[0])
    layer.support_avx512bf16_for_cpu = False
    layer.train()(torch.randn(2, 128))
    assert layer.compute_dtype == torch.float32 and layer.bias.dtype == torch.float32
    meta = ns.nn.Linear4bit(128, 64, quant_type="nf4", device="meta")
    assert meta.weight.is_meta and not meta.weight.bnb_quantized


def test_dequantize_4bit_without_quant_state_and_out_buffers():
    w = torch.randn(8, 64)
    absmax = torch.empty(8)
    out = torch.empty(8 * 64 // 2, 1, dtype=torch.uint8)
    packed, state = FF.quantize_4bit(w, absmax=absmax, out=out, quant_type="nf4")
    assert packed is out and torch.equal(absmax, state.absmax)
    dense = torch.empty(8, 64)
    result = FF.dequantize_4bit(packed, absmax=absmax, out=dense, quant_type="nf4")
    assert result is dense and torch.equal(dense, FF.dequantize_4bit(packed, state))
    with pytest.raises(ValueError, match="both absmax and out"):
        FF.dequantize_4bit(packed, absmax=absmax)


def test_import_fourbit_as_bnb_reaches_every_compatible_name():
    """`import fourbit as bnb` in place of `import bitsandbytes as bnb`: the attribute paths research
    code uses resolve, and the optimizer signatures match bitsandbytes'."""
    import subprocess
    import sys

    code = (
        "import fourbit as bnb\n"
        "names = [bnb.matmul_4bit, bnb.functional.quantize_4bit, bnb.functional.dequantize_4bit,\n"
        "         bnb.nn.Linear4bit, bnb.nn.Params4bit, bnb.optim.PagedAdamW, bnb.optim.AdamW8bit]\n"
        "print(len(names))\n"
    )
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert child.returncode == 0 and child.stdout.strip() == "7", child.stderr[-2000:]
    import fourbit.optim as fopt

    for name in fopt.__all__:  # AdamW* and Adam*, 32-bit, 8-bit and paged
        theirs, ours = _params(getattr(bnb.optim, name).__init__), _params(getattr(fopt, name).__init__)
        assert ours[: len(theirs)] == theirs, (name, ours, theirs)  # ours only adds pager knobs after them
