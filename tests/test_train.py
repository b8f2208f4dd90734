"""The training loop on a tiny random Llama: config checks, data, schedule, evaluator, resume, bad input."""

from __future__ import annotations

import errno
import json
import math
import os
import signal

import pytest
import safetensors.torch
import torch

from fourbit.train import TrainConfig, Trainer, lr_at
from fourbit.train import checkpoint as ckpt
from fourbit.train.data import IGNORE, Record, batch_at, encode, encode_all, read_jsonl
from fourbit.train.loop import RunDirExists
from fourbit.train.models import load_dense
from fourbit.train.task import date_task, exact_match
from helpers import tiny_llama_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_llama_dir(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny)


def small(tiny, out, **kw):
    base = dict(model=tiny, output_dir=str(out), steps=4, batch_size=4, eval_examples=4, max_length=80, lr=1e-2, warmup=1)
    base.update(kw)
    return TrainConfig(**base)


# ---- config and schedule ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field,value,word",
    [("r", 0, "r must"), ("dropout", 1.0, "dropout"), ("optimizer", "sgd", "optimizer"), ("schedule", "step", "schedule"),
     ("max_length", 2, "max_length"), ("on_bad_line", "ignore", "on_bad_line")],
)
def test_config_rejects_bad_values(field, value, word):
    with pytest.raises(ValueError, match=word):
        TrainConfig(**{field: value})


def test_config_round_trip():
    c = TrainConfig(targets=("q_proj",), lr=3e-4)
    assert TrainConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({"learning_rate": 1.0})


def test_schedule_warmup_then_cosine():
    c = TrainConfig(lr=1.0, warmup=3, steps=13)
    lrs = [lr_at(s, c, 13) for s in range(13)]
    assert lrs[:3] == [0.25, 0.5, 0.75]
    assert lrs[3] == 1.0
    assert all(a > b for a, b in zip(lrs[3:], lrs[4:]))  # decays monotonically
    assert lrs[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 9 / 10)))
    lin = TrainConfig(lr=1.0, warmup=0, steps=4, schedule="linear")
    assert [lr_at(s, lin, 4) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]


# ---- data -----------------------------------------------------------------------------------------
def test_jsonl_bad_lines_named_or_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"prompt": "a", "response": "b"}\n'
        '{"prompt": "no response"}\n'
        'not json\n'
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
    )
    with pytest.raises(ValueError, match=r"d.jsonl:2"):
        read_jsonl(path)
    with pytest.warns(UserWarning, match="skipped 2 bad line"):
        records = read_jsonl(path, on_bad_line="skip")
    assert records == [Record("a", "b"), Record([{"role": "user", "content": "hi"}], "yo")]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_jsonl(tmp_path / "missing.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(b"\x00\xff\xfe garbage\n")
    with pytest.raises(ValueError, match="bin.jsonl:1"):
        read_jsonl(tmp_path / "bin.jsonl")


def test_prompt_masked_and_truncation_counted(tokenizer):
    rec = Record("Write the date 1 May 2000 in ISO 8601 format (YYYY-MM-DD).", "2000-05-01")
    ids, labels, cut = encode(tokenizer, rec, 200)
    answer = tokenizer("2000-05-01", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    n_prompt = len(ids) - len(answer)
    assert not cut and labels[:n_prompt] == [IGNORE] * n_prompt and labels[n_prompt:] == answer == ids[n_prompt:]
    with pytest.warns(UserWarning, match="truncated 2 of 2"):
        enc = encode_all(tokenizer, [rec, rec], n_prompt + 3)
    assert enc.truncated == 2 and all(len(x) == n_prompt + 3 for x in enc.input_ids)
    with pytest.raises(ValueError, match="no answer tokens"):
        encode_all(tokenizer, [rec], n_prompt)


def test_batches_are_seeded_epoch_permutations(tokenizer):
    train, _ = date_task(n_train=12, n_eval=1)
    enc = encode_all(tokenizer, train, 96)
    first = [batch_at(enc, i, 4, seed=7, pad_id=0)["input_ids"] for i in range(3)]
    again = [batch_at(enc, i, 4, seed=7, pad_id=0)["input_ids"] for i in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    rows = {tuple(r[r != 0].tolist()) for b in first for r in b}
    assert len(rows) == 12  # one epoch visits every example once
    other = batch_at(enc, 0, 4, seed=8, pad_id=0)["input_ids"]
    assert not torch.equal(first[0], other)


def test_date_task_splits_are_disjoint_and_fixed():
    train, ev = date_task()
    assert len(train) == 2000 and len(ev) == 48
    assert not {r.prompt for r in train} & {r.prompt for r in ev}
    assert date_task()[1] == ev


# ---- exact match ------------------------------------------------------------------------------------
class Oracle(torch.nn.Module):
    """Predicts the next token of a fixed set of sequences (or a wrong token where told)."""

    def __init__(self, sequences, vocab, wrong=()):
        super().__init__()
        self.next = {}
        for seq in sequences:
            for t in range(len(seq) - 1):
                self.next[tuple(seq[: t + 1])] = seq[t + 1]
        self.vocab, self.wrong, self.w = vocab, set(wrong), torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask):
        b, t = input_ids.shape
        logits = torch.zeros(b, t, self.vocab)
        for i in range(b):
            row = input_ids[i].tolist()
            for j in range(t):
                nxt = self.next.get(tuple(row[: j + 1]), 0)
                logits[i, j, (nxt + 1) % self.vocab if (tuple(row[: j + 1]) in self.wrong) else nxt] = 1.0
        return type("Out", (), {"logits": logits})


def test_exact_match_counts_whole_answers(tokenizer):
    from fourbit.train.data import answer_ids, prompt_ids

    _, ev = date_task(n_eval=5)
    seqs = [prompt_ids(tokenizer, r.prompt) + answer_ids(tokenizer, r.response) for r in ev]
    assert exact_match(Oracle(seqs, len(tokenizer)), tokenizer, ev, batch_size=2) == 1.0
    # one wrong answer digit in record 1, and a wrong end-of-turn in record 3: 3/5 remain exact
    wrong = {tuple(seqs[1][:-3]), tuple(seqs[3][:-1])}
    assert exact_match(Oracle(seqs, len(tokenizer), wrong), tokenizer, ev, batch_size=2) == pytest.approx(3 / 5)
    # a wrong prediction inside the prompt does not count
    wrong_prompt = {tuple(seqs[0][:3])}
    assert exact_match(Oracle(seqs, len(tokenizer), wrong_prompt), tokenizer, ev) == 1.0


# ---- the loop -----------------------------------------------------------------------------------------
def test_training_lowers_loss_and_writes_the_run(tiny, tmp_path):
    summary = Trainer(small(tiny, tmp_path / "run"), progress=False).train()
    assert summary["last_loss"] < summary["first_loss"]
    run = tmp_path / "run"
    for name in ("metrics.jsonl", "loss.png", "summary.json", "adapter/adapter_model.safetensors", "checkpoint/optimizer.pt"):
        assert (run / name).exists(), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 5))
    assert "exact_match" in rows[0] and "exact_match" in rows[-1]


@pytest.mark.parametrize("optimizer", ["paged_adamw", "adamw8bit", "torch_adamw"])
def test_kill_and_resume_is_bit_identical(tiny, tmp_path, optimizer):
    kw = dict(dropout=0.1, grad_accum=2, optimizer=optimizer)
    full = Trainer(small(tiny, tmp_path / "full", **kw), progress=False)
    full.train()

    cut = Trainer(small(tiny, tmp_path / "cut", **kw), progress=False)
    cut.on_step = lambda trainer, step: os.kill(os.getpid(), signal.SIGINT) if step == 2 else None
    assert cut.train()["interrupted"]  # the SIGINT handler saved a checkpoint after step 2
    with pytest.raises(RunDirExists, match="--resume"):
        Trainer(small(tiny, tmp_path / "cut", **kw), progress=False)
    resumed = Trainer(small(tiny, tmp_path / "cut", **kw), resume=True, progress=False)
    assert resumed.step == 2
    resumed.train()

    losses = lambda t: [(r["step"], r["loss"]) for r in t.metrics if "loss" in r]  # noqa: E731
    assert losses(resumed) == losses(full)  # exact float equality, every step
    a = safetensors.torch.load_file(str(tmp_path / "full/adapter/adapter_model.safetensors"))
    b = safetensors.torch.load_file(str(tmp_path / "cut/adapter/adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_changed_config(tiny, tmp_path):
    t = Trainer(small(tiny, tmp_path / "run", steps=2), progress=False)
    t.train()
    with pytest.raises(ValueError, match=r"different config \(fields \['lr'\]\)"):
        Trainer(small(tiny, tmp_path / "run", steps=2, lr=5e-3), resume=True, progress=False)
    Trainer(small(tiny, tmp_path / "run", steps=2), overwrite=True, progress=False)  # overwrite clears it


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tiny, tmp_path, monkeypatch):
    t = Trainer(small(tiny, tmp_path / "run", steps=2), progress=False)
    t.train()
    before = (tmp_path / "run/checkpoint/optimizer.pt").read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    t.step = 99
    with pytest.raises(OSError, match="No space"):
        t.save_checkpoint()
    monkeypatch.undo()
    assert (tmp_path / "run/checkpoint/optimizer.pt").read_bytes() == before
    assert json.loads((tmp_path / "run/checkpoint/trainer_state.json").read_text())["step"] == 2
    assert not (tmp_path / "run/.checkpoint-new").exists()


def test_bad_model_paths(tmp_path):
    with pytest.raises(ValueError, match="neither"):
        load_dense(str(tmp_path / "nothing"))
    (tmp_path / "w.bin").write_bytes(b"PK\x03\x04rest")
    with pytest.raises(ValueError, match="not a GGUF"):
        load_dense(str(tmp_path / "w.bin"))
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match="without config.json"):
        load_dense(str(tmp_path / "d"))


def test_jsonl_data_trains(tiny, tmp_path):
    path = tmp_path / "d.jsonl"
    with open(path, "w") as f:
        for i in range(30):
            f.write(json.dumps({"prompt": f"Say {i}.", "response": str(i)}) + "\n")
    t = Trainer(small(tiny, tmp_path / "run", data=str(path), steps=2), progress=False)
    assert len(t.eval_records) == 3 and len(t.data.input_ids) == 27
    assert t.train()["exact_match_after"] is not None


# ---- LoRA on a dense base (the baseline QLoRA is measured against) ------------------------------
@pytest.mark.parametrize("base,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_lora_on_a_dense_base_trains(tiny, tmp_path, base, dtype):
    from fourbit.lora import Linear4bit, LoRALinear

    t = Trainer(small(tiny, tmp_path / base, base_weights=base), progress=False)
    layers = [m for m in t.model.modules() if isinstance(m, LoRALinear)]
    assert layers and all(type(m.base) is torch.nn.Linear and m.base.weight.dtype == dtype for m in layers)
    assert not any(isinstance(m, Linear4bit) for m in t.model.modules())
    assert all(p.dtype == torch.float32 for p in t.params)  # the adapter stays float32 either way
    summary = t.train()
    assert summary["last_loss"] < summary["first_loss"] and summary["config"]["base_weights"] == base
    with pytest.raises(ValueError, match="base_weights"):
        TrainConfig(base_weights="int8")


@pytest.mark.slow
def test_bench_qlora_vs_lora_smoke(tiny, tmp_path):
    from benchmarks import bench_qlora_vs_lora

    assert bench_qlora_vs_lora.main(["--smoke", "--model", tiny, "--bases", "nf4,fp32", "--out", str(tmp_path)]) == 0
    q, d = json.loads((tmp_path / "qlora_vs_lora.json").read_text())
    assert (q["base_weights"], d["base_weights"]) == ("nf4", "fp32")
    assert d["memory"]["base_linear"] == d["paper_base_linear_bytes"]  # 32 bits per dense weight
    # 4 + 8/64 + 32/(64*256) bits per NF4+DQ weight, plus per tensor one nested scale and the offset
    assert 1 < q["memory"]["base_linear"] / q["paper_base_linear_bytes"] < 1.02
    assert q["memory"]["adapter"] == d["memory"]["adapter"] == 4 * q["adapter_params"]
    assert q["memory"]["optimizer"] == 2 * q["memory"]["adapter"]  # two float32 AdamW moments
    assert q["memory"]["activations"] > 0 and len(q["losses"]) == 1
    assert "| QLoRA (nf4+dq) |" in (tmp_path / "qlora_vs_lora.md").read_text()


# ---- answer-position logits and the shared prompt prefix -----------------------------------------
@pytest.mark.parametrize("share_prefix", [False, True])
def test_answer_logits_equal_the_full_forward_and_its_gradients(share_prefix):
    """forward.answer_logits keeps the full forward's terms at the answer positions (right padding,
    rows of different lengths, a 5-token common prefix) and its LoRA gradients."""
    from fourbit.lora import add_lora, quantize_model
    from fourbit.train.forward import answer_layout, answer_logits, layout_of
    from helpers import tiny_llama

    model = add_lora(quantize_model(tiny_llama()), r=4, alpha=8)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    g = torch.Generator().manual_seed(0)
    rows = [[3, 4, 5, 6, 7] + torch.randint(8, 96, (n,), generator=g).tolist() for n in (9, 6, 11)]
    labels = [[IGNORE] * (len(r) - 4) + r[-4:] for r in rows]  # the last 4 tokens of each row are its answer
    from fourbit.train.data import collate

    b = collate(rows, labels, 0)
    layout = answer_layout(rows, labels)
    assert layout == layout_of(b) and layout.prefix == 5 and layout.keep == tuple(range(6, 15))  # rows of 14, 11, 16 tokens, answers their last 4
    results = []
    for fn in ("full", "answer"):
        model.zero_grad()
        if fn == "full":
            logits, target = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1], b["labels"][:, 1:]
        else:
            logits, target = answer_logits(model, b["input_ids"], b["attention_mask"], b["labels"], layout, share_prefix=share_prefix)
            assert logits.shape[1] < b["input_ids"].shape[1] - 1  # prompt-only positions were skipped
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE, reduction="sum")
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (l0, g0), (l1, g1) = results
    assert torch.allclose(l0, l1, rtol=1e-5)
    assert all(torch.allclose(a, b_, rtol=1e-4, atol=1e-6) for a, b_ in zip(g0, g1))
