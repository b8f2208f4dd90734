"""plan(config): the peak memory of the run `fourbit finetune` would do with `config`, its breakdown,
where in the step it happens, a verdict against a GPU (or this machine's RAM) and, when it does not
fit, the smallest changes that make it fit.

    from fourbit.plan import plan, gpu_target
    p = plan(TrainConfig(model="llama-3-8b", max_length=2048, r=64), target=gpu_target("4090"))
    p.peak, p.fits, p.where, p.breakdown, p.suggestions

The run's batches: with a tokenizer (a real model), the worst micro-batch the run draws (of every
micro-batch of a short run the longest, then the one with the most answer positions, then the
shortest shared prompt prefix; else the batch of the longest examples) with its labels, and the
whole evaluation (chunks of 16, in order); a preset has no tokenizer, so its batches are max_length
tokens long, every token an answer, and no evaluation is traced. `compare` plans one config as QLoRA, as LoRA on a 16-bit base, and as full 16-bit
fine-tuning (every weight trained in bf16 with float32 AdamW states, the paper's baseline).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time

from ..errors import InvalidInput, Unavailable
from ..train.config import TrainConfig
from ..train.data import IGNORE, Encoded, batch_at, encode, encode_all
from ..train.forward import layout_of
from ..train.setup import split_records
from .gpus import Target, format_bytes, local_target
from .source import ModelSource, resolve
from .trace import trace_run

__all__ = ["Plan", "Suggestion", "plan", "compare", "MODES"]

MODES = {"qlora": "QLoRA", "lora16": "LoRA, 16-bit base", "full16": "full 16-bit"}


@dataclasses.dataclass
class Suggestion:
    change: str  # the flags to change, as finetune takes them
    peak: int
    fits: bool


@dataclasses.dataclass
class Plan:
    mode: str  # "qlora" | "lora16" | "full16"
    model: str
    target: Target
    peak: int
    phase: str  # where the peak is: eval, forward, loss, backward, clip, optimizer
    where: str  # the phase and module
    breakdown: dict[str, int]  # bytes by category at the peak
    phases: dict[str, int]  # each phase's own peak
    static: dict[str, int]  # bytes at rest: codes, absmax, nested, dense weights, LoRA, optimizer states
    checkpointing: bool
    params: str
    batch: tuple[int, int]  # rows per rank, tokens
    world_size: int
    seconds: float
    notes: list[str] = dataclasses.field(default_factory=list)
    suggestions: list[Suggestion] = dataclasses.field(default_factory=list)
    config: dict = dataclasses.field(default_factory=dict)

    @property
    def fits(self) -> bool:
        return self.peak <= self.target.usable

    @property
    def label(self) -> str:
        return MODES[self.mode]

    def verdict(self) -> str:
        """One line: the peak against the target, and the first change that fits when it does not."""
        head = (f"{self.label} {self.model}: peak {format_bytes(self.peak)} ({self.where}) on {self.target.name}, "
                f"usable {format_bytes(self.target.usable)}")
        if self.fits:
            return head + ": fits"
        fix = next((s for s in self.suggestions if s.fits), None)
        return head + (f": does not fit; {fix.change} gives {format_bytes(fix.peak)}" if fix else ": does not fit")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(label=self.label, fits=self.fits, usable=self.target.usable, verdict=self.verdict())
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        """The inverse of `to_dict` (what --json wrote)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in fields}
        d.update(target=Target(**d["target"]), suggestions=[Suggestion(**s) for s in d.get("suggestions", [])],
                 batch=tuple(d["batch"]))
        return cls(**d)


# ---- the run's batches ---------------------------------------------------------------------------
class _Lazy:
    """The run's encoded examples, each encoded the first time `batch_at` asks for it: a short run
    draws a few dozen of thousands, and encoding all of them would cost the plan seconds."""

    def __init__(self, tokenizer, records, max_length: int, part: int):
        self.tokenizer, self.records, self.max_length, self.part = tokenizer, records, max_length, part
        self.cache: dict[int, tuple] = {}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        if i not in self.cache:
            self.cache[i] = encode(self.tokenizer, self.records[i], self.max_length)
        return self.cache[i][self.part]


def _run_batches(config: TrainConfig, source: ModelSource) -> tuple[list[list[int]], list[list[int]], list, list[str]]:
    """(the worst training micro-batch's token ids, their labels, the evaluation records, notes). The
    evaluation is traced whole: its chunks run one after the other, and a chunk's logits are still
    alive while the next one's are computed. The worst micro-batch: the longest; among those, the
    one whose loss keeps the most positions (`forward.AnswerLayout`), then the shortest shared prefix."""
    if source.tokenizer is None:
        notes = [f"a preset has no tokenizer: every sequence is max_length = {config.max_length} tokens, "
                 "and the evaluation pass is not planned"]
        rows = [[1] * config.max_length] * config.batch_size
        return rows, [[IGNORE] + r[1:] for r in rows], [], notes
    train_records, eval_records = split_records(config)
    per_epoch = len(train_records) // config.batch_size
    if per_epoch == 0:
        raise InvalidInput(f"batch_size={config.batch_size} exceeds the {len(train_records)} training examples",
                           "lower --batch-size or add data")
    micro = (config.steps or math.ceil(config.epochs * per_epoch / config.grad_accum)) * config.grad_accum
    tokenizer, pad = source.tokenizer, source.tokenizer.pad_token_id
    if micro * config.batch_size < len(train_records) and micro <= 4096:  # a short run: its own batches
        ids = _Lazy(tokenizer, train_records, config.max_length, 0)
        data = Encoded(ids, _Lazy(tokenizer, train_records, config.max_length, 1), 0)
        def cost(b):
            layout = layout_of(b)
            return b["input_ids"].shape[1], len(layout.keep), -layout.prefix

        batch = max((batch_at(data, i, config.batch_size, config.seed, pad) for i in range(micro)), key=cost)
        rows = [row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
        labels = [row[mask.bool()].tolist() for row, mask in zip(batch["labels"], batch["attention_mask"])]
        notes = [f"the longest of the run's {micro} micro-batches: {batch['input_ids'].shape[1]} tokens"]
    else:  # every example is drawn (up to an epoch's remainder): the batch of the longest ones
        data = encode_all(tokenizer, train_records, config.max_length)
        order = sorted(range(len(data.input_ids)), key=lambda i: -len(data.input_ids[i]))[: config.batch_size]
        rows, labels = [data.input_ids[i] for i in order], [data.labels[i] for i in order]
        notes = [f"the {len(rows)} longest examples: {len(rows[0])} tokens"]
    return rows, labels, eval_records, notes


# ---- one plan ------------------------------------------------------------------------------------
def _check(config: TrainConfig, world_size: int) -> None:
    if world_size < 1:
        raise InvalidInput(f"--world-size must be >= 1, got {world_size}", "give the number of processes (GPUs)")
    if world_size > 1 and config.distributed == "none":
        raise InvalidInput(f"--world-size {world_size} needs --distributed ddp or fsdp", "pass --distributed fsdp (or ddp)")
    if config.distributed == "fsdp" and config.optimizer != "torch_adamw":
        raise InvalidInput(f"--distributed fsdp trains with --optimizer torch_adamw only, got {config.optimizer!r} "
                           "(fourbit's optimizers do not take FSDP's sharded parameters yet: docs/distributed.md)",
                           "pass --optimizer torch_adamw")
    if config.batch_size % world_size:
        raise InvalidInput(f"--batch-size {config.batch_size} does not split evenly over {world_size} ranks",
                           f"use a multiple of {world_size}")


@contextlib.contextmanager
def _fake_group(world_size: int):
    """A process group of `world_size` ranks (0: none) in which this process is rank 0 and every
    collective returns at once (torch's fake backend): DDP and FSDP2 set themselves up as on N GPUs."""
    if world_size == 0:  # not a distributed run
        yield
        return
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise Unavailable("cannot plan a multi-rank run inside a process group (under torchrun)",
                          "run `fourbit plan --world-size N` outside torchrun, before launching")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _mode_config(config: TrainConfig, mode: str) -> TrainConfig:
    if mode == "qlora":
        return config
    if mode == "lora16":
        return dataclasses.replace(config, base_weights="bf16")
    return dataclasses.replace(config, base_weights="bf16", optimizer="adamw")  # full: float32 AdamW states


def plan(config: TrainConfig, *, target: Target | None = None, world_size: int = 1, mode: str = "qlora",
         suggest: bool | str = True, source: ModelSource | None = None, _batches=None, _trace_on: str | None = None) -> Plan:
    """Plan `config`'s run on `target` (default: this machine); see the module docstring. `suggest`:
    plan the changes that make a run that does not fit fit (True), only up to the first ("first")."""
    t0 = time.perf_counter()
    _check(config, world_size)
    target = target or local_target(config.device)
    source = source or resolve(config.model)
    batch, labels, eval_chunk, notes = _batches or _run_batches(config, source)
    notes = list(notes)  # this plan's own: the changes' plans share the batches, not the notes
    run = _mode_config(config, mode)
    with _fake_group(world_size if config.distributed != "none" else 0):
        traced = trace_run(run, source, target=target.device, hopper=target.hopper, batch=batch, labels=labels, eval_records=eval_chunk,
                           world_size=world_size, full=mode == "full16", trace_on=_trace_on)
    phase, top = max(traced.phases.items(), key=lambda kv: kv[1].total)
    if traced.traced_on != target.device:
        notes.append("traced on the CPU with CUDA's allocation rules (512-byte blocks, fourbit's Triton kernels): "
                     "attention and autocast are the CPU's, whose saved tensors have the same sizes")
    if traced.host_peak and run.optimizer.startswith("paged"):  # (torch_adamw's step counts live there too)
        notes.append(f"paged out to the host: {format_bytes(traced.host_peak)} of optimizer states")
    result = Plan(mode, config.model, target, top.total, phase, top.where, dict(top),
                  {k: v.total for k, v in traced.phases.items()}, traced.static, traced.checkpointing, traced.params,
                  traced.batch, world_size, 0.0, notes, [], run.to_dict())
    if suggest and not result.fits:
        result.suggestions = _suggestions(result, config, target, world_size, mode, source, (batch, labels, eval_chunk, notes),
                                          first=suggest == "first")
    result.seconds = time.perf_counter() - t0
    return result


def compare(config: TrainConfig, *, target: Target | None = None, world_size: int = 1, suggest: bool = False) -> list[Plan]:
    """The same run planned as QLoRA, LoRA on a 16-bit base, and full 16-bit fine-tuning."""
    target = target or local_target(config.device)
    source = resolve(config.model)
    batches = _run_batches(config, source)
    return [plan(config, target=target, world_size=world_size, mode=m, suggest=suggest, source=source,
                 _batches=batches) for m in MODES]


# ---- what to change ------------------------------------------------------------------------------
def _halvings(value: int, floor: int) -> list[int]:
    out = []
    while value // 2 >= floor:
        value //= 2
        out.append(value)
    return out


class _Found(Exception):
    pass


def _suggestions(p: Plan, config: TrainConfig, target: Target, world_size: int, mode: str, source: ModelSource,
                 batches, first: bool = False) -> list[Suggestion]:
    """Single changes, the least disruptive kind first, each planned: for each kind the mildest value
    that fits, or the strongest one tried when none does; with `first`, only up to the first that
    fits. Gradient checkpointing and paging are not tried when what they can remove at the peak
    (the saved activations, the states on the device) is less than the excess."""
    out: list[Suggestion] = []
    excess = p.peak - target.usable

    def ladder(options):  # options: [(flags, config, world size, batches)], mildest first
        for i, (change, new, ws, new_batches) in enumerate(options):
            q = plan(new, target=target, world_size=ws, mode=mode, suggest=False, source=source, _batches=new_batches)
            if q.fits or i == len(options) - 1:
                out.append(Suggestion(change, q.peak, q.fits))
                if q.fits and first:
                    raise _Found
                return

    try:
        _try_changes(p, config, world_size, mode, batches, excess, ladder)
    except _Found:
        pass
    return out


def _try_changes(p: Plan, config: TrainConfig, world_size: int, mode: str, batches, excess: int, ladder) -> None:
    same = lambda new, flags: (flags, new, world_size, batches)  # noqa: E731
    if not p.checkpointing and p.breakdown.get("activations", 0) >= excess:
        ladder([same(dataclasses.replace(config, grad_checkpointing="on"), "--grad-checkpointing on")])
    states = p.breakdown.get("optimizer", 0)
    if states >= excess and mode != "full16":  # what fits beside the rest of the peak may stay on the device
        budget_mb = max(1, int((states - excess) // 2**20))
        paged = {"adamw": "paged_adamw", "adamw8bit": "paged_adamw8bit"}.get(config.optimizer, config.optimizer)
        if paged.startswith("paged"):
            new = dataclasses.replace(config, optimizer=paged, paging_budget_mb=float(budget_mb))
            ladder([same(new, f"--optimizer {paged} --paging-budget-mb {budget_mb}")])
    rows, labels, eval_chunk, notes = batches
    if config.batch_size > world_size:
        ladder([(f"--batch-size {b} --grad-accum {config.grad_accum * config.batch_size // b}",
                 dataclasses.replace(config, batch_size=b, grad_accum=config.grad_accum * config.batch_size // b),
                 world_size, (rows[:b], labels[:b], eval_chunk, notes))
                for b in _halvings(config.batch_size, world_size) if b % world_size == 0])
    tokens = max((len(r) for r in rows), default=0)
    if tokens >= 64:
        ladder([(f"--max-length {n}", dataclasses.replace(config, max_length=n), world_size,
                 ([row[:n] for row in rows], [y[:n] for y in labels], eval_chunk, notes)) for n in _halvings(tokens, 16)])
    if mode != "full16" and config.r > 4:
        ladder([same(dataclasses.replace(config, r=r), f"--r {r}") for r in _halvings(config.r, 4)])
    sizes = [n for n in (2, 4, 8) if n > world_size and config.batch_size % n == 0]
    if sizes:
        extra = "" if config.optimizer == "torch_adamw" else " --optimizer torch_adamw"
        ladder([(f"--distributed fsdp --world-size {n}{extra}",
                 dataclasses.replace(config, distributed="fsdp", optimizer="torch_adamw"), n, batches) for n in sizes])
