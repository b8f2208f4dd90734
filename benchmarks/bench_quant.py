"""Quantize / dequantize throughput: fourbit (reference on CPU, Triton on CUDA) vs bitsandbytes.

    python -m benchmarks.bench_quant [--device cpu|cuda] [--smoke] [--out DIR]

NF4 with double quantization, blocksize 64, on 4096 x 4096 and a Llama-sized 4096 x 11008 weight,
float32 and bfloat16. Each provider's output is checked against bitsandbytes before it is timed.
GB/s counts the bytes an ideal kernel must move: quantize reads the weight and writes 4 bits per
value plus the 8-bit scales; dequantize reads those and writes the weight.
"""

from __future__ import annotations

import argparse

import torch

from fourbit import dispatch
from fourbit.nf4 import QuantState

from .harness import record, time_fn, write_results

SHAPES = [(4096, 4096), (4096, 11008)]
SMOKE_SHAPES = [(256, 256)]


def _bytes(shape, dtype, blocksize=64):
    n = shape[0] * shape[1]
    packed = n // 2 + n // blocksize + 4 * (n // blocksize // 256)
    return n * torch.empty(0, dtype=dtype).element_size(), packed


def run(device: str = "cpu", smoke: bool = False) -> list[dict]:
    import bitsandbytes.functional as bnbf

    rows = []
    for shape in SMOKE_SHAPES if smoke else SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            w = torch.randn(shape, device=device).to(dtype)
            dense_bytes, packed_bytes = _bytes(shape, dtype)
            ours_q = lambda: dispatch.quantize(w, blocksize=64, quant_type="nf4", double_quant=True)
            theirs_q = lambda: bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
            packed, state = ours_q()
            ref, ref_state = theirs_q()
            mismatched = int((packed != ref).sum()) + int((state.nested.absmax != ref_state.state2.absmax).sum())
            # On CPU the bytes must be identical. bitsandbytes' CUDA build normalises with an
            # approximate reciprocal, which can flip a code sitting within an ulp of a threshold
            # (SPEC §0), so on a GPU the count is recorded (benchmarks/gpu/checks.py explains each).
            if mismatched and torch.device(device).type == "cpu":
                raise AssertionError(f"fourbit and bitsandbytes bytes differ for {shape} {dtype}")
            for provider, fn in (("fourbit", ours_q), ("bitsandbytes", theirs_q)):
                t = time_fn(fn, device=device, smoke=smoke)
                rows.append(record("quantize", provider, shape, dtype, t, device=device,
                                   bytes_moved=dense_bytes + packed_bytes, config={"blocksize": 64, "quant": "nf4+dq"},
                                   mismatched_bytes=mismatched))
            # dequantize the same bytes and scales on both sides (bitsandbytes' CPU 8-bit quantizer
            # picks a few different nested scale codes, SPEC §3, which would change whole blocks)
            state = QuantState.from_dict(ref_state.as_dict(packed=True)).to(device)
            ours_dq = lambda: dispatch.dequantize(ref, state)
            theirs_dq = lambda: bnbf.dequantize_4bit(ref, ref_state)
            if not torch.equal(ours_dq(), theirs_dq()):
                raise AssertionError(f"dequantized weights differ for {shape} {dtype}")
            for provider, fn in (("fourbit", ours_dq), ("bitsandbytes", theirs_dq)):
                t = time_fn(fn, device=device, smoke=smoke)
                rows.append(record("dequantize", provider, shape, dtype, t, device=device,
                                   bytes_moved=dense_bytes + packed_bytes, config={"blocksize": 64, "quant": "nf4+dq"}))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--smoke", action="store_true", help="one repetition on a tiny shape")
    parser.add_argument("--out", default=None, help="output folder (default: benchmarks/results/<device>)")
    args = parser.parse_args(argv)
    rows = run(args.device, args.smoke)
    path = write_results("quant", rows, out_dir=args.out)
    print(path.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
