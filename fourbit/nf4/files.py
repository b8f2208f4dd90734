"""Safetensors files that hold quantized tensors under bitsandbytes/transformers keys.

A quantized entry `name -> (packed, QuantState)` is stored as
    name                                   packed codes (uint8 or the quant_storage dtype)
    name.absmax, name.quant_map, name.nested_absmax, name.nested_quant_map
    name.quant_state.bitsandbytes__nf4     JSON blob (see QuantState.to_dict)
exactly as `bnb.nn.Linear4bit.state_dict()` and transformers' 4-bit checkpoints lay them out.
Plain tensors are stored as they are. Writes go to a temporary file that is renamed into place.
"""

from __future__ import annotations

import os
import tempfile
from typing import Mapping, Union

import safetensors.torch
import torch

from .state import _BLOB_KEY, QuantState

__all__ = ["save_file", "load_file", "atomic_write", "split_quantized"]

Entry = Union[torch.Tensor, tuple[torch.Tensor, QuantState]]


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call write(tmp_path), then rename tmp_path onto path; on any error the old file stays."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_file(path: str | os.PathLike, tensors: Mapping[str, Entry], metadata: dict[str, str] | None = None) -> None:
    """Write plain tensors and (packed, QuantState) pairs to one safetensors file, atomically."""
    flat: dict[str, torch.Tensor] = {}
    for name, entry in tensors.items():
        if isinstance(entry, tuple):
            packed, state = entry
            if not isinstance(state, QuantState):
                raise TypeError(f"{name}: expected (packed, QuantState), got a {type(state).__name__}")
            flat[name] = packed
            flat.update(state.to_dict(prefix=name + "."))
        else:
            flat[name] = entry
    flat = {k: v.detach().contiguous().cpu() for k, v in flat.items()}
    atomic_write(path, lambda tmp: safetensors.torch.save_file(flat, tmp, metadata=metadata))


def split_quantized(flat: Mapping[str, torch.Tensor]) -> dict[str, Entry]:
    """Group a flat state dict back into plain tensors and (packed, QuantState) pairs."""
    names = [k[: k.index("." + _BLOB_KEY)] for k in flat if "." + _BLOB_KEY in k]
    out: dict[str, Entry] = {}
    claimed: set[str] = set()
    for name in names:
        if name not in flat:
            raise KeyError(f"quant state for {name!r} is present but the packed tensor {name!r} is missing")
        sub = {k: v for k, v in flat.items() if k.startswith(name + ".") and k[len(name) + 1 :].count(".") <= 1}
        state = QuantState.from_dict(sub)
        packed = flat[name]
        need = (state.numel + 1) // 2
        if packed.numel() * packed.element_size() != need:
            raise ValueError(
                f"{name}: packed tensor has {packed.numel() * packed.element_size()} bytes, shape "
                f"{tuple(state.shape)} needs {need}"
            )
        out[name] = (packed, state)
        claimed.add(name)
        claimed.update(sub)
    for k, v in flat.items():
        if k not in claimed:
            out[k] = v
    return out


def load_file(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, Entry]:
    """Read a file written by `save_file` (or by bitsandbytes/transformers); quantized entries
    come back as (packed, QuantState). A truncated or corrupt file raises ValueError."""
    try:
        flat = safetensors.torch.load_file(os.fspath(path), device=str(device))
    except FileNotFoundError:
        raise
    except Exception as err:  # safetensors raises its own error type for truncated headers/data
        raise ValueError(f"{os.fspath(path)}: not a readable safetensors file ({err})") from None
    return split_quantized(flat)
