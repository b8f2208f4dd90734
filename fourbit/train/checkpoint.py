"""Checkpoints that a resumed run continues from bit for bit.

    <run>/checkpoint/
        adapter_model.safetensors, adapter_config.json   the LoRA weights, PEFT format
        optimizer.pt                                     optimizer.state_dict()
        trainer_state.json                               step, config, metrics so far
        rng.pt                                           torch CPU (+ CUDA) and Python RNG states

Why these are enough: the frozen base is re-derived from the model source (quantization is
deterministic), the batch at a step is a pure function of (seed, step) (see `data.batch_at`), the
learning rate is a pure function of the step (see `loop.lr_at`), and the RNG states cover dropout.

Atomicity: a checkpoint is written into `<run>/.checkpoint-new`, then swapped in with renames
(old -> .checkpoint-old, new -> checkpoint, delete old). If any write fails -- a full disk, Ctrl-C --
the previous `checkpoint/` is untouched; `load` also recovers the one window where `checkpoint` is
briefly absent (the old copy is still at .checkpoint-old). Every file is fsync'd before the swap and
the run directory after it, so a power loss cannot leave a torn file behind a completed rename.
Reading a truncated or damaged file raises BadFile naming it.
"""

from __future__ import annotations

import os
import random
import shutil

import torch

from ..errors import MissingFile, output_error
from ..nf4.files import fsync_dir
from .rundir import read_json, read_torch, write_json, write_torch

__all__ = ["save", "load", "exists", "CHECKPOINT"]

CHECKPOINT = "checkpoint"
_NEW, _OLD = ".checkpoint-new", ".checkpoint-old"


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def exists(run_dir: str) -> bool:
    return any(os.path.isdir(os.path.join(run_dir, d)) for d in (CHECKPOINT, _OLD))


def save(run_dir: str, *, model, optimizer, step: int, config: dict, metrics: list[dict], source: str) -> str:
    """Write the checkpoint for `step`; returns its directory."""
    from ..lora import save_adapter

    new, old, final = (os.path.join(run_dir, d) for d in (_NEW, _OLD, CHECKPOINT))
    shutil.rmtree(new, ignore_errors=True)
    try:
        os.makedirs(new)
        save_adapter(model, new, base_model_name_or_path=source)  # each file written like the ones below
        write_torch(os.path.join(new, "optimizer.pt"), optimizer.state_dict())
        write_torch(os.path.join(new, "rng.pt"), _rng_state())
        write_json(os.path.join(new, "trainer_state.json"), {"step": step, "config": config, "metrics": metrics, "source": source})
        if os.path.isdir(final):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(new, final)
        fsync_dir(run_dir)
    except OSError as err:
        raise output_error(new, err) from err
    finally:
        shutil.rmtree(new, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load(run_dir: str, *, model, optimizer) -> dict:
    """Restore adapter, optimizer and RNG states into the given objects; returns trainer_state."""
    from ..lora import load_adapter

    path = os.path.join(run_dir, CHECKPOINT)
    if not os.path.isdir(path) and os.path.isdir(os.path.join(run_dir, _OLD)):
        os.replace(os.path.join(run_dir, _OLD), path)  # a swap was interrupted after moving the old copy aside
    if not os.path.isdir(path):
        raise MissingFile(f"{run_dir!r} has no checkpoint to resume from (expected {path})", "drop --resume")
    state = read_json(os.path.join(path, "trainer_state.json"))
    optimizer_state = read_torch(os.path.join(path, "optimizer.pt"))  # read everything before changing anything
    rng_state = read_torch(os.path.join(path, "rng.pt"))
    load_adapter(model, path)
    optimizer.load_state_dict(optimizer_state)
    _set_rng_state(rng_state)
    return state
