"""Run a QLoRA run's evaluation and optimizer step on fake tensors and count their live bytes.

The model is the one `fourbit finetune` would train (`build.build_base`: the architecture, the 4-bit
storages of its true sizes), prepared as every run prepares it (`prepare_model`: LoRA, gradient
checkpointing; `parallelize`: FSDP2 over torch's fake process group) and driven by a real Trainer
(`Trainer.around`). Then, under the `LiveBytes` tracker:

    1. the optimizer states are made first (on the CPU by optimizer steps on zero gradients; for a
       GPU by their layouts, `states.py`), so the step traced next is a steady-state one;
    2. `Trainer.evaluate` (its chunks of 16 in order, no gradients);
    3. `Trainer.step_on` on the worst micro-batch the run draws (twice with gradient accumulation:
       the second sees the first one's gradients): forward, loss, backward, clipping, optimizer step.
       Its answer positions and shared prompt prefix (`forward.AnswerLayout`) come from the real token
       lists: the forward's shapes depend on them, and fake tensors have no values to find them in.

What cannot be traced is accounted for: fourbit's matmul ops decode inside (`ops.py`), the Triton
AdamW updates in place, DDP's constructor reads values (a DDP rank is traced as the plain model on
its share of the batch plus the reducer's buckets), and transformers drops an all-ones attention mask
only after reading its values (`_unmasked`). A GPU run planned on a machine without CUDA is traced on
the CPU with the allocator's 512-byte blocks (attention and autocast then use the CPU's kernels,
whose saved tensors have the same sizes). Deep models are traced at 2 and 3 layers and carried to all
(`_extrapolate`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import re
import warnings

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

from ..lora import trainable_parameters
from ..train.config import TrainConfig
from ..train.data import IGNORE, collate
from ..train.distributed import Runtime, shard
from ..train.forward import answer_layout
from ..train.loop import Trainer
from ..train.models import check_linear_layers
from ..train.parallel import parallelize
from ..train.setup import prepare_model, use_checkpointing, uses_autocast
from .build import build_base, local, model_tensors, static_bytes
from .ops import FourbitOps, prewarm
from .source import ModelSource
from .states import state_bytes
from .tracker import LiveBytes, Peak

__all__ = ["Traced", "trace_run"]


@dataclasses.dataclass
class Traced:
    """What the trace found: the peak of each phase (bytes by category, `.total`, `.where`)."""

    phases: dict[str, Peak]
    static: dict[str, int]  # bytes at rest: 4-bit parts, dense weights, LoRA, optimizer states
    checkpointing: bool
    params: str  # the trainable-parameter line finetune prints
    batch: tuple[int, int]  # (rows per rank, tokens) of the traced micro-batch
    eval_batch: tuple[int, int] | None
    traced_on: str  # the device the fake tensors claimed
    host_peak: int  # bytes on the host (paged-out optimizer states) while planning a GPU


class _Locator:
    """Hooks that tell the tracker where the step is: the module running (forward; in backward, the
    module whose output the gradient has reached), the phase (forward, loss, backward, clip,
    optimizer), which tensors autograd saves, and which become a parameter's `.grad`."""

    def __init__(self, model: nn.Module, optimizer, tracker: LiveBytes):
        self.tracker = tracker
        self.stack: list[str] = []
        self.handles = []
        self.root = model
        self.queued = False
        for name, module in model.named_modules():
            if isinstance(module, (nn.Dropout, nn.Identity)) or name.endswith(("lora_A", "lora_B")):
                continue
            self.handles.append(module.register_forward_pre_hook(self._enter(name)))
            self.handles.append(module.register_forward_hook(self._leave(name)))
        self.handles.append(optimizer.register_step_pre_hook(lambda *a: self._set("optimizer", "")))
        self.handles.append(optimizer.register_step_post_hook(lambda *a: self._set("after", "")))
        for p in model.parameters():
            if p.requires_grad:
                self.handles.append(p.register_post_accumulate_grad_hook(lambda p: tracker.move(local(p.grad), "gradients")))

    def _set(self, phase: str | None, module: str) -> None:
        t = self.tracker
        t.module = module
        if phase is not None and phase != t.phase:
            t.phase = phase
        logits = module == "" or module.split(".")[-1] == "lm_head"
        t.current_category = "logits_loss" if logits and t.phase in ("loss", "backward", "forward", "eval") else "transient"

    def _enter(self, name: str):
        def hook(module, args):
            phase = "forward" if module is self.root and self.tracker.phase != "eval" else None
            self.stack.append(name)
            self._set(phase, name or "model")

        return hook

    def _leave(self, name: str):
        def hook(module, args, output):
            if self.stack:
                self.stack.pop()
            phase = "loss" if module is self.root and self.tracker.phase == "forward" else None
            self._set(phase, self.stack[-1] if self.stack else "")
            out = output[0] if isinstance(output, tuple) else getattr(output, "logits", output)
            if isinstance(out, torch.Tensor) and out.requires_grad and torch.is_grad_enabled():
                out.register_hook(self._backward_at(name))

        return hook

    def _backward_at(self, name: str):
        def hook(grad):
            if not self.queued:  # the end of this backward pass: clipping and the optimizer follow
                self.queued = True
                torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)
            self._set("backward", name)

        return hook

    def mark(self, phase: str) -> None:
        """Enter `phase` from code that runs no module (a step that allocates nothing)."""
        self._set(phase, "")

    def _backward_done(self) -> None:
        self.queued = False
        self._set("clip", "")

    def pack(self, t: torch.Tensor):
        if self.tracker.category_of(t) == "transient":
            self.tracker.move(t, "activations")
        return t

    @contextlib.contextmanager
    def attached(self):
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
                yield
        finally:
            for h in self.handles:
                h.remove()


_EVAL_CHUNK = 16  # fourbit.train.task.exact_match's batch size


def _unpadded_chunks(source: ModelSource, records) -> list[bool]:
    """For each chunk exact_match runs, whether its examples all have one length (nothing padded)."""
    from ..train.data import answer_ids, prompt_ids

    lengths = [len(prompt_ids(source.tokenizer, r.prompt) + answer_ids(source.tokenizer, r.response)) for r in records]
    return [len(set(lengths[i : i + _EVAL_CHUNK])) == 1 for i in range(0, len(lengths), _EVAL_CHUNK)]


def _unmasked(model: nn.Module, tracker: LiveBytes, train_unpadded: bool, eval_unpadded: list[bool]):
    """A hook giving the model no attention mask where its batch has no padding. transformers drops an
    all-ones mask itself (SDPA then runs causal, without a mask and without repeating grouped keys),
    but it never reads a fake tensor's values to find out, so the plan says what it would find.
    With a shared prompt prefix (`forward.answer_logits`) a batch runs as two calls: the prefix,
    one row of real tokens into an empty cache (unpadded), then the rows' rest after the cached
    prefix, whose mask transformers keeps (fewer queries than keys)."""
    chunks = iter(eval_unpadded)

    def hook(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and cache.get_seq_length() == 0:  # the shared prefix
            return args, {**kwargs, "attention_mask": None}
        unpadded = next(chunks, False) if tracker.phase == "eval" else train_unpadded
        if cache is not None:  # the rows after the prefix
            return args, kwargs
        if unpadded and kwargs.get("attention_mask") is not None:
            kwargs = {**kwargs, "attention_mask": None}
        return args, kwargs

    return model.register_forward_pre_hook(hook, with_kwargs=True)


def _wrap(model: nn.Module, runtime: Runtime) -> nn.Module:
    """`wrap_model` for a model built on its device already, replicas equal by construction: only its
    FSDP2 part (`parallelize`), over the fake process group. DDP's constructor reads parameter values
    (its shape check), which fake tensors do not have: a DDP rank is traced as the plain model on its
    share of the batch, and `_ddp_buckets` adds what DDP holds besides."""
    if runtime.mode in ("none", "ddp"):
        return model
    mesh = None
    if runtime.mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh

        with unset_fake_temporarily():  # the mesh is real: its coordinates come from its values
            mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))
    return parallelize(model, runtime, mesh=mesh)


def _prepare(model: nn.Module, config: TrainConfig, full: bool) -> tuple[str, bool]:
    """`prepare_model` (LoRA), or for full fine-tuning (a plan-only baseline, not a fourbit run) every
    weight trainable, with the same rule for gradient checkpointing."""
    if not full:
        return prepare_model(model, config)
    for p in model.parameters():
        p.requires_grad_(True)
    count = trainable_parameters(model)
    return str(count), use_checkpointing(model, config, count.total)


def _budget(config: TrainConfig) -> int | None:
    """The device budget of a paged optimizer, as `build_optimizer` passes it (None: all resident)."""
    if config.optimizer.startswith("paged") and config.paging_budget_mb is not None:
        return int(config.paging_budget_mb * 2**20)
    return None


def _optimizer_states(trainer: Trainer, config: TrainConfig, target: str, tracker: LiveBytes):
    """Make the optimizer states exist before the traced step, as they do from the second step on.
    On the CPU: real optimizer steps on zero gradients (a paged one with a budget sweeps three
    times: its host copies appear as pages are first evicted). For CUDA: one buffer of the size
    `states.state_bytes` gives (the Triton step only reads and writes them); returned to be kept."""
    if target == "cuda":
        params = [local(p) for p in trainer.params]
        on_device, host = state_bytes(params, config.optimizer, budget_bytes=_budget(config), device=target)
        with tracker.category("optimizer"):
            held = torch.empty(on_device, dtype=torch.uint8, device=tracker.device)
        tracker.other += host
        tracker.other_peak = max(tracker.other_peak, tracker.other)
        return held
    sweeps = 3 if _budget(config) is not None else 1
    for _ in range(sweeps):
        with tracker.category("gradients"):
            for p in trainer.params:
                p.grad = torch.zeros_like(p)
        with tracker.category("optimizer"):
            trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
    return None


def _ddp_buckets(trainer: Trainer, tracker: LiveBytes):
    """DDP's reducer keeps one flat buffer per bucket of the gradients it all-reduces (the trainable
    parameters', gradient_as_bucket_view off): as many bytes again as those gradients."""
    with tracker.category("gradients"):
        return [torch.empty(sum(p.numel() for p in trainer.params if p.dtype == dtype), dtype=dtype, device=tracker.device)
                for dtype in {p.dtype for p in trainer.params}]


@dataclasses.dataclass
class _Once:
    phases: dict[str, Peak]
    static: dict[str, int]
    host_peak: int


def _trace_once(config: TrainConfig, source: ModelSource, *, target: str, hopper: bool, device: torch.device,
                batch: list[list[int]], labels: list[list[int]], eval_records: list, world_size: int, full: bool) -> _Once:
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    autocast = uses_autocast(config, torch.device(target))
    with fake, LiveBytes(device):  # answers the data-dependent checks of quantize while building
        model = build_base(source, config, torch.bfloat16 if autocast else torch.float32, device)
        _prepare(model, config, full)
        runtime = Runtime(config.distributed, 0, world_size, 0, device, None if world_size == 1 else "fake")
        model = _wrap(model, runtime)
        trainer = Trainer.around(config, model, source.tokenizer, runtime)
    trainer.autocast = autocast  # the target's rule, wherever it is traced
    static = static_bytes(trainer.model)

    tracker = LiveBytes(device, round_to=512 if target == "cuda" else 1, on_op=FourbitOps(target, hopper=hopper))
    for category, t in model_tensors(trainer.model):
        tracker.add(t, category)
    with fake, tracker, tracker.resizes(), warnings.catch_warnings():
        # the reference AdamW compares data pointers (0 on fake tensors: the same answer for a float32 parameter)
        warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
        held = _optimizer_states(trainer, config, target, tracker)  # 1. the states of a steady-state step
        buckets = _ddp_buckets(trainer, tracker) if config.distributed == "ddp" and world_size > 1 else None
        static["optimizer"], static["optimizer_host"] = tracker.sums["optimizer"], tracker.other
        tracker.reset_peaks()
        locator = _Locator(trainer.model, trainer.optimizer, tracker)
        eval_unpadded = _unpadded_chunks(source, eval_records) if eval_records else []
        locator.handles.append(_unmasked(trainer.model, tracker, len({len(row) for row in batch}) == 1, eval_unpadded))
        if target == "cuda":  # the Triton update writes the states in place and allocates nothing
            trainer.optimizer.step = lambda closure=None: locator.mark("optimizer")
        with locator.attached():
            if eval_records:  # 2. the evaluation pass
                tracker.phase = "eval"
                trainer.eval_records = list(eval_records)
                trainer.evaluate()
            tracker.phase = "train"  # 3. the training step
            pad = getattr(source.tokenizer, "pad_token_id", None) or 0
            with tracker.category("data"):
                batches = [collate(batch, labels, pad) for _ in range(min(config.grad_accum, 2))]
            layout = answer_layout(shard(batch, rank=0, world_size=world_size), shard(labels, rank=0, world_size=world_size))
            trainer.step_on(batches, layouts=[layout] * len(batches))
        del held, buckets
    phases = {k: v for k, v in tracker.phase_peaks.items() if k not in ("setup", "train")}
    return _Once(phases, static, tracker.other_peak)


_LAYER = re.compile(r"layers\.(\d+)")


def _extrapolate(a: _Once, b: _Once, la: int, lb: int, layers: int) -> _Once:
    """Every byte count of a stack of `layers` identical decoder layers from traces with `la` and `lb`
    of them: each is affine in the number of layers (weights, saved activations, gradients and
    states all come per layer; the page rounding of paged states moves it by less than a page)."""
    def line(x: int, y: int) -> int:
        return x + (y - x) * (layers - la) // (lb - la)

    phases = {}
    for name, pb in b.phases.items():
        pa = a.phases.get(name, Peak())
        peak = Peak({c: line(pa.get(c, 0), pb.get(c, 0)) for c in set(pa) | set(pb)})
        peak.total = line(pa.total, pb.total)
        ia, ib = _LAYER.search(pa.where), _LAYER.search(pb.where)
        index = None
        if ib is not None:  # the peak's layer: fixed (counted from the first) or counted from the last
            index = int(ib[1]) if ia is not None and ia[1] == ib[1] else layers - (lb - int(ib[1]))
        peak.where = pb.where if index is None else _LAYER.sub(f"layers.{index}", pb.where)
        phases[name] = peak
    static = {k: line(a.static.get(k, 0), v) for k, v in b.static.items()}
    return _Once(phases, static, line(a.host_peak, b.host_peak))


def _homogeneous(hf_config) -> bool:
    """Whether every decoder layer is alike (one attention kind), so that traces of a few stand for all."""
    kinds = getattr(hf_config, "layer_types", None)
    return not kinds or len(set(kinds)) == 1


def trace_run(config: TrainConfig, source: ModelSource, *, target: str, hopper: bool = True, batch: list[list[int]],
              labels: list[list[int]] | None = None, eval_records: list = (), world_size: int = 1, full: bool = False,
              exact: bool = False, trace_on: str | None = None) -> Traced:
    """Trace `config`'s run (see the module docstring). `target`: "cpu" or "cuda"; `hopper`: the GPU
    is Hopper (it decides fourbit's matmul routes). `batch`: the token ids of the worst micro-batch's
    rows (the global batch); `labels`: theirs (default: every token after the first is an answer,
    the most logits a batch of these rows can have). `eval_records`: the run's evaluation records (none for a preset).
    A model of more than 4 identical decoder layers is traced with 2 and with 3 of them and the
    counts carried to all of them (`_extrapolate`), unless `exact`. `trace_on`: the fake tensors'
    device (default: the target's when this machine has it, else the CPU)."""
    device = torch.device(trace_on or ("cuda" if target == "cuda" and torch.cuda.is_available() else "cpu"))
    prewarm(device.type)  # real tables for the reference matmul, on the device it will run on
    # the parameter count (and with it "auto" gradient checkpointing) of the whole model, on meta
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        whole = AutoModelForCausalLM.from_config(source.hf_config)
    if config.base_weights == "nf4" and source.stored is None:  # what the loader refuses to quantize, refused first
        check_linear_layers(whole, source.name)
    params, checkpointing = _prepare(whole, config, full)
    layers = int(source.hf_config.num_hidden_layers)
    config = dataclasses.replace(config, grad_checkpointing="on" if checkpointing else "off")
    labels = [[IGNORE] + ids[1:] for ids in batch] if labels is None else labels
    kw = dict(target=target, hopper=hopper, device=device, batch=batch, labels=labels, eval_records=eval_records,
              world_size=world_size, full=full)
    if exact or layers <= 4 or not _homogeneous(source.hf_config):
        once = _trace_once(config, source, **kw)
    else:
        short = [dataclasses.replace(source, hf_config=_with_layers(source.hf_config, n)) for n in (2, 3)]
        once = _extrapolate(_trace_once(config, short[0], **kw), _trace_once(config, short[1], **kw), 2, 3, layers)
        # the states' page rounding is not affine: the whole model's, by the layouts
        shards = [_shard(p, world_size if config.distributed == "fsdp" else 1) for p in whole.parameters() if p.requires_grad]
        on_device, host = state_bytes(shards, config.optimizer, budget_bytes=_budget(config), device=target)
        exact_states = on_device + (host if target == "cpu" else 0)  # a CPU's host copies share its memory
        delta = exact_states - once.static["optimizer"]
        once.static["optimizer"] = exact_states
        for peak in once.phases.values():
            peak["optimizer"] = peak.get("optimizer", 0) + delta
            peak.total += delta
    del whole
    rows = len(batch) // world_size
    eval_batch = (len(eval_records), 0) if eval_records else None
    return Traced(once.phases, once.static, checkpointing, params, (rows, max(len(x) for x in batch)), eval_batch,
                  device.type, once.host_peak)


def _shard(p: torch.Tensor, world_size: int) -> torch.Tensor:
    """Rank 0's piece of `p` under FSDP2 (dim 0 in world_size chunks of ceil(rows / world_size)), as a meta tensor."""
    rows = -(-p.shape[0] // world_size) if p.dim() else 1
    return torch.empty((min(rows, p.shape[0]) if p.dim() else 1, *p.shape[1:]), dtype=p.dtype, device="meta")


def _with_layers(hf_config, n: int):
    out = copy.deepcopy(hf_config)
    out.num_hidden_layers = n
    if getattr(out, "layer_types", None):
        out.layer_types = out.layer_types[:n]
    return out
