"""Safetensors files that hold quantized tensors under bitsandbytes/transformers keys.

A quantized entry `name -> (packed, QuantState)` is stored as
    name                                   packed codes (uint8 or the quant_storage dtype)
    name.absmax, name.quant_map, name.nested_absmax, name.nested_quant_map
    name.quant_state.bitsandbytes__nf4     JSON blob (see QuantState.to_dict)
exactly as `bnb.nn.Linear4bit.state_dict()` and transformers' 4-bit checkpoints lay them out.
Plain tensors are stored as they are.

Every file fourbit writes goes through `atomic_write`: a temporary file in the same directory,
fsync'd, given the permissions the umask allows (mkstemp's 0600 would make an adapter unreadable
to a colleague), renamed into place, and the directory fsync'd so the rename survives a power loss.
A failed write (full disk, read-only directory) leaves the old file and raises `OutputError`, which
says "disk full" rather than the serializer's own words. Safetensors headers are written with the
`__metadata__` keys sorted (the Rust serializer keeps them in a hash map, so two identical runs
otherwise write different bytes).
"""

from __future__ import annotations

import json
import os
import re
import struct
import tempfile
from typing import Mapping, Union

import safetensors
import safetensors.torch
import torch

from ..errors import BadFile, InvalidInput, MissingFile, output_error
from .state import _BLOB_KEY, QuantState

__all__ = [
    "save_file", "load_file", "read_safetensors", "check_quantized_files", "atomic_write", "write_bytes", "safetensors_bytes", "save_safetensors_file",
    "fsync_dir", "split_quantized",
]

Entry = Union[torch.Tensor, tuple[torch.Tensor, QuantState]]


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it; set straight back
    os.umask(mask)
    return mask


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make renames and creations inside `directory` durable."""
    fd = os.open(os.fspath(directory), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call write(tmp_path), then rename tmp_path onto path; on any error the old file stays.
    An OSError (disk full, read-only, a file where a directory should be) becomes OutputError."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=directory)
        os.close(fd)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        fsync_dir(directory)
    except OSError as err:
        raise output_error(path, err) from err
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Atomically write `data` to `path` (Python's own write, so a full disk is an OSError)."""

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def save_safetensors_file(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors.torch.save_file for files too large to hold twice in memory (a whole model):
    written straight to `path` (callers write into a temporary directory), its I/O errors raised
    as OutputError. With at most one metadata key the bytes equal `safetensors_bytes`'. The Rust
    writer creates the file 0600 whatever the umask; it gets the umask's permissions here."""
    try:
        safetensors.torch.save_file(dict(tensors), os.fspath(path), metadata=metadata)
        os.chmod(path, 0o666 & ~_umask())
    except OSError as err:
        raise output_error(path, err) from err
    except safetensors.SafetensorError as err:  # "I/O error: No space left on device (os error 28)"
        found = re.search(r"os error (\d+)", str(err))
        if found is None:
            raise
        code = int(found.group(1))
        raise output_error(path, OSError(code, os.strerror(code))) from err


def safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file as bytes, `__metadata__` sorted by key, so equal inputs give equal bytes.

    Layout: u64 little-endian header length N, N bytes of JSON (space-padded to a multiple of 8),
    then the tensor data, which the header addresses relative to its own end."""
    raw = safetensors.torch.save(dict(tensors), metadata=metadata)
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + raw[8 + n :]


def save_file(path: str | os.PathLike, tensors: Mapping[str, Entry], metadata: dict[str, str] | None = None) -> None:
    """Write plain tensors and (packed, QuantState) pairs to one safetensors file, atomically.
    A name that two entries would both write (a plain "w.absmax" next to a 4-bit "w") is refused."""
    flat: dict[str, torch.Tensor] = {}
    owner: dict[str, str] = {}  # flat key -> the entry that wrote it
    for name, entry in tensors.items():
        if isinstance(entry, tuple):
            packed, state = entry
            if not isinstance(state, QuantState):
                raise TypeError(f"{name}: expected (packed, QuantState), got a {type(state).__name__}")
            parts = {name: packed, **state.to_dict(prefix=name + ".")}
        else:
            parts = {name: entry}
        for key, value in parts.items():
            if key in owner:
                raise InvalidInput(
                    f"two entries would be stored under the key {key!r} (from {owner[key]!r} and {name!r})",
                    "rename one of them: a 4-bit entry 'w' also writes 'w.absmax', 'w.quant_map', ...",
                )
            owner[key] = name
            flat[key] = value
    flat = {k: v.detach().contiguous().cpu() for k, v in flat.items()}
    write_bytes(path, safetensors_bytes(flat, metadata))


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
    return split_quantized(read_safetensors(path, device))


def read_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """safetensors.torch.load_file with errors that name the file: MissingFile, or BadFile for a
    directory, an empty, truncated or corrupt file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise BadFile(f"{path} is a directory, not a safetensors file", "give the path of the .safetensors file inside it")
    if not os.path.exists(path):
        raise MissingFile(f"{path} does not exist")
    try:
        return safetensors.torch.load_file(path, device=str(device))
    except safetensors.SafetensorError as err:  # truncated header or data, not JSON, empty file
        raise BadFile(f"{path} is not a readable safetensors file ({err})") from None


_ITEM_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
               "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}


def check_quantized_files(paths: list[str]) -> int:
    """Check every 4-bit entry of a checkpoint's safetensors files (one or the shards of one) before a
    loader trusts them: its QuantState (tensors, dtypes, shapes, the JSON blob) and the size of its
    packed tensor. Reads only the small state tensors, not the packed weights. BadFile names the file
    and the tensor (a truncated file, a halved absmax, an f16 where uint8 belongs); returns the count."""
    where: dict[str, str] = {}  # key -> file
    for path in paths:
        try:
            with safetensors.safe_open(path, framework="pt") as f:
                where.update(dict.fromkeys(f.keys(), path))
        except safetensors.SafetensorError as err:
            raise BadFile(f"{path} is not a readable safetensors file ({err})") from None
        except OSError as err:
            raise BadFile(f"{path} cannot be read ({err.strerror or err})") from None

    def get(key: str):
        with safetensors.safe_open(where[key], framework="pt") as f:
            return f.get_tensor(key)

    names = [k[: k.index("." + _BLOB_KEY)] for k in where if "." + _BLOB_KEY in k]
    for name in names:
        sub = [k for k in where if k.startswith(name + ".") and k[len(name) + 1 :].count(".") <= 1]
        path = where[sub[0]]
        try:
            if name not in where:
                raise KeyError(f"{name}: the quant state is there but the packed tensor is missing")
            state = QuantState.from_dict({k: get(k) for k in sub})
            with safetensors.safe_open(where[name], framework="pt") as f:
                packed = f.get_slice(name)
                count = 1
                for s in packed.get_shape():
                    count *= s
                nbytes = count * _ITEM_BYTES.get(packed.get_dtype(), 0)
            if nbytes != (state.numel + 1) // 2:
                raise ValueError(f"{name}: the packed tensor holds {nbytes} bytes, shape {tuple(state.shape)} needs {(state.numel + 1) // 2}")
        except BadFile as err:
            raise BadFile(f"{path}: {err.what}", err.fix) from None
        except (KeyError, ValueError, TypeError) as err:
            message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            raise BadFile(f"{path}: {message}", "the file is damaged or was not written as a 4-bit checkpoint: re-export the model") from None
    return len(names)
