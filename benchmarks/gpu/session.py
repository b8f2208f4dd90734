"""One stage of the GPU session (run.sh calls each under its own `timeout`).

    python -m benchmarks.gpu.session STAGE --out OUT [--dry-run]
        STAGE: env | correctness | timings | predicted

env          the machine as found: GPU, clocks, driver, versions (Triton and its ptxas too), the kernel
             gates that are on (`fourbit.dispatch.matmul_gates`), SMs, L2, and the two ceilings every
             number is read against, measured here: device-to-device copy GB/s (bytes read + written,
             1 GiB) and the bf16 matmul rate (8192^3, random data: zeros run faster, METHOD.md).
correctness  benchmarks/gpu/checks.py
timings      benchmarks/gpu/timings.py
predicted    benchmarks/gpu/predicted.py (the cost model's predictions joined with the timings)
The training step is `benchmarks.bench_train --jsonl`, the report `benchmarks.gpu.summary`.
Exit status: 0, or 1 when a required check failed (the lines are written either way).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess

import torch

from fourbit import dispatch

from ..harness import environment, time_fn
from .common import Session

SMI_FIELDS = "name,driver_version,memory.total,clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,power.limit,temperature.gpu,pstate"


def smi(s: Session, when: str) -> None:
    if shutil.which("nvidia-smi") is None:
        s.emit("note", f"nvidia-smi {when}", text="nvidia-smi not found")
        return
    try:
        done = subprocess.run(["nvidia-smi", f"--query-gpu={SMI_FIELDS}", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as err:  # a fact we can do without
        s.emit("note", f"nvidia-smi {when}", text=f"nvidia-smi failed: {err}")
        return
    values = [v.strip() for v in done.stdout.strip().split(",")]
    s.emit("fact", f"nvidia-smi {when}", value=dict(zip(SMI_FIELDS.split(","), values)) if done.returncode == 0 else done.stderr[-300:])


def toolchain(s: Session) -> dict:
    """The Triton and ptxas that build the kernels for this device (sm_90a on the dry run)."""
    from fourbit.kernels.analysis.report import ARCHS, toolchain as tools

    arch = "sm_90a"
    if s.device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        arch = next((a for a, cap in ARCHS.items() if cap == 10 * major + minor), arch if major >= 9 else "sm_80")
    return {"arch": arch, **tools(arch)}


def env(s: Session) -> None:
    s.emit("fact", "environment", value=environment())
    s.emit("fact", "toolchain", value=toolchain(s))
    s.emit("fact", "gates", value=dispatch.matmul_gates())  # which kernel paths the dispatcher may take here
    version = environment()["versions"]["bitsandbytes"]
    s.emit("fact", "peer", value=f"bitsandbytes {version}" if version else "bitsandbytes missing")
    if s.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        s.emit("fact", "device", value={
            "name": props.name, "capability": f"{props.major}.{props.minor}", "sms": props.multi_processor_count,
            "l2_bytes": getattr(props, "L2_cache_size", None), "memory_bytes": props.total_memory,
            "cuda": torch.version.cuda,
        })
        smi(s, "before")
    else:
        s.emit("fact", "device", value={"name": "cpu (dry run, Triton interpreter)", "threads": torch.get_num_threads()})

    n = 1 << (14 if s.dry_run else 28)  # float32 elements: 64 KiB or 1 GiB
    src = torch.randn(n, device=s.device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device=s.device, smoke=s.dry_run)
    s.emit("fact", "copy_gb_per_s", value=2 * 4 * n / (t["median_ms"] / 1e3) / 1e9, bytes=2 * 4 * n, **t)
    del src, dst

    d = 64 if s.dry_run else 8192
    a, b = (torch.randn(d, d, device=s.device, dtype=torch.bfloat16) for _ in range(2))
    t = time_fn(lambda: a @ b, device=s.device, smoke=s.dry_run)
    s.emit("fact", "bf16_matmul_tflop_per_s", value=2 * d**3 / (t["median_ms"] / 1e3) / 1e12, shape=[d, d, d], **t)
    if s.device == "cuda":
        smi(s, "after the matmul")  # clocks under load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu.session", description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["env", "correctness", "timings", "predicted"])
    parser.add_argument("--out", required=True, help="the session's results folder (run.sh's OUTDIR)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    args = parser.parse_args(argv)
    s = Session(args.stage, args.out, args.dry_run)
    if args.stage == "env":
        env(s)
    elif args.stage == "correctness":
        from . import checks

        checks.run(s)
    elif args.stage == "timings":
        from . import timings

        timings.run(s)
    else:
        from . import predicted

        predicted.run(s)
    return 1 if s.failed_required else 0


if __name__ == "__main__":
    raise SystemExit(main())
