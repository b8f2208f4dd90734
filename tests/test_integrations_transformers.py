"""transformers, unchanged except the config (fourbit.integrations.transformers): FourbitConfig in
from_pretrained quantizes layer by layer, loads and writes bitsandbytes' 4-bit checkpoints, sets the
flags Trainer / PEFT / TRL read; a Trainer + PEFT run equals the BitsAndBytesConfig run on real
bitsandbytes; use_for_bitsandbytes_config(); init_empty_weights construction; TRL's SFTTrainer."""

from __future__ import annotations

import copy
import json
import os
import weakref

import pytest
import torch
from torch import nn

from fourbit import dispatch
from fourbit.lora import Linear4bit, quantize_model
from helpers import tiny_llama, tiny_llama_dir

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402
from transformers.quantizers import auto as hf_auto  # noqa: E402

from fourbit import FourbitConfig  # noqa: E402
from fourbit.integrations import transformers as fourbit_hf  # noqa: E402

try:
    import bitsandbytes as bnb
except ImportError:
    bnb = None
needs_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes is in the test extra: pip install 'fourbit[test]'")

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FP32 = dict(compute_dtype=torch.float32)


def tiny_dense_dir(root) -> str:
    """helpers.tiny_llama (2 layers, 64 wide, vocab 96, untied lm_head) saved with save_pretrained."""
    path = os.path.join(root, "tiny")
    tiny_llama().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_dense_dir(tmp_path_factory.mktemp("tiny-hf"))


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))


def load(path, config=None, **kwargs):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config or FourbitConfig(**FP32), dtype=torch.float32, **kwargs)


def quantized_layers(model) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}


def same_bytes(a: nn.Module, b: nn.Module) -> bool:
    """Equal packed weights and quant-state entries, layer by layer (works for bitsandbytes' layers too)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


# ---- FourbitConfig in from_pretrained -----------------------------------------------------------------
def test_from_pretrained_builds_fourbit_layers_and_sets_the_flags(tiny, ids):
    model = load(tiny)
    layers = quantized_layers(model)
    assert len(layers) == 14 and all(n.rsplit(".", 1)[-1] in LINEAR for n in layers)
    assert type(model.lm_head) is nn.Linear  # transformers' default skip list, as for bitsandbytes
    assert model.is_loaded_in_4bit and model.is_quantized and model.quantization_method == "fourbit"
    assert isinstance(model.hf_quantizer, fourbit_hf.FourbitHfQuantizer) and model.hf_quantizer.is_trainable
    ours = quantize_model(AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32))
    assert same_bytes(model, ours)
    assert torch.equal(model(ids).logits, ours(ids).logits)


def test_quantizes_one_dense_weight_at_a_time(tiny, monkeypatch):
    """Peak memory bounded by one dense layer: when each weight is quantized, no dense weight handed
    to an earlier quantize call is still alive anywhere (the loader reads them one by one)."""
    seen: list[weakref.ref] = []
    alive_at_call: list[int] = []
    real = dispatch.quantize

    def counting(w, *args, **kwargs):
        alive_at_call.append(sum(r() is not None for r in seen))
        seen.append(weakref.ref(w))
        return real(w, *args, **kwargs)

    monkeypatch.setattr(dispatch, "quantize", counting)
    load(tiny)
    assert len(alive_at_call) == 14 and max(alive_at_call) == 0


def test_save_pretrained_writes_bitsandbytes_keys_and_config(tiny, ids, tmp_path):
    model = load(tiny)
    model.save_pretrained(tmp_path / "q4")
    stored = json.loads((tmp_path / "q4" / "config.json").read_text())["quantization_config"]
    assert stored["quant_method"] == "bitsandbytes" and stored["load_in_4bit"] and stored["bnb_4bit_quant_type"] == "nf4"
    import safetensors.torch

    keys = set(safetensors.torch.load_file(str(tmp_path / "q4" / "model.safetensors")))
    prefix = "model.layers.0.mlp.down_proj.weight"
    for suffix in ("", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4"):
        assert prefix + suffix in keys
    again = load(tmp_path / "q4")  # a stored bitsandbytes config, loaded through FourbitConfig
    assert len(quantized_layers(again)) == 14 and same_bytes(again, model)
    assert torch.equal(again(ids).logits, model(ids).logits)


@pytest.mark.bnb
@needs_bnb
def test_checkpoints_move_both_ways_with_transformers_plus_bitsandbytes(tiny, ids, tmp_path):
    theirs = load(tiny, BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                           bnb_4bit_compute_dtype=torch.float32)).train()  # train: no CPU repack
    assert isinstance(theirs.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    theirs.save_pretrained(tmp_path / "bnb")
    ours = load(tmp_path / "bnb")
    assert len(quantized_layers(ours)) == 14 and same_bytes(ours, theirs)
    assert torch.equal(ours(ids).logits, theirs(ids).logits)

    ours.save_pretrained(tmp_path / "fourbit")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "fourbit", dtype=torch.float32).train()
    assert isinstance(back.model.layers[1].self_attn.o_proj, bnb.nn.Linear4bit)
    assert torch.equal(back(ids).logits, ours(ids).logits)


def test_the_checkpoint_decides_the_format_the_config_the_compute_dtype(tiny, tmp_path):
    load(tiny, FourbitConfig(quant_type="fp4", double_quant=False)).save_pretrained(tmp_path / "fp4")
    model = load(tmp_path / "fp4", FourbitConfig(quant_type="nf4", compute_dtype=torch.bfloat16))
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.quant_type == "fp4" and not layer.double_quant and layer.compute_dtype == torch.bfloat16


def test_bf16_quant_storage_holds_the_same_bytes(tiny, ids):
    """quant_storage=bfloat16 (FSDP with a bf16 model) views the same packed bytes as bf16."""
    as_bf16, as_uint8 = load(tiny, FourbitConfig(quant_storage="bfloat16", **FP32)), load(tiny)
    a, b = as_bf16.model.layers[0].mlp.gate_proj.weight, as_uint8.model.layers[0].mlp.gate_proj.weight
    assert a.dtype == torch.bfloat16 and torch.equal(a.data.view(torch.uint8).reshape(-1), b.data.reshape(-1))
    assert torch.equal(as_bf16(ids).logits, as_uint8(ids).logits)


def test_init_empty_weights_then_load(tiny, ids):
    accelerate = pytest.importorskip("accelerate")
    config = transformers.AutoConfig.from_pretrained(tiny)
    with accelerate.init_empty_weights():
        skeleton = transformers.LlamaForCausalLM(config)
        fourbit_hf.replace_linear_layers(skeleton, FourbitConfig(**FP32), ["lm_head"])
    assert all(m.weight.is_meta for m in quantized_layers(skeleton).values())
    dense = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    skeleton.load_state_dict(dense.state_dict(), assign=True)
    skeleton.model.rotary_emb = dense.model.rotary_emb  # a non-persistent buffer, not in the state dict
    assert torch.equal(skeleton(ids).logits, load(tiny)(ids).logits)


def test_dequantize_returns_dense_linears(tiny, ids):
    model = load(tiny)
    expected = {n: m.dequantize(torch.float32) for n, m in quantized_layers(model).items()}
    model.dequantize()
    assert not quantized_layers(model) and not getattr(model, "is_quantized", False)
    for name, w in expected.items():
        assert type(model.get_submodule(name)) is nn.Linear and torch.equal(model.get_submodule(name).weight, w)


def test_use_for_bitsandbytes_config_runs_existing_code_on_fourbit(tiny, ids, monkeypatch):
    mapping = hf_auto.AUTO_QUANTIZER_MAPPING
    monkeypatch.setitem(mapping, "bitsandbytes_4bit", mapping["bitsandbytes_4bit"])  # restored afterwards
    fourbit_hf.use_for_bitsandbytes_config()
    model = load(tiny, BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.float32))
    assert len(quantized_layers(model)) == 14 and model.is_loaded_in_4bit
    assert torch.equal(model(ids).logits, load(tiny)(ids).logits)


def test_bad_configs_are_clear_errors():
    with pytest.raises(ValueError, match="quant_type"):
        FourbitConfig(quant_type="int4")
    with pytest.raises(ValueError, match="compute_dtype must be one of"):
        FourbitConfig(compute_dtype="int8")
    with pytest.raises(ValueError, match="blocksize"):
        FourbitConfig(blocksize=48)
    with pytest.raises(ValueError, match="unknown arguments"):
        FourbitConfig(quant_typ="nf4")
    with pytest.raises(ValueError, match="4-bit bitsandbytes configs only"):
        FourbitConfig.from_bitsandbytes(BitsAndBytesConfig(load_in_8bit=True))


# ---- Trainer + PEFT, against the same script on bitsandbytes -----------------------------------------
def train_three_steps(path, config, out):
    """The research script: from_pretrained -> prepare_model_for_kbit_training -> get_peft_model ->
    transformers Trainer, 3 steps. Returns (peft model, losses)."""
    model = load(path, config)
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    torch.manual_seed(0)
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    rows = torch.randint(0, 96, (6, 12), generator=torch.Generator().manual_seed(3))
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2, logging_steps=1,
        report_to=[], save_strategy="no", use_cpu=True, seed=0, lr_scheduler_type="constant", disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in rows])
    trainer.train()
    return model, [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.bnb
@needs_bnb
def test_trainer_with_peft_matches_bitsandbytes_and_the_adapter_reloads(tiny, ids, tmp_path):
    ours, losses = train_three_steps(tiny, FourbitConfig(**FP32), tmp_path / "ours")
    assert isinstance(ours.base_model.model.model.layers[0].mlp.up_proj.base_layer, Linear4bit)
    _, theirs = train_three_steps(tiny, BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32),
                                  tmp_path / "theirs")
    assert len(losses) == len(theirs) == 3 and losses[-1] != losses[0]
    assert all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(losses, theirs)), (losses, theirs)

    ours.save_pretrained(tmp_path / "adapter")
    again = peft.PeftModel.from_pretrained(load(tiny), tmp_path / "adapter")
    assert torch.equal(again(ids).logits, ours(ids).logits)


def word_tokenizer():
    """A 96-word tokenizer ("<pad>", "<eos>", "<unk>", "w3" ... "w95") for the tiny model's vocabulary."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, 96)}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def test_sft_trainer_trains_and_saves_the_adapter(tiny, tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    model = load(tiny)
    rows = torch.randint(3, 96, (8, 12), generator=torch.Generator().manual_seed(4)).tolist()
    train = datasets.Dataset.from_dict({"text": [" ".join(f"w{i}" for i in row) for row in rows]})
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, bf16=False,
    )
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=train, processing_class=word_tokenizer(),
                             peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    inner = trainer.model.base_model.model
    assert isinstance(inner.model.layers[0].self_attn.q_proj.base_layer, Linear4bit)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == [1, 2]
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if n in before)
    trainer.save_model(str(tmp_path / "adapter"))
    files = set(os.listdir(tmp_path / "adapter"))
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files and "model.safetensors" not in files
    again = peft.PeftModel.from_pretrained(load(tiny), tmp_path / "adapter")
    for p in trainer.model.parameters():  # TRL keeps QLoRA adapters in bf16; PEFT reloads them as fp32
        p.data = p.data.float() if p.dtype == torch.bfloat16 else p.data
    x = torch.tensor(rows[:2])
    assert torch.equal(again(x).logits, trainer.model(x).logits)


# ---- fourbit's own loader and CLI on a 4-bit directory ------------------------------------------------
@pytest.fixture(scope="module")
def tiny_with_tokenizer(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny-tok"))


@pytest.fixture(scope="module")
def quantized_dir(tiny_with_tokenizer, tmp_path_factory):
    from fourbit.cli import main

    out = tmp_path_factory.mktemp("q4") / "q4"
    assert main(["quantize", tiny_with_tokenizer, str(out)]) == 0
    return str(out)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """Twelve prompt/response records (tokenizing the whole date task would take longer than training)."""
    path = tmp_path_factory.mktemp("data") / "data.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Add {i} and {i + 1}.", "response": str(2 * i + 1)}) + "\n" for i in range(12)))
    return str(path)


def first_step(model_path, data, out):
    """fourbit's training loop, first step: (model, LoRA gradients captured before the optimizer, loss)."""
    from fourbit.train import TrainConfig, Trainer

    config = TrainConfig(model=model_path, data=data, output_dir=str(out), steps=1, batch_size=2, eval_examples=1, max_length=64, lr=1e-2)
    trainer = Trainer(config, progress=False)
    grads, step = {}, trainer.optimizer.step

    def capture(*args, **kwargs):
        grads.update({i: p.grad.clone() for i, p in enumerate(trainer.params)})
        return step(*args, **kwargs)

    trainer.optimizer.step = capture
    loss = trainer.train_step()["loss"]
    return trainer.model, grads, loss


def test_finetune_on_a_quantize_output_trains_like_the_dense_model(tiny_with_tokenizer, quantized_dir, records, tmp_path):
    from fourbit.cli import main

    model, grads, loss = first_step(quantized_dir, records, tmp_path / "q4-run")
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 14 and not any(type(m).__module__.startswith("bitsandbytes") for m in model.modules())
    _, dense_grads, dense_loss = first_step(tiny_with_tokenizer, records, tmp_path / "dense-run")
    assert loss == dense_loss and grads.keys() == dense_grads.keys()
    assert all(torch.equal(grads[k], dense_grads[k]) for k in grads)

    argv = ["finetune", "--model", quantized_dir, "--data", records, "--output-dir", str(tmp_path / "cli"), "--steps", "1",
            "--batch-size", "2", "--eval-examples", "1", "--max-length", "64", "--quiet"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows if "loss" in r] == [dense_loss]


@pytest.mark.slow
def test_load_quantized_never_imports_bitsandbytes(quantized_dir):
    """With bitsandbytes hidden from the import system, a 4-bit directory still loads into fourbit's
    layers, and a transformers Trainer step with PEFT runs (transformers' own parameter count would
    import bitsandbytes for a 4-bit model)."""
    import subprocess
    import sys

    code = f"""
import importlib.machinery as m, sys
find = m.PathFinder.find_spec
m.PathFinder.find_spec = staticmethod(lambda name, path=None, target=None:
    None if name.split(".")[0] == "bitsandbytes" else find(name, path, target))
import torch, transformers, peft
from fourbit.lora import Linear4bit
from fourbit.train.models import load_quantized
model, tok, _ = load_quantized({quantized_dir!r})
assert sum(isinstance(m, Linear4bit) for m in model.modules()) == 14
model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules="all-linear"))
rows = torch.randint(0, 1000, (2, 8))
args = transformers.TrainingArguments(output_dir={str(quantized_dir) + "-trainer"!r}, max_steps=1, report_to=[],
    save_strategy="no", use_cpu=True, disable_tqdm=True, per_device_train_batch_size=2)
transformers.Trainer(model=model, args=args, train_dataset=[{{"input_ids": r, "labels": r}} for r in rows]).train()
print("bitsandbytes" in sys.modules)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert child.returncode == 0, child.stderr[-3000:]
    assert child.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.slow
def test_smollm2_through_fourbitconfig():
    """The real model (SmolLM2-135M): 210 quantized layers, the tied lm_head left dense, and a
    sample of layers holding exactly the bytes of quantizing the checkpoint's weight directly."""
    import safetensors

    from fourbit.train.models import smollm2_dir

    path = smollm2_dir()
    model = load(path)
    layers = quantized_layers(model)
    assert len(layers) == 210 and model.lm_head.weight is model.model.embed_tokens.weight
    with safetensors.safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        for name in ("model.layers.0.self_attn.q_proj", "model.layers.14.mlp.down_proj", "model.layers.29.self_attn.v_proj"):
            packed, state = dispatch.quantize(f.get_tensor(name + ".weight").float(), blocksize=64, quant_type="nf4", double_quant=True)
            assert torch.equal(layers[name].weight.data, packed) and torch.equal(layers[name].quant_state.absmax, state.absmax)
