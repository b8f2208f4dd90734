"""Predicted vs measured: the static cost model's rows joined with this session's fourbit timings.

run.sh starts `python -m fourbit.kernels.analysis.costmodel --arch sm_90a --json OUT/costmodel.json` in the
background at the beginning of the session (it compiles on the CPU, so it overlaps the GPU stages).
Its rows carry {op, M, N, K, config, path, limiter, predicted_fraction, predicted_time_us,
loop_instructions_per_weight_byte, arch}; `op` is gemv | gemm | backward | dequantize, which the
timing rows carry as `kernel_op`. They join on (op, M, N, K); dequantize rows on (op, N, K) (the
model writes M = 0 there). Where the model marks the rows the dispatcher would run (`chosen`), only
those are joined: they are what was timed.

The measured fraction is read the way the model states its prediction:
    gemv, dequantize   (bytes moved / measured copy bandwidth) / measured time   (of the roofline)
    gemm, backward     dense cuBLAS time / fourbit time on the same case          (of dense)
and `measured_over_predicted` = measured time / predicted time (> 1: slower than predicted).
Missing module, a run that timed out, or no rows: one note says which; the session goes on.
"""

from __future__ import annotations

import json
from pathlib import Path

from .common import Session, read_results

COSTMODEL = "costmodel.json"


def prediction_rows(data) -> list[dict]:
    """The list of row dicts in the cost model's JSON (a list, or an object holding one)."""
    if isinstance(data, dict):
        data = next((v for v in data.values() if isinstance(v, list) and v and isinstance(v[0], dict)), [])
    return [r for r in data if isinstance(r, dict) and {"op", "N", "K"} <= r.keys()] if isinstance(data, list) else []


def key(op: str, m, n: int, k: int) -> tuple:
    return (op, None if op == "dequantize" else int(m), int(n), int(k))


def join(predictions: list[dict], timings: list[dict], copy_gbs: float | None) -> list[dict]:
    """One joined row per (measured fourbit case, matching prediction)."""
    by_key: dict[tuple, list[dict]] = {}
    for p in predictions:
        by_key.setdefault(key(p["op"], p.get("M") or 0, p["N"], p["K"]), []).append(p)
    dense = {(t["op"], t["shape"]): t["median_ms"] for t in timings if t["provider"] == "dense"}
    joined = []
    for t in timings:
        if t["provider"] != "fourbit" or "kernel_op" not in t:
            continue
        measured_us = t["median_ms"] * 1e3
        if t["kernel_op"] in ("gemv", "dequantize"):
            roofline_us = t["bytes_moved"] / (copy_gbs * 1e3) if copy_gbs and t.get("bytes_moved") else None
            fraction = roofline_us / measured_us if roofline_us and measured_us > 0 else None
        else:
            peer_ms = dense.get((t["op"], t["shape"]))
            fraction = peer_ms / t["median_ms"] if peer_ms and t["median_ms"] > 0 else None
        matches = by_key.get(key(t["kernel_op"], t["M"], t["N"], t["K"]), [])
        if any(p.get("chosen") for p in matches):  # the row(s) the dispatcher would run: what was timed
            matches = [p for p in matches if p.get("chosen")]
        for p in matches:
            predicted_us = p.get("predicted_time_us")
            joined.append({
                "op": t["kernel_op"], "M": t["M"], "N": t["N"], "K": t["K"],
                **{f: p.get(f) for f in ("config", "path", "limiter", "predicted_fraction", "predicted_time_us",
                                         "loop_instructions_per_weight_byte", "arch", "chosen")},
                "measured_us": measured_us, "measured_fraction": fraction,
                "measured_over_predicted": measured_us / predicted_us if predicted_us else None,
            })
    return joined


def run(s: Session) -> None:
    if not (Path(__file__).resolve().parents[2] / "fourbit" / "kernels" / "analysis" / "costmodel.py").exists():
        s.emit("note", "costmodel missing",
               text="fourbit.kernels.analysis.costmodel is not in this checkout: no predictions")
        return
    path = s.out / COSTMODEL
    try:
        predictions = prediction_rows(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError) as err:
        s.emit("note", "costmodel gave no predictions", text=f"{path.name}: {err} (timed out or failed: see session.log)")
        return
    lines, _ = read_results(s.out)
    timings = [line for line in lines if line["kind"] == "timing"]
    copy_gbs = next((line["value"] for line in lines if line["kind"] == "fact" and line["name"] == "copy_gb_per_s"), None)
    joined = join(predictions, timings, copy_gbs)
    for row in joined:
        s.emit("prediction", f"{row['op']} M={row['M']} N={row['N']} K={row['K']} {row['config']}", **row)
    s.emit("note", "costmodel joined", text=f"{len(joined)} predicted-vs-measured rows from {len(predictions)} predictions "
                                             f"and {sum(t['provider'] == 'fourbit' for t in timings)} fourbit timings")
