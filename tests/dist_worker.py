"""One small QLoRA run, in a single process or under torchrun; used by tests/test_distributed.py.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_worker.py \
        --out DIR [--model tiny|smollm2] [--resume-from SINGLE_PROCESS_CHECKPOINT]

Under torchrun every rank runs, in one process group: DDP for 10 steps (checkpoint after step 5)
and resumed from its own checkpoint, FSDP2 the same, FSDP2 with gradient accumulation, DDP with
fourbit's own AdamW, FSDP2 resumed from a single-process checkpoint, that checkpoint loaded under
DDP and FSDP2 and written again at once (the round trip back to one process), an FSDP2 forward
under a bf16 mixed-precision policy that records whether the gathered packed bytes are the
original ones, and a deliberately mismatched model on rank 1 that wrap_model must refuse. Rank 0
writes DIR/results.json. The test imports the same functions to run the single-process reference.

The data makes ranks unequal on purpose: each row of a global batch masks a random number of
leading (prompt) tokens, so per-rank label-token counts differ and only a token-weighted loss
(`global_mean_loss`) reproduces the single-process run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import weakref

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script by torchrun: make `fourbit` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fourbit.lora import Linear4bit, add_lora, quantize_model  # noqa: E402
from fourbit.train import checkpoint, distributed, parallel  # noqa: E402

STEPS, CHECKPOINT_AT = 10, 5
LR = {"tiny": 2e-2, "smollm2": 2e-4}  # the tiny model learns the sequences within 10 steps; SmolLM2 at a QLoRA lr
GLOBAL_BATCH, SEQ = 4, 16


def build_model(name: str = "tiny", r: int = 8) -> torch.nn.Module:
    """A QLoRA model (NF4 + double quant base, LoRA r on q/k/v/o/gate/up/down), same on every call."""
    import transformers

    torch.manual_seed(0)
    if name == "tiny":
        config = transformers.LlamaConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2,
        )
        dense = transformers.LlamaForCausalLM(config)
    elif name == "smollm2":
        from fourbit.demo import smollm2_gguf_path

        path = smollm2_gguf_path()
        folder, file = os.path.split(path)
        dense = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    else:
        raise ValueError(f"model must be 'tiny' or 'smollm2', got {name!r}")
    torch.manual_seed(1)
    return add_lora(quantize_model(dense.train()), r=r, alpha=16)


def make_optimizer(model: torch.nn.Module, lr: float, kind: str = "torch") -> torch.optim.Optimizer:
    """torch.optim.AdamW (works on FSDP's sharded DTensor parameters) or fourbit's own AdamW
    (32-bit states; plain tensors only, so DDP or a single process)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "fourbit":
        from fourbit.train.optim import AdamW

        return AdamW(params, lr=lr, weight_decay=0.01)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)


def global_batch(step: int, vocab: int) -> dict[str, torch.Tensor]:
    """Rows counting up from a random start by a random stride in {1, 2, 3} (learnable, so the loss
    falls within 10 steps); row i's first k_i labels (k_i in [0, SEQ/2]) are masked as prompt."""
    g = torch.Generator().manual_seed(1000 + step % 2)
    start = torch.randint(0, vocab, (GLOBAL_BATCH, 1), generator=g)  # (B, 1)
    stride = torch.randint(1, 4, (GLOBAL_BATCH, 1), generator=g)  # (B, 1)
    ids = (start + stride * torch.arange(SEQ)) % vocab  # (B, T)
    prompt = torch.randint(0, SEQ // 2 + 1, (GLOBAL_BATCH, 1), generator=g)  # (B, 1)
    labels = torch.where(torch.arange(SEQ) < prompt, -100, ids)  # (B, T)
    return {"input_ids": ids, "labels": labels}


def train_steps(
    model, optimizer, vocab: int, start: int, stop: int, checkpoint_dir: str | None = None, micro_batches: int = 1
) -> list[float]:
    """Steps start..stop-1 on this rank's shard of each global batch, in `micro_batches`
    accumulated pieces, with the gradient norm clipped to 1; returns the global loss per step."""
    losses = []
    for step in range(start, stop):
        batch = distributed.shard(global_batch(step, vocab))
        labels = batch["labels"][:, 1:]  # (b, T-1): token t+1 is predicted at position t
        n_tokens = int((labels != -100).sum())  # this rank's label tokens in the whole step
        loss = 0.0
        for ids, lab in zip(batch["input_ids"].chunk(micro_batches), labels.chunk(micro_batches)):
            logits = model(input_ids=ids).logits  # (b/m, T, V)
            token_sum = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), lab.flatten(), ignore_index=-100, reduction="sum")
            part = distributed.global_mean_loss(token_sum, n_tokens)
            part.backward()
            loss += float(distributed.reduce(part.detach()))
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss)
        if checkpoint_dir is not None and step + 1 == CHECKPOINT_AT:
            checkpoint.save(checkpoint_dir, model, optimizer, step=step + 1)
    return losses


def _accumulated(runtime, name: str) -> dict:
    """FSDP2 with each rank's rows in two micro-batches: the same steps as one big batch."""
    model = parallel.wrap_model(build_model(name), runtime)
    optimizer = make_optimizer(model, LR[name])
    return {"losses": train_steps(model, optimizer, model.config.vocab_size, 0, STEPS, micro_batches=2)}


def _run(runtime, name: str, out: str, tag: str, optimizer_kind: str = "torch") -> dict:
    model = build_model(name)
    vocab = model.config.vocab_size
    single = parallel.packed_weight_bytes(model)
    originals = [weakref.ref(m.weight) for m in model.modules() if isinstance(m, Linear4bit)]
    model = parallel.wrap_model(model, runtime)
    gc.collect()
    mine = parallel.packed_weight_bytes(model)
    mine["full_packed_weights_alive"] = sum(ref() is not None for ref in originals)  # FSDP must free them
    optimizer = make_optimizer(model, LR[name], optimizer_kind)
    losses = train_steps(model, optimizer, vocab, 0, STEPS, os.path.join(out, f"{tag}-checkpoint"))
    every = [None] * runtime.world_size
    torch.distributed.all_gather_object(every, mine)
    return {"losses": losses, "single_process_bytes": single, "per_rank_bytes": every}


def _resume(runtime, name: str, directory: str, optimizer_kind: str = "torch") -> dict:
    model = parallel.wrap_model(build_model(name), runtime)
    optimizer = make_optimizer(model, LR[name], optimizer_kind)
    state = checkpoint.load(directory, model, optimizer)
    vocab = parallel.unwrap(model).config.vocab_size
    return {"step": state["step"], "losses": train_steps(model, optimizer, vocab, state["step"], STEPS)}


def _round_trip(runtime, name: str, source: str, target: str) -> None:
    """Load a checkpoint into a wrapped model and write it again at once: nothing may change."""
    model = parallel.wrap_model(build_model(name), runtime)
    optimizer = make_optimizer(model, LR[name])
    state = checkpoint.load(source, model, optimizer)
    checkpoint.save(target, model, optimizer, step=state["step"])


def _bf16_forward(runtime, name: str) -> dict:
    """FSDP with param_dtype=bf16: compare each packed weight as gathered for forward with its bytes
    before sharding; also the loss, which noise weights would push far from the fp32 one."""
    model = build_model(name)
    original = {id(m): m.weight.detach().clone() for m in model.modules() if isinstance(m, Linear4bit)}
    checked, mismatched = [], []

    def compare(module, args):
        checked.append(id(module))
        if module.weight.dtype != torch.uint8 or not torch.equal(module.weight.detach(), original[id(module)]):
            mismatched.append(id(module))

    for m in model.modules():
        if isinstance(m, Linear4bit):
            m.register_forward_pre_hook(compare)
    model = parallel.wrap_model(model, runtime, param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    batch = distributed.shard(global_batch(0, model.config.vocab_size))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits
    labels = batch["labels"][:, 1:]
    token_sum = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
    loss = distributed.reduce(distributed.global_mean_loss(token_sum, int((labels != -100).sum())))
    return {"layers": len(original), "checked": len(set(checked)), "mismatched": len(mismatched), "loss": float(loss)}


def _mismatch(runtime) -> str:
    """Rank 1 builds LoRA rank 4 where rank 0 has 8: wrap_model must refuse on every rank."""
    try:
        parallel.wrap_model(build_model("tiny", r=8 if runtime.rank == 0 else 4), runtime)
    except ValueError as err:
        return str(err)
    return ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="tiny", choices=["tiny", "smollm2"])
    parser.add_argument("--resume-from", default=None, help="a single-process checkpoint to continue under FSDP")
    args = parser.parse_args(argv)
    ddp = distributed.setup("ddp")
    results = {"world_size": ddp.world_size, "backend": ddp.backend}
    results["ddp"] = _run(ddp, args.model, args.out, "ddp")
    fsdp = distributed.setup("fsdp")
    results["fsdp"] = _run(fsdp, args.model, args.out, "fsdp")
    if args.resume_from:
        results["fsdp_resumed"] = _resume(fsdp, args.model, args.resume_from)
        for runtime in (ddp, fsdp):
            _round_trip(runtime, args.model, args.resume_from, os.path.join(args.out, f"{runtime.mode}-roundtrip-checkpoint"))
    if args.model == "tiny":
        results["fsdp_accumulated"] = _accumulated(fsdp, args.model)
        results["ddp_fourbit_adamw"] = _run(ddp, args.model, args.out, "ddp-fourbit-adamw", "fourbit")
        for runtime in (ddp, fsdp):  # each mode resumed from its own checkpoint
            results[f"{runtime.mode}_self_resumed"] = _resume(runtime, args.model, os.path.join(args.out, f"{runtime.mode}-checkpoint"))
        results["bf16"] = _bf16_forward(fsdp, args.model)
        results["mismatch"] = _mismatch(fsdp)
    if distributed.is_main():
        with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    distributed.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
