"""Test configuration. Before anything imports triton (bitsandbytes does, at import), pick the Triton
mode for this process: with no CUDA device the kernels run in Triton's CPU interpreter. Triton fixes
interpreted-or-compiled at its first import, so this has to happen here, not in a test module."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    deadline=None,
    max_examples=40,
    derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", deadline=None, max_examples=10)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# ---- GPU builds without a GPU -----------------------------------------------------------------------
# Compiling needs a Python whose triton was imported without the interpreter, so a child process
# (tests/kernel_builds.py) builds for sm_90a and writes what the cost-model and hazard tests read,
# once per session and Triton version. The GPU machine runs Triton 3.6 (its ptxas 12.8), CI's main
# environment 3.9: .ci/run installs 3.6 beside it (pip --no-deps --target .tri36) and sets
# FOURBIT_TRITON36, so there a missing 3.6 fails; elsewhere those tests skip with the command to run.
REPO = Path(__file__).resolve().parents[1]


def _kernel_builds(tmp_path_factory, name: str, first_on_path: list[str], args: list[str]) -> dict:
    out = tmp_path_factory.mktemp(name) / "builds.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([*first_on_path, str(REPO), env.get("PYTHONPATH", "")])
    child = subprocess.run([sys.executable, str(REPO / "tests" / "kernel_builds.py"), str(out), *args], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=1500)
    assert child.returncode == 0, child.stdout[-4000:] + child.stderr[-4000:]
    return json.loads(out.read_text())


def triton36_dir() -> Path:
    """The side folder holding Triton 3.6 (FOURBIT_TRITON36, else REPO/.tri36)."""
    named = os.environ.get("FOURBIT_TRITON36")
    path = Path(named) if named else REPO / ".tri36"
    meta = list(path.glob("triton-3.6.*.dist-info"))
    if not meta or not (path / "triton" / "__init__.py").exists():
        if named:
            pytest.fail(f"FOURBIT_TRITON36={named} holds no Triton 3.6 (.ci/run installs it there)")
        pytest.skip("no Triton 3.6 beside the main one: pip install --no-deps --target .tri36 triton==3.6.0")
    return path


@pytest.fixture(scope="session")
def compiled(tmp_path_factory):
    """The main Triton's builds: routed rows at M = 1, 16, 2048, 8192, hazards, broken builds."""
    return _kernel_builds(tmp_path_factory, "compiled", [], ["1", "16", "2048", "8192", "--mutations"])


@pytest.fixture(scope="session")
def compiled_triton36(tmp_path_factory):
    """The same under Triton 3.6, as the GPU machine compiles (no broken builds)."""
    return _kernel_builds(tmp_path_factory, "compiled36", [str(triton36_dir())], ["1", "16", "2048", "8192"])
