"""The forward pass the loss and exact match need: logits at the answer positions only.

    layout = answer_layout(rows, labels_of_rows)       # on the host, from the token lists
    logits, target = answer_logits(model, input_ids, attention_mask, labels, layout)   # (B, P, V), (B, P)

Both read logits[t] only where labels[:, t + 1] is an answer token (the prompt is masked out with
-100, data.py), so two pieces of work of a plain `model(...).logits` are skipped, and every kept
term is the one the full (B, T, V) logits held at t (the same sums, up to float rounding):

  * The language-model head runs on the P kept positions (transformers' `logits_to_keep`), not on
    the prompt and the padding: SmolLM2 on the date task keeps 12 of 69 positions, and its
    49152-way head is a fifth of a forward's multiply-adds.
  * `share_prefix=True`: the tokens every row starts with (a chat template's system prompt: 28 of
    the date task's 69) run through the decoder once, at batch 1; their keys and values are repeated
    for the B rows and the rest of each row attends to them through the model's KV cache. Causal
    attention makes the prefix's states independent of what follows, so this is the same function;
    autograd carries the B rows' gradients back through the repeat into the one prefix pass.
    One process only (DDP expects one forward per backward) and no gradient checkpointing (under
    which transformers turns the cache off). Measured on one core here: forward + backward of a
    batch of 8, 5.06 s -> 3.88-4.01 s.

A model whose forward takes no `logits_to_keep` computes every position and the kept ones are
selected after; one without a KV-cache keyword (`cache`, or `past_key_values` before
transformers 5.25) is not prefix-shared.

The positions and the prefix length (`AnswerLayout`) are found from the token lists before the
forward, so the forward's shapes follow from its inputs' shapes alone: `fourbit.plan` traces it on
fake tensors with the layout of the run's real batch.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch

from .data import IGNORE

__all__ = ["AnswerLayout", "answer_layout", "answer_logits", "layout_of"]


@dataclasses.dataclass(frozen=True)
class AnswerLayout:
    """Where a batch's answers are, found on the host from its token lists (never from the tensors
    the forward runs on: `fourbit.plan` runs it on fake tensors, which have no values to search)."""

    keep: tuple[int, ...]  # positions t in 0..T-2 whose next token is an answer token in some row
    prefix: int  # leading tokens every row shares (real tokens, not padding), at most keep[0]


def answer_layout(input_ids: list[list[int]], labels: list[list[int]]) -> AnswerLayout:
    """The layout of rows `input_ids` (unpadded) and their `labels` (IGNORE on the prompt)."""
    keep = sorted({t - 1 for y in labels for t, token in enumerate(y) if t > 0 and token != IGNORE})
    prefix = 0
    shortest = min((len(x) for x in input_ids), default=0)
    while prefix < shortest and all(x[prefix] == input_ids[0][prefix] for x in input_ids):
        prefix += 1
    return AnswerLayout(tuple(keep), min(prefix, keep[0]) if keep else 0)


def layout_of(batch: dict[str, torch.Tensor]) -> AnswerLayout:
    """`answer_layout` of a collated batch (right-padded rows): reads its values on the host."""
    lengths = batch["attention_mask"].sum(1).tolist()
    ids, labels = batch["input_ids"].tolist(), batch["labels"].tolist()
    return answer_layout([x[:n] for x, n in zip(ids, lengths)], [y[:n] for y, n in zip(labels, lengths)])


def _parameters(model) -> frozenset:
    inner = getattr(model, "module", model)  # DDP keeps the model in .module and passes keywords through
    try:
        return frozenset(inspect.signature(inner.forward).parameters)
    except (TypeError, ValueError):
        return frozenset()


def answer_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                  layout: AnswerLayout, *, share_prefix: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, P, V), targets (B, P)) at the P positions `layout.keep` of the batch (module
    docstring); `layout` is `answer_layout` of the same rows."""
    target = labels[:, 1:]  # (B, T-1): the token each position predicts
    keep = torch.tensor(layout.keep, dtype=torch.long, device=input_ids.device)  # (P,) positions in 0..T-2
    names = _parameters(model)
    if "logits_to_keep" not in names or not layout.keep:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, keep]  # (B, T, V) -> (B, P, V)
        return logits, target[:, keep]
    cache_name = "cache" if "cache" in names else "past_key_values" if "past_key_values" in names else None
    b, n = input_ids.shape[0], layout.prefix
    if not (share_prefix and cache_name and b > 1 and n >= 2):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits
        return logits, target[:, keep]
    from transformers import DynamicCache

    cache = DynamicCache(config=getattr(model, "module", model).config)
    model(input_ids=input_ids[:1, :n], attention_mask=attention_mask[:1, :n], use_cache=True, logits_to_keep=1,
          **{cache_name: cache})  # fills the cache: (1, heads, n, head_dim) keys and values per layer
    cache.batch_repeat_interleave(b)  # -> (B, heads, n, head_dim)
    logits = model(input_ids=input_ids[:, n:], attention_mask=attention_mask, use_cache=True,
                   logits_to_keep=keep - n, **{cache_name: cache}).logits  # (B, P, V)
    return logits, target[:, keep]
