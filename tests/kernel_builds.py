"""Test-only child process: compile what the cost-model and hazard tests read, with whatever Triton
this Python imports (the main one, or 3.6 from a side folder put first on PYTHONPATH), for sm_90a,
and write it as JSON. Compiling needs a Python without TRITON_INTERPRET, hence a child.

    python tests/kernel_builds.py OUT.json [M ...] [--mutations]

OUT.json holds:
  rows, kernels  the static cost model's routed rows at each M (forward only at M <= 16, forward and
                 backward above) on the five Llama-3 shapes, and the facts of every kernel they
                 launch, hazards included (`fourbit.kernels.analysis.costmodel`)
  frozen         the frozen pre-rebuild GEMV's rows at M = 1 (tests/costmodel_frozen.py)
  routed         {kernel: hazards} for every kernel the dispatcher may pick on sm_90a for bf16 x,
                 nested scales, blocksize 64 (the five shapes, M from 1 to 8192, forward and backward),
                 one runtime specialization of each
  swapped        {kernel: hazards} for the swapped tiles, built whether or not this Triton may route them
  gates, routes, toolchain   `fourbit.dispatch.matmul_gates()`, the routes at M = 2048 (4096 x 4096),
                 the Triton and ptxas versions
  mutations      with --mutations: {name: hazards} of deliberately broken builds, each a routed
                 kernel's PTX with one safeguard removed and assembled again
"""

from __future__ import annotations

import json
import re
import sys

from costmodel_frozen import frozen_plan

ROUTE_MS = (1, 2, 9, 16, 17, 64, 1024, 2048, 8192)


def routed_specs():
    """One runtime specialization of every distinct kernel the dispatcher routes on sm_90a."""
    import importlib

    from fourbit import dispatch
    from fourbit.kernels.analysis import costmodel

    kern = importlib.import_module("fourbit.kernels.matmul")
    specs = {}
    for m in ROUTE_MS:
        for n, k in costmodel.SHAPES:
            for backward in (False, True):
                op, path = dispatch.matmul_route(m, n, k, backward=backward)
                for launch in kern.plan(op, m, n, k, path=path).launches:
                    specs.setdefault(launch.spec.name, launch.compiled_spec)
    return list(specs.values())


def swapped_specs():
    import torch

    from fourbit.kernels import matmul_plan as mp

    forward, backward = mp.swapped_configs()
    return [mp._gemm_spec(torch.bfloat16, True, 64, forward, False), mp._gemm_spec(torch.bfloat16, True, 64, backward, True)]


def mutations() -> dict[str, list[str]]:
    """Routed kernels with one safeguard removed from their PTX, assembled again: each must fail."""
    from fourbit.kernels.analysis import hazards, report

    gemm, backward = swapped_specs()
    gemv = next(s for s in routed_specs() if s.name.startswith("matmul_gemv_mma"))
    cases = {  # name: (spec, pattern, replacement, how many to replace (0: all))
        # the loop's wgmma.wait_group 1 -> 3: the next decode rewrites A registers still being read
        "swapped gemm, wait_group raised": (gemm, r"(wgmma\.wait_group\.sync\.aligned) 1;", r"\1 3;", 0),
        # no fence.proxy.async between the cp.async-written x tile and the wgmma reading it
        "swapped backward, proxy fence removed": (backward, r"\n\s*fence\.proxy\.async[^\n]*", "", 0),
        # the first barrier, the pair table's: the loop reads the table other threads are still writing
        "tensor-core GEMV, table barrier removed": (gemv, r"\n\s*bar\.sync[^\n]*", "", 1),
    }
    out = {}
    for name, (spec, pattern, repl, how_many) in cases.items():
        built = report.build(spec, "sm_90a")
        ptx, count = re.subn(pattern, repl, built["ptx"], count=how_many)
        assert count, (name, pattern)
        fmad = spec.options.get("enable_fp_fusion", True)
        out[name] = [str(f) for f in hazards.check(report.assemble(ptx, "sm_90a", fmad=fmad))]
    return out


def main(out: str, ms: list[int], with_mutations: bool) -> None:
    from fourbit import dispatch
    from fourbit.kernels.analysis import costmodel, report

    route, rows, facts = costmodel.default_route(), [], {}
    for group, ops in (([m for m in ms if m <= 16], ("gemv", "gemm")), ([m for m in ms if m > 16], ("gemm", "backward"))):
        if group:
            more, more_facts, _ = costmodel.evaluate("sm_90a", ms=tuple(group), ops=ops, route=route, routed_only=True)
            rows += [r for r in more if r["op"] in ops]
            facts |= more_facts
    frozen = []
    for n, k in costmodel.SHAPES:
        plan = frozen_plan(n, k)
        frozen.append(costmodel.predict_plan(plan, 1, n, k, "sm_90a", lambda s: facts.setdefault(
            s.name, costmodel.kernel_facts(s, "sm_90a"))))
    result = {
        "rows": rows, "frozen": frozen, "kernels": facts,
        "routed": {s.name: report.build(s, "sm_90a")["hazards"] for s in routed_specs()},
        "swapped": {s.name: report.build(s, "sm_90a")["hazards"] for s in swapped_specs()},
        "gates": dispatch.matmul_gates(), "toolchain": report.toolchain("sm_90a"),
        "routes": {f"{'backward' if b else 'forward'} M={m}": dispatch.matmul_route(m, 4096, 4096, backward=b)
                   for m in (2048, 4096) for b in (False, True)},
    }  # fmt: skip
    if with_mutations:
        result["mutations"] = mutations()
    with open(out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--mutations"]
    main(args[0], [int(m) for m in args[1:]] or [1], "--mutations" in sys.argv)
