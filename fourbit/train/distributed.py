"""Data-parallel QLoRA under torchrun: DDP or FSDP2 over models with 4-bit base weights.

    torchrun --nproc_per_node N -m fourbit.cli finetune --distributed ddp|fsdp ...

    ctx = distributed.setup("fsdp")                      # process group from the torchrun env
    model = distributed.wrap_model(model, ctx)           # after quantize_model + add_lora (+ resume)
    batch = distributed.shard(global_batch)              # this rank's rows of the global batch
    loss = distributed.global_mean_loss(loss_sum, n_tok) # per-rank loss whose averaged gradient is
                                                         # the gradient of the global token mean
    metric = distributed.reduce(loss.detach())           # the same number on every rank
    distributed.save_checkpoint(model, optimizer, dir, step=k)   # collective; rank 0 writes

Every rank runs the same program on its own slice of each global batch (data parallelism); gloo
is the backend on CPU, NCCL on GPU (one GPU per process, `cuda:LOCAL_RANK`).

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

Equivalence with one process
----------------------------
With the same global batch, N ranks compute the same update as one process: each rank takes a
contiguous 1/N of the batch rows (`shard`); the data-parallel engines average gradients over
ranks. Averaging per-rank *mean* losses equals the global token mean only when every rank holds
the same number of label tokens; `global_mean_loss` scales each rank's token *sum* by
N / (global token count), so the averaged gradient is exactly the gradient of the global mean
whatever the padding and prompt masks. Dropout draws different random numbers per rank, so with
LoRA dropout > 0 runs agree in distribution only.

Checkpoints
-----------
`save_checkpoint` writes, from rank 0 only, a directory that a single-process run reads too:
    adapter/               PEFT-format adapter (fourbit.lora.save_adapter), full LoRA tensors
    optimizer.pt           optimizer state keyed by parameter name (not by position), full tensors
    trainer_state.json     step, mode and world size it was written with, and caller's extras
Sharded LoRA tensors and their optimizer state are gathered one tensor at a time; the frozen base
weights are never gathered (the base model is re-created from its source on resume).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from ..lora import Linear4bit, LoRALinear, load_adapter, save_adapter
from ..nf4.files import atomic_write

__all__ = [
    "MODES",
    "DistContext",
    "setup",
    "teardown",
    "rank",
    "world_size",
    "is_main",
    "barrier",
    "shard",
    "reduce",
    "global_mean_loss",
    "wrap_model",
    "unwrap",
    "packed_weight_bytes",
    "full_lora_weights",
    "optimizer_state",
    "load_optimizer_state",
    "save_checkpoint",
    "load_checkpoint",
]

MODES = ("none", "ddp", "fsdp")
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"distributed mode must be one of {list(MODES)}, got {mode!r}")
    return mode


# ---- process group ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DistContext:
    """Where this process stands: mode, rank among world_size, its device and the backend."""

    mode: str
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None for a single process

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(mode: str = "none", *, backend: str | None = None, timeout_s: float = 600.0) -> DistContext:
    """Join the process group described by torchrun's environment and return this rank's context.

    mode "none" needs no torchrun and returns rank 0 of 1 on cuda:0 if there is a GPU, else CPU.
    For "ddp"/"fsdp" the variables RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT must
    be set (torchrun sets them). backend defaults to "nccl" when CUDA is available, else "gloo";
    with NCCL each process uses cuda:LOCAL_RANK. Calling it again in an initialised process returns
    the context without re-initialising.
    """
    _check_mode(mode)
    if mode == "none":
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        return DistContext("none", 0, 1, 0, device, None)
    missing = [k for k in _TORCHRUN_ENV if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"--distributed {mode} needs the torchrun environment, but {missing} are not set; launch with "
            f"`torchrun --nproc_per_node N -m fourbit.cli finetune --distributed {mode} ...`"
        )
    local_rank = int(os.environ["LOCAL_RANK"])
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl' (GPU) or 'gloo' (CPU), got {backend!r}")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise RuntimeError("backend 'nccl' needs CUDA, which this process does not see; use backend='gloo' on CPU")
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK {local_rank} has no GPU: this machine shows {torch.cuda.device_count()}; "
                f"use --nproc_per_node <= {torch.cuda.device_count()}"
            )
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistContext(mode, dist.get_rank(), dist.get_world_size(), local_rank, device, dist.get_backend())


def teardown() -> None:
    """Leave the process group (no-op in a single process)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """True on the rank that writes files, prints and plots (rank 0; always in a single process)."""
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _comm_device() -> torch.device:
    """Tensors handed to a collective must live where the backend works: the GPU for NCCL."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---- data and metrics ---------------------------------------------------------------------------
def shard(batch, *, rank: int | None = None, world_size: int | None = None):
    """This rank's rows of a global batch: rows [r*B/N, (r+1)*B/N) along dim 0.

    `batch` is a tensor, a list/tuple of examples, or a dict of tensors that share dim 0 (input_ids,
    labels, attention_mask); the same structure comes back. B must be divisible by N so that every
    rank does the same work and N ranks see exactly the global batch a single process would.
    """
    r = (dist.get_rank() if dist.is_initialized() else 0) if rank is None else rank
    n = (dist.get_world_size() if dist.is_initialized() else 1) if world_size is None else world_size
    if not 0 <= r < n:
        raise ValueError(f"rank must be in [0, {n}), got {r}")
    if isinstance(batch, dict):
        sizes = {k: len(v) for k, v in batch.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"batch entries disagree on their number of rows: {sizes}")
        return {k: shard(v, rank=r, world_size=n) for k, v in batch.items()}
    if not isinstance(batch, (torch.Tensor, list, tuple)):
        raise TypeError(f"shard takes a tensor, list, tuple or dict of them, got {type(batch).__name__}")
    rows = len(batch)
    if rows % n:
        raise ValueError(f"a global batch of {rows} rows does not split evenly over {n} ranks; use a multiple of {n}")
    per = rows // n
    return batch[r * per : (r + 1) * per]


def reduce(value, op: str = "mean"):
    """Combine a per-rank number over all ranks ("mean", "sum" or "max"); every rank gets the result.

    A float comes back as a float, a tensor as a tensor of its own dtype and device. The reduction
    runs in float64 so that means of float32 losses carry no extra rounding.
    """
    if op not in ("mean", "sum", "max"):
        raise ValueError(f"op must be 'mean', 'sum' or 'max', got {op!r}")
    as_tensor = isinstance(value, torch.Tensor)
    if not dist.is_initialized():
        return value
    t = (value.detach() if as_tensor else torch.tensor(value)).to(_comm_device(), torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    if op == "mean":
        t = t / dist.get_world_size()
    return t.to(value.device, value.dtype) if as_tensor else float(t)


def global_mean_loss(loss_sum: torch.Tensor, n_tokens: int | torch.Tensor) -> torch.Tensor:
    """The per-rank loss to backpropagate so that data-parallel training equals one process.

        L = (sum over all ranks' label tokens of the token loss) / T,   T = sum_r n_r
        rank r returns  l_r = N * s_r / T      (s_r: its token-loss sum, n_r: its token count)

    DDP and FSDP average gradients over the N ranks: (1/N) sum_r grad l_r = grad(sum_r s_r) / T =
    grad L. The mean of the l_r is L itself, so `reduce(l_r.detach())` is the logged loss. In a
    single process this is s / n.

    With gradient accumulation pass, for every micro-batch, that micro-batch's loss sum and this
    rank's label-token count over the *whole* optimizer step: the accumulated gradients then add
    up to grad L of the step, and the step's loss is the sum over micro-batches of
    `reduce(l_r.detach())`. (Under DDP, `model.no_sync()` around all but the last micro-batch
    saves the intermediate all-reduces; the result is the same.)
    """
    total = reduce(torch.as_tensor(n_tokens, dtype=torch.float64), "sum")
    if float(total) <= 0:
        raise ValueError("the global batch holds no label tokens (every label is masked); the loss is undefined")
    return loss_sum * (world_size() / float(total))


# ---- wrapping -----------------------------------------------------------------------------------
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
            s = m.quant_state
            tensors += [s.absmax] + ([s.offset, s.nested.absmax] if s.nested is not None else [])
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
    ctx: DistContext,
    *,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
    layer_classes: list[str] | None = None,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Move `model` to ctx.device and make it data-parallel according to ctx.mode.

    Call after quantize_model/add_lora (and after loading a resumed adapter), before building the
    optimizer: FSDP replaces the parameters by sharded DTensors. Every rank first receives rank 0's
    values (see `_sync_replicas`), so ranks need not share a seed for the initialisation.
      "none"  the model itself, moved.
      "ddp"   DistributedDataParallel; frozen parameters are excluded from DDP entirely.
      "fsdp"  fully_shard on each decoder layer, then on the root; the optional
              MixedPrecisionPolicy(param_dtype, reduce_dtype) casts float parameters only.
    param_dtype/reduce_dtype apply to FSDP only (use autocast with DDP).
    """
    _check_mode(ctx.mode)
    if ctx.mode != "fsdp" and (param_dtype is not None or reduce_dtype is not None):
        raise ValueError(f"param_dtype/reduce_dtype are FSDP mixed-precision settings; mode {ctx.mode!r} uses autocast instead")
    model = model.to(ctx.device)  # Linear4bit moves its QuantState too; FSDP's own move would not
    if ctx.mode == "none":
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
        raise RuntimeError(f"mode {ctx.mode!r} needs a process group: get the context from distributed.setup({ctx.mode!r}) under torchrun")
    _sync_replicas(model)
    if ctx.mode == "ddp":
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
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
            s = m.quant_state
            for t in [s.absmax] + ([s.offset, s.nested.absmax] if s.nested is not None else []):
                state += t.numel() * t.element_size()
    return {"packed": packed, "quant_state": state}


# ---- checkpoints --------------------------------------------------------------------------------
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


def save_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, directory, *, step: int, extra: dict | None = None) -> None:
    """Write adapter/, optimizer.pt and trainer_state.json into `directory` (see the module
    docstring). Collective: all ranks call it; rank 0 alone writes, each file atomically."""
    directory = os.fspath(directory)
    opt = optimizer_state(model, optimizer)
    with full_lora_weights(model) as plain:
        if is_main():
            save_adapter(plain, os.path.join(directory, "adapter"))
    if is_main():
        atomic_write(os.path.join(directory, "optimizer.pt"), lambda tmp: torch.save(opt, tmp))
        trainer = {"step": int(step), "world_size": world_size(), "mode": _mode_of(model), **(extra or {})}
        text = json.dumps(trainer, indent=2, sort_keys=True) + "\n"

        def write(tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)

        atomic_write(os.path.join(directory, "trainer_state.json"), write)
    barrier()


def _mode_of(model: nn.Module) -> str:
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, nn.parallel.DistributedDataParallel):
        return "ddp"
    return "fsdp" if isinstance(model, FSDPModule) else "none"


def load_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, directory) -> dict[str, Any]:
    """Load a `save_checkpoint` directory (from any mode and world size) into a wrapped or plain
    model and its optimizer; returns the trainer state (step, ...). Collective: all ranks call it
    and all read the files."""
    directory = os.fspath(directory)
    for name in ("adapter", "optimizer.pt", "trainer_state.json"):
        if not os.path.exists(os.path.join(directory, name)):
            raise FileNotFoundError(f"{directory} is not a checkpoint: {name} is missing (expected adapter/, optimizer.pt, trainer_state.json)")
    with full_lora_weights(model, write_back=True) as plain:
        load_adapter(plain, os.path.join(directory, "adapter"))
    load_optimizer_state(model, optimizer, torch.load(os.path.join(directory, "optimizer.pt"), weights_only=True))
    with open(os.path.join(directory, "trainer_state.json"), encoding="utf-8") as f:
        return json.load(f)
