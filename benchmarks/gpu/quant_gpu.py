"""GPU session for the Triton quantize/dequantize kernels: bandwidth, bitsandbytes parity, timings.

    python -m benchmarks.gpu.quant_gpu [--smoke] [--out DIR]        (run.sh calls this)

1. Copy bandwidth: `dst.copy_(src)` on 1 GiB (read + write), the roofline every GB/s is read against.
2. Our kernels equal the reference (`fourbit.nf4`, plain torch on the same device) byte for byte:
   quantize with and without double quantization, dequantize to fp32, fp16 and bf16.
3. Parity with bitsandbytes' CUDA kernels on large random tensors. bitsandbytes normalises with an
   approximate reciprocal (--use_fast_math, SPEC §0.2); fourbit divides correctly, so codes may flip
   where s = x / absmax lies within an ulp or two of a decision threshold. For every differing code
   we record how many float32 ulps s is from the nearest threshold: flips all at <= 2 ulp are that
   effect, anything farther is a real disagreement. Nested 8-bit scale codes and dequantization
   (ours of bitsandbytes' bytes vs theirs) are compared too.
4. A tensor past 2**31 elements (int64 offsets): its last blocks equal the reference's (quantized
   from bf16, dequantized to fp32).
5. Timings of quantize and dequantize (NF4, blocksize 64, double quantization) for fourbit's Triton
   kernels and bitsandbytes, as GB/s of the bytes an ideal kernel moves and % of the copy bandwidth.
Writes `<out or benchmarks/results/<gpu>>/quant_gpu.json` (+ .md/.png via the harness) and
`quant_gpu_parity.json`. `--smoke` runs every step once on tiny tensors (on CPU: under
TRITON_INTERPRET=1, against bitsandbytes' CPU backend), so the script is tested without a GPU.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import fourbit.kernels as kernels
import fourbit.nf4 as reference
from fourbit.nf4 import QuantState
from fourbit.nf4.codes import NF4_THRESHOLDS
from fourbit.nf4.files import atomic_write

from ..harness import RESULTS_DIR, device_name, environment, record, time_fn, write_results

SHAPES = [(4096, 4096), (4096, 14336), (8192, 8192)]
SMOKE_SHAPES = [(48, 80)]
BLOCKSIZE = 64


def copy_bandwidth(device: str, smoke: bool) -> dict:
    """GB/s of a device-to-device copy (bytes read + bytes written)."""
    n = 1 << (14 if smoke else 28)  # float32 elements: 64 KiB or 1 GiB
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    timing = time_fn(lambda: dst.copy_(src), device=device, smoke=smoke)
    return record("copy", "torch", (n,), torch.float32, timing, device=device, bytes_moved=2 * 4 * n)


def ulps_to_threshold(x: torch.Tensor, absmax: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """For the flat elements `where` (indices): float32 ulps between s = x * fl32(1/absmax) and the
    nearest NF4 threshold (the distance a rounding difference in the reciprocal has to cover)."""
    xs = x.reshape(-1)[where].float()
    s = xs * (1.0 / absmax.clamp(min=1e-38))[where // BLOCKSIZE]
    t = NF4_THRESHOLDS.to(x.device)
    nearest = t[(s[:, None] - t[None, :]).abs().argmin(dim=1)]
    return (s.view(torch.int32).long() - nearest.view(torch.int32).long()).abs()


def nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(2 * nbytes,) codes in element order."""
    b = packed.reshape(-1).view(torch.uint8)
    return torch.stack([b >> 4, b & 15], dim=1).reshape(-1)


def bitsandbytes_functional():
    """bitsandbytes.functional, or None when it is not installed (run.sh installs a carried wheel)."""
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        return None
    return bnbf


def parity(device: str, shape: tuple[int, int], dtype: torch.dtype) -> dict:
    """Count fourbit vs bitsandbytes differences on one random weight (see the module docstring)."""
    w = torch.randn(shape, device=device).to(dtype)
    n = w.numel()
    result: dict = {"shape": list(shape), "dtype": str(dtype)[6:], "device": device_name(device), "values": n}

    ours, state = kernels.quantize(w, blocksize=BLOCKSIZE, quant_type="nf4", double_quant=False)
    want, want_state = reference.quantize(w, blocksize=BLOCKSIZE, quant_type="nf4", double_quant=False)
    same = torch.equal(ours, want) and state.equal(want_state)
    packed_dq, state_dq = kernels.quantize(w, blocksize=BLOCKSIZE, quant_type="nf4", double_quant=True)
    want_dq, want_state_dq = reference.quantize(w, blocksize=BLOCKSIZE, quant_type="nf4", double_quant=True)
    same = same and torch.equal(packed_dq, want_dq) and state_dq.equal(want_state_dq)
    result["triton_equals_reference"] = bool(same)
    result["triton_dequantize_equals_reference"] = {
        str(out)[6:]: bool(torch.equal(kernels.dequantize(want_dq, want_state_dq, dtype=out),
                                       reference.dequantize(want_dq, want_state_dq, dtype=out)))
        for out in (torch.float32, torch.float16, torch.bfloat16)
    }  # fmt: skip
    bnbf = bitsandbytes_functional()
    if bnbf is None:
        result["bitsandbytes"] = "not installed"
        return result

    theirs, their_state = bnbf.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=False)
    result["absmax_mismatches"] = int((state.absmax != their_state.absmax.reshape(-1)).sum())
    differ = torch.nonzero(nibbles(ours)[:n] != nibbles(theirs)[:n]).reshape(-1)
    result["code_mismatches"] = int(differ.numel())
    if differ.numel():
        ulps = ulps_to_threshold(w, state.absmax, differ[:1_000_000])
        result["mismatch_ulps_to_threshold_max"] = int(ulps.max())
        result["mismatches_within_2_ulps"] = int((ulps <= 2).sum())

    theirs_dq, their_dq = bnbf.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True)
    result["offset_equal"] = bool(torch.equal(state_dq.offset.reshape(()), their_dq.offset.reshape(())))
    result["nested_absmax_mismatches"] = int((state_dq.nested.absmax != their_dq.state2.absmax).sum())
    result["nested_code_mismatches"] = int((state_dq.absmax != their_dq.absmax).sum())

    imported = QuantState.from_dict(their_dq.as_dict(packed=True)).to(device)  # their bytes, our kernel
    deq_ours = kernels.dequantize(theirs_dq, imported)
    deq_theirs = bnbf.dequantize_4bit(theirs_dq, their_dq)
    result["dequantize_mismatches"] = int((deq_ours != deq_theirs).sum())
    return result


def large_tensor_check(device: str, smoke: bool) -> dict:
    """Quantize and dequantize a tensor past 2**31 elements (smoke: a tiny one); the last blocks must
    equal the reference run on just those blocks (plain scales, so blocks are independent)."""
    n = 4096 if smoke else (1 << 31) + 64 * 1024
    w = torch.randn(n, device=device, dtype=torch.bfloat16)
    packed, state = kernels.quantize(w, blocksize=BLOCKSIZE, double_quant=False)
    tail = 64 * BLOCKSIZE
    want_packed, want_state = reference.quantize(w[-tail:], blocksize=BLOCKSIZE, double_quant=False)
    quant_ok = torch.equal(packed[-tail // 2 :], want_packed) and torch.equal(state.absmax[-64:], want_state.absmax)
    out = kernels.dequantize(packed, state, dtype=torch.float32)  # fp32: exact under the interpreter too
    dequant_ok = torch.equal(out[-tail:], reference.dequantize(want_packed, want_state, dtype=torch.float32))
    del w, out
    return {"values": n, "quantize_tail_equal": bool(quant_ok), "dequantize_tail_equal": bool(dequant_ok)}


def timings(device: str, smoke: bool, copy_gbs: float) -> list[dict]:
    bnbf = bitsandbytes_functional()
    rows = []
    for shape in SMOKE_SHAPES if smoke else SHAPES:
        for dtype in (torch.bfloat16, torch.float16):
            w = torch.randn(shape, device=device).to(dtype)
            n = w.numel()
            nb = n // BLOCKSIZE
            dense = n * w.element_size()
            packed_bytes = n // 2 + nb + 4 * -(-nb // 256)
            config = {"blocksize": BLOCKSIZE, "quant_type": "nf4", "double_quant": True}
            providers = {
                "fourbit-triton": (
                    lambda: kernels.quantize(w, blocksize=BLOCKSIZE, double_quant=True),
                    lambda p, s: (lambda: kernels.dequantize(p, s)),
                ),
                "bitsandbytes": (
                    lambda: bnbf.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True),
                    lambda p, s: (lambda: bnbf.dequantize_4bit(p, s)),
                ),
            }
            if bnbf is None:
                del providers["bitsandbytes"]
            for provider, (quantize, make_dequantize) in providers.items():
                t = time_fn(quantize, device=device, smoke=smoke)
                rows.append(record("quantize", provider, shape, dtype, t, device=device, bytes_moved=dense + packed_bytes,
                                   ceiling_gbs=copy_gbs, config=config))  # fmt: skip
                packed, state = quantize()
                t = time_fn(make_dequantize(packed, state), device=device, smoke=smoke)
                rows.append(record("dequantize", provider, shape, dtype, t, device=device,
                                   bytes_moved=dense + packed_bytes, ceiling_gbs=copy_gbs, config=config))  # fmt: skip
            del w
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="every step once on tiny tensors (CPU: interpreter)")
    parser.add_argument("--out", default=None, help="output folder (default: benchmarks/results/<gpu>)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        parser.error("no CUDA device: only --smoke runs on CPU (under TRITON_INTERPRET=1)")
    out = Path(args.out) if args.out else RESULTS_DIR / device_name(device)
    out.mkdir(parents=True, exist_ok=True)

    copy = copy_bandwidth(device, args.smoke)
    print(f"copy bandwidth: {copy['gb_per_s']:.1f} GB/s")
    checks = {
        "environment": environment(),
        "device": device_name(device),
        "copy_gb_per_s": copy["gb_per_s"],
        "large_tensor": large_tensor_check(device, args.smoke),
        "parity": [parity(device, shape, dtype) for shape in (SMOKE_SHAPES if args.smoke else [(8192, 8192)])
                   for dtype in (torch.bfloat16, torch.float32)],  # fmt: skip
    }
    text = json.dumps(checks, indent=1, default=str) + "\n"

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(out / "quant_gpu_parity.json", write)
    print(text)
    rows = [copy, *timings(device, args.smoke, copy["gb_per_s"])]
    try:
        write_results("quant_gpu", rows, device=device_name(device), out_dir=out)
    except ImportError as err:  # no matplotlib on the GPU machine: the JSON and markdown come first
        print(f"note: no plot ({err})")
    print((out / "quant_gpu.md").read_text())
    ok = checks["large_tensor"]["quantize_tail_equal"] and checks["large_tensor"]["dequantize_tail_equal"]
    for p in checks["parity"]:
        # the interpreter truncates fp32 -> bf16 (see fourbit.kernels.dequantize); GPUs must round
        exact = {k: v for k, v in p["triton_dequantize_equals_reference"].items() if device == "cuda" or k != "bfloat16"}
        ok = ok and p["triton_equals_reference"] and all(exact.values())
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
