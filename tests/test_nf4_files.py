"""QuantState serialization and safetensors files, both directions with bitsandbytes."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fourbit import nf4

bnb = pytest.importorskip("bitsandbytes")


def _quantized(shape=(96, 128), dtype=torch.bfloat16, quant_type="nf4", double_quant=True, blocksize=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g).to(dtype)
    return w, *nf4.quantize(w, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)


@pytest.mark.bnb
@settings(max_examples=20)
@given(
    quant_type=st.sampled_from(["nf4", "fp4"]),
    double_quant=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    blocksize=st.sampled_from([32, 64, 256, 4096]),
    seed=st.integers(0, 10_000),
)
def test_to_dict_matches_bitsandbytes_as_dict(quant_type, double_quant, dtype, blocksize, seed):
    w = torch.randn((48, 64), generator=torch.Generator().manual_seed(seed)).to(dtype)
    _, ref_state = bnb.functional.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant)
    theirs = ref_state.as_dict(packed=True)
    ours = nf4.QuantState.from_dict(theirs).to_dict()
    assert list(ours) == list(theirs)  # same keys, same order
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k
    blob = json.loads(bytes(ours[f"quant_state.bitsandbytes__{quant_type}"].tolist()))
    assert blob["dtype"] == str(dtype).removeprefix("torch.")


def test_to_dict_round_trip_with_prefix():
    _, packed, state = _quantized()
    d = state.to_dict(prefix="model.layers.0.q_proj.weight.")
    assert sorted(d) == sorted(
        "model.layers.0.q_proj.weight." + k
        for k in ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4")
    )
    assert nf4.QuantState.from_dict(d).equal(state)


@pytest.mark.bnb
def test_file_written_by_fourbit_loads_in_bitsandbytes(tmp_path):
    w, packed, state = _quantized()
    path = tmp_path / "w.safetensors"
    nf4.save_file(path, {"weight": (packed, state), "bias": torch.randn(96)})
    flat = safetensors.torch.load_file(str(path))
    data = flat.pop("weight")
    flat.pop("bias")
    p = bnb.nn.Params4bit.from_prequantized(data=data, quantized_stats={k[len("weight."):]: v for k, v in flat.items()}, device="cpu")
    assert torch.equal(p.data, packed)
    assert torch.equal(bnb.functional.dequantize_4bit(p.data, p.quant_state), nf4.dequantize(packed, state))


@pytest.mark.bnb
def test_bitsandbytes_linear4bit_state_dict_loads_into_fourbit(tmp_path):
    torch.manual_seed(0)
    dense = torch.nn.Linear(128, 96, bias=True)
    layer = bnb.nn.Linear4bit(128, 96, bias=True, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True)
    layer.bias = torch.nn.Parameter(dense.bias.data.clone())
    layer = layer.to("cpu")  # bitsandbytes quantizes on .to()
    path = tmp_path / "bnb.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in layer.state_dict().items()}, str(path))
    loaded = nf4.load_file(path)
    packed, state = loaded["weight"]
    assert torch.equal(loaded["bias"], layer.bias.data)
    assert torch.equal(packed, layer.weight.data)
    ref = layer.weight.quant_state
    assert torch.equal(state.absmax, ref.absmax) and torch.equal(state.offset, ref.offset)
    assert torch.equal(state.nested.absmax, ref.state2.absmax)
    assert torch.equal(nf4.dequantize(packed, state), bnb.functional.dequantize_4bit(layer.weight.data, ref))


def test_save_is_atomic_and_load_round_trips(tmp_path):
    _, packed, state = _quantized(quant_type="fp4", double_quant=False, dtype=torch.float16)
    path = tmp_path / "q.safetensors"
    nf4.save_file(path, {"w": (packed, state)})
    before = path.read_bytes()
    with pytest.raises(TypeError):
        nf4.save_file(path, {"w": (packed, "not a state")})
    assert path.read_bytes() == before  # the failed save left the old file intact
    assert [p.name for p in tmp_path.iterdir()] == ["q.safetensors"]  # no temp file left behind
    packed2, state2 = nf4.load_file(path)["w"]
    assert torch.equal(packed2, packed) and state2.equal(state)


def _flat(tmp_path):
    _, packed, state = _quantized()
    flat = {"weight": packed, **state.to_dict(prefix="weight.")}
    return flat


@pytest.mark.parametrize(
    "corrupt, error, message",
    [
        (lambda d: d.pop("weight.absmax"), KeyError, "weight.absmax"),
        (lambda d: d.pop("weight.nested_absmax"), KeyError, "weight.nested_absmax"),
        (lambda d: d.update({"weight.absmax": d["weight.absmax"].float()}), ValueError, "weight.absmax: expected dtype torch.uint8"),
        (lambda d: d.update({"weight.nested_absmax": torch.zeros(5)}), ValueError, r"weight.nested_absmax: expected shape \(1,\)"),
        (lambda d: d.update({"weight.quant_state.bitsandbytes__nf4": torch.tensor(list(b"{nope"), dtype=torch.uint8)}), ValueError, "not valid UTF-8 JSON"),
        (lambda d: d.update({"weight.quant_state.bitsandbytes__fp4": d.pop("weight.quant_state.bitsandbytes__nf4")}), ValueError, "quant_type 'fp4' but its JSON says 'nf4'"),
        (lambda d: d.update({"weight.quant_map": d["weight.quant_map"].flip(0)}), ValueError, "quant_map does not equal"),
        (lambda d: d.update({"weight": d["weight"][:-2]}), ValueError, "needs 6144"),
    ],
)
def test_load_rejects_bad_checkpoints(tmp_path, corrupt, error, message):
    flat = _flat(tmp_path)
    corrupt(flat)
    path = tmp_path / "bad.safetensors"
    safetensors.torch.save_file(flat, str(path))
    with pytest.raises(error, match=message):
        nf4.load_file(path)


def test_load_rejects_truncated_file(tmp_path):
    _, packed, state = _quantized()
    path = tmp_path / "t.safetensors"
    nf4.save_file(path, {"weight": (packed, state)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        nf4.load_file(path)


def test_quant_state_to_device_never_requantizes():
    _, packed, state = _quantized()
    moved = state.to("cpu")
    assert moved.equal(state) and moved is not state
