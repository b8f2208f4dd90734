"""4-bit matmul y = x @ dequantize(W).T: fourbit vs bitsandbytes vs a dense bf16/fp32 matmul.

    python -m benchmarks.bench_matmul [--device cpu|cuda] [--dtype bfloat16 float32] [--threads N]
                                      [--ms 1 16 ...] [--shapes 4096x14336 ...] [--smoke] [--full] [--out DIR]

Providers: fourbit-reference (the chunked PyTorch path, what CPU training runs), fourbit-triton and
fourbit-triton-nodq (`fourbit.dispatch.matmul` on CUDA: the GEMV, the fused tensor-core kernels or
dequantize + cuBLAS, by M; with and without double-quantized scales),
bitsandbytes (`bnb.matmul_4bit`, NF4 + double quant, blocksize 64) and dense (torch.matmul on the
weight already dequantized into x's dtype). W is [N, K]; shapes from Llama-3 8B/70B projections.

Every fourbit output is first checked against float64 (relative norm error under the dtype's
bound) and bitsandbytes' against fourbit-reference; then each is timed. Columns: TFLOP/s
(2*M*N*K), effective GB/s over the bytes an ideal kernel moves (packed W + scales + x + y, or the
dense W + x + y for dense), % of the measured copy bandwidth (the roofline for these memory-bound
shapes), and, from benchmarks.report, the speedup of each fourbit row vs dense and vs bitsandbytes.

On CUDA every timed call reads cold weights, as in a real forward pass: the harness times with
`triton.testing.do_bench`, which overwrites a 256 MB buffer (more than any L2) before each call,
for every provider alike, so no weight copies need rotating. Shapes with M <= 16 are replayed from
CUDA graphs, so launch overhead is not what gets measured. On CPU (2 busy cores here) the default grid is a small subset; --full
runs the whole grid of the issue.
"""

from __future__ import annotations

import argparse
import itertools

import torch

from fourbit.nf4 import dequantize, quantize

from .harness import graphed, quantized_bytes, record, time_fn, write_results

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192), (8192, 28672), (28672, 8192)]  # (N, K)
MS = [1, 2, 4, 8, 16, 32, 64, 128, 512, 2048, 8192]
CPU_SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]
CPU_MS = [1, 16, 128, 512]
SMOKE_SHAPES, SMOKE_MS = [(96, 128)], [1, 17]
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def copy_bandwidth(device: str) -> float:
    """GB/s of a large device-to-device copy (read + write), the ceiling for these kernels."""
    src = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device=device)
    return 2 * src.numel() / (t["median_ms"] / 1e3) / 1e9


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


def run(device: str = "cpu", smoke: bool = False, full: bool = False, dtypes=(torch.bfloat16,), ms=None,
        shapes=None) -> list[dict]:
    from fourbit.dispatch import matmul as kernel_mm  # the route the library takes at each M
    from fourbit.nf4 import matmul as ref_mm

    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
    except ImportError:  # still time fourbit and dense, and say so
        bnb = bnbf = None
        print("bitsandbytes is not installed: its rows are missing", flush=True)
    cuda = torch.device(device).type == "cuda"
    grid_shapes, grid_ms = (SMOKE_SHAPES, SMOKE_MS) if smoke else (SHAPES, MS) if (full or cuda) else (CPU_SHAPES, CPU_MS)
    shapes, ms = shapes or grid_shapes, ms or grid_ms
    ceiling = None if smoke else copy_bandwidth(device)
    rows = []
    for dtype, (n, k) in itertools.product(dtypes, shapes):
        w = torch.randn(n, k, device=device)
        weights = {dq: quantize(w, blocksize=64, quant_type="nf4", double_quant=dq) for dq in (True, False)}
        if bnbf is not None:
            bnb_packed, bnb_state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        dense_w = dequantize(*weights[True], dtype=dtype)  # (N, K) in x's dtype
        w64 = dequantize(*weights[True], dtype=torch.float32).double()  # (N, K) exact
        # bitsandbytes' own bytes decode to a slightly different W (its CPU quantizer divides by
        # absmax and rounds some nested scales differently, SPEC §2-3): check it against itself
        bnb_w64 = bnbf.dequantize_4bit(bnb_packed, bnb_state).double() if bnbf is not None else None
        del w
        for m in ms:
            x = torch.randn(m, k, device=device).to(dtype)
            providers = {"fourbit-reference": lambda: ref_mm(x, *weights[True]),
                         "bitsandbytes": lambda: bnb.matmul_4bit(x, bnb_packed.t(), bnb_state),
                         "dense": lambda: torch.matmul(x, dense_w.T)}
            if bnb is None:
                del providers["bitsandbytes"]
            if cuda:
                providers["fourbit-triton"] = lambda: kernel_mm(x, *weights[True])
                providers["fourbit-triton-nodq"] = lambda: kernel_mm(x, *weights[False])
                providers.pop("fourbit-reference")  # the reference is the CPU path; on a GPU it is bnb's fallback
            want = x.double() @ w64.T  # (M, N)
            want_bnb = x.double() @ bnb_w64.T if bnb_w64 is not None else None
            for name, fn in providers.items():
                err = _rel_err(fn(), want_bnb if name == "bitsandbytes" else want)
                if err > TOL[dtype]:
                    raise AssertionError(f"{name} is wrong for M={m} N={n} K={k} {dtype}: relative error {err:.2e}")
            for name, fn in providers.items():
                if cuda and m <= 16:
                    fn = graphed(fn)
                dq = name != "fourbit-triton-nodq"
                w_bytes = n * k * dense_w.element_size() if name == "dense" else quantized_bytes(n, k, dq)
                io_bytes = (m * k + m * n) * dense_w.element_size()
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                t = time_fn(fn, device=device, smoke=smoke)
                rows.append(record(
                    "matmul", name, (m, n, k), dtype, t, device=device, bytes_moved=w_bytes + io_bytes,
                    flops=2 * m * n * k, ceiling_gbs=ceiling,
                    peak_mem_bytes=torch.cuda.max_memory_allocated() if cuda else None,
                    config={"blocksize": 64, "quant": "nf4+dq" if dq else "nf4", "threads": torch.get_num_threads(),
                            "cuda_graph": cuda and m <= 16},
                    copy_gbs=ceiling,
                ))
                print(f"{name:>20} M={m:<5} N={n:<6} K={k:<6} {dtype}: {t['median_ms']:.3f} ms", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--smoke", action="store_true", help="one repetition on tiny shapes")
    parser.add_argument("--full", action="store_true", help="the whole shape x M grid, also on CPU")
    parser.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"], choices=["float32", "float16", "bfloat16"],
                        help="activation dtypes (x, y and the dense weight)")
    parser.add_argument("--ms", type=int, nargs="+", default=None, help="rows of x to run (default: the grid)")
    parser.add_argument("--shapes", nargs="+", default=None, metavar="NxK", help="weight shapes, e.g. 4096x14336")
    parser.add_argument("--out", default=None, help="output folder (default: benchmarks/results/<device>)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice). On a CPU shared with other jobs, 1 is "
                             "the stable choice: each multi-threaded torch op then waits on descheduled threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = None
    if args.shapes:
        try:
            shapes = [tuple(int(v) for v in text.lower().split("x")) for text in args.shapes]
        except ValueError:
            parser.error(f"--shapes takes NxK pairs such as 4096x14336, got {args.shapes}")
        if any(len(shape) != 2 for shape in shapes):
            parser.error(f"--shapes takes NxK pairs such as 4096x14336, got {args.shapes}")
    rows = run(args.device, args.smoke, args.full, [getattr(torch, d) for d in args.dtype], args.ms, shapes)
    path = write_results("matmul", rows, out_dir=args.out)
    print(path.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
