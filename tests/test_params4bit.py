"""Linear4bit's bitsandbytes life cycle and its Params4bit weight: an nn.Linear subclass built on
"meta" or under init_empty_weights and then loaded; dense until moved, loaded or called; read-through
attributes for FSDP's key traversal; chunk/split, copies and pickling keep the class."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from fourbit.lora import Linear4bit, add_lora, quantize_model, trainable_parameters
from fourbit.lora.params import Params4bit


def dense(n_out: int = 32, k: int = 64, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(k, n_out, bias=bias)


def assert_same_layer(a: Linear4bit, b: Linear4bit) -> None:
    assert torch.equal(a.weight.data, b.weight.data) and a.quant_state.equal(b.quant_state)
    x = torch.randn(3, a.in_features)
    assert torch.equal(a(x), b(x))


def empty_layers() -> list:
    """The three ways research code builds a layer without memory for its weights."""
    accelerate = pytest.importorskip("accelerate")
    layers = [("device=meta", Linear4bit(64, 32, device="meta"))]
    with torch.device("meta"):
        layers.append(("torch.device(meta)", Linear4bit(64, 32)))
    with accelerate.init_empty_weights():
        layers.append(("init_empty_weights", Linear4bit(64, 32)))
    return layers


@pytest.mark.parametrize("checkpoint", ["dense", "4-bit"])
def test_layers_built_without_memory_load_real_weights(checkpoint):
    lin = dense()
    reference = Linear4bit.from_linear(lin)
    sd = lin.state_dict() if checkpoint == "dense" else reference.state_dict()
    for how, layer in empty_layers():
        assert layer.weight.is_meta and layer.bias.is_meta and layer.quant_state is None, how
        assert isinstance(layer.weight, Params4bit) and not layer.weight.bnb_quantized, how
        with pytest.raises(ValueError, match="meta device"):
            layer(torch.randn(2, 64))
        layer.load_state_dict(sd)
        assert layer.weight.device.type == "cpu" and layer.bias.device.type == "cpu", how
        assert_same_layer(layer, reference)


def test_construction_quantizes_nothing_and_a_forward_quantizes_the_dense_weight():
    layer = Linear4bit(64, 32)
    assert layer.weight.dtype == torch.float32 and layer.weight.shape == (32, 64)
    lin = dense()
    layer.weight.detach().copy_(lin.weight)  # research code writes into the dense weight
    layer.bias.detach().copy_(lin.bias)
    y = layer(torch.zeros(1, 64))  # the first forward quantizes
    assert layer.weight.bnb_quantized and layer.weight.dtype == torch.uint8
    assert_same_layer(layer, Linear4bit.from_linear(lin))
    assert torch.equal(y[0], lin.bias.detach())


def test_casts_of_a_dense_layer_stay_dense_and_the_move_quantizes_the_cast_weight():
    lin = dense()
    layer = Linear4bit(64, 32)
    layer.weight.detach().copy_(lin.weight)
    layer.half()
    assert layer.weight.dtype == torch.float16 and not layer.weight.bnb_quantized
    assert isinstance(layer.weight, Params4bit) and layer.weight.module is layer
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16 and not layer.weight.bnb_quantized
    layer.to("cpu")
    assert layer.weight.bnb_quantized and layer.quant_state.dtype == torch.bfloat16
    w = lin.weight.detach().to(torch.float16).to(torch.bfloat16)
    assert torch.equal(layer.weight.data, Linear4bit.from_linear(_with_weight(w)).weight.data)


def _with_weight(w: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


def test_assigning_a_dense_tensor_or_a_dense_params4bit_waits_with_its_settings():
    lin = dense()
    layer = Linear4bit.from_linear(dense(32, 64))  # quantized; now replace its weight by a dense one
    layer.weight = nn.Parameter(lin.weight.detach().clone())
    assert isinstance(layer.weight, Params4bit) and not layer.weight.bnb_quantized and layer.quant_state is None
    layer.to("cpu")
    assert torch.equal(layer.weight.data, Linear4bit.from_linear(lin).weight.data)
    layer.weight = Params4bit(lin.weight.detach().clone(), quant_type="fp4", blocksize=128, compress_statistics=False)
    assert (layer.quant_type, layer.blocksize, layer.double_quant) == ("fp4", 128, False)
    layer.to("cpu")
    ref = Linear4bit.from_linear(lin, quant_type="fp4", blocksize=128, double_quant=False)
    assert torch.equal(layer.weight.data, ref.weight.data) and layer.quant_state.equal(ref.quant_state)
    with pytest.raises(ValueError, match=r"dense weight has shape \(16, 64\)"):
        layer.weight = Params4bit(torch.randn(16, 64))


def test_a_params4bit_written_behind_the_layers_back_is_adopted():
    """accelerate's set_module_tensor_to_device writes `module._parameters[name]` directly."""
    lin = dense()
    layer = Linear4bit(64, 32, device="meta")
    old = layer.weight
    new = type(old)(lin.weight.detach().clone(), **{k: v for k, v in old.__dict__.items()}).to("cpu")
    layer._parameters["weight"] = new
    layer.bias = nn.Parameter(lin.bias.detach().clone())
    assert_same_layer(layer, Linear4bit.from_linear(lin))
    assert layer.quant_state is layer.weight.quant_state


def test_read_through_attributes_cover_every_checkpoint_key():
    layer = Linear4bit.from_linear(dense())
    w = layer.weight
    assert w.absmax is layer.quant_state.absmax and w.code is layer.quant_state.code and w.quant_map is w.code
    assert w.state2 is layer.quant_state.nested and w.nested_absmax is w.state2.absmax
    assert w.nested_blocksize == 256 and w.nested_dtype == torch.float32 and w.nested_offset is w.offset
    assert torch.equal(w.nested_quant_map, w.state2.code)
    # FSDP resolves "weight.quant_state.bitsandbytes__nf4" attribute by attribute
    for key, value in layer.state_dict().items():
        if key.startswith("weight."):
            obj = layer
            for part in key.split("."):
                obj = getattr(obj, part)
            assert torch.equal(obj, value), key
    assert not hasattr(w, "nonexistent") and not hasattr(layer.quant_state, "bitsandbytes__fp4")
    plain = Linear4bit.from_linear(dense(), double_quant=False).weight
    with pytest.raises(AttributeError, match="nested_absmax"):
        plain.nested_absmax  # noqa: B018
    assert plain.state2 is None and plain.offset is None
    with pytest.raises(AttributeError, match="'absmax'"):
        Linear4bit(64, 32).weight.absmax  # noqa: B018  (not quantized yet)


def test_chunk_split_copy_and_pickle_keep_the_class():
    layer = Linear4bit.from_linear(dense())
    w = layer.weight
    for pieces in (torch.chunk(w, 4), w.chunk(4), torch.split(w, 100), w.split(100)):
        assert all(type(p) is Params4bit and p.quant_state is w.quant_state and p.bnb_quantized for p in pieces)
        assert torch.equal(torch.cat([p.data for p in pieces]), w.data)
    shallow = copy.copy(w)
    assert shallow.quant_state is w.quant_state and shallow.data.data_ptr() == w.data.data_ptr()
    back = pickle.loads(pickle.dumps(w))
    assert type(back) is Params4bit and back.quant_state.equal(w.quant_state) and torch.equal(back.data, w.data)
    twin = copy.deepcopy(layer)
    assert twin.weight.module is twin and twin.weight.quant_state is twin.quant_state
    assert twin.quant_state is not layer.quant_state and twin.weight.data.data_ptr() != w.data.data_ptr()
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded.weight) is Params4bit and loaded.weight.module is loaded
    assert_same_layer(loaded, layer)


def test_an_nn_linear_that_surgery_still_tells_apart():
    model = nn.Sequential(nn.Linear(64, 64), Linear4bit.from_linear(dense(64, 64)), nn.Linear(64, 32))
    assert all(isinstance(m, nn.Linear) for m in model)
    already = model[1]
    quantize_model(model, skip=())
    assert model[1] is already  # an existing 4-bit layer is not quantized again
    assert all(type(m) is Linear4bit for m in model)
    add_lora(model, r=4, target_modules=["0", "1", "2"])
    count = trainable_parameters(model)
    assert count.trainable == 4 * (64 + 64) * 2 + 4 * (64 + 32)
    assert count.total == count.trainable + 64 * 64 * 2 + 64 * 32 + 64 + 64 + 32


@pytest.mark.parametrize("start", ["quantized", "dense"])
def test_torch_compile_traces_the_layer(start):
    """A quantized layer compiles with fullgraph=True (a graph break would raise), forward and
    backward; a still-dense one quantizes eagerly on the compiled module's first call (one graph
    break, so fullgraph=False) and then computes the same."""
    torch.compiler.reset()
    lin = dense()
    layer = Linear4bit.from_linear(lin) if start == "quantized" else Linear4bit(64, 32)
    if start == "dense":
        layer.weight.detach().copy_(lin.weight)
        layer.bias.detach().copy_(lin.bias)
    reference = Linear4bit.from_linear(lin)
    compiled = torch.compile(layer, fullgraph=start == "quantized", backend="aot_eager")
    for _ in range(2):
        x = torch.randn(5, 64, requires_grad=True)
        y = compiled(x)
        y.sum().backward()
        x_ref = x.detach().clone().requires_grad_(True)
        reference(x_ref).sum().backward()
        assert torch.equal(y, reference(x_ref)) and torch.equal(x.grad, x_ref.grad)
    assert layer.weight.bnb_quantized


@pytest.mark.parametrize("how, dtype", [("assign", torch.float32), ("to_empty", torch.bfloat16)])
def test_quantize_model_on_a_meta_model_then_load_equals_quantizing_the_loaded_model(dtype, how):
    """bitsandbytes' replace_with_bnb_linear flow: an empty Llama, quantize_model, then the
    weights; every saved byte (packed codes, absmax, nested state, blob, bias, the dense rest)
    equals quantize_model on the dense model that loaded the same checkpoint. The checkpoint is
    float32 (a bfloat16 model casts it on load; to_empty + load must quantize the cast weight)."""
    accelerate = pytest.importorskip("accelerate")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, attention_bias=True)
    checkpoint = {k: v.clone() for k, v in transformers.LlamaForCausalLM(cfg).state_dict().items()}
    with accelerate.init_empty_weights():
        empty = transformers.LlamaForCausalLM(cfg).to(dtype)
    quantize_model(empty)
    layers = [m for m in empty.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 14 and all(m.weight.is_meta and m.quant_state is None for m in layers)
    if how == "assign":  # torch keeps the checkpoint's tensors as they are: the dense twin does too
        empty.load_state_dict(checkpoint, assign=True)
        with accelerate.init_empty_weights():
            twin = transformers.LlamaForCausalLM(cfg).to(dtype)
        twin.load_state_dict(checkpoint, assign=True)
    else:
        empty.to_empty(device="cpu")
        empty.load_state_dict(checkpoint)
        twin = transformers.LlamaForCausalLM(cfg).to(dtype)
        twin.load_state_dict(checkpoint)
    want, got = quantize_model(twin).state_dict(), empty.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert want[key].dtype == got[key].dtype and torch.equal(want[key], got[key]), key
    assert all(m.weight.device.type == "cpu" and m.weight.bnb_quantized for m in layers)
    if how == "assign":  # (to_empty leaves non-persistent buffers such as RoPE's inv_freq unset)
        ids = torch.randint(0, 96, (2, 5))
        assert torch.equal(empty(ids).logits, twin(ids).logits)


def test_docs_meta_model_block_runs_and_quantizes_what_the_dense_model_would():
    """docs/ecosystem.md's meta-model block, exactly as printed there."""
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "ecosystem.md").read_text()
    block = page.split("<!-- test: tests/test_params4bit.py -->", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(block, "docs/ecosystem.md", "exec"), namespace)
    model, checkpoint = namespace["model"], namespace["checkpoint"]
    twin = type(model)(model.config)
    twin.load_state_dict(checkpoint)
    want, got = quantize_model(twin).state_dict(), model.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert sum(isinstance(m, Linear4bit) and m.weight.bnb_quantized for m in model.modules()) == 14
