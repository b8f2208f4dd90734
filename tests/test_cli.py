"""The `fourbit` command line: --help everywhere, finetune/generate on a tiny model, quantize -> transformers."""

from __future__ import annotations

import json

import pytest
import torch

from fourbit.cli import build_parser, main
from helpers import tiny_llama_dir

COMMANDS = ("demo", "finetune", "generate", "quantize", "report")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_llama_dir(str(tmp_path_factory.mktemp("tiny")))


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: fourbit " + command in capsys.readouterr().out


def test_finetune_flags_cover_every_config_field():
    import dataclasses

    from fourbit.train import TrainConfig

    args = build_parser().parse_args(["finetune"])
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= set(vars(args))


def test_finetune_then_generate(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["finetune", "--model", tiny, "--output-dir", str(run), "--steps", "2", "--batch-size", "2",
            "--eval-examples", "4", "--targets", "q_proj", "v_proj", "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "exact match on the eval set: before" in out and str(run) in out
    config = json.loads((run / "summary.json").read_text())["config"]
    assert config["targets"] == ["q_proj", "v_proj"] and config["steps"] == 2
    assert main(argv) == 2  # the run directory is taken
    assert "--resume" in capsys.readouterr().err
    assert main(["generate", "--adapter", str(run / "adapter"), "--max-new-tokens", "3", "Hello"]) == 0


def test_generate_applies_the_adapter_to_the_base_it_was_trained_on(tiny, tmp_path, monkeypatch):
    import fourbit.train.models as models

    run = tmp_path / "run"
    assert main(["finetune", "--model", tiny, "--output-dir", str(run), "--steps", "1", "--batch-size", "2",
                 "--eval-examples", "4", "--base-weights", "fp32", "--quiet"]) == 0
    loaded, real = [], models.load_base
    monkeypatch.setattr(models, "load_base", lambda spec, base_weights="nf4", **kw: loaded.append(base_weights) or real(spec, base_weights, **kw))
    for extra in ([], ["--base-weights", "nf4"]):
        assert main(["generate", "--adapter", str(run / "adapter"), "--max-new-tokens", "2", *extra, "Hello"]) == 0
    (run / "summary.json").unlink()  # an adapter outside a fourbit run: the NF4 base, as before
    assert main(["generate", "--adapter", str(run / "adapter"), "--max-new-tokens", "2", "Hello"]) == 0
    assert loaded == ["fp32", "nf4", "nf4"]


def test_bad_data_file_is_a_clear_error(tiny, tmp_path, capsys):
    assert main(["finetune", "--model", tiny, "--data", str(tmp_path / "none.jsonl"), "--output-dir", str(tmp_path / "r")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.bnb
def test_quantize_writes_what_transformers_and_bitsandbytes_load(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    from fourbit.train.models import load_quantized

    assert main(["quantize", tiny, str(tmp_path / "q4")]) == 0
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "q4"))
    assert type(theirs.model.layers[0].mlp.down_proj).__module__.startswith("bitsandbytes")
    ours, _, _ = load_quantized(tiny)
    theirs.train()  # bitsandbytes' CPU eval path repacks weights in place (SPEC 6); compare in train mode
    x = torch.randint(0, 1000, (2, 9))
    assert torch.equal(theirs(x).logits, ours(x).logits)
    assert main(["quantize", tiny, str(tmp_path / "q4")]) == 2  # exists; needs --overwrite
