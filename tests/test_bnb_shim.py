"""The reviewer-run of bitsandbytes' own tests against fourbit (tests/bnb_shim/run_bnb_tests.py)
cannot run here (it needs a bitsandbytes clone); these keep its two parts from rotting: the shim
package maps `bitsandbytes` onto fourbit's objects, and the runner counts a junit report right."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

SHIM = Path(__file__).resolve().parent / "bnb_shim"
ROOT = SHIM.parents[1]


def test_shim_package_maps_bitsandbytes_onto_fourbit():
    code = (
        "import bitsandbytes as bnb, bitsandbytes.functional as F, bitsandbytes.nn as bnn, fourbit\n"
        "from bitsandbytes.cextension import HIP_ENVIRONMENT\n"
        "import fourbit.nn, fourbit.functional, fourbit.optim\n"
        "assert bnn.Linear4bit is fourbit.nn.Linear4bit and bnb.nn.Params4bit is fourbit.nn.Params4bit\n"
        "assert F.QuantState is fourbit.functional.QuantState and F.gemv_4bit is fourbit.functional.gemv_4bit\n"
        "assert bnb.optim.PagedAdamW8bit is fourbit.optim.PagedAdamW8bit and HIP_ENVIRONMENT is False\n"
        "assert bnb.matmul_4bit is fourbit.functional.matmul_4bit\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SHIM), str(ROOT)])}
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert child.returncode == 0 and child.stdout.strip() == "ok", child.stderr[-2000:]


def test_runner_counts_a_junit_report(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("run_bnb_tests", SHIM / "run_bnb_tests.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    (tmp_path / "junit.xml").write_text(
        "<testsuites><testsuite>"
        '<testcase name="test_a[x]"/><testcase name="test_a[y]"><failure message="AssertionError: boom"/></testcase>'
        '<testcase name="test_b"><skipped/></testcase><testcase name="test_c[1]"><error message="ValueError: bad"/></testcase>'
        "</testsuite></testsuites>"
    )
    assert runner.summarize(tmp_path / "junit.xml") == 1
    out = capsys.readouterr().out
    assert "1 passed, 2 failed, 1 skipped, of 4" in out
    assert "test_a: 1 failed" in out and "1 x AssertionError: boom" in out and "test_c: 1 failed" in out
