"""Package plumbing: the README's commands, the demo main job (backend dispatch: test_dispatch.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)


def test_readme_has_two_commands_and_ci_runs_the_test_one():
    commands = _readme_commands()
    assert len(commands) == 2, commands
    ci = (ROOT / ".ci" / "run").read_text()
    install, _, test_cmd = commands[1].rpartition(" && ")
    for step in install.split(" && "):
        pip_args = step.removeprefix("pip install ")
        assert f"python3 -m pip install {pip_args}" in ci, step
    assert test_cmd.replace("python ", "python3 ") in ci
    assert "-eq 5" in ci  # pytest's "no tests collected" fails CI


@pytest.mark.slow
def test_demo_quantizes_a_real_weight_like_bitsandbytes():
    pytest.importorskip("gguf")
    from fourbit.demo import run_demo

    report = run_demo()
    assert report["shape"] == [1536, 576]
    assert 4.0 < report["bits_per_param"] < 4.2
    assert report["relative_error"] < 0.12
    if "identical_to_bitsandbytes" in report and report["identical_to_bitsandbytes"] != "bitsandbytes not installed":
        assert report["identical_to_bitsandbytes"] is True
