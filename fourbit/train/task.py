"""The embedded task ("dates") and the exact-match evaluator.

Task: rewrite a date written in words as ISO 8601.
    prompt   "Write the date 7 March 2021 in ISO 8601 format (YYYY-MM-DD)."
    response "2021-03-07"
SmolLM2-135M-Instruct answers this in prose ("The date 7 March 2021 in ISO 8601 format is ...") or
with wrong digits, so its exact-match accuracy starts near 0; the answer is short and fully
determined by the prompt, so a few minutes of QLoRA on CPU move it a lot and the check is exact.

The examples are generated, not stored: `random.Random(seed)` is specified to give the same
sequence on every platform and Python version (it is the Mersenne Twister with a documented
seeding algorithm), so the train and eval splits are the same everywhere. Train and eval draw from
disjoint (day, month, year) triples.

Exact match is measured in one teacher-forced forward pass: greedy decoding reproduces the answer
exactly iff, at every answer position, the argmax of the logits given the gold prefix is the gold
token (induction over positions: if every argmax matches, greedy decoding walks the gold path; at the
first mismatch it leaves it). The end-of-turn token is part of the answer, so a correct answer followed
by chatter counts as wrong. One pass over B examples instead of up to len(answer) decoding steps, with the language-model head
on the answer positions only (`forward.answer_logits`).
"""

from __future__ import annotations

import random

import torch

from .data import IGNORE, Record, answer_ids, collate, encode, prompt_ids
from .forward import answer_layout, answer_logits

__all__ = ["date_task", "exact_match", "generate"]

MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)


def date_task(n_train: int = 2000, n_eval: int = 48, seed: int = 1234) -> tuple[list[Record], list[Record]]:
    """(train, eval) records of the date task; eval triples never occur in train."""
    rng = random.Random(seed)
    seen: set[tuple[int, int, int]] = set()
    out: list[Record] = []
    while len(out) < n_train + n_eval:
        y, m, d = rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)
        if (y, m, d) in seen:
            continue
        seen.add((y, m, d))
        prompt = f"Write the date {d} {MONTHS[m - 1]} {y} in ISO 8601 format (YYYY-MM-DD)."
        out.append(Record(prompt, f"{y:04d}-{m:02d}-{d:02d}"))
    return out[:n_train], out[n_train:]


@torch.no_grad()
def exact_match(model, tokenizer, records: list[Record], *, batch_size: int = 16, device=None,
                max_length: int | None = None, share_prefix: bool = False) -> float:
    """Fraction of records whose answer (+ end-of-turn) greedy decoding reproduces exactly. With
    `max_length`, each example is cut to that many tokens as training examples are (`data.encode`):
    a truncated answer is judged on the tokens that remain."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    hits = 0
    try:
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            ids, labels = [], []
            for rec in chunk:
                if max_length is not None:
                    x, y, _ = encode(tokenizer, rec, max_length)
                else:
                    p, a = prompt_ids(tokenizer, rec.prompt), answer_ids(tokenizer, rec.response)
                    x, y = p + a, [IGNORE] * len(p) + a
                ids.append(x)
                labels.append(y)
            batch = collate(ids, labels, tokenizer.pad_token_id)
            logits, target = answer_logits(model, *(batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")),
                                           answer_layout(ids, labels), share_prefix=share_prefix)
            pred = logits.argmax(-1)  # (B, P): the token predicted at each answer position (forward.answer_logits)
            ok = ((pred == target) | (target == IGNORE)).all(dim=1).cpu()
            hits += int(ok.sum())
    finally:
        model.train(was_training)
    return hits / len(records)


@torch.no_grad()
def generate(model, tokenizer, prompt: str, *, max_new_tokens: int = 64) -> str:
    """Greedy completion of one chat-formatted prompt, without the prompt and end-of-turn token."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids(tokenizer, prompt)], device=device)  # (1, T)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
