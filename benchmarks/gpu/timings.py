"""Headline timings: fourbit vs bitsandbytes vs dense cuBLAS on the five Llama-3 projection shapes.

Cases, in this order (a timeout loses the later ones, so the order is by importance):
    dequantize       NF4 + double quant -> bf16 (bytes: packed W and scales in, dense W out)
    matmul M=1, 16   decode GEMV, replayed from CUDA graphs (launch overhead is not measured)
    matmul M=2048    training/prefill forward
    backward M=2048  dx = dy @ W, the input gradient a QLoRA step needs
Providers: `fourbit` (what `fourbit.dispatch` runs: the path and crossover it picks), `fourbit-nodq`
(plain fp32 scales, M = 1 and 2048: the cost of double quantization), `fourbit-dequant` (M = 2048:
the dequantize + cuBLAS route, timed beside the fused swapped tiles the dispatcher picks on Hopper,
so the run measures the crossover the cost model set), `bitsandbytes`
(`matmul_4bit` forward; its backward is dequantize_4bit + matmul, as its autograd does) and
`dense` (torch.matmul on the bf16 weight already dequantized: the cuBLAS floor fourbit is read
against). Every weight is cold: `triton.testing.do_bench` overwrites a 256 MB buffer (more than
the 60 MB L2) before each call, for every provider alike. Every output is checked against float64
before it is timed; a wrong provider is recorded as a failed check and not timed.
Each row carries `kernel_op` (gemv | gemm | backward | dequantize), M, N, K: the cost model's key.
"""

from __future__ import annotations

import torch

import fourbit.nf4 as reference
from fourbit import dispatch
from fourbit.kernels.matmul import matmul as kernel_matmul, matmul_backward as kernel_matmul_backward

from ..harness import graphed, quantized_bytes, record, time_fn
from .checks import MATMUL_TOL
from .common import GEMV_MS, Session, peer, rel_err

BLOCKSIZE = 64
DEQUANTIZE_TOL = 2**-8  # bf16 output vs the exact fp32 decode: half a bf16 ulp per element (bytes: checks.py)


class Weight:
    """One (N, K) weight in every provider's format, and its exact float64 decode."""

    def __init__(self, n: int, k: int, device: str, dtype: torch.dtype):
        self.n, self.k, self.dtype = n, k, dtype
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16)
        self.dq = dispatch.quantize(w, blocksize=BLOCKSIZE, quant_type="nf4", double_quant=True)
        self.nodq = dispatch.quantize(w, blocksize=BLOCKSIZE, quant_type="nf4", double_quant=False)
        self.dense = dispatch.dequantize(*self.dq, dtype=dtype)  # (N, K) in the activations' dtype
        self.w64 = reference.dequantize(*self.dq, dtype=torch.float32).double()
        _, bnbf = peer()
        self.bnb = bnbf.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True) if bnbf else None
        self.bnb_w64 = bnbf.dequantize_4bit(*self.bnb).double() if bnbf else None  # their bytes decode a little differently


def providers(case: str, w: Weight, m: int, device: str) -> dict[str, tuple]:
    """{provider: (fn, float64 expected output or None, weight bytes)} for one case."""
    bnb, bnbf = peer()
    dq_bytes, nodq_bytes = quantized_bytes(w.n, w.k, True, BLOCKSIZE), quantized_bytes(w.n, w.k, False, BLOCKSIZE)
    dense_bytes = 2 * w.n * w.k
    if case == "dequantize":
        out = {"fourbit": (lambda: dispatch.dequantize(*w.dq, dtype=torch.bfloat16), w.w64, dq_bytes)}  # bnb's too: bf16
        if bnbf:
            out["bitsandbytes"] = (lambda: bnbf.dequantize_4bit(*w.bnb), w.bnb_w64, dq_bytes)
        return out
    if case == "matmul":
        x = torch.randn(m, w.k, device=device, dtype=w.dtype)
        want = x.double() @ w.w64.T
        out = {"fourbit": (lambda: dispatch.matmul(x, *w.dq), want, dq_bytes)}
        if m == 1 or m >= 2048:
            out["fourbit-nodq"] = (lambda: dispatch.matmul(x, *w.nodq), want, nodq_bytes)
        if m > max(GEMV_MS):  # the training M
            out["fourbit-dequant"] = (lambda: kernel_matmul(x, *w.dq, route=("gemm", "dequantize+cublas")), want, dq_bytes)
        if bnb:
            packed, state = w.bnb
            out["bitsandbytes"] = (lambda: bnb.matmul_4bit(x, packed.t(), state), x.double() @ w.bnb_w64.T, dq_bytes)
        out["dense"] = (lambda: torch.matmul(x, w.dense.T), want, dense_bytes)
        return out
    dy = torch.randn(m, w.n, device=device, dtype=w.dtype)
    want = dy.double() @ w.w64
    out = {"fourbit": (lambda: dispatch.matmul_backward(dy, *w.dq), want, dq_bytes),
           "fourbit-dequant": (lambda: kernel_matmul_backward(dy, *w.dq, route=("backward", "dequantize+cublas")),
                               want, dq_bytes)}  # only the training M reaches here
    if bnbf:
        out["bitsandbytes"] = (lambda: torch.matmul(dy, bnbf.dequantize_4bit(*w.bnb).to(dy.dtype)),
                               dy.double() @ w.bnb_w64, dq_bytes)
    out["dense"] = (lambda: torch.matmul(dy, w.dense), want, dense_bytes)
    return out


def time_case(s: Session, case: str, w: Weight, m: int, copy_gbs: float | None) -> None:
    kernel_op = "dequantize" if case == "dequantize" else "backward" if case == "backward" else "gemv" if m <= 16 else "gemm"
    shape = (w.n, w.k) if case == "dequantize" else (m, w.n, w.k)
    for provider, (fn, want, w_bytes) in providers(case, w, m, s.device).items():
        label = f"{case} {provider} {'x'.join(map(str, shape))}"
        try:
            err = rel_err(fn(), want)
        except Exception as error:  # one provider's failure is a failed check; the others still run
            s.check(f"{label} runs", False, error=repr(error)[:500])
            continue
        tol = DEQUANTIZE_TOL if case == "dequantize" else MATMUL_TOL
        if not s.check(f"{label} vs float64", err <= tol, rel_err=err, tol=tol):
            continue
        io_bytes = 2 * w.n * w.k if case == "dequantize" else 2 * m * (w.k + w.n)  # bf16 in/out
        use_graph = s.device == "cuda" and case == "matmul" and m <= 16
        timed = fn
        if use_graph:
            try:
                timed = graphed(fn)
            except RuntimeError as err_:  # a provider that cannot be captured is timed plainly, and says so
                s.emit("note", f"{label} not graphed", text=str(err_)[:300])
                torch.cuda.synchronize()
                use_graph = False
        try:
            timing = time_fn(timed, device=s.device, smoke=s.dry_run)
        except RuntimeError as err_:
            s.emit("note", f"{label} not timed", text=str(err_)[:300])
            continue
        dtype = torch.bfloat16 if case == "dequantize" else w.dtype
        row = record(
            case, provider, shape, dtype, timing, device=s.device, bytes_moved=w_bytes + io_bytes,
            flops=None if case == "dequantize" else 2 * m * w.n * w.k, ceiling_gbs=copy_gbs,
            config={"blocksize": BLOCKSIZE, "quant": "nf4" if provider.endswith("nodq") else "nf4+dq",
                    "cuda_graph": use_graph, "l2_flushed": s.device == "cuda"},
        )
        s.emit("timing", label, kernel_op=kernel_op, M=m if case != "dequantize" else None, N=w.n, K=w.k,
               weight_bytes=w_bytes, bytes_moved=w_bytes + io_bytes, **row)


def run(s: Session) -> None:
    torch.manual_seed(1)
    facts = s.facts()
    copy_gbs = facts.get("copy_gb_per_s")
    if peer()[0] is None:
        s.emit("note", "bitsandbytes missing", text="bitsandbytes missing (not installed): fourbit and dense only")
    weights = [Weight(n, k, s.device, s.dtype) for n, k in s.shapes]
    cases = [("dequantize", 0)] + [("matmul", m) for m in GEMV_MS] + [("matmul", s.train_m), ("backward", s.train_m)]
    for case, m in cases:
        for w in weights:
            time_case(s, case, w, m, copy_gbs)
