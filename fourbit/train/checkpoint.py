"""Checkpoints: one format for one process, DDP and FSDP2, resumed bit for bit.

    <run>/checkpoint/
        adapter/adapter_model.safetensors,   the LoRA weights, PEFT format, full tensors
        adapter/adapter_config.json
        optimizer.pt                         optimizer.state_dict() keyed by parameter name, full tensors
        rng.pt                               every rank's torch CPU (+ CUDA) and Python RNG states
        trainer_state.json                   step, mode and world size it was written with, and the
                                             caller's extras (the loop: config, metrics, source)

    checkpoint.save(directory, model, optimizer, step=k, extra={...})   # every rank calls it
    state = checkpoint.load(directory, model, optimizer)                # every rank calls it

Why these are enough: the frozen base is re-derived from the model source (quantization is
deterministic), the batch at a step is a pure function of (seed, step) (see `data.batch_at`), the
learning rate is a pure function of the step (see `loop.lr_at`), and the RNG states cover dropout.

One format in every mode. Names, not positions, key the optimizer state, and every tensor is whole
(FSDP's shards are gathered one tensor at a time, LoRA only; the frozen base weights are never
gathered), so a checkpoint written by one process resumes under DDP or FSDP with any number of
ranks and back. RNG states are saved per rank; a run with the same world size restores each rank's
own, a different world size gives every rank rank 0's (which is what a fresh run does: the loop
seeds every rank alike).

Atomicity: the collective part (gathering) runs on every rank; rank 0 alone then writes every
file into `<parent>/.<name>-new` and swaps it in with renames (old -> .<name>-old, new -> <name>,
delete old), all in `_write_atomically`. If any write fails -- a full disk, Ctrl-C -- the previous
checkpoint is untouched; `load` also recovers the one window where `<name>` is briefly absent (the
old copy is still at .<name>-old). Every file is written through `atomic_write` (fsync'd, umask
permissions, OutputError "disk full" on failure) and both directories are fsync'd around the swap, so
a power loss cannot leave a torn file behind a completed rename. `load` reads every file before it
changes anything, and a truncated or damaged one raises BadFile naming it.
"""

from __future__ import annotations

import os
import random
import shutil
from typing import Any, Callable

import torch
from torch import nn

from ..errors import MissingFile, output_error
from ..lora import load_adapter, save_adapter
from ..nf4.files import fsync_dir
from . import distributed
from .parallel import full_lora_weights, unwrap
from .rundir import read_json, read_torch, write_json, write_torch

__all__ = ["CHECKPOINT", "exists", "save", "load", "optimizer_state", "load_optimizer_state"]

CHECKPOINT = "checkpoint"  # its name inside a run directory
_FILES = ("adapter", "optimizer.pt", "rng.pt", "trainer_state.json")


def _aside(directory: str, what: str) -> str:
    """The sibling `.<name>-new` / `.<name>-old` of a checkpoint directory."""
    parent, name = os.path.split(os.path.normpath(directory))
    return os.path.join(parent, f".{name}-{what}")


def exists(directory: str) -> bool:
    return any(os.path.isdir(d) for d in (directory, _aside(directory, "old")))


# ---- optimizer state by parameter name ----------------------------------------------------------
def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in unwrap(model).named_parameters()}


def _ordered_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Parameters in the order `state_dict()` numbers them (group by group)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """`optimizer.state_dict()` with full tensors on the CPU, keyed by parameter name (collective).

        {"state": {name: {key: tensor|number|nested dict}}, "param_groups": [{hyper-parameters, "params": [names]}],
         ...any other top-level entries of the optimizer's own state_dict (format tags)}

    Names are those of the unwrapped model, so the dict loads into DDP, FSDP or a single process
    alike, whatever the world size. Going through `state_dict()` keeps each optimizer's own saved
    form (a paged optimizer gathers its pages there). Sharded (DTensor) state is gathered; a plain
    tensor state of a sharded parameter is a per-shard layout (e.g. flat or blockwise 8-bit
    moments of the local chunk) that cannot be reassembled here, and raises.
    """
    from torch.distributed.tensor import DTensor

    names = _param_names(model)
    order = [names[id(p)] for p in _ordered_params(optimizer)]
    sharded = {names[id(p)] for p in _ordered_params(optimizer) if isinstance(p, DTensor)}
    saved = optimizer.state_dict()

    def gathered(name: str, entries: dict) -> dict:
        full = {}
        for key, value in entries.items():
            if isinstance(value, dict):  # bitsandbytes' layout nests the state tensors one level down
                full[key] = gathered(name, value)
                continue
            if isinstance(value, DTensor):
                value = value.full_tensor()
            elif name in sharded and isinstance(value, torch.Tensor) and value.dim() > 0:
                raise ValueError(
                    f"optimizer state {key!r} of {name} is a plain per-shard tensor of shape {tuple(value.shape)}; "
                    f"{type(optimizer).__name__} keeps a layout that cannot be gathered from FSDP shards "
                    "(torch.optim.AdamW's states can)"
                )
            full[key] = value.detach().cpu().clone() if isinstance(value, torch.Tensor) else value
        return full

    state = {order[index]: gathered(order[index], entries) for index, entries in saved["state"].items()}
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]]
    rest = {k: v for k, v in saved.items() if k not in ("state", "param_groups")}
    return {**rest, "state": state, "param_groups": groups}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, full: dict) -> None:
    """Load a dict from `optimizer_state` (written in any mode, any world size) into `optimizer`.

    Every rank passes the full dict; with FSDP each keeps its own chunk of every state tensor that
    has its parameter's shape. The optimizer's parameter groups must name the same parameters in
    the same order (they do when both runs build them from the same model the same way).
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    names = _param_names(model)
    params = _ordered_params(optimizer)
    mine = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    theirs = [g["params"] for g in full["param_groups"]]
    if mine != theirs:
        raise ValueError(f"optimizer state is for parameter groups {theirs}, this optimizer has {mine}")
    index = {names[id(p)]: i for i, p in enumerate(params)}

    def local(p: torch.Tensor, entries: dict) -> dict:
        out = {}
        for key, value in entries.items():
            if isinstance(value, dict):  # bitsandbytes' nested layout
                value = local(p, value)
            elif isinstance(p, DTensor) and isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(p.shape):
                value = distribute_tensor(value.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
            out[key] = value
        return out

    state = {index[name]: local(params[index[name]], entries) for name, entries in full["state"].items()}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in full["param_groups"]]
    rest = {k: v for k, v in full.items() if k not in ("state", "param_groups")}
    optimizer.load_state_dict({**rest, "state": state, "param_groups": groups})


# ---- RNG states ---------------------------------------------------------------------------------
def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _all_rng_states() -> list[dict]:
    """Every rank's RNG states, in rank order (collective; rank 0's list is the one written)."""
    mine = _rng_state()
    if distributed.world_size() == 1:
        return [mine]
    everyone: list = [None] * distributed.world_size()
    torch.distributed.all_gather_object(everyone, mine)
    return everyone


# ---- save and load ------------------------------------------------------------------------------
def _write_atomically(directory: str, writers: dict[str, Callable[[str], None]]) -> None:
    """Create `directory` holding one entry per writer (writer(path) creates that file or folder),
    all or nothing: everything goes into .<name>-new first, then two renames swap it in."""
    new, old = _aside(directory, "new"), _aside(directory, "old")
    shutil.rmtree(new, ignore_errors=True)
    try:
        os.makedirs(new)
        for name, write in writers.items():
            write(os.path.join(new, name))  # each one fsync'd (atomic_write)
        fsync_dir(new)
        if os.path.isdir(directory):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
        os.replace(new, directory)
        fsync_dir(os.path.dirname(os.path.abspath(directory)))
    except OSError as err:
        raise output_error(new, err) from err
    finally:
        shutil.rmtree(new, ignore_errors=True)  # gone already after a successful swap
    shutil.rmtree(old, ignore_errors=True)


def _mode_of(model: nn.Module) -> str:
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, nn.parallel.DistributedDataParallel):
        return "ddp"
    return "fsdp" if isinstance(model, FSDPModule) else "none"


def save(directory, model: nn.Module, optimizer: torch.optim.Optimizer, *, step: int,
         extra: dict[str, Any] | None = None) -> str:
    """Write the checkpoint for `step` into `directory` (see the module docstring); returns it.
    Collective: every rank calls it, rank 0 writes."""
    directory = os.fspath(directory)
    opt = optimizer_state(model, optimizer)
    rng = {"world_size": distributed.world_size(), "ranks": _all_rng_states()}
    trainer = {**(extra or {}), "step": int(step), "mode": _mode_of(model), "world_size": distributed.world_size()}
    with full_lora_weights(model) as plain:
        if distributed.is_main():
            _write_atomically(directory, {
                "adapter": lambda path: save_adapter(plain, path, base_model_name_or_path=trainer.get("source")),
                "optimizer.pt": lambda path: write_torch(path, opt),
                "rng.pt": lambda path: write_torch(path, rng),
                "trainer_state.json": lambda path: write_json(path, trainer),
            })  # fmt: skip
    distributed.barrier()
    return directory


def load(directory, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore adapter, optimizer and RNG states from `directory` (written in any mode and world
    size) into a wrapped or plain model and its optimizer; returns trainer_state.json's contents.
    Collective: every rank calls it and reads the files."""
    directory = os.fspath(directory)
    old = _aside(directory, "old")
    if distributed.is_main() and not os.path.isdir(directory) and os.path.isdir(old):
        os.replace(old, directory)  # a swap was interrupted after moving the old copy aside
    distributed.barrier()
    missing = [name for name in _FILES if not os.path.exists(os.path.join(directory, name))]
    if missing:
        raise MissingFile(
            f"{directory} is not a checkpoint: {', '.join(missing)} missing (expected {', '.join(_FILES)})",
            "start again with --overwrite",
        )
    state = read_json(os.path.join(directory, "trainer_state.json"))  # every file read before anything changes
    opt = read_torch(os.path.join(directory, "optimizer.pt"))  # weights_only: never runs code from a file
    rng = read_torch(os.path.join(directory, "rng.pt"))  # Python's RNG state is a tuple of ints: plain data
    with full_lora_weights(model, write_back=True) as plain:
        load_adapter(plain, os.path.join(directory, "adapter"))
    load_optimizer_state(model, optimizer, opt)
    same_world = rng["world_size"] == distributed.world_size()
    _set_rng_state(rng["ranks"][distributed.rank() if same_world else 0])
    return state
