"""One small QLoRA run, in a single process or under torchrun; used by tests/test_distributed.py.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_worker.py \
        --out DIR [--model tiny|smollm2] [--resume-from SINGLE_PROCESS_CHECKPOINT]

Under torchrun every rank runs, in one process group: DDP for 10 steps (checkpoint after step 5)
and resumed from its own checkpoint, FSDP2 the same, FSDP2 with gradient accumulation, DDP with
fourbit's own AdamW, FSDP2 resumed from a single-process checkpoint, that checkpoint loaded under
DDP and FSDP2 and written again at once (the round trip back to one process), an FSDP2 forward
under a bf16 mixed-precision policy that records whether the gathered packed bytes are the
original ones, and a deliberately mismatched model on rank 1 that wrap_model must refuse. Rank 0
writes DIR/results.json. The model, data and steps live in tests/helpers.py, which the test imports too to
run the single-process reference.

The data (helpers.global_batch) makes ranks unequal on purpose: each row of a global batch masks a random number of
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

if __package__ in (None, ""):  # run as a script by torchrun: make `fourbit` importable (tests/ is already on the path)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fourbit.lora import Linear4bit  # noqa: E402
from fourbit.train import checkpoint, distributed, parallel  # noqa: E402
from helpers import LR, STEPS, global_batch, make_optimizer, qlora_model, train_steps  # noqa: E402

def _accumulated(runtime, name: str) -> dict:
    """FSDP2 with each rank's rows in two micro-batches: the same steps as one big batch."""
    model = parallel.wrap_model(qlora_model(name), runtime)
    optimizer = make_optimizer(model, LR[name])
    return {"losses": train_steps(model, optimizer, model.config.vocab_size, 0, STEPS, micro_batches=2)}


def _run(runtime, name: str, out: str, tag: str, optimizer_kind: str = "torch") -> dict:
    model = qlora_model(name)
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
    model = parallel.wrap_model(qlora_model(name), runtime)
    optimizer = make_optimizer(model, LR[name], optimizer_kind)
    state = checkpoint.load(directory, model, optimizer)
    vocab = parallel.unwrap(model).config.vocab_size
    return {"step": state["step"], "losses": train_steps(model, optimizer, vocab, state["step"], STEPS)}


def _round_trip(runtime, name: str, source: str, target: str) -> None:
    """Load a checkpoint into a wrapped model and write it again at once: nothing may change."""
    model = parallel.wrap_model(qlora_model(name), runtime)
    optimizer = make_optimizer(model, LR[name])
    state = checkpoint.load(source, model, optimizer)
    checkpoint.save(target, model, optimizer, step=state["step"])


def _bf16_forward(runtime, name: str) -> dict:
    """FSDP with param_dtype=bf16: compare each packed weight as gathered for forward with its bytes
    before sharding; also the loss, which noise weights would push far from the fp32 one."""
    model = qlora_model(name)
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
        parallel.wrap_model(qlora_model("tiny", r=8 if runtime.rank == 0 else 4), runtime)
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
