"""PEFT, unchanged, on fourbit's Linear4bit (fourbit.integrations.peft): get_peft_model equals
fourbit's own add_lora (outputs and gradients), "all-linear", prepare_model_for_kbit_training,
merge_and_unload (re-quantized, the same bytes as LoRALinear.merge_requantized) and an exact unmerge,
save_pretrained -> PeftModel.from_pretrained, several adapters, and the refused variants."""

from __future__ import annotations

import copy

import pytest
import torch

from fourbit.lora import Linear4bit, add_lora, lora_layers, quantize_model
from helpers import tiny_llama

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
fourbit_peft = pytest.importorskip("fourbit.integrations.peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def quantized():
    """A tiny Llama after fourbit.lora.quantize_model (every linear but lm_head in NF4 + DQ)."""
    return quantize_model(tiny_llama())


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))


def peft_model(base, r=4, alpha=8, targets=TARGETS, **kwargs):
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, **kwargs)
    return peft.get_peft_model(copy.deepcopy(base), config)


def randomize(model, seed=2):
    """B starts at zero; give every adapter weight values so the comparisons see the adapters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def copy_into_fourbit(peft_m, base):
    """fourbit's add_lora model holding the same adapter values as `peft_m`'s default adapter."""
    ours = add_lora(copy.deepcopy(base), r=4, alpha=8, target_modules=TARGETS)
    inner = peft_m.base_model.model
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            theirs = inner.get_submodule(name)
            layer.lora_A.weight.copy_(theirs.lora_A["default"].weight)
            layer.lora_B.weight.copy_(theirs.lora_B["default"].weight)
    return ours


def test_get_peft_model_equals_add_lora_outputs_and_gradients(quantized, ids):
    pm = peft_model(quantized)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer) is fourbit_peft.Linear4bit and isinstance(layer.base_layer, Linear4bit)
    randomize(pm)
    ours = copy_into_fourbit(pm, quantized)
    out_p, out_o = pm(ids, labels=ids), ours(ids, labels=ids)
    assert torch.equal(out_p.logits, out_o.logits)
    out_p.loss.backward()
    out_o.loss.backward()
    inner = pm.base_model.model
    for name, layer in lora_layers(ours).items():
        theirs = inner.get_submodule(name)
        assert torch.equal(theirs.lora_A["default"].weight.grad, layer.lora_A.weight.grad), name
        assert torch.equal(theirs.lora_B["default"].weight.grad, layer.lora_B.weight.grad), name
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_all_linear_targets_every_quantized_layer(quantized):
    pm = peft_model(quantized, targets="all-linear")
    wrapped = {n for n, m in pm.base_model.model.named_modules() if isinstance(m, fourbit_peft.Linear4bit)}
    quantized_names = {n for n, m in quantized.named_modules() if isinstance(m, Linear4bit)}
    assert wrapped == quantized_names and len(wrapped) == 14  # 7 per layer; lm_head stays dense and untargeted


def test_prepare_model_for_kbit_training_does_its_work():
    model = quantize_model(tiny_llama()).to(torch.bfloat16)
    assert model.is_loaded_in_4bit
    model = peft.prepare_model_for_kbit_training(model)
    assert model.is_gradient_checkpointing  # only turned on for a model it sees as k-bit
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "norm" in n)
    packed = model.model.layers[0].mlp.down_proj.weight
    assert packed.dtype == torch.uint8 and not packed.requires_grad  # the 4-bit bytes are left alone


def test_merge_and_unload_requantizes_like_lora_merge_requantized(quantized, ids):
    pm = peft_model(quantized)
    randomize(pm)
    ours = copy_into_fourbit(pm, quantized)
    merged = pm.merge_and_unload()
    for name, layer in lora_layers(ours).items():
        expected, error = layer.merge_requantized()
        got = merged.get_submodule(name)
        assert type(got) is type(layer.base)
        assert torch.equal(got.weight.data, expected.weight.data), name
        assert torch.equal(got.quant_state.absmax, expected.quant_state.absmax), name
        assert 0 < error < 0.15
        parent, _, child = name.rpartition(".")
        setattr(ours.get_submodule(parent), child, expected)
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in merged.modules())
    assert torch.equal(merged(ids).logits, ours(ids).logits)


def test_unmerge_restores_the_exact_bytes(quantized, ids):
    pm = peft_model(quantized)
    randomize(pm)
    layer = pm.base_model.model.model.layers[1].mlp.up_proj
    packed = layer.base_layer.weight.data.clone()
    before = pm(ids).logits
    pm.base_model.merge_adapter()
    assert not torch.equal(layer.base_layer.weight.data, packed)
    pm.base_model.unmerge_adapter()
    assert torch.equal(layer.base_layer.weight.data, packed)
    assert torch.equal(pm(ids).logits, before)


def test_save_and_reload_with_peft_model_from_pretrained(quantized, ids, tmp_path):
    pm = peft_model(quantized)
    randomize(pm)
    pm.save_pretrained(tmp_path / "adapter")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(quantized), tmp_path / "adapter")
    assert isinstance(again.base_model.model.model.layers[0].mlp.gate_proj, fourbit_peft.Linear4bit)
    assert torch.equal(again(ids).logits, pm(ids).logits)


def test_two_adapters_switch_and_disable(quantized, ids):
    pm = peft_model(quantized)
    randomize(pm, seed=2)
    pm.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    randomize(pm, seed=3)  # both adapters get values
    first = pm(ids).logits
    pm.set_adapter("second")
    second = pm(ids).logits
    with pm.disable_adapter():
        base = pm(ids).logits
    assert torch.equal(base, quantized(ids).logits)
    assert not torch.equal(first, second) and not torch.equal(second, base)
    pm.set_adapter("default")
    assert torch.equal(pm(ids).logits, first)


def test_dora_is_refused_with_a_clear_error(quantized):
    with pytest.raises(ValueError, match="not supported on a fourbit Linear4bit"):
        peft_model(quantized, use_dora=True)
