"""The training loop against bitsandbytes + PEFT on the real SmolLM2-135M (slow, bnb).

fourbit (Linear4bit + LoRALinear + fourbit PagedAdamW) and bitsandbytes Linear4bit (same packed bytes)
+ PEFT LoRA (same initial adapter) + bitsandbytes.optim.PagedAdamW take 30 steps on the same batches
with the same loss, schedule and clipping, in fp32 on CPU. The per-step losses must agree within
1e-3 relative, and both must fall.
"""

from __future__ import annotations

import pytest

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")
pytest.importorskip("gguf")

from benchmarks.bench_train import build_pair, date_batches, make_optimizer, train_step  # noqa: E402
from fourbit.train import TrainConfig, lr_at  # noqa: E402

STEPS = 30


@pytest.mark.slow
@pytest.mark.bnb
def test_losses_match_bitsandbytes_plus_peft_for_30_steps():
    config = TrainConfig(lr=1e-3, warmup=2, steps=STEPS, schedule="cosine")
    models, tokenizer = build_pair("smollm2", r=8, alpha=16, targets=("q_proj", "v_proj", "down_proj"), seed=0)
    batches = date_batches(tokenizer, batch_size=2)
    losses = {}
    for provider, model in models.items():
        params = [p for p in model.parameters() if p.requires_grad]
        opt = make_optimizer(provider, params, config.lr)
        losses[provider] = [
            train_step(model, opt, params, batches(i), lr=lr_at(i, config, STEPS), clip_norm=1.0) for i in range(STEPS)
        ]
    ours, theirs = losses["fourbit"], losses["bnb+peft"]
    worst = max(abs(a - b) / abs(b) for a, b in zip(ours, theirs))
    assert worst < 1e-3, list(zip(ours, theirs))
    for seq in (ours, theirs):
        assert sum(seq[-5:]) / 5 < 0.5 * sum(seq[:5]) / 5  # the loss falls by more than half
