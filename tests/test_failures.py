"""Nothing lost, nothing silently wrong (issue 15): every bad input the CLI can meet ends in one line
`fourbit <command>: error: <what> — <how to fix>`, a non-zero exit and no change to any file that
was there before; kills, full disks and divergence keep the last good state."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import safetensors
import safetensors.torch
import torch

from fourbit import nf4
from fourbit.cli import main
from fourbit.errors import BadFile, Diverged, InvalidInput, OutputError, UserError
from fourbit.train import Trainer
from fourbit.train import rundir

from helpers import FINISHED_ARGS, finished_run
from test_train import small, tiny_llama_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_ARGS = FINISHED_ARGS


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_llama_dir(str(tmp_path_factory.getbasetemp() / "shared"))


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    """A completed 2-step run of the tiny model (adapter, checkpoint, metrics, summary), shared with
    the other modules that need one (helpers.finished_run)."""
    return finished_run(tiny, str(tmp_path_factory.getbasetemp() / "shared"))


def _hashes(root) -> dict[str, str]:
    out = {}
    for base, _, files in os.walk(root):
        for name in files:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _truncate(path, keep=0.5):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: int(len(data) * keep)])


def _no_cuda_env(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")


def _no_torchrun_env(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)


def _full_disk_for_writes(monkeypatch):
    """Every file opened for writing by Python fails its writes with ENOSPC, as on a full disk
    (the directory entries themselves can still be created, as on a real full disk)."""
    import builtins

    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def full_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return Full(f) if any(c in mode for c in "wa+") and isinstance(file, (str, os.PathLike)) else f

    monkeypatch.setattr(builtins, "open", full_open)


def _full_disk_for_safetensors(monkeypatch):
    """safetensors' Rust writer, which bypasses Python's open, with its own words for ENOSPC."""
    import safetensors.torch

    def full(*args, **kwargs):
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)


# (name, argv with {tiny} {run} {tmp} placeholders, words the error line must contain, setup(tmp, run, monkeypatch))
CASES = [
    ("overwrite with a data typo", ["finetune", "--model", "{tiny}", "--output-dir", "{run}", "--data", "{tmp}/typo.jsonl", "--overwrite"],
     "does not exist", None),
    ("overwrite with a missing model", ["finetune", "--model", "{tmp}/nomodel", "--output-dir", "{run}", "--overwrite"], "neither", None),
    ("lr inf", ["finetune", "--output-dir", "{run}", "--lr", "inf"], "--lr: 'inf' is not a finite number", None),
    ("lr nan", ["finetune", "--output-dir", "{run}", "--lr", "nan"], "--lr: 'nan' is not a finite", None),
    ("alpha inf", ["finetune", "--output-dir", "{run}", "--alpha", "inf"], "--alpha: 'inf' is not a finite", None),
    ("epochs inf", ["finetune", "--output-dir", "{run}", "--steps", "0", "--epochs", "inf"], "--epochs: 'inf'", None),
    ("lr not a number", ["finetune", "--output-dir", "{run}", "--lr", "fast"], "invalid float value: 'fast'", None),
    ("r zero", ["finetune", "--output-dir", "{run}", "--r", "0"], "r must be a positive integer", None),
    ("run exists", ["finetune", "--model", "{tiny}", "--output-dir", "{run}"], "already holds a run", None),
    ("resume and overwrite", ["finetune", "--output-dir", "{run}", "--resume", "--overwrite"], "exclude each other", None),
    ("resume without a checkpoint", ["finetune", "--output-dir", "{tmp}/fresh", "--resume"], "no checkpoint", None),
    ("resume with another r", ["finetune", "--model", "{tiny}", "--output-dir", "{run}", *RUN_ARGS, "--resume", "--r", "4"],
     "different config (fields ['r']): r: saved 16, now 4", None),
    ("resume with other targets", ["finetune", "--model", "{tiny}", "--output-dir", "{run}", *RUN_ARGS, "--resume", "--targets", "q_proj"],
     "fields ['targets']", None),
    ("resume with another model", ["finetune", "--model", "smollm2", "--output-dir", "{run}", *RUN_ARGS, "--resume"], "fields ['model']", None),
    ("resume, corrupt adapter", ["finetune", "--model", "{tiny}", "--output-dir", "{run}", *RUN_ARGS, "--resume"],
     "checkpoint/adapter/adapter_model.safetensors is not a readable safetensors file",
     lambda tmp, run, mp: _truncate(os.path.join(run, "checkpoint", "adapter", "adapter_model.safetensors"), 0.3)),
    ("resume, truncated optimizer.pt", ["finetune", "--model", "{tiny}", "--output-dir", "{run}", *RUN_ARGS, "--resume"],
     "checkpoint/optimizer.pt is truncated or damaged", lambda tmp, run, mp: _truncate(os.path.join(run, "checkpoint", "optimizer.pt"))),
    ("resume, truncated rng.pt", ["finetune", "--model", "{tiny}", "--output-dir", "{run}", *RUN_ARGS, "--resume"],
     "checkpoint/rng.pt is truncated or damaged", lambda tmp, run, mp: _truncate(os.path.join(run, "checkpoint", "rng.pt"))),
    ("resume, truncated trainer_state.json", ["finetune", "--model", "{tiny}", "--output-dir", "{run}", *RUN_ARGS, "--resume"],
     "checkpoint/trainer_state.json is truncated or damaged",
     lambda tmp, run, mp: _truncate(os.path.join(run, "checkpoint", "trainer_state.json"))),
    ("output dir is a file", ["finetune", "--model", "{tiny}", "--output-dir", "{run}/metrics.jsonl"], "is a file, not a directory", None),
    ("output dir under a file", ["finetune", "--model", "{tiny}", "--output-dir", "{run}/summary.json/run"], "is a file, not a directory", None),
    ("disk full", ["finetune", "--model", "{tiny}", "--output-dir", "{tmp}/new"], "disk full",
     lambda tmp, run, mp: _full_disk_for_writes(mp)),
    ("device cuda without CUDA", ["finetune", "--model", "{tiny}", "--output-dir", "{tmp}/new", "--device", "cuda"],
     "CUDA is not available", lambda tmp, run, mp: _no_cuda_env(mp)),
    ("distributed without torchrun", ["finetune", "--model", "{tiny}", "--output-dir", "{tmp}/new", "--distributed", "ddp"],
     "needs the torchrun environment", lambda tmp, run, mp: _no_torchrun_env(mp)),
    ("diverged with overwrite", ["finetune", "--model", "{tiny}", "--output-dir", "{run}", "--overwrite", *RUN_ARGS, "--lr", "1e30"],
     "training diverged at step 1: a LoRA weight reached magnitude", None),
    ("generate, adapter is a file", ["generate", "--adapter", "{run}/adapter/adapter_model.safetensors", "hi"], "is a file", None),
    ("generate, adapter missing", ["generate", "--adapter", "{tmp}/nothing", "hi"], "adapter_config.json not found", None),
    ("generate, empty adapter", ["generate", "--adapter", "{run}/adapter", "--model", "{tiny}", "hi"],
     "adapter_model.safetensors is not a readable safetensors file",
     lambda tmp, run, mp: open(os.path.join(run, "adapter", "adapter_model.safetensors"), "wb").close()),
    ("generate, damaged adapter config", ["generate", "--adapter", "{run}/adapter", "hi"], "adapter_config.json is not valid JSON",
     lambda tmp, run, mp: _truncate(os.path.join(run, "adapter", "adapter_config.json"))),
    ("quantize onto its input", ["quantize", "{tmp}/model", "{tmp}/model", "--overwrite"], "is the input", None),
    ("quantize into its input", ["quantize", "{tmp}/model", "{tmp}/model/q4", "--overwrite"], "is inside the input", None),
    ("quantize around its input", ["quantize", "{tmp}/model", "{tmp}", "--overwrite"], "contains the input", None),
    ("quantize, output exists", ["quantize", "{tmp}/model", "{run}"], "exists — pass --overwrite", None),
    ("quantize, output under a file", ["quantize", "{tmp}/model", "{run}/summary.json/q4"], "is a file, not a directory", None),
    ("quantize, disk full", ["quantize", "{tmp}/model", "{tmp}/q4"], "disk full", lambda tmp, run, mp: _full_disk_for_safetensors(mp)),
    ("quantize, missing input", ["quantize", "{tmp}/nomodel", "{tmp}/q4"], "neither", None),
]


@pytest.mark.parametrize("name,argv,words,setup", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(name, argv, words, setup, tiny, finished, tmp_path, monkeypatch, capsys):
    run = str(tmp_path / "run")
    shutil.copytree(finished, run)
    shutil.copytree(tiny, str(tmp_path / "model"))
    if setup is not None:
        setup(str(tmp_path), run, monkeypatch)
    before = _hashes(tmp_path)
    capsys.readouterr()
    try:
        rc = main([a.format(tiny=tiny, run=run, tmp=str(tmp_path)) for a in argv])
    except SystemExit as exit_info:  # argparse's errors exit from inside parsing
        rc = exit_info.code
    monkeypatch.undo()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert rc != 0 and len(lines) == 1, err
    assert lines[0].startswith(f"fourbit {argv[0]}: error: ") and " — " in lines[0], lines[0]
    assert words in lines[0], lines[0]
    assert "Traceback" not in err
    assert _hashes(tmp_path) == before  # nothing that was there changed, nothing new left behind


def test_subprocess_errors_are_one_line_without_traceback(tmp_path):
    """The real process: stderr is the one line, exit status 2; --debug shows the traceback."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "fourbit.cli", "generate", "--adapter", str(tmp_path / "missing"), "hi"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("fourbit generate: error: ") and "adapter_config.json not found" in done.stderr
    debug = subprocess.run(cmd + ["--debug"], capture_output=True, text=True, env=env, timeout=120)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "MissingFile" in debug.stderr


# ---- 1. --overwrite never loses the old run -------------------------------------------------------------
def test_overwrite_restores_the_old_run_when_the_new_one_fails(tiny, finished, tmp_path, monkeypatch):
    run = str(tmp_path / "run")
    shutil.copytree(finished, run)
    before = _hashes(run)
    t = Trainer(small(tiny, run, steps=2, batch_size=2, eval_examples=4), overwrite=True, progress=False)
    held = _hashes(run)
    assert held.pop(rundir.LOCK) and held == before  # constructing locks, validates and loads; nothing moves yet

    def crash(self):
        assert not os.path.exists(os.path.join(run, "summary.json"))  # the old run is aside now
        raise RuntimeError("simulated crash in step 1")

    monkeypatch.setattr(Trainer, "train_step", crash)
    with pytest.raises(RuntimeError, match="simulated"):
        t.train()
    assert _hashes(run) == before
    monkeypatch.undo()

    # a kill -9 in the same window leaves .replaced/; the next start puts it back
    rundir.RunDir(run).begin(replacing=True)  # the old run set aside, as a killed --overwrite left it
    open(os.path.join(run, "metrics.jsonl"), "w").write('{"step": 1}\n')  # what the killed run wrote
    with pytest.raises(UserError, match="already holds a run"):
        Trainer(small(tiny, run, steps=2, batch_size=2, eval_examples=4), progress=False)
    assert _hashes(run) == before

    # and a successful overwrite replaces it once the new run has a checkpoint
    Trainer(small(tiny, run, steps=1, batch_size=2, eval_examples=4), overwrite=True, progress=False).train()
    assert json.load(open(os.path.join(run, "summary.json")))["step"] == 1
    assert not os.path.exists(os.path.join(run, rundir.REPLACED))


# ---- 2. divergence ----------------------------------------------------------------------------------
def test_divergence_stops_before_the_step_and_keeps_the_last_checkpoint(tiny, tmp_path, monkeypatch):
    import torch.nn.functional as F

    run = str(tmp_path / "run")
    t = Trainer(small(tiny, run, steps=4, batch_size=2, eval_examples=4, checkpoint_interval=1), progress=False)
    cross_entropy, poisoned = F.cross_entropy, []
    monkeypatch.setattr(F, "cross_entropy", lambda *a, **k: cross_entropy(*a, **k) * (float("nan") if poisoned else 1.0))
    t.on_step = lambda trainer, step: poisoned.append(step)  # from step 2 on, the loss is NaN
    with pytest.raises(Diverged, match=r"diverged at step 2: loss nan.*checkpoint in .* is kept") as info:
        t.train()
    assert info.value.exit_code == 3 and t.step == 1  # the diverged step was never applied
    state = json.load(open(os.path.join(run, "checkpoint", "trainer_state.json")))
    assert state["step"] == 1 and not os.path.exists(os.path.join(run, "adapter"))
    adapter = safetensors.torch.load_file(os.path.join(run, "checkpoint", "adapter", "adapter_model.safetensors"))
    weights = {n: p for n, p in t.model.named_parameters() if p.requires_grad}
    assert all(torch.isfinite(v).all() for v in adapter.values()) and all(torch.isfinite(p).all() for p in weights.values())


def test_a_huge_learning_rate_is_divergence_even_with_a_finite_loss(tiny, tmp_path):
    """--lr 1e30 saturates the tiny model: finite loss, zero gradients, weights at ~1e30."""
    with pytest.raises(Diverged, match=r"diverged at step 1: a LoRA weight reached magnitude 5e\+29 \(limit 10000\)"):
        Trainer(small(tiny, tmp_path / "run", lr=1e30, steps=2, batch_size=2, eval_examples=4), progress=False).train()
    assert not os.path.exists(tmp_path / "run" / "checkpoint") and not os.path.exists(tmp_path / "run" / "adapter")


def test_gradient_norm_streak_is_divergence():
    from fourbit.train.loop import GRAD_NORM_LIMIT, GRAD_NORM_PATIENCE

    t = Trainer.__new__(Trainer)  # only the guard's bookkeeping
    t.config, t.step, t.total_steps, t.run_dir, t._big_norms = small("m", "/nonexistent"), 0, 10, "/nonexistent", 0
    for _ in range(GRAD_NORM_PATIENCE - 1):
        t._check_divergence(1.0, GRAD_NORM_LIMIT * 10)
        t.step += 1
    t._check_divergence(1.0, 1.0)  # one healthy step resets the streak
    for _ in range(GRAD_NORM_PATIENCE - 1):
        t._check_divergence(1.0, GRAD_NORM_LIMIT * 10)
    with pytest.raises(Diverged, match="above 10000 for 3 steps in a row"):
        t._check_divergence(1.0, GRAD_NORM_LIMIT * 10)
    with pytest.raises(Diverged, match="gradient norm inf"):
        t._check_divergence(1.0, float("inf"))


# ---- 3. SIGTERM ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigterm_mid_run_checkpoints_and_resumes_bit_identically(tiny, tmp_path):
    argv = ["finetune", "--model", tiny, "--steps", "6", "--batch-size", "2", "--eval-examples", "4",
            "--targets", "q_proj", "v_proj", "--dropout", "0.1", "--quiet"]
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "fourbit.cli", *argv, "--output-dir", cut],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = os.path.join(cut, "metrics.jsonl")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:  # wait for the first training step
        if os.path.exists(metrics) and any('"loss"' in line for line in open(metrics)):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    assert not os.path.exists(os.path.join(cut, rundir.LOCK))  # released on the way out
    stopped = json.load(open(os.path.join(cut, "checkpoint", "trainer_state.json")))["step"]
    assert 1 <= stopped < 6, out
    assert f"SIGTERM: stopped after step {stopped}" in out and "--resume" in out.splitlines()[-1]

    assert main([*argv, "--output-dir", cut, "--resume"]) == 0
    assert main([*argv, "--output-dir", full]) == 0
    losses = lambda d: [(r["step"], r["loss"]) for r in map(json.loads, open(os.path.join(d, "metrics.jsonl"))) if "loss" in r]  # noqa: E731
    assert losses(cut) == losses(full)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert open(os.path.join(cut, "adapter", name), "rb").read() == open(os.path.join(full, "adapter", name), "rb").read()


def test_same_seed_writes_identical_adapter_bytes(tiny, finished, tmp_path):
    again = str(tmp_path / "again")
    assert main(["finetune", "--model", tiny, "--output-dir", again, *RUN_ARGS]) == 0
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert open(os.path.join(again, "adapter", name), "rb").read() == open(os.path.join(finished, "adapter", name), "rb").read()


# ---- 4. quantize refuses its own input (in the table above); 5. name collisions --------------------------------
def test_save_file_refuses_a_name_collision(tmp_path):
    packed, state = nf4.quantize(torch.randn(64, 64))
    with pytest.raises(InvalidInput, match=r"'w.absmax' \(from 'w' and 'w.absmax'\)"):
        nf4.save_file(tmp_path / "x.safetensors", {"w": (packed, state), "w.absmax": torch.zeros(3)})
    assert not os.listdir(tmp_path)


# ---- 6. double quantization overflow, and the other format guards ------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_quantize_refuses_an_overflowing_offset(backend):
    quantize = nf4.quantize if backend == "reference" else __import__("fourbit.kernels", fromlist=["quantize"]).quantize
    x = torch.full((4, 64), 3e38)
    with pytest.raises(InvalidInput, match=r"largest magnitude 3e\+38 .*offset inf.*double_quant=False"):
        quantize(x)
    packed, state = quantize(x, double_quant=False)  # single quantization holds it
    assert torch.isfinite(nf4.dequantize(packed, state)).all()
    packed, state = quantize(torch.full((4, 64), 5e37))  # the float32 sum of the 4 scales, 2e38, still fits
    assert torch.isfinite(nf4.dequantize(packed, state)).all()


def test_format_guards():
    with pytest.raises(InvalidInput, match="meta tensor.*load the real weights first"):
        nf4.quantize(torch.empty(64, 64, device="meta"))
    packed, state = nf4.quantize(torch.randn(64, 64))
    with pytest.raises(TypeError, match="float32, float16, bfloat16, float64, got torch.int32"):
        nf4.dequantize(packed, state, dtype=torch.int32)
    assert nf4.dequantize(packed, state, dtype=torch.float64).dtype == torch.float64  # the reference's exact output
    d = state.to_dict()
    key = "quant_state.bitsandbytes__nf4"
    blob = json.loads(bytes(d[key].tolist()))
    for change, word in [({"shape": [-1, 64]}, "non-negative integers"), ({"shape": [64, 1.5]}, "non-negative integers"),
                         ({"nested_offset": float("nan")}, "finite"), ({"nested_offset": float("inf")}, "finite")]:
        bad = dict(d, **{key: torch.tensor(list(json.dumps(dict(blob, **change)).encode()), dtype=torch.uint8)})
        with pytest.raises(BadFile, match=word):
            nf4.QuantState.from_dict(bad)
    bad = dict(d, nested_absmax=torch.full_like(d["nested_absmax"], float("nan")))
    with pytest.raises(BadFile, match="nested_absmax holds 1 non-finite"):
        nf4.QuantState.from_dict(bad)


def test_load_file_errors_name_the_path(tmp_path):
    with pytest.raises(BadFile, match="is a directory, not a safetensors file"):
        nf4.load_file(tmp_path)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(BadFile, match="empty.safetensors is not a readable safetensors file"):
        nf4.load_file(tmp_path / "empty.safetensors")


@pytest.mark.parametrize("budget", [float("nan"), float("inf"), -1, 0])
def test_pager_budget_must_be_finite_and_positive(budget):
    from fourbit.optim import PagedAdamW

    with pytest.raises(ValueError, match="device_budget_bytes"):
        PagedAdamW([torch.nn.Parameter(torch.zeros(4))], device_budget_bytes=budget)


def test_optimizer_state_dict_without_param_groups():
    from fourbit.optim import AdamW

    opt = AdamW([torch.nn.Parameter(torch.zeros(4))])
    sd = opt.state_dict()
    del sd["param_groups"]
    with pytest.raises(BadFile, match="no 'param_groups' entry"):
        opt.load_state_dict(sd)


# ---- 7. durable, shareable, reproducible files --------------------------------------------------------------
def test_checkpoint_files_and_directories_are_fsynced(tiny, tmp_path, monkeypatch):
    t = Trainer(small(tiny, tmp_path / "run", steps=1, batch_size=2, eval_examples=4), progress=False)
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = t.save_checkpoint()
    new = os.path.join(str(tmp_path / "run"), ".checkpoint-new")
    files = sorted(os.path.relpath(os.path.join(base, f), path) for base, _, fs in os.walk(path) for f in fs)
    assert files == ["adapter/adapter_config.json", "adapter/adapter_model.safetensors", "optimizer.pt", "rng.pt",
                     "trainer_state.json"]
    for name in files:  # each written as .tmp-*<name> in the new directory, fsync'd, then renamed
        folder, base = os.path.split(os.path.join(new, name))
        assert any(os.path.dirname(p) == folder and os.path.basename(p).endswith(base) for p in synced), (name, synced)
    assert new in synced and str(tmp_path / "run") in synced  # the renames inside them, too


def test_files_honour_the_umask_and_metadata_order(tmp_path):
    old = os.umask(0o027)
    try:
        nf4.save_file(tmp_path / "a.safetensors", {"x": torch.zeros(2)}, metadata={"b": "2", "a": "1"})
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "a.safetensors").st_mode & 0o777 == 0o640
    nf4.save_file(tmp_path / "b.safetensors", {"x": torch.zeros(2)}, metadata={"a": "1", "b": "2"})
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    with safetensors.safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        assert f.metadata() == {"a": "1", "b": "2"}


def test_full_disk_is_named(tmp_path, monkeypatch):
    _full_disk_for_writes(monkeypatch)
    with pytest.raises(OutputError, match=r"cannot write .*x.safetensors: disk full \(No space left on device\)"):
        nf4.save_file(tmp_path / "x.safetensors", {"x": torch.zeros(2)})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []  # the temporary file is gone too


def test_quantize_output_is_shareable_and_replaced_whole(tiny, tmp_path):
    out = tmp_path / "q4"
    old = os.umask(0o022)
    try:
        assert main(["quantize", tiny, str(out)]) == 0
        first = _hashes(out)
        (out / "stale.txt").write_text("from the old export")
        assert main(["quantize", tiny, str(out), "--overwrite"]) == 0
    finally:
        os.umask(old)
    assert os.stat(out).st_mode & 0o777 == 0o755  # not mkdtemp's 0700
    assert all(os.stat(out / name).st_mode & 0o777 == 0o644 for name in os.listdir(out))
    assert _hashes(out) == first  # the old directory was replaced as a whole, byte-identical export
    assert sorted(os.listdir(tmp_path)) == ["q4"]  # no temporary or set-aside directory left


def test_batch_size_must_split_over_the_ranks(tmp_path, monkeypatch):
    from fourbit.train import distributed

    for k, v in dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="localhost", MASTER_PORT="1").items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(distributed, "setup", lambda mode, device: distributed.Runtime(mode, 0, 2, 0, torch.device("cpu"), "gloo"))
    with pytest.raises(InvalidInput, match="--batch-size 3 does not split evenly over 2 ranks — use a multiple of 2"):
        Trainer(small("m", tmp_path / "run", batch_size=3, distributed="ddp"), progress=False)
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("code,words", [(errno.ENOSPC, "disk full"), (errno.EROFS, "read-only file system"),
                                        (errno.EACCES, "permission denied"), (errno.ENOTDIR, "is a file, not a directory")])
def test_output_errors_say_what_happened(code, words, tmp_path, monkeypatch):
    """Unwritable places, as the OS reports them (as root, chmod would not stop the write)."""
    import builtins

    real_open = builtins.open

    def refusing_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wa+"):
            raise OSError(code, os.strerror(code), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    run = rundir.RunDir(str(tmp_path / "run"))
    run.lock()
    with pytest.raises(OutputError, match=f"cannot write .*run: .*{words}"):
        run.check(resume=False, overwrite=False)
    run.release()
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []  # the directory it had created is gone again
