"""What a model directory or GGUF file must hold, checked before transformers reads it, so a damaged
or foreign model ends in one line naming the file and the field or tensor (BadFile, MissingFile,
InvalidInput) instead of a traceback from deep inside transformers or its loading report.

    config = read_config(directory)        # config.json: JSON, an object
    files = weight_files(directory)        # the weights it names: one file, or the shards of an index
    check_weights(directory)               # every safetensors file readable; every 4-bit entry sound
    with loading(directory, files): ...    # what transformers raises while loading, in those words

No code runs from a model file: weights come from safetensors, or from pytorch_model.bin, which
transformers reads with torch.load(weights_only=True); a pickle that names an object is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import struct

from ..errors import BadFile, InvalidInput, MissingFile

__all__ = ["read_config", "weight_files", "check_weights", "loading", "gguf_errors"]

_SINGLE = ("model.safetensors", "pytorch_model.bin")
_INDEX = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_MODEL_FIX = "give a complete transformers model directory (config.json, weights, tokenizer files)"


def _json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadFile(f"{path} is not valid JSON ({err})", "restore the file from the model's source") from None
    except OSError as err:
        raise BadFile(f"{path} cannot be read ({err.strerror or err})", "check its permissions") from None


def read_config(directory: str) -> dict:
    """config.json of a model directory, checked to be a JSON object."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise InvalidInput(f"{directory!r} is a directory without config.json: not a transformers model directory", _MODEL_FIX)
    config = _json(path)
    if not isinstance(config, dict):
        raise BadFile(f"{path} holds a JSON {type(config).__name__}, not an object", "restore the file from the model's source")
    return config


def weight_files(directory: str) -> list[str]:
    """The weight files transformers will read: model.safetensors or pytorch_model.bin, or every
    shard an index names. MissingFile names what is absent."""
    for name in _INDEX:
        index = os.path.join(directory, name)
        if os.path.isfile(index):
            content = _json(index)
            weight_map = content.get("weight_map") if isinstance(content, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise BadFile(f"{index} has no weight_map of tensor names to file names", "restore the file from the model's source")
            shards = [os.path.join(directory, f) for f in sorted(set(weight_map.values()))]
            missing = [os.path.basename(s) for s in shards if not os.path.isfile(s)]
            if missing:
                raise MissingFile(f"{directory!r}: {name} names {missing[:3]}, which are not there", _MODEL_FIX)
            return shards
    found = [os.path.join(directory, name) for name in _SINGLE if os.path.isfile(os.path.join(directory, name))]
    if not found:
        raise MissingFile(f"{directory!r} holds config.json but no weights (model.safetensors or pytorch_model.bin)", _MODEL_FIX)
    return found[:1]  # transformers prefers the safetensors file


def check_weights(directory: str) -> list[str]:
    """weight_files, with every safetensors file opened and every 4-bit entry checked (see
    `fourbit.nf4.files.check_quantized_files`); returns the files."""
    from ..nf4.files import check_quantized_files

    files = weight_files(directory)
    check_quantized_files([f for f in files if f.endswith(".safetensors")])
    return files


@contextlib.contextmanager
def loading(source: str, files: list[str] = ()):
    """Turn what transformers raises for a bad model file into BadFile / InvalidInput naming it."""
    import safetensors

    pickles = [f for f in files if f.endswith(".bin")]
    try:
        yield
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        what = f"holds a Python object ({found.group(1)})" if found else f"is not a readable weights file ({_first(err)})"
        raise BadFile(
            f"{', '.join(pickles) or source} {what}; fourbit loads weights with weights_only=True and never runs code from a file",
            "use a safetensors copy of the model (model.safetensors) from a source you trust",
        ) from None
    except safetensors.SafetensorError as err:
        raise BadFile(f"{source}: a weights file is not a readable safetensors file ({err})") from None
    except ValueError as err:
        text = str(err)
        if "Unrecognized" in text or "does not recognize this architecture" in text or "not supported" in text:
            raise InvalidInput(f"{source}: transformers cannot load it as a causal language model ({_first(err)})",
                               "give a decoder-only model (Llama, Mistral, Qwen, SmolLM, ...)") from None
        raise


@contextlib.contextmanager
def gguf_errors(path: str):
    """A truncated or damaged GGUF file: the gguf reader raises struct.error, or ValueError/IndexError
    when the tensor data ends early."""
    try:
        yield
    except (struct.error, EOFError, IndexError, KeyError, ValueError) as err:
        raise BadFile(
            f"{path} cannot be read as a GGUF model ({_first(err)}); it is truncated, damaged, "
            "or of an architecture transformers does not read",
            "copy or download the file again",
        ) from None


def _first(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__
