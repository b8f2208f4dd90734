"""docs/ecosystem.md's transformers, PEFT and TRL blocks, run as written on a tiny Llama (`path` and
`dataset` are the only names the test provides)."""

from __future__ import annotations

import os
import re

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

PAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "ecosystem.md")


def page_blocks() -> dict[str, list[str]]:
    """Section title -> its ```python blocks, on the page above."""
    text = open(PAGE).read()
    blocks: dict[str, list[str]] = {}
    for part in re.split(r"\n## ", text)[1:]:
        title, _, body = part.partition("\n")
        blocks[title.strip()] = re.findall(r"```python\n(.*?)```", body, flags=re.S)
    return blocks


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    from helpers import tiny_llama_dir

    return tiny_llama_dir(tmp_path_factory.mktemp("readme"))


def test_the_section_has_the_blocks_this_test_runs():
    blocks = page_blocks()
    assert [len(blocks.get(k, [])) for k in ("transformers", "PEFT", "TRL")] == [2, 1, 1]


def test_transformers_and_peft_blocks(path, tmp_path, monkeypatch):
    from fourbit.lora import Linear4bit

    monkeypatch.chdir(tmp_path)
    blocks = page_blocks()
    ns = {"path": path}
    exec(blocks["transformers"][0], ns)
    assert ns["model"].is_loaded_in_4bit and (tmp_path / "model-4bit" / "model.safetensors").exists()
    exec(blocks["PEFT"][0], ns)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    layers = [m for m in ns["merged"].modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 14 and all(m.compute_dtype == torch.bfloat16 for m in layers)


def test_use_for_bitsandbytes_config_block(path, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.quantizers import auto as hf_auto

    from fourbit.lora import Linear4bit

    monkeypatch.setitem(hf_auto.AUTO_QUANTIZER_MAPPING, "bitsandbytes_4bit", hf_auto.AUTO_QUANTIZER_MAPPING["bitsandbytes_4bit"])
    exec(page_blocks()["transformers"][1], {})
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    assert isinstance(model.model.layers[0].mlp.up_proj, Linear4bit)


def test_trl_block(path, tmp_path, monkeypatch):
    import functools

    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    monkeypatch.chdir(tmp_path)
    # this machine's part, not the page's: the CPU (TrainingArguments refuses bf16 on a CPU
    # without use_cpu) and a one-step run
    monkeypatch.setattr(trl, "SFTConfig", functools.partial(trl.SFTConfig, use_cpu=True, max_steps=1, report_to=[]))
    blocks = page_blocks()
    ns = {"path": path, "dataset": datasets.Dataset.from_dict({"text": ["one two three", "four five six"]})}
    exec(blocks["transformers"][0], ns)
    exec("from peft import LoraConfig\n" + blocks["TRL"][0], ns)
    assert ns["trainer"].state.global_step > 0
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(os.listdir(tmp_path / "adapter"))
