"""A real `fourbit` command in its own process that pauses where a test asks, so the test can start
a second command on the same output while the first one is inside it (tests/test_rundir.py).

    python tests/hold_run.py DIR PAUSES -- finetune --output-dir R ...

PAUSES is a comma-separated list of points, each paused at its first occurrence:
    train        the run directory is validated and the model loaded; nothing written yet
    step         the first training step (an --overwrite run has set the old run aside)
    checkpoint   right after the first checkpoint was written
    load         `fourbit quantize` is loading the model (before anything is written)
At each point it creates DIR/ready-<point>, then waits until DIR/go-<point> exists. The command's
exit status is this process's.
"""

from __future__ import annotations

import os
import sys
import time


def _pause(folder: str, point: str) -> None:
    open(os.path.join(folder, f"ready-{point}"), "w").close()
    deadline = time.monotonic() + 600
    while not os.path.exists(os.path.join(folder, f"go-{point}")):
        if time.monotonic() > deadline:
            raise SystemExit(f"hold_run: nobody said go at {point}")
        time.sleep(0.02)


def _hook(owner, name: str, folder: str, point: str, *, after: bool = False) -> None:
    original, done = getattr(owner, name), []

    def wrapper(*args, **kwargs):
        if not after and not done:
            done.append(1)
            _pause(folder, point)
        result = original(*args, **kwargs)
        if after and not done:
            done.append(1)
            _pause(folder, point)
        return result

    setattr(owner, name, wrapper)


def main() -> int:
    folder, points = sys.argv[1], sys.argv[2].split(",")
    argv = sys.argv[sys.argv.index("--") + 1 :]
    from fourbit.cli import main as cli
    from fourbit.train import models
    from fourbit.train.loop import Trainer

    where = {"train": (Trainer, "train", False), "step": (Trainer, "train_step", False),
             "checkpoint": (Trainer, "save_checkpoint", True), "load": (models, "load_quantized", False)}
    for point in points:
        owner, name, after = where[point]
        _hook(owner, name, folder, point, after=after)
    return cli(argv)


if __name__ == "__main__":
    sys.exit(main())
