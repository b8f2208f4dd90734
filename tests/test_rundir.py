"""One fourbit process per output (issue 24, cases 1-6): concurrent runs, resumes, overwrites and
quantizes of one directory are refused in one line naming the holder and change nothing; a lock a
killed process left is taken over; --overwrite and --resume act only on runs fourbit marked.

The holders are real processes (tests/hold_run.py: the CLI, paused at a chosen point); the second
command runs in this process, which is a second lock holder to the kernel like any other process
(flock locks belong to the open file, not the process)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from fourbit.train import rundir

from helpers import FINISHED_ARGS, finished_run, run_cli, tiny_llama_dir, tree_hashes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_llama_dir(str(tmp_path_factory.getbasetemp() / "shared"))


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    return finished_run(tiny, str(tmp_path_factory.getbasetemp() / "shared"))


class Holder:
    """A fourbit command in its own process, paused at the points given (see tests/hold_run.py)."""

    def __init__(self, folder, pauses: str, argv: list[str]):
        self.folder = str(folder)
        os.makedirs(self.folder, exist_ok=True)
        script = os.path.join(ROOT, "tests", "hold_run.py")
        self.proc = subprocess.Popen([sys.executable, script, self.folder, pauses, "--", *argv],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)

    def wait_at(self, point: str) -> None:
        deadline = time.monotonic() + 300
        while not os.path.exists(os.path.join(self.folder, f"ready-{point}")):
            if self.proc.poll() is not None:
                raise AssertionError(f"the holder ended before {point}: {self.proc.communicate()}")
            assert time.monotonic() < deadline, f"the holder never reached {point}"
            time.sleep(0.05)

    def go(self, point: str) -> None:
        open(os.path.join(self.folder, f"go-{point}"), "w").close()

    def finish(self) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=300)
        return self.proc.returncode, out, err


def _first_of_two(tmp_path, pauses: str, argv: list[str], what: str) -> Holder:
    """Start two holders with the same command at the same instant; one must get the output and
    pause at its first point, the other be refused in one line naming the first. Returns the first."""
    pair = [Holder(tmp_path / f"hold{i}", pauses, argv) for i in range(2)]
    first = pauses.split(",")[0]
    reached = lambda h: os.path.exists(os.path.join(h.folder, f"ready-{first}"))  # noqa: E731
    deadline = time.monotonic() + 300
    while not all(reached(h) or h.proc.poll() is not None for h in pair):
        assert time.monotonic() < deadline, "neither holder got anywhere"
        time.sleep(0.05)
    winners = [h for h in pair if reached(h)]
    assert len(winners) == 1, "both commands got the same output"
    winner, loser = winners[0], next(h for h in pair if h is not winners[0])
    rc, out, err = loser.finish()
    assert rc == 2 and err.count("\n") == 1 and err.startswith(f"fourbit {argv[0]}: error: "), err
    assert f"{what} is in use by pid {winner.proc.pid} on host " in err and "Traceback" not in err, err
    return winner


def _refused_by(err: str, holder: Holder, path: str) -> bool:
    return f"the run directory {path!r} is in use by pid {holder.proc.pid} on host " in err and "fourbit finetune" in err


RUN = ["--batch-size", "2", "--eval-examples", "4", "--targets", "q_proj", "v_proj", "--quiet"]


# ---- 1 and 3: a second --overwrite, or a plain run, while an --overwrite run is in progress ---------------
def test_overwrite_in_progress_refuses_a_second_overwrite_and_a_plain_run(tiny, finished, tmp_path, capsys):
    run = str(tmp_path / "run")
    shutil.copytree(finished, run)
    old = tree_hashes(run)
    diverge = ["finetune", "--model", tiny, "--output-dir", run, *RUN, "--steps", "2", "--overwrite", "--lr", "1e30", "--warmup", "0"]
    holder = Holder(tmp_path / "hold", "step", diverge)
    holder.wait_at("step")  # the old run is in .replaced/ now
    during = tree_hashes(run)

    rc, err = run_cli(capsys, diverge)
    assert rc == 2 and _refused_by(err, holder, run), err
    rc, err = run_cli(capsys, ["finetune", "--model", tiny, "--output-dir", run, *RUN, "--steps", "2"])
    assert rc == 2 and _refused_by(err, holder, run), err
    assert tree_hashes(run) == during  # the refused commands changed nothing
    assert {f"{rundir.REPLACED}/{k}" for k in old if k != rundir.MARKER} <= set(during)  # the old run was aside

    holder.go("step")
    rc, out, err = holder.finish()
    assert rc == 3 and "training diverged at step 1" in err and "is restored" in out, (out, err)
    assert tree_hashes(run) == old  # the old run, byte for byte; no lock file left


# ---- 2, 4 and a stale lock: two fresh runs into one new directory; --resume while one checkpoints -----------
def test_two_fresh_runs_then_a_resume_while_it_checkpoints_then_a_kill_leaves_a_lock_to_take_over(tiny, tmp_path, capsys):
    run = str(tmp_path / "new" / "run")
    argv = ["finetune", "--model", tiny, "--output-dir", run, *RUN, "--steps", "3", "--checkpoint-interval", "1"]
    holder = _first_of_two(tmp_path, "train,checkpoint", argv, f"the run directory {run!r}")  # locked, loaded, nothing written
    before = os.listdir(run)
    rc, err = run_cli(capsys, argv)
    assert rc == 2 and _refused_by(err, holder, run), err
    assert os.listdir(run) == before == [rundir.LOCK]

    holder.go("train")
    holder.wait_at("checkpoint")  # step 1 is checkpointed
    during = tree_hashes(run)
    rc, err = run_cli(capsys, [*argv, "--resume"])
    assert rc == 2 and _refused_by(err, holder, run), err
    assert tree_hashes(run) == during

    holder.proc.send_signal(signal.SIGKILL)  # a kill -9: the lock file stays, the kernel drops the lock
    holder.proc.communicate(timeout=60)
    assert os.path.exists(os.path.join(run, rundir.LOCK))
    rc, err = run_cli(capsys, [*argv, "--resume"])
    assert rc == 0, err
    assert f"took over the lock on the run directory {run!r}: its holder, pid {holder.proc.pid} on host " in err, err
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3] and [r["step"] for r in rows if "exact_match" in r] == [0, 3]
    assert not os.path.exists(os.path.join(run, rundir.LOCK))


# ---- 5: two quantizes into one output ---------------------------------------------------------------------------
def test_concurrent_quantize_into_one_output(tiny, tmp_path, capsys):
    """Two quantizes into one new output started together: one is refused, naming the other. A third,
    of another model, is refused while the winner loads; SIGTERM then stops the winner with nothing
    left behind (no output, temporary folder or lock), and the third, retried, writes its model."""
    out = str(tmp_path / "q4")
    holder = _first_of_two(tmp_path, "load", ["quantize", tiny, out], f"the output {out!r}")
    other = str(tmp_path / "other")
    shutil.copytree(tiny, other)
    rc, err = run_cli(capsys, ["quantize", other, out])
    assert rc == 2 and f"the output {out!r} is in use by pid {holder.proc.pid} on host " in err, err

    holder.proc.send_signal(signal.SIGTERM)
    rc, _, err = holder.finish()
    assert rc == 143 and err.strip().endswith("fourbit quantize: interrupted"), err
    assert sorted(os.listdir(tmp_path)) == ["hold0", "hold1", "other"]
    rc, err = run_cli(capsys, ["quantize", other, out])
    assert rc == 0, err
    assert json.load(open(os.path.join(out, "fourbit-quantize.json")))["source"] == os.path.abspath(other)
    assert sorted(os.listdir(tmp_path)) == ["hold0", "hold1", "other", "q4"]


# ---- 6: --overwrite and --resume only act on runs fourbit marked ------------------------------------------------
def _foreign(folder) -> str:
    """A directory someone else owns whose names collide with a run's."""
    os.makedirs(os.path.join(folder, "checkpoint"))
    os.makedirs(os.path.join(folder, "adapter"))
    for name in ("checkpoint/model.bin", "adapter/weights.bin", "metrics.jsonl", "summary.json", "notes.txt"):
        with open(os.path.join(folder, name), "w") as f:
            f.write(f"someone else's {name}\n")
    return str(folder)


@pytest.mark.parametrize("flag", ["--overwrite", "--resume", None])
def test_a_directory_fourbit_did_not_write_is_never_replaced(flag, tiny, tmp_path, capsys):
    target = _foreign(tmp_path / "theirs")
    link = str(tmp_path / "link")
    os.symlink(target, link)
    before = tree_hashes(tmp_path)
    for out in (target, link):
        argv = ["finetune", "--model", tiny, "--output-dir", out, *RUN, "--steps", "1", "--lr", "1e30", "--warmup", "0"]
        rc, err = run_cli(capsys, argv + ([flag] if flag else []))
        assert rc == 2 and "no fourbit-run.json" in err, err
    assert tree_hashes(tmp_path) == before and os.path.islink(link)


def test_quantize_overwrite_replaces_only_its_own_output(tiny, tmp_path, capsys):
    target = _foreign(tmp_path / "theirs")
    before = tree_hashes(tmp_path)
    rc, err = run_cli(capsys, ["quantize", tiny, target, "--overwrite"])
    assert rc == 2 and "fourbit-quantize.json" in err, err
    assert tree_hashes(tmp_path) == before
