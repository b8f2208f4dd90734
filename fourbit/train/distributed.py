"""Data-parallel QLoRA under torchrun: DDP or FSDP2 over models with 4-bit base weights.

    torchrun --nproc_per_node N -m fourbit.cli finetune --distributed ddp|fsdp ...

    runtime = distributed.setup("fsdp")                  # process group from the torchrun env
    model = parallel.wrap_model(model, runtime)          # after quantize_model + add_lora
    batch = runtime.shard(global_batch)                  # this rank's rows of the global batch
    loss = runtime.global_mean_loss(loss_sum, n_tok)     # per-rank loss whose averaged gradient is
                                                         # the gradient of the global token mean
    metric = runtime.reduce(loss.detach())               # the same number on every rank
    checkpoint.save(dir, model, optimizer, step=k)       # collective; rank 0 writes (checkpoint.py)

Every rank runs the same program on its own slice of each global batch (data parallelism); gloo
is the backend on CPU, NCCL on GPU (one GPU per process, `cuda:LOCAL_RANK`).

This module answers "where am I running": `setup(mode)` returns the `Runtime` (mode, rank, world
size, device) and its methods work unchanged in a single process (mode "none": rank 0 of 1, every
collective a no-op), so the training loop has no `if distributed` branches. How a model is made
data-parallel (DDP or FSDP2, why the quant state is replicated, mixed precision) is
`fourbit.train.parallel`; the checkpoint format shared by every mode is `fourbit.train.checkpoint`.

Equivalence with one process
----------------------------
With the same global batch, N ranks compute the same update as one process: each rank takes a
contiguous 1/N of the batch rows (`shard`); the data-parallel engines average gradients over
ranks. Averaging per-rank *mean* losses equals the global token mean only when every rank holds
the same number of label tokens; `global_mean_loss` scales each rank's token *sum* by
N / (global token count), so the averaged gradient is exactly the gradient of the global mean
whatever the padding and prompt masks. Dropout draws different random numbers per rank, so with
LoRA dropout > 0 runs agree in distribution only.

"""

from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist

from ..errors import InvalidInput, Unavailable

__all__ = [
    "MODES",
    "check_mode",
    "Runtime",
    "setup",
    "teardown",
    "rank",
    "world_size",
    "is_main",
    "barrier",
    "shard",
    "reduce",
    "global_mean_loss",
]

MODES = ("none", "ddp", "fsdp")
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"distributed mode must be one of {list(MODES)}, got {mode!r}")
    return mode


# ---- process group ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Runtime:
    """Where this process runs: mode, rank among world_size, its device and the backend. The methods
    are the module's functions for this process; in mode "none" they are the single-process identity."""

    mode: str
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None for a single process

    @property
    def is_main(self) -> bool:
        """The rank that writes files, prints and plots."""
        return self.rank == 0

    def barrier(self) -> None:
        barrier()

    def shard(self, batch):
        return shard(batch, rank=self.rank, world_size=self.world_size)

    def reduce(self, value, op: str = "mean"):
        return reduce(value, op)

    def global_mean_loss(self, loss_sum: torch.Tensor, n_tokens: int | torch.Tensor) -> torch.Tensor:
        return global_mean_loss(loss_sum, n_tokens)


def setup(mode: str = "none", *, device: str | torch.device = "auto", backend: str | None = None,
          timeout_s: float = 600.0) -> Runtime:
    """Join the process group described by torchrun's environment and return this rank's Runtime.

    mode "none" needs no torchrun and returns rank 0 of 1 on `device` ("auto": the current CUDA
    device if there is a GPU, else the CPU).
    For "ddp"/"fsdp" the variables RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT must
    be set (torchrun sets them). backend defaults to "nccl" when CUDA is available, else "gloo";
    with NCCL each process uses cuda:LOCAL_RANK. Calling it again in an initialised process returns
    the context without re-initialising.
    """
    check_mode(mode)
    if mode == "none":
        if device == "auto":
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        return Runtime("none", 0, 1, 0, torch.device(device), None)
    missing = [k for k in _TORCHRUN_ENV if k not in os.environ]
    if missing:
        raise Unavailable(
            f"--distributed {mode} needs the torchrun environment, but {missing} are not set",
            f"launch with `torchrun --nproc_per_node N -m fourbit.cli finetune --distributed {mode} ...`",
        )
    local_rank = int(os.environ["LOCAL_RANK"])
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend not in ("nccl", "gloo"):
        raise InvalidInput(f"backend must be 'nccl' (GPU) or 'gloo' (CPU), got {backend!r}", "pass nccl or gloo")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise Unavailable("backend 'nccl' needs CUDA, which this process does not see", "use backend='gloo' on CPU")
        if local_rank >= torch.cuda.device_count():
            raise Unavailable(f"LOCAL_RANK {local_rank} has no GPU: this machine shows {torch.cuda.device_count()}",
                              f"use torchrun --nproc_per_node <= {torch.cuda.device_count()}")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return Runtime(mode, dist.get_rank(), dist.get_world_size(), local_rank, device, dist.get_backend())


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
    return loss_sum * world_size() / float(total)  # N = 1: exactly loss_sum / n (the product is exact)
