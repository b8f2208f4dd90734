"""The one benchmark harness: time a function, make a long-format record, write JSON + table + plot.

    timing = time_fn(lambda: op(x), device="cpu")          # median / p20 / p80 in ms
    rows.append(record("dequantize", "fourbit", (4096, 4096), "float32", timing, bytes_moved=...))
    write_results("quant", rows)                            # benchmarks/results/cpu/quant.{json,md,png}

Correctness is each bench script's job and comes before timing. JSON is the source of truth; the
markdown table and the PNG are rendered from it (`python -m benchmarks.report FILE.json` redoes it).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

__all__ = ["time_fn", "record", "write_results", "environment", "device_name", "RESULTS_DIR"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def device_name(device: str | torch.device = "cpu") -> str:
    """Folder name for results: "cpu" or the GPU's name in lower-case-with-dashes (e.g. "nvidia-h200")."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).lower().replace(" ", "-")
    return "cpu"


def time_fn(
    fn: Callable[[], Any],
    *,
    device: str | torch.device = "cpu",
    min_time_s: float = 0.2,
    max_reps: int = 200,
    smoke: bool = False,
) -> dict[str, float]:
    """Milliseconds per call: median, 20th and 80th percentile.

    CPU: one warm-up call, then repeated calls until `min_time_s` has passed (at least 3, at most
    `max_reps`). CUDA: `triton.testing.do_bench` (it flushes L2 between runs and synchronizes).
    `smoke=True` runs the function once, for tests that only check the script still works.
    """
    if smoke:
        t0 = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t0) * 1e3
        return {"median_ms": ms, "p20_ms": ms, "p80_ms": ms, "reps": 1}
    if torch.device(device).type == "cuda":
        import triton.testing

        median, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": median, "p20_ms": p20, "p80_ms": p80, "reps": -1}
    fn()  # warm-up: caches, allocator, lazy imports
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_time_s and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return {"median_ms": statistics.median(times), "p20_ms": q[1], "p80_ms": q[7], "reps": len(times)}


_ENV: dict[str, Any] | None = None


def environment() -> dict[str, Any]:
    """Versions and the git revision, recorded with every row."""
    global _ENV
    if _ENV is None:
        versions = {"python": platform.python_version(), "torch": torch.__version__}
        for name in ("triton", "bitsandbytes", "fourbit", "peft", "transformers"):
            try:  # the installed distribution's metadata: importing peft or bitsandbytes takes seconds
                versions[name] = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                versions[name] = None
        try:
            sha = subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                cwd=Path(__file__).resolve().parent,
            ).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            sha = None
        _ENV = {"versions": versions, "git_sha": sha, "machine": platform.machine(), "cpu_count": os.cpu_count()}
    return _ENV


def record(
    op: str,
    provider: str,
    shape: Iterable[int] | str,
    dtype: str | torch.dtype,
    timing: dict[str, float],
    *,
    device: str | torch.device = "cpu",
    bytes_moved: int | None = None,
    flops: int | None = None,
    ceiling_gbs: float | None = None,
    peak_mem_bytes: int | None = None,
    config: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One long-format row. GB/s and TFLOP/s are derived from the median time."""
    seconds = timing["median_ms"] / 1e3
    gbs = bytes_moved / seconds / 1e9 if bytes_moved and seconds > 0 else None
    row = {
        "op": op,
        "provider": provider,
        "shape": shape if isinstance(shape, str) else "x".join(str(int(s)) for s in shape),
        "dtype": str(dtype).removeprefix("torch."),
        **timing,
        "gb_per_s": gbs,
        "tflop_per_s": flops / seconds / 1e12 if flops and seconds > 0 else None,
        "pct_of_ceiling": 100.0 * gbs / ceiling_gbs if gbs and ceiling_gbs else None,
        "peak_mem_bytes": peak_mem_bytes,
        "device": device_name(device),
        "config": config or {},
        **extra,
    }
    row.update(environment())
    return row


def write_results(name: str, rows: list[dict[str, Any]], device: str | None = None, out_dir: str | Path | None = None) -> Path:
    """Write `<out_dir or results/<device>>/<name>.json`, then render `<name>.md` and `<name>.png`."""
    from .report import render

    device = device or (rows[0]["device"] if rows else "cpu")
    folder = Path(out_dir) if out_dir is not None else RESULTS_DIR / device
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rows, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    render(path)
    return path


def quantized_bytes(n: int, k: int, double_quant: bool, blocksize: int = 64) -> int:
    """Bytes of an (n, k) NF4 weight as stored: packed codes, uint8 or float32 scales, and with double
    quantization one float32 scale per 256 blocks."""
    blocks = n * k // blocksize
    return n * k // 2 + (blocks + 4 * -(-blocks // 256) if double_quant else 4 * blocks)


def graphed(fn: Callable[[], Any]) -> Callable[[], Any]:
    """fn replayed from a CUDA graph, captured after a warm-up call (which also autotunes)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay
