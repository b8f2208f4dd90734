"""Making a QLoRA model data-parallel: DDP or FSDP2 over 4-bit base weights (`wrap_model`), and the
helpers that see through the wrapping (`unwrap`, `full_lora_weights`, `packed_weight_bytes`).

Two ways to hold the model
--------------------------
DDP (`torch.nn.parallel.DistributedDataParallel`): every rank holds the whole 4-bit model. Only
parameters with requires_grad=True (the LoRA A/B matrices) are registered with DDP, so only
they are broadcast at start and all-reduced (averaged) after each backward; the frozen packed
bytes are never communicated by DDP.

FSDP2 (`torch.distributed.fsdp.fully_shard`, one call per decoder layer and one for the root):
every parameter -- the packed uint8 weights included -- is split along dim 0 into N chunks and
each rank keeps one. A packed weight of an (out, in) layer is ((out*in + 1)//2, 1) uint8, so rank
r keeps about (out*in/2)/N bytes. Before a layer's forward (and again before its backward) FSDP
all-gathers the layer's chunks into the full tensors, and frees them afterwards. The gradients of
the LoRA parameters are reduce-scattered (averaged) so each rank updates only its chunk; frozen
parameters get no gradient and cost no reduction. A uint8 parameter and float LoRA parameters in
one layer are gathered together in a single byte-typed buffer (FSDP falls back to uint8 when
the dtypes of a group differ), so sharding the 4-bit weights costs no extra collective.

Why the quant state is replicated, not sharded
----------------------------------------------
A Linear4bit's QuantState (absmax, offset, nested absmax, code tables) is a plain attribute, not a
parameter, so FSDP leaves it alone and every rank keeps all of it. That is small: per weight it is
8/bs bits of uint8 absmax codes with double quantization (bs = 64: 1/32 of the packed bytes), or
32/bs bits of float32 absmax without (1/8 of the packed bytes), plus 1 KiB of shared tables.
Sharding it would need a second all-gather per layer (its block boundaries do not line up with
FSDP's byte chunks) and a QuantState rebuilt around the gathered tensors on every forward, for a
saving of 3% (with double quantization) of the base weights. Per rank, base-weight memory is
therefore packed/N + state: 0.5/1.03 + 0.03/1.03 = 0.52 of the single-process bytes for N = 2 with
double quantization (`packed_weight_bytes` measures it).

Mixed precision must not cast the packed bytes
----------------------------------------------
`MixedPrecisionPolicy(param_dtype=bf16)` casts every gathered *floating* parameter. FSDP skips
non-float parameters, so uint8 packed weights arrive bit-exact. A packed weight stored in a float
`quant_storage` (bf16 bytes, as bitsandbytes does for FSDP) would be cast: bf16 -> fp32 changes
every bit pattern, which silently turns the weights into noise. `wrap_model` therefore refuses a
policy whose param_dtype differs from a float quant_storage.

"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from ..lora import Linear4bit, LoRALinear
from .distributed import Runtime, check_mode

__all__ = ["wrap_model", "parallelize", "unwrap", "packed_weight_bytes", "full_lora_weights"]


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside a DDP wrapper (FSDP2 shards in place and needs no unwrapping)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _replica_signature(model: nn.Module) -> list[tuple]:
    sig = [(n, tuple(t.shape), str(t.dtype)) for n, t in model.named_parameters()]
    sig += [(n, tuple(t.shape), str(t.dtype)) for n, t in model.named_buffers()]
    for n, m in model.named_modules():
        if isinstance(m, Linear4bit):
            s = m.quant_state
            sig.append((n + ".quant_state", tuple(s.shape), str(s.dtype), s.blocksize, s.quant_type, s.double_quant))
    return sig


def _sync_replicas(model: nn.Module) -> None:
    """Make every rank hold rank 0's model: check the structure, then broadcast all tensor values.

    FSDP keeps rank r's chunk of whatever rank r holds, and the replicated quant state must match
    the bytes it describes, so a rank that quantized a different random initialisation would train
    a model made of pieces of several. The structural check comes first because a collective over
    tensors of different shapes hangs or corrupts instead of failing.
    """
    mine = _replica_signature(model)
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    for r, theirs in enumerate(everyone):
        if theirs != everyone[0]:
            diff = next((a, b) for a, b in zip(everyone[0] + [None], theirs + [None]) if a != b)
            raise ValueError(f"rank {r} holds a different model than rank 0: rank 0 has {diff[0]}, rank {r} has {diff[1]}")
    seen: set[int] = set()
    tensors = [p.data for p in model.parameters()] + list(model.buffers())
    for m in model.modules():
        if isinstance(m, Linear4bit):
            absmax, nested_absmax, _, offset = m.quant_state.as_tensors()  # the code tables are constants
            tensors += [t for t in (absmax, offset, nested_absmax) if t is not None]
    with torch.no_grad():
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                dist.broadcast(t, src=0)


def _decoder_layers(model: nn.Module, layer_classes) -> list[nn.Module]:
    """The modules to shard one by one: instances of `layer_classes` (class names); by default the
    model's `_no_split_modules` (transformers: "LlamaDecoderLayer", ...), else every element of an
    nn.ModuleList that holds a Linear4bit."""
    names = layer_classes if layer_classes is not None else getattr(model, "_no_split_modules", None) or ()
    layers = [m for m in model.modules() if type(m).__name__ in set(names)]
    if not layers and layer_classes is None:
        layers = [
            child
            for m in model.modules()
            if isinstance(m, nn.ModuleList)
            for child in m
            if any(isinstance(x, Linear4bit) for x in child.modules())
        ]
    if not layers:
        raise ValueError(
            f"found no decoder layers to shard (looked for classes {list(names)} and for nn.ModuleList "
            "elements holding Linear4bit layers); pass layer_classes=['MyDecoderLayer']"
        )
    return layers


def wrap_model(
    model: nn.Module,
    runtime: Runtime,
    *,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
    layer_classes: list[str] | None = None,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Move `model` to runtime.device and make it data-parallel according to runtime.mode.

    Call after quantize_model/add_lora (and after loading a resumed adapter), before building the
    optimizer: FSDP replaces the parameters by sharded DTensors. Every rank first receives rank 0's
    values (see `_sync_replicas`), so ranks need not share a seed for the initialisation.
      "none"  the model itself, moved.
      "ddp"   DistributedDataParallel; frozen parameters are excluded from DDP entirely.
      "fsdp"  fully_shard on each decoder layer, then on the root; the optional
              MixedPrecisionPolicy(param_dtype, reduce_dtype) casts float parameters only.
    param_dtype/reduce_dtype apply to FSDP only (use autocast with DDP).
    """
    check_mode(runtime.mode)
    if runtime.mode != "fsdp" and (param_dtype is not None or reduce_dtype is not None):
        raise ValueError(f"param_dtype/reduce_dtype are FSDP mixed-precision settings; mode {runtime.mode!r} uses autocast instead")
    model = model.to(runtime.device)  # Linear4bit moves its QuantState too; FSDP's own move would not
    if runtime.mode == "none":
        return model
    if not any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("model has no LoRALinear layers; call add_lora before wrap_model")
    for name, m in model.named_modules():
        storage = m.weight.dtype if isinstance(m, Linear4bit) else None
        if storage is not None and storage.is_floating_point and param_dtype not in (None, storage):
            raise ValueError(
                f"{name} keeps its packed 4-bit codes in a {storage} quant_storage, which param_dtype={param_dtype} "
                f"would cast (turning the codes into noise); use param_dtype={storage} or None, or quant_storage=torch.uint8"
            )
    if not dist.is_initialized():
        raise RuntimeError(f"mode {runtime.mode!r} needs a process group: get the Runtime from distributed.setup({runtime.mode!r}) under torchrun")
    _sync_replicas(model)
    return parallelize(model, runtime, policy_dtypes=(param_dtype, reduce_dtype), layer_classes=layer_classes,
                       reshard_after_forward=reshard_after_forward)


def parallelize(model: nn.Module, runtime: Runtime, *, policy_dtypes=(None, None), layer_classes: list[str] | None = None,
                reshard_after_forward: bool = True, mesh=None) -> nn.Module:
    """The last part of `wrap_model`: DDP, or FSDP2 per decoder layer and root, on a model already on
    its device and equal on every rank (`fourbit.plan` calls it on fake tensors and a fake process
    group, with a `mesh` it made outside them)."""
    param_dtype, reduce_dtype = policy_dtypes
    if runtime.mode == "ddp":
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = mesh or init_device_mesh(runtime.device.type, (runtime.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for layer in _decoder_layers(model, layer_classes):
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def packed_weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes this rank holds for the 4-bit base weights: "packed" (the storage behind its chunks
    of the packed codes, FSDP's padding included; all of them without FSDP) and "quant_state"
    (absmax, offset, nested absmax; replicated). Code tables are shared constants and not counted.
    Measured on the local tensors, not derived from shapes."""
    packed = state = 0
    for m in unwrap(model).modules():
        if isinstance(m, Linear4bit):
            packed += _local(m.weight).untyped_storage().nbytes()
            absmax, nested_absmax, _, offset = m.quant_state.as_tensors()
            state += sum(t.numel() * t.element_size() for t in (absmax, offset, nested_absmax) if t is not None)
    return {"packed": packed, "quant_state": state}



# ---- full LoRA tensors -------------------------------------------------------------------------
def _lora_params(model: nn.Module) -> Iterator[tuple[nn.Linear, nn.Parameter]]:
    for layer in unwrap(model).modules():
        if isinstance(layer, LoRALinear):
            yield layer.lora_A, layer.lora_A.weight
            yield layer.lora_B, layer.lora_B.weight


@contextlib.contextmanager
def full_lora_weights(model: nn.Module, *, write_back: bool = False):
    """Inside, the model's LoRA layers hold full plain tensors, so `fourbit.lora.save_adapter` and
    `load_adapter` work on the yielded (unwrapped) model in any mode. Collective: every rank enters.

    With FSDP each sharded LoRA weight is all-gathered (one tensor at a time, LoRA only; the base
    weights stay sharded) and swapped in; on exit the sharded parameter is put back, and with
    write_back=True this rank's chunk of the (possibly changed) full tensor is copied into it.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    swapped = []
    for owner, p in _lora_params(model):
        if isinstance(p, DTensor):
            full = nn.Parameter(p.full_tensor().detach().clone(), requires_grad=p.requires_grad)
            owner._parameters["weight"] = full
            swapped.append((owner, p, full))
    try:
        yield unwrap(model)
    finally:
        for owner, p, full in swapped:
            owner._parameters["weight"] = p
            if write_back:
                with torch.no_grad():
                    mine = distribute_tensor(full.detach(), p.device_mesh, p.placements, src_data_rank=None)
                    p.to_local().copy_(mine.to_local())
