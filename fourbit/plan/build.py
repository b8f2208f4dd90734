"""The model `fourbit finetune` would train, built on fake tensors: sizes, no memory.

`build_base` is `fourbit.train.models.load_base` without reading a weight: the architecture from the
config alone (`from_config` inside the caller's FakeTensorMode, on the device the run uses), every
`nn.Linear` but the skipped ones replaced by a `Linear4bit` holding storages of the sizes
`fourbit.nf4.quantize` would leave (`empty_4bit`). `model_tensors` and `static_bytes` say what each
tensor of such a model (or a real one) is.
"""

from __future__ import annotations

import torch
from torch import nn
from torch._subclasses.fake_tensor import unset_fake_temporarily

from ..lora import Linear4bit, LoRALinear
from ..lora.surgery import name_matches
from ..nf4.state import NESTED_BLOCKSIZE, QuantState
from ..train.config import TrainConfig
from .source import ModelSource

__all__ = ["build_base", "empty_4bit", "model_tensors", "static_bytes", "local"]

_DENSE = {"fp32": torch.float32, "bf16": torch.bfloat16}


def empty_4bit(shape: tuple[int, int], *, blocksize: int, quant_type: str, double_quant: bool,
               quant_storage: torch.dtype, dtype: torch.dtype, device, tables: dict) -> tuple[torch.Tensor, QuantState]:
    """(packed, QuantState) with storages of the sizes `fourbit.nf4.quantize` leaves for a weight of
    `shape`, empty (fake under a FakeTensorMode): (n+1)//2 bytes of codes as a (.., 1) `quant_storage`
    column; absmax (nb,) float32, or with double quantization uint8 codes in a storage padded to
    whole blocks of 256 (quantize_blockwise's), the nested absmax (ceil(nb/256),) and a 0-dim offset.
    The 16-entry code and the 256-entry map come from `tables`, one of each per plan, as Linear4bit
    shares them. tests/test_plan.py holds every size to quantize's own."""
    n = shape[0] * shape[1]
    nbytes, blocks = (n + 1) // 2, -(-n // blocksize)
    itemsize = torch.empty((), dtype=quant_storage).element_size()
    packed = torch.empty((nbytes // itemsize, 1), dtype=quant_storage, device=device)
    if "code" not in tables:
        tables["code"] = torch.empty(16, dtype=torch.float32, device=device)
        tables["map"] = torch.empty(256, dtype=torch.float32, device=device)
    kw = dict(shape=shape, dtype=dtype, blocksize=blocksize, quant_type=quant_type, code=tables["code"])
    if not double_quant:
        return packed, QuantState.from_tensors(torch.empty(blocks, dtype=torch.float32, device=device), None, None, None, **kw)
    groups = -(-blocks // NESTED_BLOCKSIZE)
    absmax = torch.empty(groups * NESTED_BLOCKSIZE, dtype=torch.uint8, device=device)[:blocks]
    nested = torch.empty(groups, dtype=torch.float32, device=device)
    offset = torch.empty((), dtype=torch.float32, device=device)
    return packed, QuantState.from_tensors(absmax, nested, tables["map"], offset, **kw)


def _linear4bit(dense: nn.Linear, settings: dict, compute_dtype, tables: dict) -> Linear4bit:
    """A Linear4bit holding `empty_4bit` tensors for `dense`'s weight. The codes sit in a plain
    Parameter, as after FSDP2's swap (`Linear4bit.quant_state`): a Params4bit cannot wrap a fake tensor."""
    weight = dense.weight
    packed, state = empty_4bit(tuple(weight.shape), dtype=weight.dtype, device=weight.device, tables=tables, **settings)
    with unset_fake_temporarily():  # the layer's waiting dense weight: a real meta tensor, no memory
        layer = Linear4bit(dense.in_features, dense.out_features, bias=False, device="meta", compute_dtype=compute_dtype,
                           **settings)
    layer.weight = nn.Parameter(packed, requires_grad=False)
    layer.quant_state = state
    layer.bias = dense.bias
    return layer


def build_base(source: ModelSource, config: TrainConfig, compute_dtype: torch.dtype, device: torch.device) -> nn.Module:
    """`fourbit.train.models.load_base`'s model, on fake tensors on `device` (call inside a
    FakeTensorMode): dense float32 (or the --base-weights dtype), then every nn.Linear but the skipped
    ones in NF4 with the settings a 4-bit directory stores (else the QLoRA recipe: NF4, double
    quantization, blocksize 64, lm_head kept dense), as `quantize_model` chooses them."""
    from transformers import AutoModelForCausalLM

    with device:
        model = AutoModelForCausalLM.from_config(source.hf_config, dtype=_DENSE.get(config.base_weights, torch.float32))
    if config.base_weights == "nf4":
        stored = source.stored or {}
        storage = stored.get("bnb_4bit_quant_storage", "uint8")
        settings = dict(quant_type=stored.get("bnb_4bit_quant_type", "nf4"),
                        double_quant=bool(stored.get("bnb_4bit_use_double_quant", True)),
                        blocksize=int(stored.get("bnb_4bit_blocksize", 64)),
                        quant_storage=getattr(torch, storage) if isinstance(storage, str) else storage)
        skip = tuple(stored.get("llm_int8_skip_modules") or ("lm_head",))
        done: dict[int, Linear4bit] = {}
        tables: dict = {}
        for name, module in list(model.named_modules(remove_duplicate=False)):
            if type(module) is nn.Linear and name and not name_matches(name, skip):
                if id(module) not in done:
                    done[id(module)] = _linear4bit(module, settings, compute_dtype, tables)
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, done[id(module)])
        if done:
            model.is_loaded_in_4bit = True
    return model.eval()  # as from_pretrained returns it


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def model_tensors(model: nn.Module):
    """(category, tensor) for every tensor the model holds: 4-bit parts first, then LoRA, then the rest."""
    for m in model.modules():
        if isinstance(m, Linear4bit):
            yield "base_4bit", local(m.weight)
            absmax, nested_absmax, nested_code, offset = m.quant_state.as_tensors()
            for t in (absmax, nested_absmax, nested_code, offset, m.quant_state.code):
                if t is not None:
                    yield "base_4bit", t
    for m in model.modules():
        if isinstance(m, LoRALinear):
            for p in m.lora_A.parameters():
                yield "lora", local(p)
            for p in m.lora_B.parameters():
                yield "lora", local(p)
    for t in [*model.parameters(), *model.buffers()]:
        yield "dense_weights", local(t)


def static_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes at rest, each storage once: the 4-bit weights split into codes / absmax / nested state."""
    seen: set = set()
    out = {"codes": 0, "absmax": 0, "nested": 0, "dense_weights": 0, "lora": 0, "n_4bit_weights": 0}

    def count(key, t):
        st = t.untyped_storage()
        if id(st) not in seen:  # the storages stay alive while the model does
            seen.add(id(st))
            out[key] += st.nbytes()

    for m in model.modules():
        if isinstance(m, Linear4bit):
            out["n_4bit_weights"] += m.out_features * m.in_features
            count("codes", local(m.weight))
            absmax, nested_absmax, nested_code, offset = m.quant_state.as_tensors()
            count("absmax", absmax)
            for t in (nested_absmax, nested_code, offset, m.quant_state.code):
                if t is not None:
                    count("nested", t)
    for category, t in model_tensors(model):
        if category != "base_4bit":
            count(category, t)
    return out
