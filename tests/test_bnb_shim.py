"""The reviewer-run of bitsandbytes' own tests against fourbit (tests/bnb_shim/run_bnb_tests.py)
cannot run here (it needs a bitsandbytes clone); these keep its two parts from rotting: the shim
package maps `bitsandbytes` onto fourbit's objects, and the runner counts a junit report right."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def _runner():
    spec = importlib.util.spec_from_file_location("run_bnb_tests", SHIM / "run_bnb_tests.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    return runner


def test_installed_plugin_counts_calls_into_fourbit_per_test(monkeypatch):
    """`--against installed`: the plugin installs fourbit into the real bitsandbytes, puts fourbit's
    optimizers in bitsandbytes.optim, simulates AVX512-BF16, and gives each test its count of calls
    into fourbit as a junit property; unconfigure undoes all of it."""
    bnb = pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as F
    import torch

    import fourbit.optim
    from fourbit.integrations import bitsandbytes as fourbit_bnb

    spec = importlib.util.spec_from_file_location("fourbit_installed", SHIM / "plugin" / "fourbit_installed.py")
    plugin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plugin)
    monkeypatch.setenv("FOURBIT_BNB_OPTIM", "1")
    monkeypatch.setenv("FOURBIT_BNB_AVX512BF16", "1")
    real_adam, real_avx = bnb.optim.AdamW8bit, F.has_avx512bf16
    plugin.pytest_configure(None)
    try:
        assert fourbit_bnb.is_installed() and F.has_avx512bf16()
        assert bnb.optim.AdamW8bit is fourbit.optim.AdamW8bit and bnb.optim.GlobalOptimManager is fourbit.optim.GlobalOptimManager
        item = type("Item", (), {"user_properties": []})()
        for work in (lambda: F.quantize_4bit(torch.randn(64, 64), quant_type="nf4"), lambda: None):
            wrapper = plugin.pytest_runtest_protocol(item, None)
            next(wrapper)
            work()
            plugin.pytest_runtest_teardown(item, None)
    finally:
        plugin.pytest_unconfigure(None)
    assert item.user_properties == [("fourbit_calls", 1), ("fourbit_calls", 0)]
    assert not fourbit_bnb.is_installed() and bnb.optim.AdamW8bit is real_adam and F.has_avx512bf16 is real_avx


def test_runner_records_replace_the_same_selection(tmp_path):
    runner = _runner()
    base = {"file": "tests/test_ops.py", "k": None, "against": "installed", "optim": False, "avx512bf16": False}
    path = tmp_path / "bnb_tests.json"
    runner.save_record(path, {**base, "passed": 1})
    runner.save_record(path, {**base, "avx512bf16": True, "passed": 2})
    runner.save_record(path, {**base, "passed": 3})
    import json

    rows = json.loads(path.read_text())
    assert [(r["avx512bf16"], r["passed"]) for r in rows] == [(False, 3), (True, 2)]
