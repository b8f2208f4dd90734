"""Run bitsandbytes' own test files against fourbit, the way a reviewer checks a compatibility claim.

    python tests/bnb_shim/run_bnb_tests.py --repo PATH_TO_BITSANDBYTES_GIT [--ref 0.50.1]
        [--against fourbit|installed|bitsandbytes] [--optim] [--avx512bf16]
        [--file tests/test_linear4bit.py] [--with-compile] [-k EXPR] [NODE_ID ...]

`--repo` is a local clone (or bare mirror) of github.com/bitsandbytes-foundation/bitsandbytes; this
script fetches nothing. The test directory at `--ref` is exported with `git archive` into a
temporary directory and run with pytest, unchanged. With `--against fourbit` (the default) the
package in tests/bnb_shim/bitsandbytes/ comes first on sys.path, so `import bitsandbytes` gives
fourbit's compatible names; with `--against installed` the real bitsandbytes is imported and
`fourbit.integrations.bitsandbytes.install()` routes its 4-bit and blockwise ops to fourbit (the
plugin in tests/bnb_shim/plugin/; `--optim` also puts fourbit's Adam/AdamW classes and
GlobalOptimManager in bitsandbytes.optim, `--avx512bf16` makes bitsandbytes believe the CPU has
AVX512-BF16 so that it repacks 4-bit weights for that kernel); every test's calls into fourbit are
counted, and a passing test that made none is reported (it did not test fourbit). With `--against
bitsandbytes` the installed bitsandbytes runs the same selection alone, for the baseline.

`--record FILE` adds the counts of the run to a JSON list (one entry per file, selection and mode;
benchmarks/results/cpu/bnb_tests.json feeds the table in docs/ecosystem.md). bitsandbytes'
test_optim.py imports `lion_pytorch` at module level (`pip install lion-pytorch` for that file).
Its `test_benchmark_blockwise` cases are timing loops (500 steps of a 4096 x 4096 parameter, no
assertion), so deselect them (`-k "... and not benchmark"`).

By default `test_linear4bit_torch_compile` (128 cases, each an inductor compile of a 4-layer net,
over an hour on a 2-core CPU) is deselected; `--with-compile` keeps it.

Prints pass/fail/skip counts and, per failing test function, the count and first error line.
bitsandbytes' test code is never copied into this repository.
"""

from __future__ import annotations

import argparse
import collections
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

SHIM = pathlib.Path(__file__).resolve().parent
ROOT = SHIM.parents[1]


def export_tests(repo: str, ref: str, dest: pathlib.Path) -> None:
    """`git archive REF tests` from the clone (worktree or bare) into dest."""
    git_dir = pathlib.Path(repo)
    if (git_dir / ".git").exists():
        git_dir = git_dir / ".git"
    archive = subprocess.run(["git", f"--git-dir={git_dir}", "archive", ref, "tests"], capture_output=True, check=False)
    if archive.returncode != 0:
        raise SystemExit(f"git archive {ref} tests failed in {repo}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)


def fourbit_calls(case) -> int | None:
    """The plugin's per-test count of calls into fourbit (None: not run under the plugin)."""
    for prop in case.iter("property"):
        if prop.get("name") == "fourbit_calls":
            return int(prop.get("value"))
    return None


def summarize(junit: pathlib.Path, record: dict | None = None) -> int:
    cases = ET.parse(junit).getroot().iter("testcase")
    counts: collections.Counter = collections.Counter()
    failures: dict[str, list[str]] = collections.defaultdict(list)
    idle: collections.Counter = collections.Counter()  # passed without calling fourbit, per function
    for case in cases:
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        if bad is not None:
            counts["failed"] += 1
            func = case.get("name", "").split("[")[0]
            first = (bad.get("message") or bad.text or "").strip().splitlines()
            failures[func].append(first[0][:160] if first else "")
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
            calls = fourbit_calls(case)
            if calls is not None:
                counts["counted"] += 1
                if calls == 0:
                    idle[case.get("name", "").split("[")[0]] += 1
    total = counts["passed"] + counts["failed"] + counts["skipped"]
    print(f"\n{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped, of {total}")
    if counts["counted"]:
        print(f"calls into fourbit counted in {counts['counted']} passed tests; "
              f"{sum(idle.values())} of them made none")
        for func, n in sorted(idle.items()):
            print(f"  {func}: {n} passed without calling fourbit")
    if record is not None:
        record.update(passed=counts["passed"], failed=counts["failed"], skipped=counts["skipped"],
                      counted=counts["counted"], passed_without_fourbit=sum(idle.values()),
                      failures={func: len(m) for func, m in sorted(failures.items())})
    for func, messages in sorted(failures.items()):
        print(f"  {func}: {len(messages)} failed")
        for message, n in collections.Counter(messages).most_common(3):
            print(f"      {n} x {message}")
    return 0 if counts["failed"] == 0 else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", required=True, help="local bitsandbytes clone or bare mirror")
    parser.add_argument("--ref", default="0.50.1", help="tag or commit (default 0.50.1, same sources as 0.50.2)")
    parser.add_argument("--against", choices=("fourbit", "installed", "bitsandbytes"), default="fourbit")
    parser.add_argument("--optim", action="store_true", help="installed: fourbit's Adam/AdamW in bitsandbytes.optim")
    parser.add_argument("--avx512bf16", action="store_true", help="installed: simulate has_avx512bf16() == True")
    parser.add_argument("--file", default="tests/test_linear4bit.py")
    parser.add_argument("--with-compile", action="store_true", help="keep test_linear4bit_torch_compile")
    parser.add_argument("-k", default=None, help="extra pytest -k expression")
    parser.add_argument("--from-junit", default=None, help="summarize (and --record) this junit report instead of running")
    parser.add_argument("--record", default=None, help="add this run's counts to a JSON list (benchmarks/results/cpu/bnb_tests.json)")
    parser.add_argument("tests", nargs="*", help="node ids to run instead of --file, e.g. 'tests/test_linear4bit.py::test_x[...]'")
    args = parser.parse_args(argv)
    if args.from_junit:
        record = None if args.record is None else describe(args)
        rc = summarize(pathlib.Path(args.from_junit), record)
        if record is not None:
            save_record(pathlib.Path(args.record), record)
        return rc

    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(tmp)
        export_tests(args.repo, args.ref, work)
        env = dict(os.environ)
        paths = [str(ROOT)] + {"fourbit": [str(SHIM)], "installed": [str(SHIM / "plugin")]}.get(args.against, [])
        env["PYTHONPATH"] = os.pathsep.join(paths[::-1] + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env["FOURBIT_BNB_OPTIM"] = "1" if args.optim else "0"
        env["FOURBIT_BNB_AVX512BF16"] = "1" if args.avx512bf16 else "0"
        if args.against != "installed" and (args.optim or args.avx512bf16):
            raise SystemExit("--optim and --avx512bf16 need --against installed")
        env.setdefault("TRITON_INTERPRET", "0" if _has_cuda() else "1")
        selection = [] if args.with_compile else ["not test_linear4bit_torch_compile or activation_checkpointing"]
        if args.k:
            selection.append(args.k)
        plugin = ["-p", "fourbit_installed"] if args.against == "installed" else []
        cmd = [sys.executable, "-m", "pytest", *(args.tests or [args.file]), "-q", "-p", "no:cacheprovider", *plugin, "-o", "addopts=",
               "-o", "log_cli=false", f"--junitxml={work / 'junit.xml'}", "--rootdir", str(work)]
        if selection:
            cmd += ["-k", " and ".join(f"({s})" for s in selection)]
        print(" ".join(cmd), flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=work, env=env, check=False)
        record = None if args.record is None else describe(args)
        rc = summarize(work / "junit.xml", record)
        if record is not None:
            record["wall_s"] = round(time.perf_counter() - t0, 1)
            save_record(pathlib.Path(args.record), record)
        return rc


def describe(args) -> dict:
    """What ran, against what, with which versions (the key of a record)."""
    import importlib.metadata
    import platform

    import torch

    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"file": args.file if not args.tests else " ".join(args.tests), "k": args.k, "ref": args.ref,
            "against": args.against, "optim": args.optim, "avx512bf16": args.avx512bf16,
            "bitsandbytes": importlib.metadata.version("bitsandbytes"),  # (this script's folder holds the shim package) "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "git_sha": sha, "date": time.strftime("%Y-%m-%d")}


def save_record(path: pathlib.Path, record: dict) -> None:
    """Replace the record with the same selection and mode, keep the others (written atomically)."""
    import json

    key = ("file", "k", "against", "optim", "avx512bf16")
    rows = json.loads(path.read_text()) if path.exists() else []
    rows = [r for r in rows if any(r.get(k) != record[k] for k in key)] + [record]
    rows.sort(key=lambda r: (r["file"], r["against"], r["optim"], r["avx512bf16"]))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=1) + "\n")
    tmp.replace(path)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
