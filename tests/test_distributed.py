"""fourbit.train.distributed: DDP and FSDP2 over 4-bit models, launched with torchrun on CPU (gloo).

One torchrun launch (2 processes, tests/dist_worker.py) runs every distributed scenario; the
single-process reference runs here, in the test process, with the same functions and data.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import safetensors.torch
import torch

from fourbit.lora import load_adapter, lora_layers
from fourbit.train import checkpoint, distributed, parallel

pytest.importorskip("transformers")

import helpers  # noqa: E402  the run that tests/dist_worker.py repeats under torchrun
from helpers import max_rel_err, tiny_llama_dir  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LOSS_RTOL = 1e-4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_run(model_name: str, checkpoint_dir, optimizer_kind: str = "torch") -> list[float]:
    """The reference: 10 steps on the whole global batch, checkpoint after step 5."""
    model = parallel.wrap_model(helpers.qlora_model(model_name), distributed.setup("none"))
    optimizer = helpers.make_optimizer(model, helpers.LR[model_name], optimizer_kind)
    return helpers.train_steps(model, optimizer, model.config.vocab_size, 0, helpers.STEPS, str(checkpoint_dir))


# A worker aborted by torch's own C++ (std::terminate in its CPU collectives, no Python error; seen
# once in ~10 runs of the SmolLM2 test on the 2-core machine, and reported upstream for FSDP tests:
# pytorch/pytorch#90549) says nothing about fourbit, so such a launch is run once more. Any other
# failure, a Python exception or a wrong number, fails at once.
NATIVE_ABORT = "terminate called without an active exception"


def launch(args: list[str], log_path, timeout_s: int) -> None:
    """`torchrun --nproc_per_node 2 <args>` on a free port; fails the test with the log on error."""
    for attempt in (1, 2):
        returncode, text = _launch_once(args, log_path, timeout_s)
        if returncode == 0 or NATIVE_ABORT not in text or "Traceback" in text.split(NATIVE_ABORT)[0]:
            break
        os.replace(log_path, f"{log_path}.aborted{attempt}")
    assert returncode == 0, f"torchrun failed or timed out after {timeout_s} s (exit {returncode}):\n{text[-8000:]}"


def _launch_once(args: list[str], log_path, timeout_s: int) -> tuple[int, str]:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    with open(log_path, "w") as log:  # a file, not a pipe: workers outliving the launcher cannot block us
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)  # torchrun passes SIGTERM on to its workers and stops them
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    with open(log_path) as f:
        return proc.returncode, f.read()


def test_launch_retries_only_a_native_abort(monkeypatch, tmp_path):
    log = tmp_path / "torchrun.log"
    aborted = f"loading\n{NATIVE_ABORT}\nTraceback (launcher)\nChildFailedError"
    for outcomes, passes in (([(1, aborted), (0, "")], True), ([(1, aborted), (1, aborted)], False),
                             ([(1, "Traceback (worker)\nValueError\n" + aborted), (0, "")], False),
                             ([(1, "AssertionError"), (0, "")], False)):
        calls = iter(outcomes)
        monkeypatch.setattr(sys.modules[__name__], "_launch_once", lambda *a: (log.write_text("x"), next(calls))[1])
        if passes:
            launch([], str(log), 1)
        else:
            with pytest.raises(AssertionError, match="torchrun failed"):
                launch([], str(log), 1)


def torchrun(out, *extra, timeout_s: int) -> dict:
    """Run tests/dist_worker.py on 2 ranks; returns the results.json rank 0 wrote."""
    launch([os.path.join(HERE, "dist_worker.py"), "--out", str(out), *extra], os.path.join(out, "torchrun.log"), timeout_s)
    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
        return json.load(f)


def resume_single(model_name: str, directory, optimizer_kind: str = "torch") -> tuple[int, list[float]]:
    model = parallel.wrap_model(helpers.qlora_model(model_name), distributed.setup("none"))
    optimizer = helpers.make_optimizer(model, helpers.LR[model_name], optimizer_kind)
    state = checkpoint.load(directory, model, optimizer)
    return state["step"], helpers.train_steps(model, optimizer, model.config.vocab_size, state["step"], helpers.STEPS)


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    reference = single_process_run("tiny", out / "single-checkpoint")
    results = torchrun(out, "--resume-from", str(out / "single-checkpoint"), timeout_s=240)
    return out, reference, results


# ---- the torchrun runs --------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_losses_match_single_process_with_same_global_batch(tiny_runs, mode):
    _, reference, results = tiny_runs
    assert results["world_size"] == 2 and results["backend"] == "gloo"
    assert max_rel_err(results[mode]["losses"], reference) < LOSS_RTOL
    assert reference[-1] < 0.9 * reference[0], f"the reference run must learn for the comparison to mean something: {reference}"


def test_fsdp_with_gradient_accumulation_matches_one_big_batch(tiny_runs):
    _, reference, results = tiny_runs
    assert max_rel_err(results["fsdp_accumulated"]["losses"], reference) < LOSS_RTOL


def test_fsdp_shards_packed_weights_across_ranks(tiny_runs):
    _, _, results = tiny_runs
    single = results["fsdp"]["single_process_bytes"]
    for mine in results["fsdp"]["per_rank_bytes"]:
        assert mine["packed"] <= 0.55 * single["packed"]
        assert mine["packed"] + mine["quant_state"] <= 0.55 * (single["packed"] + single["quant_state"])
        assert mine["quant_state"] == single["quant_state"]  # replicated, by design
        assert mine["full_packed_weights_alive"] == 0  # nothing keeps the unsharded bytes resident
    for mine in results["ddp"]["per_rank_bytes"]:
        assert mine["packed"] == single["packed"] and mine["full_packed_weights_alive"] == 14  # whole model per rank


def test_bf16_mixed_precision_never_casts_packed_bytes(tiny_runs):
    _, reference, results = tiny_runs
    bf16 = results["bf16"]
    assert bf16["checked"] == bf16["layers"] == 14 and bf16["mismatched"] == 0
    assert abs(bf16["loss"] - reference[0]) / reference[0] < 2e-2  # bf16 rounding, not noise weights


def test_ranks_holding_different_models_are_refused(tiny_runs):
    _, _, results = tiny_runs
    assert "rank 1 holds a different model than rank 0" in results["mismatch"]
    assert "lora_A.weight', (8, 64)" in results["mismatch"] and "(4, 64)" in results["mismatch"]


def test_ddp_with_fourbit_adamw_matches_and_resumes_in_one_process(tiny_runs):
    out, _, results = tiny_runs
    reference = single_process_run("tiny", out / "single-fourbit-adamw-checkpoint", "fourbit")
    assert max_rel_err(results["ddp_fourbit_adamw"]["losses"], reference) < LOSS_RTOL
    step, losses = resume_single("tiny", out / "ddp-fourbit-adamw-checkpoint", "fourbit")
    assert max_rel_err(losses, reference[step:]) < LOSS_RTOL
    saved = torch.load(out / "ddp-fourbit-adamw-checkpoint" / "optimizer.pt", weights_only=True)
    assert saved["fourbit"]["format"] == "fourbit-adamw"  # the optimizer's own saved form, renamed by parameter


# ---- checkpoints cross between modes ------------------------------------------------------------
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_process_checkpoint_resumes_in_one_process(tiny_runs, mode):
    out, reference, _ = tiny_runs
    step, losses = resume_single("tiny", out / f"{mode}-checkpoint")
    assert step == helpers.CHECKPOINT_AT
    assert max_rel_err(losses, reference[step:]) < LOSS_RTOL


def test_one_process_checkpoint_resumes_under_fsdp(tiny_runs):
    _, reference, results = tiny_runs
    resumed = results["fsdp_resumed"]
    assert resumed["step"] == helpers.CHECKPOINT_AT
    assert max_rel_err(resumed["losses"], reference[helpers.CHECKPOINT_AT :]) < LOSS_RTOL


def test_one_process_resume_is_bit_identical(tiny_runs):
    out, reference, _ = tiny_runs
    step, losses = resume_single("tiny", out / "single-checkpoint")
    assert step == helpers.CHECKPOINT_AT and losses == reference[step:]  # exact float equality


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_one_process_checkpoint_through_two_processes_and_back_is_bit_identical(tiny_runs, mode):
    """Loaded under 2-process DDP / FSDP and written again at once, a one-process checkpoint holds
    the same tensors and resumes in one process with exactly the uninterrupted run's losses."""
    out, reference, _ = tiny_runs
    source, trip = out / "single-checkpoint", out / f"{mode}-roundtrip-checkpoint"
    assert_same_tree(torch.load(trip / "optimizer.pt", weights_only=True), torch.load(source / "optimizer.pt", weights_only=True), "optimizer")
    rng, rng_source = (torch.load(d / "rng.pt", weights_only=True) for d in (trip, source))  # plain data, every mode
    assert rng["world_size"] == 2 and rng_source["world_size"] == 1
    for r in range(2):  # another world size: every rank continues from rank 0's RNG states
        assert_same_tree(rng["ranks"][r], rng_source["ranks"][0], f"rng of rank {r}")
    a = safetensors.torch.load_file(str(source / "adapter/adapter_model.safetensors"))
    b = safetensors.torch.load_file(str(trip / "adapter/adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    step, losses = resume_single("tiny", trip)
    assert step == helpers.CHECKPOINT_AT and losses == reference[step:]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_process_resume_is_bit_identical(tiny_runs, mode):
    _, _, results = tiny_runs
    resumed = results[f"{mode}_self_resumed"]
    assert resumed["step"] == helpers.CHECKPOINT_AT
    assert resumed["losses"] == results[mode]["losses"][helpers.CHECKPOINT_AT :]  # exact float equality


def assert_same_tree(got, want, where: str) -> None:
    """Equal nested dicts/lists of tensors and numbers; tensors bit for bit."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype and torch.equal(got, want), where
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), (where, sorted(map(str, got)), sorted(map(str, want)))
        for k in want:
            assert_same_tree(got[k], want[k], f"{where}[{k!r}]")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same_tree(g, w, f"{where}[{i}]")
    else:
        assert got == want, (where, got, want)


def test_checkpoint_files_are_plain_and_agree_across_modes(tiny_runs):
    out, _, _ = tiny_runs
    adapters = {}
    for mode in ("single", "ddp", "fsdp"):
        directory = out / f"{mode}-checkpoint"
        with open(directory / "trainer_state.json") as f:
            state = json.load(f)
        assert state["step"] == helpers.CHECKPOINT_AT
        assert sorted(os.listdir(directory)) == ["adapter", "optimizer.pt", "rng.pt", "trainer_state.json"]
        assert state["mode"] == ("none" if mode == "single" else mode)
        assert state["world_size"] == (1 if mode == "single" else 2)
        model = load_adapter(helpers.qlora_model("tiny"), directory / "adapter")  # a fresh plain model
        adapters[mode] = {n: m.lora_A.weight.detach().clone() for n, m in lora_layers(model).items()}
        optim = torch.load(directory / "optimizer.pt", weights_only=True)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        assert list(optim["state"]) == names and optim["param_groups"][0]["params"] == names
        for name, p in model.named_parameters():
            if p.requires_grad:
                assert optim["state"][name]["exp_avg"].shape == p.shape  # full, not a shard
    for mode in ("ddp", "fsdp"):
        for name, a in adapters[mode].items():
            ref = adapters["single"][name]
            assert float((a - ref).norm() / ref.norm()) < 1e-4, (mode, name)


# ---- single-process behaviour and bad input (no torchrun) ---------------------------------------
def test_shard_gives_each_rank_its_rows_of_the_global_batch():
    batch = {"input_ids": torch.arange(12).reshape(6, 2), "labels": torch.arange(12).reshape(6, 2) + 100}
    parts = [distributed.shard(batch, rank=r, world_size=3) for r in range(3)]
    assert torch.equal(torch.cat([p["input_ids"] for p in parts]), batch["input_ids"])
    assert torch.equal(parts[1]["labels"], batch["labels"][2:4])
    assert distributed.shard(list("abcd"), rank=1, world_size=2) == ["c", "d"]
    assert torch.equal(distributed.shard(batch["input_ids"]), batch["input_ids"])  # no process group: everything
    with pytest.raises(ValueError, match="6 rows does not split evenly over 4 ranks"):
        distributed.shard(batch, rank=0, world_size=4)
    with pytest.raises(ValueError, match="disagree on their number of rows"):
        distributed.shard({"a": torch.zeros(4), "b": torch.zeros(2)}, rank=0, world_size=2)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\)"):
        distributed.shard(batch, rank=2, world_size=2)


def test_single_process_helpers():
    assert distributed.rank() == 0 and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.reduce(2.5) == 2.5
    loss = distributed.global_mean_loss(torch.tensor(6.0), 4)
    assert float(loss) == 1.5
    with pytest.raises(ValueError, match="no label tokens"):
        distributed.global_mean_loss(torch.tensor(0.0), 0)
    with pytest.raises(ValueError, match="op must be 'mean', 'sum' or 'max'"):
        distributed.reduce(1.0, "median")


def test_bad_modes_and_launches(monkeypatch):
    with pytest.raises(ValueError, match=r"must be one of \['none', 'ddp', 'fsdp'\], got 'zero3'"):
        distributed.setup("zero3")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RuntimeError, match="torchrun --nproc_per_node N"):
        distributed.setup("fsdp")
    ctx = distributed.setup("none")
    assert (ctx.rank, ctx.world_size, ctx.backend) == (0, 1, None)
    # under torchrun: a wrong backend, NCCL without CUDA, more processes than GPUs are user errors
    from fourbit.errors import InvalidInput, Unavailable

    for key, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29999"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(InvalidInput, match="backend must be 'nccl'"):
        distributed.setup("ddp", backend="mpi")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(Unavailable, match="needs CUDA.*use backend='gloo'"):
        distributed.setup("ddp", backend="nccl")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(Unavailable, match=r"LOCAL_RANK 1 has no GPU: this machine shows 1 — use torchrun --nproc_per_node <= 1"):
        distributed.setup("ddp", backend="nccl")
    with pytest.raises(ValueError, match="FSDP mixed-precision settings"):
        parallel.wrap_model(torch.nn.Linear(2, 2), ctx, param_dtype=torch.bfloat16)


def test_fsdp_refuses_a_policy_that_would_cast_float_quant_storage():
    from fourbit.lora import add_lora, quantize_model

    model = add_lora(quantize_model(torch.nn.Sequential(torch.nn.Linear(64, 64)), quant_storage=torch.bfloat16), target_modules=["0"])
    fake = distributed.Runtime("fsdp", 0, 2, 0, torch.device("cpu"), "gloo")
    with pytest.raises(ValueError, match="torch.bfloat16 quant_storage, which param_dtype=torch.float32 would cast"):
        parallel.wrap_model(model, fake, param_dtype=torch.float32)
    with pytest.raises(RuntimeError, match=r"needs a process group: get the Runtime from distributed.setup\('fsdp'\)"):
        parallel.wrap_model(model, fake, param_dtype=torch.bfloat16)  # bf16 codes, bf16 policy: no cast


def test_load_checkpoint_names_what_is_missing(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "rng.pt").touch()
    with pytest.raises(FileNotFoundError, match="optimizer.pt, trainer_state.json missing"):
        checkpoint.load(tmp_path, torch.nn.Linear(2, 2), None)


# ---- `fourbit finetune --distributed` (the training loop) --------------------------------------
FINETUNE = dict(steps=3, batch_size=4, grad_accum=2, eval_examples=4, max_length=80, lr=1e-2, warmup=1, optimizer="torch_adamw")


@pytest.fixture(scope="module")
def finetune_runs(tmp_path_factory):
    """A tiny Llama directory with the SmolLM2 tokenizer, fine-tuned by the loop in this process
    and by `torchrun ... -m fourbit.cli finetune --distributed ddp|fsdp`; returns their losses."""
    from fourbit.train.config import TrainConfig
    from fourbit.train.loop import Trainer

    root = tmp_path_factory.mktemp("finetune")
    tiny = tiny_llama_dir(root)
    # Answers of 1 to 12 words: ranks hold different numbers of answer tokens, which only a
    # token-weighted loss over all ranks turns into the one-process step.
    g = torch.Generator().manual_seed(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    with open(root / "echo.jsonl", "w") as f:
        for _ in range(80):
            picked = [words[int(i)] for i in torch.randint(0, 12, (int(torch.randint(1, 13, (1,), generator=g)),), generator=g)]
            f.write(json.dumps({"prompt": "Repeat: " + " ".join(picked), "response": " ".join(picked)}) + "\n")

    def losses(run) -> list[float]:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r]

    data = str(root / "echo.jsonl")
    Trainer(TrainConfig(model=tiny, data=data, output_dir=str(root / "none"), **FINETUNE), progress=False).train()
    runs = {"none": losses(root / "none")}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in FINETUNE.items()]
    for mode in ("ddp", "fsdp"):
        args = ["-m", "fourbit.cli", "finetune", f"--model={tiny}", f"--data={data}", f"--output-dir={root / mode}",
                f"--distributed={mode}", "--quiet", *flags]
        launch(args, root / f"{mode}.log", timeout_s=240)
        runs[mode] = losses(root / mode)
    return root, runs


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_finetune_cli_under_torchrun_matches_one_process(finetune_runs, mode):
    root, runs = finetune_runs
    assert len(runs["none"]) == FINETUNE["steps"]
    assert max_rel_err(runs[mode], runs["none"]) < LOSS_RTOL
    for name in ("adapter/adapter_model.safetensors", "checkpoint/optimizer.pt", "loss.png", "summary.json"):
        assert (root / mode / name).exists(), name  # written once, by rank 0
    import safetensors.torch

    ours = safetensors.torch.load_file(str(root / mode / "adapter/adapter_model.safetensors"))
    reference = safetensors.torch.load_file(str(root / "none/adapter/adapter_model.safetensors"))
    assert ours.keys() == reference.keys()
    for key, ref in reference.items():  # full (gathered) tensors, equal to the one-process adapter
        assert ours[key].shape == ref.shape and float((ours[key] - ref).norm() / ref.norm()) < 1e-4, key


# ---- the real model (slow) ----------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_ddp_and_fsdp_match_single_process(tmp_path):
    """The real model (30 layers, tied embeddings). Resuming is covered on the tiny model: here
    each extra GGUF load costs ~15 s of a suite that must stay short."""
    pytest.importorskip("gguf")
    reference = single_process_run("smollm2", tmp_path / "single-checkpoint")
    results = torchrun(tmp_path, "--model", "smollm2", timeout_s=900)
    for mode in ("ddp", "fsdp"):
        assert max_rel_err(results[mode]["losses"], reference) < LOSS_RTOL, mode
    single = results["fsdp"]["single_process_bytes"]
    for mine in results["fsdp"]["per_rank_bytes"]:
        assert mine["packed"] <= 0.55 * single["packed"] and mine["full_packed_weights_alive"] == 0
