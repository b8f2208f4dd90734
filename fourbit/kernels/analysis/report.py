"""Compile report: build every fourbit kernel for real GPUs without one, and read what ptxas made.

    python -m fourbit.kernels.analysis.report [--arch sm_75 sm_80 sm_89 sm_90a] [--only NAME]... [--module M]...
        [--json PATH]

For each `CompileSpec` of the kernel modules (`compile_specs()` in quantize, dequantize, matmul and
adamw; a module that fails to import is reported as a failure) and each architecture it runs on:
  1. `triton.compile` with a `GPUTarget` builds PTX and a cubin; no driver or GPU is involved.
     Pointer arguments are marked 16-byte aligned, the specialization Triton's launcher picks for
     torch allocations. Integer arguments are marked divisible by 16 (every real weight's N and K),
     except in a spec specialized to one launch's values (`compile.specialize`, rows named e.g.
     `...{M=1}`): there a 1 is a constant and a size that is no multiple of 16 gets no mark, as at
     run time. The Triton that compiles is the one imported (the report and the cost model say which).
  2. ptxas -v (the one Triton itself uses for that architecture, shipped in the triton wheel) on
     the PTX: registers per thread, spill stores/loads. Shared memory is Triton's own allocation.
  3. cuobjdump -sass on the cubin: global loads/stores counted by width (LDG/STG .U8/.U16/32/.64/
     .128; cp.async LDGSTS counts as a load), local-memory LDL/STL, tensor-core HMMA (sm_80/89) and
     HGMMA (sm_90a), TMA loads, and the instruction total.
  4. The hazard check (`fourbit.kernels.analysis.hazards`) on the same SASS: asynchronous wgmma
     register and proxy hazards, shared-memory tables read before a barrier.
A row fails its checks on spills or local memory, on a widest global load narrower than the spec's
`expect_vector_bits`, on missing tensor-core instructions when the spec expects them, or on a hazard.
Exit status 1 when any row fails or a kernel module fails to import.
With sm_90a among the targets and no --only/--module filter, a last section prints the static cost
model's predictions for the dispatcher's choices (`fourbit.kernels.analysis.costmodel`), from the
same builds.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Any

from ...nf4.files import atomic_write

__all__ = ["ARCHS", "MODULES", "collect_specs", "build", "analyse", "assemble", "sass_counts", "ptxas_usage", "toolchain",
           "main"]

# sm_75 (T4; V100 is 7.0, which CUDA 13's cuobjdump no longer reads) stands for the GPUs below 8.0,
# where only the kernels without mma.sync run (`CompileSpec.archs`; fourbit.dispatch's gates)
ARCHS = {"sm_75": 75, "sm_80": 80, "sm_89": 89, "sm_90a": 90}
MODULES = ("fourbit.kernels.quantize", "fourbit.kernels.dequantize", "fourbit.kernels.matmul", "fourbit.kernels.adamw")


def collect_specs(modules=MODULES, only: list[str] | None = None) -> tuple[list[Any], list[str], bool]:
    """(specs, notes, import_ok): every spec whose name contains one of `only` (all when empty)."""
    specs, notes, ok = [], [], True
    for name in modules:
        try:
            module = importlib.import_module(name)
        except Exception as err:  # a broken kernel module is a report finding, not a crash
            notes.append(f"{name}: import failed: {type(err).__name__}: {err}")
            ok = False
            continue
        if not hasattr(module, "compile_specs"):
            notes.append(f"{name}: has no compile_specs(), skipped")
            continue
        specs += [s for s in module.compile_specs() if not only or any(o in s.name for o in only)]
    return specs, notes, ok


def _tool(name: str, capability: int) -> str:
    """Path of ptxas/cuobjdump inside the triton wheel; for ptxas, the one Triton uses for this arch."""
    import triton

    if name == "ptxas":
        try:
            from triton.backends.nvidia.compiler import get_ptxas

            return get_ptxas(capability).path
        except (ImportError, TypeError, AttributeError):
            pass
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return getattr(knobs.nvidia, name).path
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def toolchain(arch: str = "sm_90a") -> dict[str, str]:
    """{"triton": version, "ptxas": version}: what builds kernels for `arch` in this process."""
    import triton

    out = subprocess.run([_tool("ptxas", ARCHS[arch]), "--version"], capture_output=True, text=True).stdout
    release = re.search(r"release ([0-9.]+)", out)
    return {"triton": triton.__version__, "ptxas": release.group(1) if release else out.strip()[-60:]}


def _compile(spec: Any, capability: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # pointers ("*fp32") are 16-byte aligned (torch allocations); integers ("i32", "i64") divisible by
    # 16 unless the spec says which are (`compile.specialize`: the runtime values of one launch)
    divisible = getattr(spec, "divisible", None)
    aligned = {(i,): [["tt.divisibility", 16]] for i, (name, t) in enumerate(spec.signature.items())
               if t[0] == "*" or (t[0] in "iu" and (divisible is None or name in divisible))}
    source = ASTSource(fn=spec.kernel, signature=dict(spec.signature), constexprs=dict(spec.constexprs), attrs=aligned)
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages, **getattr(spec, "options", {})}
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options), options


def ptxas_usage(ptx: str, capability: int, fmad: bool) -> dict[str, int]:
    """Registers, spill bytes and static shared memory from `ptxas -v` on the PTX."""
    arch = f"sm_{capability}{'a' if capability >= 90 else ''}"
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [_tool("ptxas", capability), "-v", f"--gpu-name={arch}", *([] if fmad else ["--fmad=false"]), src, "-o", out]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spill is None:
        raise RuntimeError(f"could not parse ptxas -v output:\n{log}")
    smem = re.search(r"(\d+) bytes smem", log)  # static shared memory (a table declared in inline PTX)
    return {"registers": int(regs.group(1)), "spill_stores": int(spill.group(1)), "spill_loads": int(spill.group(2)),
            "static_shared": int(smem.group(1)) if smem else 0}


_WIDTH = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "64": 64, "128": 128, "256": 256}


def _width(modifiers: list[str]) -> int:
    widths = [_WIDTH[m] for m in modifiers if m in _WIDTH]
    return widths[-1] if widths else 32


def sass_counts(sass: str) -> dict[str, Any]:
    """Instruction classes in a cuobjdump -sass listing (one `/*addr*/ [@P] OPCODE.MODS operands ;` per line)."""
    ldg: collections.Counter = collections.Counter()
    stg: collections.Counter = collections.Counter()
    other: collections.Counter = collections.Counter()
    total = 0
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)", line)
        if not m:
            continue
        total += 1
        opcode, modifiers = m.group(1), m.group(2).split(".")[1:]
        if opcode in ("LDG", "LDGSTS"):
            ldg[_width(modifiers)] += 1
        elif opcode == "STG":
            stg[_width(modifiers)] += 1
        elif opcode in ("LDL", "STL", "HMMA", "HGMMA", "UTMALDG"):
            other[opcode] += 1
    return {
        "ldg_bits": dict(sorted(ldg.items())),
        "stg_bits": dict(sorted(stg.items())),
        "widest_ldg": max(ldg, default=0),
        "widest_stg": max(stg, default=0),
        "ldl": other["LDL"],
        "stl": other["STL"],
        "hmma": other["HMMA"],
        "hgmma": other["HGMMA"],
        "tma_loads": other["UTMALDG"],
        "instructions": total,
    }


_BUILT: dict[tuple, dict[str, Any]] = {}


def _disassemble(cubin: bytes, capability: int) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([_tool("cuobjdump", capability), "-sass", path], capture_output=True, text=True,
                              check=True).stdout


def assemble(ptx: str, arch: str, fmad: bool = True) -> str:
    """The SASS listing of PTX text assembled for `arch` by the ptxas Triton uses for it (to check
    a hand-edited build, e.g. a deliberately broken one)."""
    capability = ARCHS[arch]
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        subprocess.run([_tool("ptxas", capability), f"--gpu-name={arch}", *([] if fmad else ["--fmad=false"]), src, "-o",
                        out], capture_output=True, text=True, check=True)
        with open(out, "rb") as f:
            return _disassemble(f.read(), capability)


def build(spec: Any, arch: str) -> dict[str, Any]:
    """{"cubin": bytes, "ptx": str, "sass": str, "usage": ptxas -v numbers, "shared_bytes": int,
    "hazards": [str]} of `spec` for `arch`, built once per process (the compile report and the cost
    model share the builds)."""
    key = (spec.name, spec.kernel, arch)
    if key not in _BUILT:
        from . import hazards

        capability = ARCHS[arch]
        compiled, options = _compile(spec, capability)
        sass = _disassemble(compiled.asm["cubin"], capability)
        _BUILT[key] = {
            "cubin": compiled.asm["cubin"],
            "ptx": compiled.asm["ptx"],
            "sass": sass,
            "usage": ptxas_usage(compiled.asm["ptx"], capability, fmad=options.get("enable_fp_fusion", True)),
            "hazards": [str(f) for f in hazards.check(sass)],
        }
        # what a CTA occupies: Triton's dynamic shared memory plus any static declaration
        _BUILT[key]["shared_bytes"] = int(compiled.metadata.shared) + _BUILT[key]["usage"]["static_shared"]
    return _BUILT[key]


def analyse(spec: Any, arch: str) -> dict[str, Any]:
    """One report row: compile `spec` for `arch`, read ptxas and SASS, apply the spec's checks."""
    built = build(spec, arch)
    row: dict[str, Any] = {"kernel": spec.name, "arch": arch, "num_warps": spec.num_warps, "num_stages": spec.num_stages}
    row.update(built["usage"])
    row["shared_bytes"] = built["shared_bytes"]
    row.update(sass_counts(built["sass"]))

    problems = []
    if row["spill_stores"] or row["spill_loads"] or row["ldl"] or row["stl"]:
        problems.append(f"spills {row['spill_stores']}/{row['spill_loads']} B, LDL {row['ldl']}, STL {row['stl']}")
    want = spec.expect_vector_bits
    if want and row["widest_ldg"] < want and not row["tma_loads"]:
        problems.append(f"widest global load {row['widest_ldg']} bits < {want}")
    if spec.expect_tensor_cores and not (row["hmma"] or row["hgmma"]):
        problems.append("no HMMA/HGMMA")
    row["hazards"] = built["hazards"]
    if built["hazards"]:
        problems.append(f"{len(built['hazards'])} hazards, first: {built['hazards'][0]}")
    row["problems"] = problems
    row["ok"] = not problems
    return row


def _widths(counts: dict[int, int]) -> str:
    return " ".join(f"{bits}x{count}" for bits, count in counts.items()) or "-"


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ("kernel", "arch", "regs", "spill B", "smem B", "LDG bits x count", "STG bits x count", "LDL/STL", "MMA", "ok")
    lines = [
        (
            r["kernel"], r["arch"], str(r["registers"]), f"{r['spill_stores']}/{r['spill_loads']}", str(r["shared_bytes"]),
            _widths(r["ldg_bits"]), _widths(r["stg_bits"]), f"{r['ldl']}/{r['stl']}",
            str(r["hgmma"] or r["hmma"] or "-"), "ok" if r["ok"] else "FAIL: " + "; ".join(r["problems"]),
        )  # fmt: skip
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [header, *lines]) for i in range(len(header))]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, lines)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fourbit.kernels.analysis.report", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", nargs="+", choices=list(ARCHS), default=list(ARCHS), help="targets (default: all)")
    parser.add_argument("--only", action="append", default=[], help="keep specs whose name contains this (repeatable)")
    parser.add_argument("--module", action="append", choices=MODULES, help="kernel modules to load (default: all)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows (and notes) as JSON")
    args = parser.parse_args(argv)

    from .._triton_utils import interpreting

    if interpreting():
        parser.error("TRITON_INTERPRET=1 replaces kernels by the interpreter; unset it to compile for GPUs")
    specs, notes, import_ok = collect_specs(args.module or MODULES, only=args.only)
    rows = [analyse(spec, arch) for spec in specs for arch in args.arch if spec.archs is None or arch in spec.archs]
    tools = {arch: toolchain(arch) for arch in args.arch}
    print("built by " + ", ".join(f"{arch}: triton {t['triton']}, ptxas {t['ptxas']}" for arch, t in tools.items()))
    print(format_table(rows))
    for note in notes:
        print("note:", note)
    model_rows = []
    if "sm_90a" in args.arch and not args.only and not args.module and import_ok:
        # the static cost model on the same builds (cached): what the dispatcher's choices may reach
        from . import costmodel

        model_rows, _, _ = costmodel.evaluate("sm_90a", route=costmodel.default_route(), routed_only=True)
        print("\nstatic cost model, sm_90a, the dispatcher's choices "
              "(python -m fourbit.kernels.analysis.costmodel --all: every candidate)")
        print(costmodel.format_table([r for r in model_rows if r["chosen"]]))
    if args.json:
        text = json.dumps({"toolchain": tools, "rows": rows, "notes": notes, "costmodel": model_rows}, indent=1,
                          default=str) + "\n"

        def write(tmp: str) -> None:
            with open(tmp, "w") as f:
                f.write(text)

        atomic_write(args.json, write)
    return 0 if import_ok and rows and all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
