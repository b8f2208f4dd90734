"""What every stage of the GPU session shares: the results file, its schema, the device and the sizes.

Every stage appends JSON lines to `OUT/results.jsonl` as each case finishes (one `write` + flush
per line), so a stage killed by its `timeout` keeps what it measured. Each line is one object:

    {"stage": "timings", "kind": "timing", "name": "matmul fourbit 1x4096x4096", "t": 12.3, ...}

`kind` says which keys it carries beyond stage/kind/name/t (`REQUIRED`): a fact about the machine
(`value`), a check (`ok`, and `required`: a failed required check fails the session), a timing row
of `benchmarks.harness.record` (op, provider, shape, dtype, median_ms, ...), a training row
(the same keys), a cost-model prediction joined with its measurement (op, M, N, K), a note
(`text`: a peer or module missing, a case skipped), and run.sh's own accounting of each stage
(budget, timeout, elapsed, exit status). `t` is seconds since the session started (run.sh exports
FOURBIT_SESSION_T0), so the stage lines and the rows can be read against one clock.

`--dry-run` runs the same code on the CPU under Triton's interpreter with tiny shapes: it proves
the plumbing, not the numbers.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

RESULTS = "results.jsonl"
KINDS = ("fact", "check", "timing", "train", "prediction", "note", "stage")
REQUIRED: dict[str, tuple[str, ...]] = {
    "fact": ("value",),
    "check": ("ok", "required"),
    "timing": ("op", "provider", "shape", "dtype", "median_ms"),
    "train": ("op", "provider", "shape", "dtype", "median_ms"),
    "prediction": ("op", "M", "N", "K"),
    "note": ("text",),
    "stage": ("budget_s", "timeout_s", "elapsed_s", "rc"),
}

# (N, K) of the Llama-3 8B/70B projections the headline timings cover; the dry run's stand-ins are
# small enough for the interpreter and keep K % 64 == 0 (the fused kernels' requirement).
LLAMA_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672), (28672, 8192)]
DRY_SHAPES = [(64, 128), (96, 192)]
GEMV_MS = (1, 16)
TRAIN_M = 2048
DRY_TRAIN_M = 33  # > 16 and not a power of two: the GEMM path with a ragged tile


_IMPORTED = time.time()


def session_t0() -> float:
    """The session's start (epoch seconds) as run.sh exported it; else when this module loaded."""
    return float(os.environ.get("FOURBIT_SESSION_T0") or _IMPORTED)


def validate(line: dict[str, Any]) -> list[str]:
    """The schema errors of one results line (empty when it is well formed)."""
    errors = []
    for key, kind in (("stage", str), ("kind", str), ("name", str), ("t", (int, float))):
        if not isinstance(line.get(key), kind):
            errors.append(f"{key!r} missing or not {getattr(kind, '__name__', 'a number')}")
    if line.get("kind") not in KINDS:
        errors.append(f"kind {line.get('kind')!r} is not one of {KINDS}")
        return errors
    errors += [f"a {line['kind']} line needs {key!r}" for key in REQUIRED[line["kind"]] if key not in line]
    if line["kind"] == "check" and not (isinstance(line.get("ok"), bool) and isinstance(line.get("required"), bool)):
        errors.append("a check's 'ok' and 'required' are booleans")
    return errors


def read_results(out: str | os.PathLike) -> tuple[list[dict], list[str]]:
    """(lines, problems) of OUT/results.jsonl. A last line cut off by a killed stage is reported,
    not fatal; every other malformed line is a problem too."""
    path = Path(out) / RESULTS
    if not path.exists():
        return [], [f"{path} does not exist"]
    lines, problems = [], []
    for i, text in enumerate(path.read_text().splitlines(), 1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except json.JSONDecodeError as err:
            problems.append(f"line {i}: not JSON ({err.msg})")
            continue
        errors = validate(line) if isinstance(line, dict) else ["not an object"]
        problems += [f"line {i}: {e}" for e in errors]
        if not errors:
            lines.append(line)
    return lines, problems


def append_line(out: str | os.PathLike, stage: str, kind: str, name: str, **fields: Any) -> dict:
    """Append one results line to OUT/results.jsonl (and echo a short form to stdout)."""
    line = {"stage": stage, "kind": kind, "name": name, "t": round(time.time() - session_t0(), 3), **fields}
    problems = validate(line)
    if problems:
        raise ValueError(f"bad results line {name!r}: {problems}")
    text = json.dumps(line, default=str) + "\n"
    with open(Path(out) / RESULTS, "a") as f:  # one write per line: a kill leaves whole lines
        f.write(text)
    brief = {k: v for k, v in fields.items() if k in ("ok", "value", "text", "median_ms", "rel_err", "tokens_per_s")}
    print(f"[{line['t']:7.1f}s] {stage}/{kind}: {name} {json.dumps(brief, default=str)[:300]}", flush=True)
    return line


class Session:
    """One stage's view of the session: where to write, which device, how large."""

    def __init__(self, stage: str, out: str | os.PathLike, dry_run: bool):
        import torch

        self.stage, self.out, self.dry_run = stage, Path(out), dry_run
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = "cpu" if dry_run else "cuda"
        if not dry_run and not torch.cuda.is_available():
            raise SystemExit("no CUDA device visible to torch (use --dry-run on a machine without a GPU)")
        self.shapes = DRY_SHAPES if dry_run else LLAMA_SHAPES
        self.train_m = DRY_TRAIN_M if dry_run else TRAIN_M
        # Triton's interpreter has no bf16 dot (tests/test_matmul.py): the dry run's matmuls use fp16
        self.dtype = torch.float16 if dry_run else torch.bfloat16
        self.failed_required = 0

    def emit(self, kind: str, name: str, **fields: Any) -> dict:
        if kind == "check" and fields["required"] and not fields["ok"]:
            self.failed_required += 1
        return append_line(self.out, self.stage, kind, name, **fields)

    def check(self, name: str, ok: bool, *, required: bool = True, **details: Any) -> bool:
        self.emit("check", name, ok=bool(ok), required=required, **details)
        return bool(ok)

    def facts(self) -> dict[str, Any]:
        """{name: value} of the fact lines written so far (the ceilings later stages divide by)."""
        lines, _ = read_results(self.out)
        return {line["name"]: line["value"] for line in lines if line["kind"] == "fact"}

    def sync(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()


def peer():
    """(bitsandbytes, bitsandbytes.functional), or (None, None) when it is not installed: run.sh
    installs the carried wheel; without it the session still times fourbit and dense."""
    try:
        import bitsandbytes
        import bitsandbytes.functional as functional
    except ImportError:
        return None, None
    return bitsandbytes, functional


def rel_err(got, want) -> float:
    """‖got − want‖ / ‖want‖ in float64 (inf if got has a NaN or inf, so it never passes)."""
    import torch

    got = got.double()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - want).norm() / want.norm().clamp(min=1e-300)).item()
