"""Static cost model: how fast fourbit's matmul kernels can be on an H200, read from their SASS.

    python -m fourbit.kernels.analysis.costmodel --arch sm_90a [--json FILE] [--save-binaries DIR]
        [--m 1 --m 2048 ...] [--op gemv --op gemm ...] [--shape 4096x4096 ...]

No GPU: every kernel configuration the launchers may run is compiled for the target with the
compile report's machinery (`fourbit.kernels.analysis.report.build`), its steady-state loop is found in the
SASS (`fourbit.kernels.analysis.sass`) and its instructions per loop trip are counted by class. Each launch
is then bounded by the slowest of
  * issue: 4 warp-instructions per clock per SM, and each class's own pipe rate (`PIPES`);
  * L1/shared memory: 128 B per clock per SM; a warp's access costs its bytes / 128 wavefronts,
    gathers from a table with data-dependent addresses the expected number of distinct 128-B lines
    32 random lanes touch, HGMMA its shared-memory operands;
  * tensor cores: the measured dense bf16 rate; a loop that waits for every wgmma before decoding
    the next tile (`WARPGROUP.DEPBAR.LE gsb0, 0x0`) overlaps decode and MMA only across CTAs; one
    whose wgmma takes A from registers (Triton splits it in two halves, `wait_group 1` after each)
    overlaps the decode with half of the MMA;
  * bytes in flight: resident CTAs (registers, shared memory, threads) x weight bytes one CTA has
    in flight (one loop trip for register loads unless the plan says more, stages-1 for cp.async/TMA
    pipelines) must cover HBM latency x the SM's share of bandwidth (Little's law);
  * HBM: the launch's compulsory bytes at the measured copy bandwidth;
  * wave quantization: the busiest SM runs ceil(programs / 132) programs;
plus, once per launch, the prologue of the first programs (`prologue_clocks`): what runs before the
loop (a table fill waits for its table's loads, then its stores and the barrier issue) and the first
weights' latency where it is not covered by the fill; every program's prologue also takes its issue
slots and L1 wavefronts.
A dequantize + cuBLAS path costs the dequantize launch plus cuBLAS, modelled as
max(2MNK / CUBLAS_FLOPS, bytes / HBM): the measured 8192^3 rate, assumed at every shape (fraction
1.0 of the measured peak). The dense bf16 reference the gemm/backward rows are compared with is the
same cuBLAS time, so the assumption cancels except through the dequantize share.

This is a lower bound on the work per byte, not a simulator. Blind spots: it assumes perfect
overlap of the bounded resources and perfect latency hiding within them; no instruction latency or
dependency stalls, no scheduling, no bank conflicts beyond table gathers, no L2 misses on tiles
re-read across programs; in the prologue, every global load is charged the DRAM latency (the
GEMV's pair table is an L2 hit, so its wait is overcharged) and the first loop trip's loads of x
and scales, issued at the loop's start, are not charged; no launch overhead or drain (about 2-5 us
per launch, comparable to the 2 us a 4096x4096 GEMV needs at the roofline), no clock throttling (1.98 GHz
assumed, the clock read right after a matmul run), static counts of predicated code and both sides
of in-loop branches, every gather charged the same table size, integer ops on one 64-lane pipe,
barriers and shuffles cost only their pipe slots (no convergence waits), no credit for a dequantized
workspace that fits in the 60 MB L2 and is read back from there by cuBLAS (4096x4096 bf16: 33.5 MB),
so dequantize + cuBLAS is charged its full write to HBM. Treat its ranking as reliable and its
fractions as optimistic.

Rows (`--json` writes {"arch", "toolchain", "constants", "rows", "kernels"}: the Triton and ptxas that
built them (run it with Triton 3.6 first on PYTHONPATH for the GPU machine's builds), and each compiled spec's
registers, shared memory, resident CTAs, loop address range and instruction mix); the row schema is stable
(helper scripts write predicted-vs-measured tables from it):
    op            "gemv" | "gemm" | "backward" | "dequantize"
    M, N, K       problem size (y[M, N] = x[M, K] W[N, K]^T; backward dx[M, K] = dy[M, N] W); M = 0 for dequantize
    config        the plan's configuration label
    path          "fused" | "dequantize+cublas"
    limiter       what bounds the time: issue | <pipe class> | l1 | tensor | mma_wait (decode and MMA
                  serialized, or overlapping only half of the MMA) | latency | hbm | cublas
    predicted_fraction  gemv/dequantize: roofline time / predicted time, roofline = compulsory HBM
                  bytes (4.127-bit weights, activations in and out; dequantize: its bf16 output too) at
                  HBM_BYTES_PER_S; gemm/backward: dense bf16 cuBLAS time / predicted time (> 1 is faster)
    predicted_time_us   the bound, in microseconds
    loop_instructions_per_weight_byte  thread-instructions of one loop trip over the packed weight
                  bytes it consumes (null for pure cuBLAS)
    arch          target, e.g. "sm_90a"
    chosen        whether the dispatcher would run this row (its route, and within it the best-predicted
                  config: the autotuner's pick if the model ranks like the hardware)
    kernels       names of the compiled kernel specs the row launches
    bounds_us     every bound of the slowest launch, in microseconds (the limiter is the largest)
    prologue_us   the exposed prologue added to the bound (`prologue_clocks`), summed over launches
    roofline_fraction  the HBM-roofline fraction for every op (the goal's unit for decode-sized M)

Contract with the kernel modules (what the model asks, so that it evaluates what really runs):
  * `fourbit.kernels.matmul.launch_plans(op, m, n, k, *, sms=132) -> list[Plan]`, op in
    {"gemv", "gemm", "backward"}: every alternative the launcher may run for bf16 activations, nested
    scales, blocksize 64 (the QLoRA case compile_specs() covers), one `Plan` per autotune candidate,
    including "dequantize+cublas" plans; [] where the op does not apply (gemv above its M limit).
    The dequantize rows rate the launches of the "gemm" dequantize+cublas plans on their own.
  * `fourbit.dispatch.matmul_route(m, n, k, *, backward=False) -> (op, path)`: the dispatcher's choice.
  * `Plan`/`Launch` (fourbit.kernels.compile) carry the spec as compiled, the grid, loop trips per
    program, weight bytes per trip (BLOCK_N * BLOCK_K / 2 for packed nibbles), compulsory HBM bytes,
    the size of any table the loop gathers from, and optionally the trips whose loads are in flight
    at once (a loop that prefetches the next trip's weights into registers says 2). Take the specs
    from the module's compile_specs(), so that `fourbit report` checks (spills, widths) exactly what
    the model rates.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Callable

from . import sass as sasslib
from ..compile import Launch, Plan
from .report import build

__all__ = ["SHAPES", "MS", "predict_launch", "predict_plan", "evaluate", "main"]

# ---- constants: the machine (sm_90a = H200 SXM), each with its source -----------------------------
SMS = 132  # multiprocessors; PyTorch's device properties on the lent H200 (.library/device/KINDS.md, 2026-10-28)
CLOCK_HZ = 1.98e9  # SM clock nvidia-smi read right after a matmul run there (KINDS.md); boost, no throttling
HBM_BYTES_PER_S = 4.3e12  # device-to-device copy, bytes read + written (KINDS.md, gVisor and Firecracker)
CUBLAS_FLOPS = 790e12  # bf16 8192^3 torch.matmul on random data: 788 (gVisor), 769-798 (Firecracker), KINDS.md
ISSUE_PER_CLK = 4.0  # warp-instructions per clock per SM: 4 schedulers, one issue each (H100 whitepaper)
# warp-instructions per clock per SM of each pipe = results/clk/SM / 32, CUDA C++ Programming Guide,
# "Throughput of Native Arithmetic Instructions", compute capability 9.0: fp32 add/mul/fma 128,
# half2 add/mul/fma 256 results = 128 instructions' lanes, 32-bit integer add/logic/shift/compare 64,
# warp shuffle 32, "all other type conversions" 16, special functions (MUFU) 16.
PIPES = {"fp32": 4.0, "fp16x2": 4.0, "integer": 2.0, "shuffle": 1.0, "conversion": 0.5, "special": 0.5}
L1_BYTES_PER_CLK = 128  # L1/shared data path per SM per clock: 32 banks x 4 bytes (.library/device/HOPPER.md)
# Loaded DRAM latency: an assumption until a GPU run measures it (a pointer chase under load). It sets
# the bytes each SM must keep in flight: 0.6 us x 4.3 TB/s / 132 SMs = ~19.5 KB.
HBM_LATENCY_S = 0.6e-6
REGISTERS_PER_SM = 65536  # 64K 32-bit registers (H100 whitepaper), allocated per warp in units of 256
THREADS_PER_SM, CTAS_PER_SM = 2048, 32  # CUDA Programming Guide, technical specifications, cc 9.0
SHARED_PER_SM, SHARED_RESERVED_PER_CTA = 228 * 1024, 1024  # same table; 1 KB per CTA reserved by the system
BITS_PER_WEIGHT = 4 + 8 / 64 + 32 / (64 * 256)  # NF4 + uint8 scale per 64 + fp32 nested scale per 256 blocks

TENSOR_FLOP_PER_CLK = CUBLAS_FLOPS / SMS / CLOCK_HZ  # ~3020 per SM: the measured rate, not the datasheet's
HBM_BYTES_PER_CLK_PER_SM = HBM_BYTES_PER_S / SMS / CLOCK_HZ  # ~16.5

SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672), (28672, 8192))  # (N, K): Llama-3 8B/70B
MS = (1, 4, 16, 64, 256, 2048, 8192)


def constants() -> dict[str, float]:
    names = ["SMS", "CLOCK_HZ", "HBM_BYTES_PER_S", "CUBLAS_FLOPS", "ISSUE_PER_CLK", "L1_BYTES_PER_CLK", "HBM_LATENCY_S",
             "BITS_PER_WEIGHT", "TENSOR_FLOP_PER_CLK", "HBM_BYTES_PER_CLK_PER_SM"]
    return {n: globals()[n] for n in names} | {"PIPES": dict(PIPES)}


# ---- one compiled kernel ----------------------------------------------------------------------------
def kernel_facts(spec: Any, arch: str) -> dict[str, Any]:
    """Loop mix, gathers, registers, shared memory and resident CTAs of `spec` built for `arch`."""
    built = build(spec, arch)
    instructions = sasslib.parse(built["sass"])
    loop = sasslib.find_loop(instructions)
    body = loop.body if loop else tuple(instructions)
    mix = sasslib.mix(body)
    mix["gathers"] = [[g.opcode + "".join("." + m for m in g.modifiers), sasslib.access_bytes(g)]
                      for g in sasslib.gathers(body)]  # [name, bytes per warp if coalesced]
    mix["async_copies"] = mix["by_class"].get("global_load", 0) and any(
        x.opcode in ("LDGSTS", "UTMALDG", "UBLKCP") for x in body)
    mix["prologue"] = None if loop is None else sasslib.prologue([x for x in instructions if x.addr < loop.start])
    regs, shared, warps = built["usage"]["registers"], built["shared_bytes"], spec.num_warps
    per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    limits = {"registers": (REGISTERS_PER_SM // per_warp) // warps, "threads": THREADS_PER_SM // (32 * warps),
              "ctas": CTAS_PER_SM}
    if shared:
        limits["shared"] = SHARED_PER_SM // (shared + SHARED_RESERVED_PER_CTA)
    return {"name": spec.name, "registers": regs, "shared_bytes": shared, "num_warps": warps, "num_stages": spec.num_stages,
            "resident_ctas": max(0, min(limits.values())), "occupancy_limit": min(limits, key=limits.get),
            "loop": None if loop is None else [hex(loop.start), hex(loop.end)], "hazards": built["hazards"], **mix}


def prologue_clocks(pro: dict[str, int] | None, warps: int) -> tuple[float, float, float]:
    """(issue clocks, L1 clocks, exposed clocks) of one program's prologue. Exposed: the time before
    its loop can run, charged once per launch (all resident programs start together; a later
    program's prologue overlaps other programs' loops, so only its issue and L1 slots count):
    a table fill waits one memory latency for its table (loads before its first store), then issues
    (the fill's stores, the barrier, the rest); weights requested after the fill add a latency of
    their own, weights requested before it arrive during the fill."""
    if not pro:
        return 0.0, 0.0, 0.0
    issue = warps * pro["instructions"] / ISSUE_PER_CLK
    l1 = warps * pro["l1_wavefronts"] * 128 / L1_BYTES_PER_CLK
    latency = HBM_LATENCY_S * CLOCK_HZ
    ready = (latency if pro["fill_stores"] and pro["loads_before_fill"] else 0.0) + max(issue, l1)
    first_data = ready + latency if pro["loads_after_fill"] else latency
    return issue, l1, max(ready, first_data)


def _gather_wavefronts(table_bytes: int) -> float:
    """Expected distinct 128-byte lines 32 lanes touch when each picks a table entry at random."""
    lines = max(1, math.ceil(table_bytes / 128))
    return lines * (1 - (1 - 1 / lines) ** 32)


def predict_launch(launch: Launch, facts: dict[str, Any]) -> dict[str, Any]:
    """Time bound of one launch: {"time_s", "limiter", "bounds": {name: seconds}, "instr_per_byte"}."""
    warps, n = facts["num_warps"], facts["instructions"]
    by = facts["by_class"]
    # SM clocks one program's loop trip occupies each resource (all warps of the program)
    clk = {"issue": warps * n / ISSUE_PER_CLK}
    clk |= {cls: warps * by.get(cls, 0) / rate for cls, rate in PIPES.items()}
    # a gather touches the table's expected distinct lines instead of its width's worth (counted in the mix)
    extra = sum(max(0.0, _gather_wavefronts(launch.gather_table_bytes) - max(1, nbytes // 128))
                for _, nbytes in facts["gathers"])
    clk["l1"] = warps * ((facts["l1_wavefronts"] + extra) * 128 + facts["hgmma_smem_bytes"]) / L1_BYTES_PER_CLK
    clk["tensor"] = warps * facts["tensor_flops"] / TENSOR_FLOP_PER_CLK
    programs = math.prod(launch.grid)
    per_sm = math.ceil(programs / SMS)  # the busiest SM's share: wave quantization
    active = max(1, min(facts["resident_ctas"], per_sm))
    trip = max(clk.values())
    if facts["waits_all_mma"] and clk["tensor"]:
        # decode and MMA serialize inside a program; only other resident programs fill the gap
        trip = max(trip, (clk["issue"] + clk["tensor"]) / active)
    elif facts.get("mma_register_a") and clk["tensor"]:
        # Triton splits a register-operand wgmma in two halves with `wait_group 1` after each: the
        # next decode overlaps only the second half
        trip = max(trip, (clk["tensor"] / 2 + max(clk["issue"], clk["tensor"] / 2)) / active)
    sm_clk = {name: per_sm * launch.iterations * c for name, c in clk.items()}
    if trip > max(clk.values()):
        sm_clk["mma_wait"] = per_sm * launch.iterations * trip
    pro_issue, pro_l1, exposed = prologue_clocks(facts.get("prologue"), warps)
    sm_clk["issue"] += per_sm * pro_issue  # every program's prologue takes issue slots and L1 wavefronts
    sm_clk["l1"] += per_sm * pro_l1
    depth = launch.iterations_in_flight or (max(1, facts["num_stages"] - 1) if facts["async_copies"] else 1)
    in_flight = active * launch.weight_bytes_per_iteration * depth  # bytes one SM has requested at once
    sm_bytes = per_sm * launch.hbm_bytes / programs
    latency_clk = HBM_LATENCY_S * CLOCK_HZ
    bounds = {name: c / CLOCK_HZ for name, c in sm_clk.items()}
    bounds["latency"] = sm_bytes / (in_flight / latency_clk) / CLOCK_HZ if in_flight else math.inf
    bounds["hbm"] = launch.hbm_bytes / HBM_BYTES_PER_S
    limiter = max(bounds, key=bounds.get)
    ipb = 32 * warps * n / launch.weight_bytes_per_iteration if launch.weight_bytes_per_iteration else None
    prologue = exposed / CLOCK_HZ
    return {"time_s": bounds[limiter] + prologue, "limiter": limiter, "bounds": bounds, "instr_per_byte": ipb,
            "programs": programs, "active_ctas_per_sm": active, "prologue_s": prologue}


def cublas_time(m: int, n: int, k: int) -> float:
    """Dense bf16 torch.matmul of (m, k) x (k, n): the measured rate, or its bytes at HBM speed."""
    return max(2 * m * n * k / CUBLAS_FLOPS, 2 * (m * k + n * k + m * n) / HBM_BYTES_PER_S)


def roofline_time(op: str, m: int, n: int, k: int) -> float:
    weights = n * k * BITS_PER_WEIGHT / 8
    if op == "dequantize":
        return (weights + 2 * n * k) / HBM_BYTES_PER_S
    return (weights + 2 * m * k + 2 * m * n) / HBM_BYTES_PER_S


def predict_plan(plan: Plan, m: int, n: int, k: int, arch: str, facts_of: Callable[[Any], dict]) -> dict[str, Any]:
    """One output row for `plan` (see the module docstring for the schema)."""
    # each launch's spec as Triton specializes it for the launch's sizes (M = 1 is a constant, ...)
    parts = [(predict_launch(launch, facts_of(launch.compiled_spec)), launch) for launch in plan.launches]
    time_s = sum(p["time_s"] for p, _ in parts)
    limiters = [(p["time_s"], p["limiter"]) for p, _ in parts]
    if plan.cublas_mnk is not None:
        t = cublas_time(*plan.cublas_mnk)
        time_s += t
        limiters.append((t, "cublas"))
    main = max(parts, key=lambda x: x[0]["time_s"], default=(None, None))[0]
    if plan.op in ("gemv", "dequantize"):
        fraction = roofline_time(plan.op, m, n, k) / time_s
    else:
        fraction = cublas_time(m, n, k) / time_s
    return {
        "op": plan.op, "M": m, "N": n, "K": k, "config": plan.config, "path": plan.path,
        "limiter": max(limiters)[1], "predicted_fraction": round(fraction, 4), "predicted_time_us": round(time_s * 1e6, 3),
        "loop_instructions_per_weight_byte": None if main is None or main["instr_per_byte"] is None
        else round(main["instr_per_byte"], 2),
        "arch": arch, "chosen": False, "kernels": [launch.compiled_spec.name for launch in plan.launches],
        "bounds_us": {} if main is None else {name: round(t * 1e6, 3) for name, t in main["bounds"].items()},
        "prologue_us": round(sum(p.get("prologue_s", 0.0) for p, _ in parts) * 1e6, 3),
        "roofline_fraction": round(roofline_time("dequantize" if plan.op == "dequantize" else "gemv", m, n, k) / time_s, 4),
    }  # fmt: skip


# ---- what the library would run -----------------------------------------------------------------------
def _plans_function() -> Callable[..., list[Plan]]:
    from ..matmul import launch_plans

    return launch_plans


def _dequantize_plans(plans_for: Callable[..., list[Plan]], n: int, k: int) -> list[Plan]:
    """The dequantize launches of the dequantize + cuBLAS plans, rated on their own."""
    launches = {}
    for plan in plans_for("gemm", MS[-1], n, k, sms=SMS):
        if plan.path == "dequantize+cublas":
            launches.setdefault(tuple(launch.spec.name for launch in plan.launches), plan.launches)
    return [Plan(op="dequantize", path="fused", config=",".join(names), launches=ls) for names, ls in launches.items()]


def default_route() -> Callable[..., tuple[str, str]]:
    """The dispatcher's route function. The model is a tool above the library (tests/test_layers.py
    places it just above dispatch), so reading dispatch's choice here does not make the kernels depend
    on dispatch: nothing in the library imports the cost model."""
    from ...dispatch import matmul_route

    return matmul_route


def evaluate(arch: str = "sm_90a", shapes=SHAPES, ms=MS, ops=("gemv", "gemm", "backward", "dequantize"),
             route: Callable[..., tuple[str, str]] | None = None, routed_only: bool = False,
             ) -> tuple[list[dict], dict[str, dict], dict[str, Any]]:
    """(rows, kernel facts by spec name, specs by name) for every plan of every (op, M, shape); with
    `route`, the rows the dispatcher would run are marked chosen, and with `routed_only` only the
    routed (op, path) is evaluated (fewer kernels to compile)."""
    plans_for = _plans_function()
    facts: dict[str, dict] = {}
    specs: dict[str, Any] = {}

    def facts_of(spec):
        if spec.name not in facts:
            facts[spec.name] = kernel_facts(spec, arch)
            specs[spec.name] = spec
        return facts[spec.name]

    rows = []
    for n, k in shapes:
        if "dequantize" in ops:
            rows += [predict_plan(p, 0, n, k, arch, facts_of) for p in _dequantize_plans(plans_for, n, k)]
            if rows and rows[-1]["op"] == "dequantize":
                min((r for r in rows if (r["op"], r["N"], r["K"]) == ("dequantize", n, k)),
                    key=lambda r: r["predicted_time_us"])["chosen"] = True
        for m in ms:
            routes = {route(m, n, k, backward=b) for b in (False, True)} if route is not None else set()
            for op in ("gemv", "gemm", "backward"):
                if op in ops:
                    rows += [predict_plan(p, m, n, k, arch, facts_of) for p in plans_for(op, m, n, k, sms=SMS)
                             if not routed_only or (p.op, p.path) in routes]
            for op, path in routes:
                mine = [r for r in rows if (r["op"], r["path"], r["M"], r["N"], r["K"]) == (op, path, m, n, k)]
                if mine:
                    min(mine, key=lambda r: r["predicted_time_us"])["chosen"] = True
    return rows, facts, specs


def format_table(rows: list[dict], chosen_only: bool = False) -> str:
    header = ("op", "M", "N", "K", "path", "config", "limiter", "fraction", "time us", "instr/B", "chosen")
    lines = [(r["op"], str(r["M"]), str(r["N"]), str(r["K"]), r["path"], r["config"], r["limiter"],
              f"{r['predicted_fraction']:.3f}", f"{r['predicted_time_us']:.1f}",
              "-" if r["loop_instructions_per_weight_byte"] is None else f"{r['loop_instructions_per_weight_byte']:.1f}",
              "*" if r["chosen"] else "")
             for r in rows if r["chosen"] or not chosen_only]  # fmt: skip
    widths = [max(len(x[i]) for x in [header, *lines]) for i in range(len(header))]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, lines)])


CASES = [("dequantize", "dequantize", 0, False)] + [(f"forward M={m}", None, m, False) for m in MS] + [
    (f"backward M={m}", "backward", m, True) for m in (2048, 8192)]


def format_markdown(rows: list[dict], shapes=SHAPES) -> str:
    """The docs/kernels.md table: per goal case and shape, the chosen row's predicted fraction (and loop
    thread-instructions per weight byte), with a "measured" line for a GPU run to fill."""
    lines = ["| case | | " + " | ".join(f"{n}×{k}" for n, k in shapes) + " | path (limiter) |",
             "|" + "---|" * (len(shapes) + 3)]
    for label, op, m, backward in CASES:
        cells, paths = [], set()
        for n, k in shapes:
            hit = [r for r in rows if r["chosen"] and (r["M"], r["N"], r["K"]) == (m, n, k)
                   and ((r["op"] == "backward") == backward) and (op is None or r["op"] == op)]
            if not hit:
                cells.append("—")
                continue
            r = hit[0]
            ipb = r["loop_instructions_per_weight_byte"]
            cells.append(f"{r['predicted_fraction']:.3f}" + ("" if ipb is None else f" ({ipb:.1f} i/B)"))
            paths.add(f"{r['op']} {r['path']} ({r['limiter']})")
        if any(c != "—" for c in cells):
            lines.append(f"| {label} | predicted | " + " | ".join(cells) + f" | {'; '.join(sorted(paths))} |")
            lines.append("| | measured | " + " | ".join("" for _ in shapes) + " | |")
    return "\n".join(lines)


def _shape(text: str) -> tuple[int, int]:
    try:
        n, k = (int(x) for x in text.lower().split("x"))
    except ValueError:
        n = k = 0
    if n < 1 or k < 64 or k % 64:
        raise argparse.ArgumentTypeError(f"shape must be NxK with N >= 1 and K a multiple of 64, e.g. 4096x14336, got {text!r}")
    return n, k


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"M must be a positive integer, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fourbit.kernels.analysis.costmodel", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=["sm_90a"], default="sm_90a", help="target (the constants are the H200's)")
    parser.add_argument("--json", metavar="FILE", help="write rows, kernel facts, constants and notes as JSON")
    parser.add_argument("--save-binaries", metavar="DIR", help="write each compiled cubin (check with cuobjdump -sass)")
    parser.add_argument("--m", type=_positive, action="append", help=f"M values (default: {list(MS)})")
    parser.add_argument("--op", action="append", choices=["gemv", "gemm", "backward", "dequantize"], help="ops (default: all)")
    parser.add_argument("--shape", type=_shape, action="append", help="NxK (default: the five Llama-3 shapes)")
    parser.add_argument("--all", action="store_true", help="evaluate and print every candidate, not only the routed ones")
    parser.add_argument("--markdown", action="store_true", help="print docs/kernels.md's table of chosen rows instead")
    args = parser.parse_args(argv)

    from .._triton_utils import interpreting

    if interpreting():
        parser.error("TRITON_INTERPRET=1 replaces kernels by the interpreter; unset it to compile for GPUs")
    rows, facts, specs = evaluate(args.arch, tuple(args.shape or SHAPES), tuple(args.m or MS),
                           tuple(args.op or ("gemv", "gemm", "backward", "dequantize")), route=default_route(),
                                  routed_only=not args.all)
    print(format_markdown(rows) if args.markdown else format_table(rows))
    if args.save_binaries:
        os.makedirs(args.save_binaries, exist_ok=True)
        for name, spec in specs.items():
            safe = "".join(c if c.isalnum() or c in "_." else "-" for c in name).strip("-")
            with open(os.path.join(args.save_binaries, f"{safe}.{args.arch}.cubin"), "wb") as f:
                f.write(build(spec, args.arch)["cubin"])
    if args.json:
        from ...nf4.files import atomic_write

        from .report import toolchain

        text = json.dumps({"arch": args.arch, "toolchain": toolchain(args.arch), "constants": constants(), "rows": rows,
                           "kernels": facts}, indent=1) + "\n"

        def write(tmp: str) -> None:
            with open(tmp, "w") as f:
                f.write(text)

        atomic_write(args.json, write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
