"""fourbit.plan: the planned peak against the allocator's record of real runs, the layouts it assumes
against the code that allocates, extrapolation over identical layers, the CLI and finetune's check."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.bench_plan import measure_run
from fourbit.cli import main
from fourbit.nf4 import quantize
from fourbit.plan import gpus
from fourbit.plan.gpus import Target, parse_size
from fourbit.plan.source import ModelSource
from fourbit.plan.states import state_bytes
from fourbit.plan.build import empty_4bit
from fourbit.plan.trace import trace_run
from fourbit.plan.tracker import LiveBytes
from fourbit.train.config import TrainConfig
from helpers import tiny_llama_dir

TOLERANCE = 0.03


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_llama_dir(str(tmp_path_factory.mktemp("tiny")))


def _small(tiny, tmp_path, **kw) -> TrainConfig:
    """The tiny model with the main job's recipe, short."""
    base = dict(model=tiny, output_dir=str(tmp_path / "run"), steps=2, batch_size=4, eval_examples=8, max_length=80)
    return TrainConfig(**{**base, **kw})


# ---- the layouts the plan assumes are the code's -----------------------------------------------
@given(rows=st.integers(1, 300), cols=st.integers(1, 300), blocksize=st.sampled_from([64, 128, 256]),
       double_quant=st.booleans(), storage=st.sampled_from([torch.uint8, torch.bfloat16, torch.float32]))
def test_empty_4bit_storages_are_quantizes(rows, cols, blocksize, double_quant, storage):
    if (rows * cols + 1) // 2 % torch.empty((), dtype=storage).element_size():
        storage = torch.uint8  # quantize refuses a storage that does not divide the bytes
    packed, state = quantize(torch.randn(rows, cols), blocksize=blocksize, double_quant=double_quant, quant_storage=storage)
    empty, planned = empty_4bit((rows, cols), blocksize=blocksize, quant_type="nf4", double_quant=double_quant,
                                quant_storage=storage, dtype=torch.float32, device="cpu", tables={})
    nbytes = lambda t: None if t is None else (t.untyped_storage().nbytes(), t.dtype, tuple(t.shape))  # noqa: E731
    assert nbytes(empty) == nbytes(packed)
    assert [nbytes(t) for t in planned.as_tensors()[:2]] == [nbytes(t) for t in state.as_tensors()[:2]]
    assert nbytes(planned.as_tensors()[3]) == nbytes(state.as_tensors()[3])


@pytest.mark.parametrize("kind, budget", [(k, None) for k in ("adamw", "paged_adamw", "adamw8bit", "paged_adamw8bit", "torch_adamw")]
                         + [("paged_adamw", 3 * 2**18), ("paged_adamw8bit", 3 * 2**18), ("paged_adamw", 8 * 2**18)])
def test_state_bytes_are_what_the_optimizers_allocate(kind, budget):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*shape)) for shape in [(16, 576), (1536, 16), (7,), (64, 4096), (3, 33)]]
    from fourbit.train.setup import build_optimizer

    opt = build_optimizer(TrainConfig(optimizer=kind, paging_budget_mb=None if budget is None else budget / 2**20), params)
    for p in params:
        p.grad = torch.randn_like(p)
    tracker = LiveBytes(torch.device("cpu"))
    tracker.add_all(params, "lora")  # counted before, so that views of them are not new bytes
    tracker.add_all([p.grad for p in params], "gradients")
    with tracker, tracker.category("optimizer"):
        opt.step()
        opt.step()  # a paged one keeps the host buffers the second walk (in the other direction) adds
    device, host = state_bytes(params, kind, budget_bytes=budget)
    counted = tracker.sums["optimizer"]
    if kind.startswith("paged"):  # on the CPU the host copies of evicted pages sit beside the slots
        assert counted == device + host
        assert opt.pool.resident_bytes == device - (2 * 1024 if kind.endswith("8bit") else 0)
    else:
        assert counted == device
        assert host == 0


@pytest.mark.parametrize("m, dtype", [(3, torch.float32), (40, torch.float32), (40, torch.bfloat16)])
def test_c_kernel_matmul_buffers_are_planned(m, dtype):
    """What fourbit.cpu.matmul allocates in a forward and backward (the GEMV at 3 rows; at 40 the
    decode into the thread's kept buffer, emptied first, and bf16 widened to float32) is what the
    planner makes on fake tensors: the same peak rise, within 1 KiB (the bf16 call makes one small
    tensor more than the model, 128 bytes; the buffers modelled are MiB)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.bench_plan import _live_peak
    from fourbit import dispatch
    from fourbit.cpu.matmul import _LOCAL
    from fourbit.lora.autograd import matmul_4bit
    from fourbit.nf4.state import QuantState
    from fourbit.plan.ops import FourbitOps

    if dispatch.backend_for(torch.empty(0)) != "cpu":
        pytest.skip("the C kernels do not run here")
    torch.manual_seed(0)
    packed, state = quantize(torch.randn(1536, 576), double_quant=True)  # SmolLM2's largest weight
    x = torch.randn(m, 576, dtype=dtype)

    def step(x, packed, state):
        x = x.requires_grad_()
        y = matmul_4bit(x, packed, state)
        y.backward(torch.ones_like(y))

    _LOCAL.__dict__.clear()  # the thread's kept decode buffer: made again by this call
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(x.clone(), packed, state)
    times = [e.start_ns() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    measured = _live_peak(prof, times[0], times[-1]) - x.numel() * x.element_size()  # less the clone

    ops = FourbitOps("cpu")
    tracker = LiveBytes(torch.device("cpu"), on_op=ops)
    with FakeTensorMode() as fake:
        tensors = [None if t is None else fake.from_tensor(t) for t in (x, packed, *state.as_tensors())]
        fx, fpacked, absmax, nested_absmax, nested_code, offset = tensors
        fstate = QuantState.from_tensors(absmax, nested_absmax, nested_code, offset, shape=state.shape, dtype=state.dtype,
                                         blocksize=state.blocksize, quant_type=state.quant_type, code=state.code)
        with tracker:
            step(fx, fpacked, fstate)
    planned = max(p.total for p in tracker.phase_peaks.values())
    assert abs(planned - measured) <= 1024, (planned, measured)


@pytest.mark.slow
def test_extrapolated_layers_equal_the_whole_trace():
    import transformers

    hf = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=5, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=300)
    source = ModelSource("five layers", hf, None, None, True)
    config = TrainConfig(model="five layers", batch_size=2, max_length=32, r=8, grad_checkpointing="on")
    kw = dict(target="cuda", batch=[[1] * 32] * 2)
    whole, carried = trace_run(config, source, exact=True, **kw), trace_run(config, source, **kw)
    assert {k: (v.total, v.where) for k, v in whole.phases.items()} == {k: (v.total, v.where) for k, v in carried.phases.items()}
    assert whole.static == carried.static


# ---- the plan against real runs ---------------------------------------------------------------
def test_finetune_logs_its_plan_within_3_percent_of_the_profilers_peak(tiny, tmp_path, capsys):
    """The CLI plans its own run (the main job's recipe on the tiny model) and writes the prediction
    into summary.json; the profiler's allocator events over the whole command are the truth."""
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.bench_plan import _live_peak

    run = tmp_path / "run"
    argv = ["finetune", "--model", tiny, "--output-dir", str(run), "--steps", "2", "--batch-size", "4",
            "--eval-examples", "8", "--max-length", "80", "--quiet"]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        assert main(argv) == 0
    assert "plan: peak" in capsys.readouterr().out
    memory = json.loads((run / "summary.json").read_text())["memory"]
    events = [e.start_ns() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    measured = _live_peak(prof, events[0], events[-1])
    assert abs(memory["predicted_peak_bytes"] - measured) <= TOLERANCE * measured, (memory, measured)


@pytest.mark.slow
def test_plan_of_a_fourbitconfig_model_is_within_3_percent(tiny, tmp_path):
    """A 4-bit directory, loaded through FourbitConfig, with gradient checkpointing, r = 64 and paged
    8-bit AdamW over a budget smaller than its states (half a MiB: the rest is paged out)."""
    from fourbit.plan import local_target, plan

    nf4 = str(tmp_path / "nf4")
    assert main(["quantize", tiny, nf4]) == 0
    config = _small(tiny, tmp_path, model=nf4, grad_checkpointing="on", r=64, optimizer="paged_adamw8bit",
                    paging_budget_mb=0.5, batch_size=2)
    predicted = plan(config, target=local_target("cpu"), suggest=False).peak
    measured = measure_run(config)["measured_peak_bytes"]
    assert abs(predicted - measured) <= TOLERANCE * measured, (predicted, measured)


# ---- refusing a run that will not fit ------------------------------------------------------------
def test_finetune_refuses_before_loading_with_a_change_that_fits(tiny, tmp_path, monkeypatch, capsys):
    """A GPU of 64 MiB: batch 8 of the tiny model needs ~84 MiB at its peak (its logits at the answer
    positions, in the loss), batch 4 ~52."""
    from fourbit.plan import gate
    from fourbit.train import loop

    monkeypatch.setattr(gate, "local_target", lambda device: Target("a 64 MiB test GPU", "cuda", 64 * 2**20, headroom=0.0))
    monkeypatch.setattr(loop, "load_base", lambda *a, **k: pytest.fail("the model was loaded"))
    argv = ["finetune", "--model", tiny, "--output-dir", str(tmp_path / "run"), "--steps", "2", "--batch-size", "8",
            "--eval-examples", "8", "--max-length", "80"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "64.0 MiB usable" in err and "nothing was loaded" in err, err
    assert "--batch-size 4 --grad-accum 2 (planned peak" in err, err


def test_changes_are_planned_each_alone_and_leave_the_plan_its_own_notes(tiny, tmp_path):
    from fourbit.plan import plan

    p = plan(_small(tiny, tmp_path, batch_size=8), target=Target("a 64 MiB test GPU", "cuda", 64 * 2**20, headroom=0.0),
             suggest="first")
    assert not p.fits and p.suggestions[-1].fits and all(s.peak < p.peak for s in p.suggestions)
    assert len(p.notes) == len(set(p.notes)), p.notes  # the changes' plans once appended theirs to this list


# ---- the CLI ------------------------------------------------------------------------------------
def test_plan_cli_writes_the_table_json_and_png(tmp_path, capsys):
    out = tmp_path / "plan.json"
    code = main(["plan", "--model", "smollm2-135m", "--gpu", "T4", "--max-length", "256", "--batch-size", "2",
                 "--json", str(out), "--png", str(tmp_path / "plan.png")])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "QLoRA plan for smollm2-135m on T4" in text and "4-bit weights" in text and "fits" in text
    data = json.loads(out.read_text())
    assert data["fits"] and data["peak"] > data["static"]["codes"] > 0
    assert (tmp_path / "plan.png").read_bytes()[:4] == b"\x89PNG"
    # nothing fake was left in a process-wide cache for later real calls
    from torch._subclasses.fake_tensor import is_fake

    from fourbit.lora import layers
    from fourbit.nf4 import quant, state

    cached = [*layers._SHARED_TABLES.values(), *quant._PAIR_TABLES.values(), *state._CODES.values()]
    assert cached and not any(is_fake(t) for t in cached)


@pytest.mark.parametrize("argv, words", [
    (["--model", "llama-66b"], "neither a preset"),
    (["--model", "smollm2-135m", "--gpu-memory", "12XB"], "'12XB' is not a memory size"),
    (["--model", "smollm2-135m", "--gpu", "Z80"], "not in the table"),
    (["--model", "{file}"], "not a GGUF file"),
    (["--model", "{dir}"], "without config.json"),
    (["--model", "smollm2-135m", "--world-size", "2"], "needs --distributed"),
    (["--model", "smollm2-135m", "--distributed", "fsdp", "--world-size", "2"], "torch_adamw"),
])
def test_bad_input_is_one_line(argv, words, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / "empty").mkdir()
    argv = [a.format(file=tmp_path / "notes.txt", dir=tmp_path / "empty") for a in argv]
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and words in err and err.startswith("fourbit plan: error:"), err


def test_plan_help_lists_the_presets(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "usage: fourbit plan" in out and "llama-65b" in out and "--gpu-memory" in out


def test_sizes():
    assert parse_size("24GiB") == 24 * 2**30 and parse_size("80GB") == 80 * 10**9 and parse_size("16000MiB") == 16000 * 2**20
    assert parse_size("1.5G") == int(1.5 * 2**30)
    assert gpus.gpu_target("h100").hopper and not gpus.gpu_target("A100-40GB").hopper
