"""Files someone else hands you (issue 24): nothing fourbit reads runs code, and a damaged or foreign
input ends in one line naming the file and the tensor or field, exit status 2, nothing changed."""

from __future__ import annotations

import ast
import io
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
