"""Optimizer step time and state memory: fourbit's (Paged)AdamW(8bit) vs torch and bitsandbytes.

    python -m benchmarks.bench_optim [--device cpu|cuda] [--smoke] [--out DIR]

Workload: the LoRA parameters of SmolLM2-135M (r=16 on q, k, v, o, gate, up, down of its 30 layers:
420 tensors, 4.9 M parameters), float32, the same fixed gradients for every provider. fourbit runs
unpaged, paged with the budget idle (everything resident), and paged with the budget at 25 % of the
state bytes (pages move every step). Before timing, each provider takes 3 steps from the same start
and its update is checked against torch.optim.AdamW (32-bit: 1e-5 relative, 8-bit: 5e-2).

GB/s counts the bytes an ideal fused step must move per element: 32-bit reads p, g, m, v and writes
p, m, v (28 B); 8-bit reads p, g and two codes and writes p and two codes (16 B), plus the scales.
Paging traffic is not counted in it: the pager's own bytes in/out per step are in each row.
"peak MiB" is the optimizer state resident on the device (CPU: the "device" pool), measured as
torch.cuda.max_memory_allocated growth on CUDA and counted from the state tensors on CPU.
"""

from __future__ import annotations

import argparse
import warnings

import torch

from fourbit.optim import AdamW, AdamW8bit, PagedAdamW, PagedAdamW8bit
from fourbit.train.optim import DEFAULT_PAGE_BYTES

from .harness import record, time_fn, write_results

# SmolLM2-135M: hidden 576, 3 KV heads of 64 (192), MLP 1536, 30 layers.
_HIDDEN, _KV, _MLP, _LAYERS, _R = 576, 192, 1536, 30, 16
_TARGETS = {"q": (_HIDDEN, _HIDDEN), "k": (_HIDDEN, _KV), "v": (_HIDDEN, _KV), "o": (_HIDDEN, _HIDDEN),
            "gate": (_HIDDEN, _MLP), "up": (_HIDDEN, _MLP), "down": (_MLP, _HIDDEN)}  # fmt: skip
PAGE_BYTES = DEFAULT_PAGE_BYTES  # what PagedAdamW uses unless told otherwise


def lora_shapes(layers: int) -> list[tuple[int, int]]:
    """(r, in) for A and (out, r) for B of every target in `layers` layers."""
    shapes = []
    for _ in range(layers):
        for fan_in, fan_out in _TARGETS.values():
            shapes += [(_R, fan_in), (fan_out, _R)]
    return shapes


def _state_bytes(opt) -> int:
    """Bytes of optimizer state on the compute device (paged: the resident pages only)."""
    pool = getattr(opt, "pool", None)
    seen = {}  # data_ptr -> bytes: bitsandbytes shares one qmap between all parameters
    for state in opt.state.values():
        for key, v in state.items():
            if torch.is_tensor(v) and key != "step":
                seen[v.data_ptr()] = v.numel() * v.element_size()
    return sum(seen.values()) + (0 if pool is None else pool.stats.peak_resident_bytes)


def _providers(bits: int, budget: int):
    """(name, factory(params)) for one state width."""
    kw = dict(lr=1e-3, weight_decay=1e-2)
    paged = PagedAdamW if bits == 32 else PagedAdamW8bit
    ours = [
        ("fourbit", lambda ps: (AdamW if bits == 32 else AdamW8bit)(ps, **kw)),
        ("fourbit-paged-idle", lambda ps: paged(ps, page_bytes=PAGE_BYTES, **kw)),
        ("fourbit-paged-25%", lambda ps: paged(ps, page_bytes=PAGE_BYTES, device_budget_bytes=budget, **kw)),
    ]
    import bitsandbytes as bnb

    if bits == 32:
        peers = [
            ("torch", lambda ps: torch.optim.AdamW(ps, foreach=True, **kw)),
            ("torch-fused", lambda ps: torch.optim.AdamW(ps, fused=True, **kw)),
            ("bitsandbytes", lambda ps: bnb.optim.AdamW(ps, **kw)),
            ("bitsandbytes-paged", lambda ps: bnb.optim.PagedAdamW(ps, **kw)),
        ]
    else:
        peers = [
            ("bitsandbytes", lambda ps: bnb.optim.AdamW8bit(ps, **kw)),
            ("bitsandbytes-paged", lambda ps: bnb.optim.PagedAdamW8bit(ps, **kw)),
        ]
    return ours + peers


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def run(device: str = "cpu", smoke: bool = False) -> list[dict]:
    shapes = lora_shapes(1 if smoke else _LAYERS)
    n = sum(a * b for a, b in shapes)
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=gen).to(device) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(device) * 1e-2 for s in shapes]

    def fresh():
        params = [torch.nn.Parameter(w.clone()) for w in start]
        for p, g in zip(params, grads):
            p.grad = g
        return params

    reference = fresh()
    ref_opt = torch.optim.AdamW(reference, lr=1e-3, weight_decay=1e-2)
    for _ in range(3):
        ref_opt.step()
    ref_delta = torch.cat([(p.detach() - w).view(-1) for p, w in zip(reference, start)])

    rows = []
    for bits in (32, 8):
        state_bytes = n * (8 if bits == 32 else 2) + (0 if bits == 32 else 8 * -(-n // 256))
        budget = max(PAGE_BYTES, state_bytes // 4)
        for provider, factory in _providers(bits, budget):
            params = fresh()
            opt = factory(params)
            for _ in range(3):
                opt.step()
            delta = torch.cat([(p.detach() - w).view(-1) for p, w in zip(params, start)])
            tol = 1e-5 if bits == 32 else 5e-2
            if _rel(delta, ref_delta) > tol:
                raise AssertionError(f"{provider} {bits}-bit: update off torch's by {_rel(delta, ref_delta):.2e}")
            stats = getattr(opt, "pager_stats", None)
            before = (stats.bytes_in, stats.bytes_out, stats.wait_s) if stats else (0, 0, 0.0)
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            timing = time_fn(opt.step, device=device, smoke=smoke)
            if device == "cuda":
                peak = torch.cuda.max_memory_allocated() - base + _state_bytes(opt)
            else:
                peak = _state_bytes(opt)
            extra = {}
            if stats:
                steps = max(1, timing["reps"]) + (0 if smoke else 1)  # + the warm-up call
                extra = {
                    "page_bytes_in_per_step": (stats.bytes_in - before[0]) / steps,
                    "page_bytes_out_per_step": (stats.bytes_out - before[1]) / steps,
                    "pager_ms_per_step": (stats.wait_s - before[2]) / steps * 1e3,
                }
            per_element = 28 if bits == 32 else 16
            rows.append(
                record(
                    f"adamw{bits} step", provider, f"lora-smollm2 {len(shapes)}x ({n / 1e6:.2f}M)", "float32", timing,
                    device=device, bytes_moved=per_element * n, peak_mem_bytes=peak,
                    config={"lr": 1e-3, "weight_decay": 1e-2, "page_bytes": PAGE_BYTES, "budget_bytes": budget,
                            "state_bytes": state_bytes, "threads": torch.get_num_threads()},
                    **extra,
                )
            )  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--smoke", action="store_true", help="one repetition, one layer of LoRA tensors")
    parser.add_argument("--out", default=None, help="output folder (default: benchmarks/results/<device>)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: on a shared 2-core box each 2-thread op "
                             "waited ~15 ms for the busy core)")  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
        rows = run(args.device, args.smoke)
    path = write_results("optim", rows, out_dir=args.out)
    print(path.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
