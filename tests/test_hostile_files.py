"""Files someone else hands you (issue 24): nothing fourbit reads runs code, and a damaged or foreign
input ends in one line naming the file and the tensor or field, exit status 2, nothing changed."""

from __future__ import annotations

import ast
import errno
import io
import json
import os
import shutil

import pytest
import torch

from fourbit.cli import main

from helpers import FINISHED_ARGS, finished_run, run_cli, tiny_llama_dir, tree_hashes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_llama_dir(str(tmp_path_factory.getbasetemp() / "shared"))


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    return finished_run(tiny, str(tmp_path_factory.getbasetemp() / "shared"))


# ---- 0. no code from a file ---------------------------------------------------------------------------------
def _unsafe_loads(source: str) -> list[tuple[int, str]]:
    """(line, call) of every deserialization that can run code: torch.load without weights_only=True,
    pickle/dill/joblib/marshal loads, numpy loads with allow_pickle=True, yaml.load without SafeLoader."""

    def name(node) -> str:
        return f"{name(node.value)}.{node.attr}" if isinstance(node, ast.Attribute) else getattr(node, "id", "?")

    def kw(call, key):
        return next((k.value for k in call.keywords if k.arg == key), None)

    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        called = name(node.func)
        safe_flag = kw(node, "weights_only")
        if called.endswith("torch.load") or called == "torch.serialization.load":
            if not (isinstance(safe_flag, ast.Constant) and safe_flag.value is True):
                found.append((node.lineno, called))
        elif called.split(".")[0] in ("pickle", "cPickle", "dill", "joblib", "marshal", "shelve") and (
            "load" in called or "Unpickler" in called or called.endswith("open")
        ):
            found.append((node.lineno, called))
        elif called in ("np.load", "numpy.load"):
            flag = kw(node, "allow_pickle")
            if not (flag is None or (isinstance(flag, ast.Constant) and flag.value is False)):
                found.append((node.lineno, called))
        elif called == "yaml.load" and "Safe" not in ast.unparse(kw(node, "Loader") or ast.Constant(None)):
            found.append((node.lineno, called))
    return found


def test_the_scan_finds_what_it_looks_for():
    bad = "import torch, pickle\ntorch.load(p)\ntorch.load(p, weights_only=False)\npickle.load(f)\nnp.load(p, allow_pickle=True)\n"
    assert [line for line, _ in _unsafe_loads(bad)] == [2, 3, 4, 5]
    assert _unsafe_loads("torch.load(p, weights_only=True)\nnp.load(p)\nsafetensors.torch.load_file(p)\n") == []


def test_no_unsafe_deserialization_in_the_library_or_benchmarks():
    hits = []
    for top in ("fourbit", "benchmarks"):
        for base, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(base, f)
                    hits += [f"{os.path.relpath(path, ROOT)}:{line}: {call}" for line, call in _unsafe_loads(open(path).read())]
    assert hits == [], "deserialization that can run code:\n" + "\n".join(hits)


class _Payload:
    """Unpickling this runs `touch <sentinel>`: what a hostile checkpoint would do."""

    def __init__(self, sentinel: str):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def _plant(path: str, sentinel: str) -> None:
    """Replace a torch file with one of the same shape whose unpickling runs the payload."""
    saved = torch.load(path, weights_only=True)
    saved = {**saved, "planted": _Payload(sentinel)}
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    with open(path, "wb") as f:
        f.write(buffer.getvalue())


@pytest.mark.parametrize("name", ["rng.pt", "optimizer.pt"])
def test_a_resume_never_runs_code_from_a_checkpoint(name, tiny, finished, tmp_path, capsys):
    """Every torch file a resume reads (the others are JSON and safetensors, which hold no code)."""
    run, sentinel = str(tmp_path / "run"), str(tmp_path / "payload-ran")
    shutil.copytree(finished, run)
    _plant(os.path.join(run, "checkpoint", name), sentinel)
    before = tree_hashes(run)
    rc, err = run_cli(capsys, ["finetune", "--model", tiny, "--output-dir", run, *FINISHED_ARGS, "--resume"])
    assert not os.path.exists(sentinel)  # the payload never ran
    assert rc == 2 and f"checkpoint/{name} holds a Python object (posix.system)" in err, err
    assert tree_hashes(run) == before


def test_a_model_directory_never_runs_code(tiny, tmp_path, capsys):
    """A model directory whose weights are a pickle (pytorch_model.bin) with a payload in it."""
    model, sentinel = str(tmp_path / "model"), str(tmp_path / "payload-ran")
    shutil.copytree(tiny, model)
    from safetensors.torch import load_file

    weights = load_file(os.path.join(model, "model.safetensors"))
    os.unlink(os.path.join(model, "model.safetensors"))
    torch.save({**weights, "planted": _Payload(sentinel)}, os.path.join(model, "pytorch_model.bin"))
    for argv in (["finetune", "--model", model, "--output-dir", str(tmp_path / "run")], ["quantize", model, str(tmp_path / "q4")]):
        rc, err = run_cli(capsys, argv)
        assert not os.path.exists(sentinel)
        assert rc == 2 and "pytorch_model.bin" in err, err
    assert sorted(os.listdir(tmp_path)) == ["model"]


# ---- shared inputs ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def q4(tiny, tmp_path_factory):
    """The tiny Llama as `fourbit quantize` writes it."""
    out = str(tmp_path_factory.mktemp("q4") / "q4")
    assert main(["quantize", tiny, out]) == 0
    return out


@pytest.fixture(scope="module")
def gpt2(tiny, tmp_path_factory):
    """A tiny GPT-2: its projections are transformers Conv1D, not nn.Linear."""
    import transformers

    path = str(tmp_path_factory.mktemp("gpt2") / "gpt2")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny)
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=128, vocab_size=len(tokenizer),
                                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _one_line(capsys, argv, *words) -> str:
    """Run the CLI; it must fail with the one-line error holding every word."""
    rc, err = run_cli(capsys, argv)
    assert rc == 2, err
    line = next(line for line in err.splitlines() if "error:" in line)
    assert all(w in line for w in words), line
    assert line.count(" — ") == 1, line  # what, then how to fix, once
    return line


SHORT = ["--steps", "1", "--batch-size", "2", "--eval-examples", "4", "--targets", "q_proj", "--quiet"]


# ---- 7. silently wrong ------------------------------------------------------------------------------------------
def test_quantize_and_finetune_refuse_a_conv1d_model(gpt2, tmp_path, capsys):
    _one_line(capsys, ["quantize", gpt2, str(tmp_path / "q4")], "gpt2 model whose 4 projection layers (transformer.h.0.attn.c_attn, ...) are transformers Conv1D", "Conv1D")
    _one_line(capsys, ["finetune", "--model", gpt2, "--output-dir", str(tmp_path / "run"), *SHORT], "are transformers Conv1D")
    assert os.listdir(tmp_path) == []


def test_linear4bit_refuses_integer_input_as_nn_linear_does():
    from torch import nn

    from fourbit.lora import Linear4bit

    dense = nn.Linear(64, 32)
    x = torch.randint(0, 5, (3, 64))
    with pytest.raises(RuntimeError):
        dense(x)
    for compute_dtype in (torch.float32, None):  # with a compute dtype, the input used to be cast, the output truncated
        layer = Linear4bit.from_linear(dense, compute_dtype=compute_dtype)
        with pytest.raises(TypeError, match="floating-point input, got torch.int64"):
            layer(x)


# ---- 8. eval records obey --max-length -----------------------------------------------------------------------
@pytest.mark.parametrize("seed", [1, 0])
def test_a_huge_record_is_refused_in_either_split(seed, tiny, tmp_path, capsys):
    """21 records, 2 of them the eval split: seed 1 puts the huge one in eval, seed 0 in training.
    The outcome is one refusal either way (it used to be a terabyte allocation for the eval one)."""
    records = [{"prompt": f"Say {i}.", "response": str(i)} for i in range(20)]
    records.insert(7, {"prompt": "word " * 4000, "response": "x"})
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    assert (7 in order[:2]) == (seed == 1)  # where the huge record lands
    _one_line(capsys, ["finetune", "--model", tiny, "--data", str(data), "--output-dir", str(tmp_path / "run"), *SHORT,
                       "--seed", str(seed)], "max_length=96 leaves no answer tokens for prompt 'word word")
    assert sorted(os.listdir(tmp_path)) == ["data.jsonl"]


# ---- 9. damaged or foreign inputs: one line naming the file and the tensor or field ----------------------------
def test_a_model_directory_without_weights_or_with_a_damaged_config(tiny, tmp_path, capsys):
    model = str(tmp_path / "model")
    shutil.copytree(tiny, model)
    os.unlink(os.path.join(model, "model.safetensors"))
    for command in (["finetune", "--model", model, "--output-dir", str(tmp_path / "run")], ["quantize", model, str(tmp_path / "q4")]):
        _one_line(capsys, command, f"{model!r} holds config.json but no weights (model.safetensors or pytorch_model.bin)")
    shutil.copy(os.path.join(tiny, "model.safetensors"), model)
    with open(os.path.join(model, "config.json"), "w") as f:
        f.write('{"model_type": "llama",')
    _one_line(capsys, ["finetune", "--model", model, "--output-dir", str(tmp_path / "run")], "config.json is not valid JSON")
    with open(os.path.join(model, "config.json"), "w") as f:
        json.dump({"model_type": "llama", "quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}}, f)
    _one_line(capsys, ["finetune", "--model", model, "--output-dir", str(tmp_path / "run")],
              "config.json: quantization_config says this is a 8-bit bitsandbytes checkpoint")
    assert os.listdir(tmp_path) == ["model"]


def test_a_non_llama_architecture_in_finetune(gpt2, tmp_path, capsys):
    _one_line(capsys, ["finetune", "--model", gpt2, "--base-weights", "fp32", "--output-dir", str(tmp_path / "run"), *SHORT],
              f"--model {gpt2}: target_modules ['q_proj'] match no module")


KEY = "model.layers.0.self_attn.q_proj.weight.absmax"


@pytest.mark.parametrize("damage,words", [
    ("halved", f"{KEY}: expected shape (64,), got (32,)"),
    ("f16", f"{KEY}: expected dtype torch.uint8, got torch.float16"),
    ("i32", f"{KEY}: expected dtype torch.uint8, got torch.int32"),
    ("f32", f"{KEY}: expected dtype torch.uint8, got torch.float32"),
    ("truncated", "model.safetensors is not a readable safetensors file"),
])
def test_damaged_4bit_tensors_are_named(damage, words, q4, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    model = str(tmp_path / "q4")
    shutil.copytree(q4, model)
    path = os.path.join(model, "model.safetensors")
    if damage == "truncated":
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) * 2 // 3])
    else:
        tensors = load_file(path)
        t = tensors[KEY]
        tensors[KEY] = t[: t.numel() // 2] if damage == "halved" else t.to({"f16": torch.float16, "i32": torch.int32, "f32": torch.float32}[damage])
        save_file(tensors, path, metadata={"format": "pt"})
    line = _one_line(capsys, ["finetune", "--model", model, "--output-dir", str(tmp_path / "run"), *SHORT], words)
    assert path in line


def _small_gguf(path: str) -> int:
    """A small Llama GGUF file (SmolLM2's takes 12 s to parse); returns where its tensor data starts."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(64)
    writer.add_block_count(1)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tensor("token_embd.weight", np.random.default_rng(0).standard_normal((96, 64), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf.GGUFReader(path).data_offset


@pytest.mark.parametrize("where", ["header", "metadata", "tensor data"])
def test_a_truncated_gguf_file(where, tmp_path, capsys):
    whole, path = str(tmp_path / "whole.gguf"), str(tmp_path / "cut.gguf")
    start = _small_gguf(whole)
    keep = {"header": 12, "metadata": start - 40, "tensor data": start + 1000}[where]
    with open(whole, "rb") as f, open(path, "wb") as g:
        g.write(f.read(keep))
    _one_line(capsys, ["finetune", "--model", path, "--output-dir", str(tmp_path / "run")], f"{path} cannot be read as a GGUF model")


def test_a_chat_template_that_refuses_a_role(tiny, tmp_path, capsys):
    from transformers import AutoTokenizer

    model = str(tmp_path / "model")
    shutil.copytree(tiny, model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
                               "{{ raise_exception('only user and assistant roles') }}{% endif %}{{ m['content'] }}{% endfor %}")
    tokenizer.save_pretrained(model)
    record = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello"}]}
    data = tmp_path / "chat.jsonl"
    data.write_text((json.dumps(record) + "\n") * 24)
    _one_line(capsys, ["finetune", "--model", model, "--data", str(data), "--output-dir", str(tmp_path / "run"), *SHORT],
              f"the chat template of {model} refused messages with roles ['system', 'user'] (only user and assistant roles)")


def test_a_read_only_home_with_the_default_model(tmp_path, capsys, monkeypatch):
    home = str(tmp_path / "home")
    os.makedirs(home)
    for name in ("FOURBIT_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", home)
    real_mkdir = os.mkdir

    def read_only_home(path, *args, **kwargs):
        if os.fspath(path).startswith(home):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only_home)
    _one_line(capsys, ["finetune", "--output-dir", str(tmp_path / "run"), *SHORT],
              f"cannot write {home}/.cache/fourbit: read-only file system", "set FOURBIT_CACHE")
    assert sorted(os.listdir(tmp_path)) == ["home"]


def test_an_adapter_whose_base_is_a_list(finished, tmp_path, capsys):
    adapter = str(tmp_path / "adapter")
    shutil.copytree(os.path.join(finished, "adapter"), adapter)
    path = os.path.join(adapter, "adapter_config.json")
    config = json.load(open(path))
    json.dump({**config, "base_model_name_or_path": ["a", "b"]}, open(path, "w"))
    _one_line(capsys, ["generate", "--adapter", adapter, "hi"], f"{path}: base_model_name_or_path is a JSON list, not a string")


# ---- 10. unclear messages --------------------------------------------------------------------------------------
def test_a_failed_checkpoint_write_says_its_fix_once(tiny, tmp_path, capsys, monkeypatch):
    from fourbit.errors import output_error
    from fourbit.train import checkpoint

    def full(path, data):
        raise output_error(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))

    monkeypatch.setattr(checkpoint, "write_torch", full)  # the checkpoint's optimizer.pt, inside .checkpoint-new/
    _one_line(capsys, ["finetune", "--model", tiny, "--output-dir", str(tmp_path / "run"), *SHORT],
              "optimizer.pt: disk full (No space left on device) — free space on that disk, or write somewhere else")


@pytest.mark.parametrize("data,words", [("{tmp}", "is a directory"), ("/dev/null", "is not a regular file")])
def test_data_that_is_not_a_file(data, words, tiny, tmp_path, capsys):
    _one_line(capsys, ["finetune", "--model", tiny, "--data", data.format(tmp=tmp_path), "--output-dir", str(tmp_path / "new" / "run")],
              words)
    assert os.listdir(tmp_path) == []  # a refused run leaves no (empty) output directory behind


def test_a_paged_optimizer_step_on_a_meta_parameter():
    from fourbit.errors import InvalidInput
    from fourbit.optim import PagedAdamW

    p = torch.nn.Parameter(torch.zeros(4, 4, device="meta"))
    p.grad = torch.zeros(4, 4, device="meta")
    with pytest.raises(InvalidInput, match=r"shape \(4, 4\) is on the meta device"):
        PagedAdamW([p]).step()
