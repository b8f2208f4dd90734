"""A QLoRA training step, fourbit vs bitsandbytes + PEFT: tokens/s and peak memory.

    python -m benchmarks.bench_train [--smoke] [--out DIR] [--steps N] [--batch-size B] [--threads T] [--rounds R]
                                     [--model smollm2 | llama3-8b:LAYERS | tiny-llama:LAYERS] [--seq-len T]

Both sides train the same model with the same adapter init, batches, loss and optimizer settings:
    fourbit       quantize_model + add_lora (fourbit.lora.Linear4bit / LoRALinear) + fourbit PagedAdamW
    bnb+peft      bitsandbytes Linear4bit holding the *same packed bytes and quant state* + PEFT LoRA
                  (adapter values copied from ours) + bitsandbytes.optim.PagedAdamW
so the only differences are the implementations. On CPU: SmolLM2-135M-Instruct (embedded), fp32,
the date task's batches (about 70 tokens per example), r=16 on all seven projections.

On a GPU (benchmarks/gpu/run.sh): `--model llama3-8b:4` builds a stack of 4 decoder layers with
Llama-3-8B's shapes (hidden 4096, MLP 14336, 32 heads, 8 KV heads) and random weights, in bf16 on
the GPU, quantizes it with fourbit's Triton kernels and trains on random tokens, batch 1 x
`--seq-len` 2048 under bf16 autocast, LoRA adapters in fp32 on both sides. The vocabulary is cut to
32768 (Llama-3 has 128256): embedding, lm_head and the loss are the same dense work on both sides,
and at full size they would outweigh the four quantized layers being compared. `tiny-llama:L` is
the same construction at toy size, for the test suite on CPU.

Each provider runs in its own subprocess, so "peak MiB" is that process's peak RSS (CPU) or
torch.cuda.max_memory_allocated (GPU) and one side's allocations never count against the other.
Before timing, two warm-up steps run (allocator, lazy imports); then `--steps` steps are timed one by
one and the median is reported. Tokens/s counts every non-padding token of a step.

bitsandbytes' CPU Linear4bit repacks its weight in place on an eval-mode no-grad forward (SPEC §6);
the twin is kept in train mode and has `support_avx512bf16_for_cpu = False`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

PROVIDERS = ("fourbit", "bnb+peft")
RANDOM_MODELS = {  # name -> LlamaConfig fields; ":LAYERS" in the spec sets num_hidden_layers
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      vocab_size=32768, rope_theta=500000.0, max_position_embeddings=8192),
    "tiny-llama": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                       vocab_size=256, max_position_embeddings=512),
}


def is_random(spec: str) -> bool:
    return spec.partition(":")[0] in RANDOM_MODELS


def random_llama(spec: str, device: str, dtype: torch.dtype, seed: int = 0):
    """A LlamaForCausalLM with the named shapes and random weights on `device` in `dtype`, every
    linear but lm_head quantized by fourbit (Triton on CUDA, the reference on CPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fourbit.lora import quantize_model

    name, _, layers = spec.partition(":")
    config = LlamaConfig(**RANDOM_MODELS[name], num_hidden_layers=int(layers or 4), tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return quantize_model(model, compute_dtype=dtype)


def random_batches(vocab: int, batch_size: int, seq_len: int, device: str):
    """Batch i: random tokens (every one a label), the same for every provider."""
    def batch(i: int) -> dict:
        g = torch.Generator().manual_seed(1000 + i)
        ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g).to(device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    return batch


def build_pair(spec: str = "smollm2", *, r: int = 16, alpha: float = 32, targets=None, seed: int = 0, which=PROVIDERS,
               device: str = "cpu", dtype: torch.dtype = torch.float32):
    """{provider: model} trained from identical starting points, and the tokenizer.

    fourbit's model is quantized by `fourbit.train.models.load_quantized`; the bitsandbytes twin gets
    a deep copy of that skeleton with each Linear4bit swapped for a `bnb.nn.Linear4bit` built from our
    packed bytes (`Params4bit.from_prequantized`), then PEFT LoRA with our initial A/B values.
    """
    from fourbit.lora import Linear4bit, add_lora, lora_layers
    from fourbit.train.config import DEFAULT_TARGETS
    from fourbit.train.models import load_quantized

    targets = tuple(targets or DEFAULT_TARGETS)
    if is_random(spec):
        ours, tokenizer = random_llama(spec, device, dtype, seed), None
    else:
        ours, tokenizer, _ = load_quantized(spec)
    skeleton = copy.deepcopy(ours) if "bnb+peft" in which else None
    torch.manual_seed(seed)
    add_lora(ours, r=r, alpha=alpha, dropout=0.0, target_modules=targets)
    models = {"fourbit": ours.train()}
    if skeleton is not None:
        import bitsandbytes as bnb
        import peft

        for name, base in list(skeleton.named_modules()):
            if not isinstance(base, Linear4bit):
                continue
            layer = bnb.nn.Linear4bit(
                base.in_features, base.out_features, bias=base.bias is not None, quant_type="nf4",
                compute_dtype=dtype, device="meta",
            )
            layer.weight = bnb.nn.Params4bit.from_prequantized(
                base.weight.detach().clone(), base.quant_state.to_dict(), device=device, module=layer
            )
            if base.bias is not None:
                layer.bias = torch.nn.Parameter(base.bias.detach().clone())
            layer.support_avx512bf16_for_cpu = False
            parent, _, child = name.rpartition(".")
            setattr(skeleton.get_submodule(parent) if parent else skeleton, child, layer)
        twin = peft.get_peft_model(
            skeleton, peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets))
        )
        inner = twin.base_model.model
        with torch.no_grad():
            for name, layer in lora_layers(ours).items():
                inner.get_submodule(name).lora_A["default"].weight.copy_(layer.lora_A.weight)
                inner.get_submodule(name).lora_B["default"].weight.copy_(layer.lora_B.weight)
        models["bnb+peft"] = twin.train()
    if "fourbit" not in which:
        del models["fourbit"]
    return models, tokenizer


def make_optimizer(provider: str, params, lr: float):
    if provider == "fourbit":
        from fourbit.train.optim import PagedAdamW
    else:
        from bitsandbytes.optim import PagedAdamW
    return PagedAdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def train_step(model, optimizer, params, batch: dict, *, lr: float, clip_norm: float = 1.0,
               autocast: torch.dtype | None = None) -> float:
    """One step of the fourbit loop's objective (mean CE over answer tokens), any model; the forward
    under `autocast` (bf16 on a GPU, as the training loop runs) when given."""
    device_type = batch["input_ids"].device.type
    with torch.autocast(device_type, dtype=autocast or torch.float32, enabled=autocast is not None):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, clip_norm)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def date_batches(tokenizer, batch_size: int, seed: int = 0):
    from fourbit.train.data import batch_at, encode_all
    from fourbit.train.task import date_task

    train, _ = date_task(n_train=512, n_eval=1)
    data = encode_all(tokenizer, train, 96)
    return lambda i: batch_at(data, i, batch_size, seed, tokenizer.pad_token_id)


def _peak_mib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_provider(provider: str, model_spec: str, steps: int, batch_size: int, r: int, seq_len: int = 2048) -> dict:
    """Time `steps` training steps of one provider in this process."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    models, tokenizer = build_pair(model_spec, r=r, alpha=2 * r, which=(provider,), device=device, dtype=dtype)
    model = models[provider]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(provider, params, 1e-4)
    if is_random(model_spec):
        batches = random_batches(model.config.vocab_size, batch_size, seq_len, device)
    else:
        batches = date_batches(tokenizer, batch_size)
    autocast = dtype if dtype != torch.float32 else None
    losses, times, tokens = [], [], []
    for i in range(steps + 2):
        b = {k: v.to(device) for k, v in batches(i).items()}
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        losses.append(train_step(model, opt, params, b, lr=1e-4, autocast=autocast))  # .item() syncs
        if i >= 2:  # two warm-up steps (allocator, lazy imports, Triton autotuning)
            times.append(time.perf_counter() - t0)
            tokens.append(int(b["attention_mask"].sum()))
    return summarize(times, tokens, _peak_mib(), losses)


def summarize(times: list[float], tokens: list[int], peak_mib: float, losses: list[float]) -> dict:
    """Median / p20 / p80 step time (seconds in, ms out) and tokens/s at the median."""
    med = statistics.median(times)
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return {
        "median_ms": med * 1e3, "p20_ms": q[1] * 1e3, "p80_ms": q[7] * 1e3, "reps": len(times),
        "tokens_per_step": statistics.mean(tokens), "tokens_per_s": statistics.mean(tokens) / med,
        "peak_mib": peak_mib, "losses": losses, "times_s": times, "tokens": tokens,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_train", description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="one timed step, batch 1 (for the test suite)")
    p.add_argument("--out", default=None, help="results directory (default benchmarks/results/<device>)")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per example for the random models")
    p.add_argument("--rounds", type=int, default=1, help="fresh processes per provider, alternating; steps pooled")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per provider (0: torch's default)")
    p.add_argument("--session", default=None, metavar="OUT",
                   help="append rows to OUT/results.jsonl as each provider finishes (benchmarks/gpu/run.sh) "
                        "instead of writing train.json/.md/.png; without bitsandbytes or peft, fourbit alone")
    p.add_argument("--provider", choices=PROVIDERS, help=argparse.SUPPRESS)  # internal: one provider, JSON to stdout
    args = p.parse_args(argv)
    steps, batch = (1, 1) if args.smoke else (args.steps, args.batch_size)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.provider:
        print(json.dumps(run_provider(args.provider, args.model, steps, batch, args.r, args.seq_len)))
        return 0

    from .harness import record, write_results

    dtype_name = "bfloat16" if torch.cuda.is_available() else "float32"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    providers = PROVIDERS if peer_available() else PROVIDERS[:1]
    if args.session is not None:
        from .gpu.common import append_line

        emit = lambda kind, name, **fields: append_line(args.session, "train", kind, name, **fields)  # noqa: E731
        if len(providers) == 1:
            emit("note", "bnb+peft missing", text="bitsandbytes or peft is not installed: fourbit only")
    elif len(providers) == 1:
        raise SystemExit("bench_train compares against bitsandbytes + PEFT: install the test extra")

    def row(provider: str, pooled: list[dict]) -> dict:
        res = summarize([t for r in pooled for t in r["times_s"]], [n for r in pooled for n in r["tokens"]],
                        max(r["peak_mib"] for r in pooled), pooled[0]["losses"])
        res["rounds"] = len(pooled)
        return record(
            "qlora_step", provider, (batch, round(res["tokens_per_step"] / batch)), dtype_name, res,
            peak_mem_bytes=int(res["peak_mib"] * 2**20), tokens_per_s=res["tokens_per_s"],
            config={"model": args.model, "r": args.r, "batch_size": batch, "optimizer": "PagedAdamW", "threads": args.threads,
                    "seq_len": args.seq_len if is_random(args.model) else None},
        )

    runs: dict[str, list[dict]] = {provider: [] for provider in providers}
    failed = []
    # Rounds alternate the providers (A B, B A, A B, ...), each in a fresh process, and the steps of
    # all rounds are pooled: a shared machine's slow spells then hit both sides alike. A GPU session
    # (--session) runs one round and appends each provider's row as soon as it is measured.
    rounds = 1 if args.smoke or args.session is not None else args.rounds
    for round_ in range(rounds):
        for provider in (providers if round_ % 2 == 0 else providers[::-1]):
            cmd = [sys.executable, "-m", "benchmarks.bench_train", "--provider", provider, "--model", args.model,
                   "--steps", str(steps), "--batch-size", str(batch), "--r", str(args.r),
                   "--threads", str(args.threads), "--seq-len", str(args.seq_len)]
            if args.smoke:
                cmd.append("--smoke")
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
            if done.returncode != 0:
                if args.session is None:
                    raise RuntimeError(f"{provider} run failed:\n{done.stderr[-3000:]}")
                last = (done.stderr.strip().splitlines() or [""])[-1]
                if provider == "bnb+peft" and ("ImportError" in last or "ModuleNotFoundError" in last):
                    emit("note", "bnb+peft missing", text=f"bnb+peft missing: {last[:300]}; fourbit only")
                    continue  # the peer is missing, not broken: fourbit's row stands alone
                emit("note", f"{provider} failed", text=done.stderr[-2000:])
                failed.append(provider)
                continue
            runs[provider].append(json.loads(done.stdout.strip().splitlines()[-1]))
            if args.session is not None:
                emit("train", f"qlora_step {provider} {args.model}", **row(provider, runs[provider]))
    if args.session is not None:
        return session_verdict(runs, dtype_name, emit) if not failed else 1

    rows = [row(provider, runs[provider]) for provider in PROVIDERS]
    ours, theirs = rows
    first = first_loss_gap(ours, theirs)
    if first > loss_tolerance(dtype_name):
        raise RuntimeError(f"first-step losses differ: fourbit {ours['losses'][0]} vs bnb+peft {theirs['losses'][0]}")
    speedup = ours["tokens_per_s"] / theirs["tokens_per_s"]
    for r in rows:
        r["speedup_vs_bnb_peft"] = speedup if r["provider"] == "fourbit" else 1.0
    out = write_results("train", rows, out_dir=args.out)
    print(f"fourbit {ours['tokens_per_s']:.0f} tok/s, {ours['peak_mib']:.0f} MiB | bnb+peft {theirs['tokens_per_s']:.0f} tok/s, "
          f"{theirs['peak_mib']:.0f} MiB | speedup {speedup:.2f}x -> {out}")
    return 0


def peer_available() -> bool:
    """bitsandbytes and peft importable (looked up, not imported: importing them takes seconds)."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("bitsandbytes", "peft"))


def loss_tolerance(dtype_name: str) -> float:
    # Same bytes, same adapters, same batches: the first warm-up loss must agree (fp32: 1e-3; bf16
    # autocast rounds differently in the two implementations' matmuls: 2e-2).
    return 1e-3 if dtype_name == "float32" else 2e-2


def first_loss_gap(ours: dict, theirs: dict) -> float:
    return abs(ours["losses"][0] - theirs["losses"][0]) / abs(theirs["losses"][0])


def session_verdict(runs: dict[str, list[dict]], dtype_name: str, emit) -> int:
    """The GPU session's closing lines: the first-step loss agreement (a required check) and the speedup."""
    if len(runs) < 2 or not all(runs.values()):
        return 0
    ours, theirs = (runs[p][0] for p in PROVIDERS)
    gap, tol = first_loss_gap(ours, theirs), loss_tolerance(dtype_name)
    emit("check", "first-step losses agree (fourbit vs bnb+peft)", ok=gap <= tol, required=True, rel_gap=gap, tol=tol,
         losses={"fourbit": ours["losses"][0], "bnb+peft": theirs["losses"][0]})
    emit("fact", "qlora step speedup vs bnb+peft", value=ours["tokens_per_s"] / theirs["tokens_per_s"],
         memory_ratio=ours["peak_mib"] / theirs["peak_mib"])
    return 0 if gap <= tol else 1


if __name__ == "__main__":
    sys.exit(main())
