"""Training data: JSONL records -> token ids with the prompt masked out of the labels -> padded batches.

A record is either {"prompt": str, "response": str} or a chat {"messages": [{"role", "content"}, ...]}
whose last message is the assistant's answer. Both are rendered with the tokenizer's chat template
(plain "prompt + response + eos" when the tokenizer has none), split into

    prompt ids  (everything up to and including the assistant header)  -> label -100 (no loss)
    answer ids  (the response and the end-of-turn token)               -> label = the token

so the causal-LM loss is the mean negative log-likelihood of the answer tokens only. Examples longer
than `max_length` are truncated from the right (the answer is cut) and counted in `Encoded.truncated`.

Batches: the example order of epoch e is a permutation drawn from a generator seeded with
(seed, e), so the batch at any step is a pure function of (seed, step) -- which is what makes a
resumed run see exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings

import torch

from ..errors import BadFile, InvalidInput, MissingFile

__all__ = ["Record", "Encoded", "read_jsonl", "encode", "encode_all", "collate", "batch_at", "prompt_ids"]

IGNORE = -100  # label value that F.cross_entropy skips


@dataclasses.dataclass(frozen=True)
class Record:
    prompt: str | list[dict]  # a string, or the chat messages before the answer
    response: str


def _parse(obj, where: str) -> Record:
    if isinstance(obj, dict) and isinstance(obj.get("prompt"), str) and isinstance(obj.get("response"), str):
        return Record(obj["prompt"], obj["response"])
    if isinstance(obj, dict) and isinstance(obj.get("messages"), list) and obj["messages"]:
        msgs = obj["messages"]
        ok = all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs)
        if ok and msgs[-1]["role"] == "assistant" and len(msgs) >= 2:
            return Record([dict(m) for m in msgs[:-1]], msgs[-1]["content"])
    raise BadFile(
        f"{where}: expected {{\"prompt\": str, \"response\": str}} or {{\"messages\": [...]}} ending with an "
        f"assistant message, got {str(obj)[:120]!r}",
        "fix that line, or pass --on-bad-line skip",
    )


def read_jsonl(path: str | os.PathLike, *, on_bad_line: str = "stop") -> list[Record]:
    """Read records from a JSONL file. A bad line (invalid JSON, missing fields) raises ValueError
    naming its line number, or with on_bad_line="skip" is skipped with one warning that counts them."""
    path = os.fspath(path)
    fix = "give a JSONL file, or 'dates' for the embedded task"
    if not os.path.exists(path):
        raise MissingFile(f"data file {path!r} does not exist", fix)
    if os.path.isdir(path):
        raise BadFile(f"data file {path!r} is a directory", fix)
    if not os.path.isfile(path):
        raise BadFile(f"data file {path!r} is not a regular file (a device, pipe or socket)", fix)
    records, skipped = [], []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise BadFile(f"{where}: not UTF-8 text ({err.reason} at byte {err.start})", "fix that line, or pass --on-bad-line skip") from None
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise BadFile(f"{where}: not valid JSON ({err.msg})", "fix that line, or pass --on-bad-line skip") from None
                records.append(_parse(obj, where))
            except BadFile as err:
                if on_bad_line != "skip":
                    raise
                skipped.append(err.what)
    if skipped:
        warnings.warn(f"skipped {len(skipped)} bad line(s) in {path}; first: {skipped[0]}", stacklevel=2)
    if not records:
        raise BadFile(f"{path} holds no usable records", "give a JSONL file of {\"prompt\", \"response\"} or {\"messages\"} records")
    return records


def prompt_ids(tokenizer, prompt: str | list[dict]) -> list[int]:
    """Token ids of the prompt, up to and including the assistant header (what generation starts from)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if getattr(tokenizer, "chat_template", None):
        from jinja2 import TemplateError

        try:
            ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        except TemplateError as err:  # the template's own raise_exception(...), or a broken template
            roles = [m.get("role") for m in messages]
            raise InvalidInput(
                f"the chat template of {getattr(tokenizer, 'name_or_path', '') or 'the tokenizer'} refused messages "
                f"with roles {roles} ({err}); first message: "
                f"{str(messages[0].get('content'))[:60]!r}",
                "give records whose roles the template accepts (its message says which), or use another model",
            ) from None
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)
    text = "\n".join(m["content"] for m in messages) + "\n"
    return tokenizer(text, add_special_tokens=True).input_ids


def answer_ids(tokenizer, response: str) -> list[int]:
    """Token ids of the answer followed by the end-of-turn token the model must learn to emit."""
    return tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]


@dataclasses.dataclass
class Encoded:
    input_ids: list[list[int]]
    labels: list[list[int]]
    truncated: int  # how many examples lost tokens to max_length


def encode(tokenizer, record: Record, max_length: int) -> tuple[list[int], list[int], bool]:
    p, a = prompt_ids(tokenizer, record.prompt), answer_ids(tokenizer, record.response)
    ids, labels = p + a, [IGNORE] * len(p) + a
    cut = len(ids) > max_length
    return ids[:max_length], labels[:max_length], cut


def encode_all(tokenizer, records: list[Record], max_length: int) -> Encoded:
    out = Encoded([], [], 0)
    for rec in records:
        ids, labels, cut = encode(tokenizer, rec, max_length)
        if all(x == IGNORE for x in labels):
            raise InvalidInput(f"max_length={max_length} leaves no answer tokens for prompt {str(rec.prompt)[:80]!r}", "raise --max-length")
        out.input_ids.append(ids)
        out.labels.append(labels)
        out.truncated += cut
    if out.truncated:
        warnings.warn(f"truncated {out.truncated} of {len(records)} examples to max_length={max_length} tokens", stacklevel=2)
    return out


def collate(input_ids: list[list[int]], labels: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids (B, T), attention_mask (B, T), labels (B, T)."""
    t = max(len(x) for x in input_ids)
    b = len(input_ids)
    ids = torch.full((b, t), pad_id, dtype=torch.long)
    lab = torch.full((b, t), IGNORE, dtype=torch.long)
    mask = torch.zeros((b, t), dtype=torch.long)
    for i, (x, y) in enumerate(zip(input_ids, labels)):
        ids[i, : len(x)] = torch.tensor(x)
        lab[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


def batch_at(data: Encoded, micro_step: int, batch_size: int, seed: int, pad_id: int) -> dict[str, torch.Tensor]:
    """The micro-batch with global index `micro_step`: epochs are seeded permutations, concatenated.
    Each epoch is cut into len(data) // batch_size full batches (the remainder is dropped)."""
    n = len(data.input_ids)
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise InvalidInput(f"batch_size={batch_size} is larger than the {n} training examples", "lower --batch-size or add data")
    epoch, k = divmod(micro_step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g)[k * batch_size : (k + 1) * batch_size].tolist()
    return collate([data.input_ids[i] for i in order], [data.labels[i] for i in order], pad_id)
