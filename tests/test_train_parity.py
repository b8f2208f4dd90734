"""The training loop against bitsandbytes + PEFT on the real SmolLM2-135M (slow, bnb).

fourbit's side is the real `Trainer` (its model loading and quantization, LoRA init, batches,
loss, schedule, clipping and PagedAdamW): 30 calls of `Trainer.train_step`. The bitsandbytes side
is bitsandbytes Linear4bit holding the Trainer's packed bytes + PEFT LoRA with the Trainer's initial
adapter + bitsandbytes.optim.PagedAdamW, stepped here on the Trainer's own batches with the
objective the Trainer documents (mean cross-entropy over answer tokens, clip, lr_at). fp32 on CPU.
The per-step losses must agree within 1e-3 relative, and both must fall.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")
pytest.importorskip("gguf")

from fourbit.train import TrainConfig, Trainer, lr_at  # noqa: E402
from fourbit.train.data import IGNORE, batch_at  # noqa: E402
from helpers import peft_twin  # noqa: E402

STEPS = 30
TARGETS = ("q_proj", "v_proj", "down_proj")


def reference_step(trainer: Trainer, model, optimizer, params, step: int) -> float:
    """One step of the Trainer's objective on the Trainer's batch `step`, for any model."""
    c = trainer.config
    batch = batch_at(trainer.data, step, c.batch_size, c.seed, trainer.tokenizer.pad_token_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, c.clip_norm)
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, c, STEPS)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


@pytest.mark.slow
@pytest.mark.bnb
def test_losses_match_bitsandbytes_plus_peft_for_30_steps(tmp_path):
    import bitsandbytes as bnb

    config = TrainConfig(lr=1e-3, warmup=2, steps=STEPS, schedule="cosine", r=8, alpha=16, targets=TARGETS,
                         batch_size=2, clip_norm=1.0, optimizer="paged_adamw", device="cpu", precision="fp32",
                         output_dir=str(tmp_path / "run"))
    trainer = Trainer(config, progress=False)
    twin = peft_twin(trainer.model, trainer.model, r=8, alpha=16, targets=TARGETS)  # built before any step
    twin_params = [p for p in twin.parameters() if p.requires_grad]
    twin_opt = bnb.optim.PagedAdamW(twin_params, lr=config.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=config.weight_decay)

    ours = [trainer.train_step()["loss"] for _ in range(STEPS)]
    theirs = [reference_step(trainer, twin, twin_opt, twin_params, i) for i in range(STEPS)]
    worst = max(abs(a - b) / abs(b) for a, b in zip(ours, theirs))
    assert worst < 1e-3, list(zip(ours, theirs))
    for seq in (ours, theirs):
        assert sum(seq[-5:]) / 5 < 0.5 * sum(seq[:5]) / 5  # the loss falls by more than half
