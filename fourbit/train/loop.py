"""The QLoRA training loop: `train(config)` or `Trainer(config).train()`.

One optimizer step (grad_accum micro-batches of batch_size examples):

    n    = number of answer tokens (labels != -100) in all micro-batches of the step
    loss = sum over micro-batches of  sum_t CE(logits[t], label[t+1]) / n      # mean per answer token
    g    = d loss / d lora params        (accumulated across micro-batches by autograd)
    g   *= min(1, clip_norm / ||g||)      (clip_grad_norm_)
    lr   = lr_at(step)                    (linear warmup from 0, then cosine/linear decay or constant)
    optimizer.step()                      (paged AdamW by default)

Dividing by the step's total token count (not each micro-batch's) makes grad_accum=k with batch b
the same objective as one batch of k*b examples.

Determinism: the seed fixes the LoRA init (torch's global RNG right before `add_lora`), the batch
at each step (`data.batch_at`), and dropout (the RNG state, saved in checkpoints). `resume=True`
reloads a checkpoint and continues with the same numbers an uninterrupted run would produce.

Failures (docs/training.md, "Failure behaviour"):
  * SIGINT (Ctrl-C) and SIGTERM (docker stop, SLURM preemption, Kubernetes) take one path: the
    first sets a flag, the loop finishes the current step, writes a checkpoint and returns
    {"interrupted": True, "signal": n} (the CLI exits 128 + n: 130 / 143); a second one abandons
    the step at once (the previous checkpoint stays).
  * Divergence: a step whose loss or gradient norm is not finite, or the GRAD_NORM_PATIENCE-th
    consecutive step with a gradient norm (before clipping) above GRAD_NORM_LIMIT, raises Diverged
    before the optimizer applies it; so does a step after which a LoRA weight exceeds WEIGHT_LIMIT
    (or is not finite). Nothing is written then, so the last checkpoint (and adapter) stay as they were.
  * One process per run directory: the Trainer holds a `rundir.RunDir`, whose lock it takes before
    anything in the directory is read and keeps until train() ends (or close()); a second run,
    --resume or --overwrite of the same directory is refused in one line naming the holder.
  * Everything is validated before the run directory changes: the environment, the config of a
    resumed run (read from trainer_state.json before any tensor loads), the data and the model.
    --overwrite then moves the old run aside and deletes it only once the new run has written a
    checkpoint; it and --resume act only on a directory fourbit marked as its run (see rundir.py).

Where it runs is one object, `self.runtime` (`fourbit.train.distributed.Runtime`), the same code
path in one process and under torchrun (`distributed="ddp"|"fsdp"`, see docs/distributed.md): the
model is wrapped after add_lora (`parallel.wrap_model`; in one process it is only moved), each
global micro-batch is sharded by rows (one process: all of them), the loss is scaled with
`global_mean_loss` so the averaged gradient is that of the global token mean (one process: the
token mean), checkpoints are `checkpoint.save/load` (one format for every mode; collective, rank 0
writes), and only rank 0 writes metrics, the adapter, the plot and the summary.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import signal
import threading
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import Diverged, InvalidInput, UserError
from ..lora import save_adapter
from ..nf4.files import write_bytes
from . import checkpoint, distributed, rundir
from .config import TrainConfig
from .data import IGNORE, batch_at, encode_all
from .forward import answer_logits, layout_of
from .models import load_base
from .parallel import full_lora_weights, wrap_model
from .plot import plot_metrics
from .setup import build_optimizer, prepare_model, split_records, uses_autocast
from .task import exact_match

__all__ = ["Trainer", "train", "lr_at", "RunDirExists", "GRAD_NORM_LIMIT", "GRAD_NORM_PATIENCE", "WEIGHT_LIMIT"]

RunDirExists = rundir.RunDirExists

# Divergence: a healthy QLoRA run's gradient norm (before clipping) stays below ~10 (SmolLM2 on the
# date task: 0.3-4); 1e4 is far outside that, and three steps in a row rule out a single spike.
GRAD_NORM_LIMIT = 1e4
GRAD_NORM_PATIENCE = 3
# LoRA weights start at |A| <= 1/sqrt(in_features), B = 0, and stay below ~1 in healthy runs. A huge
# learning rate can saturate the model instead of producing NaN: with --lr 1e30 on the tiny test
# Llama the loss stays finite (10.8), the gradients go to exactly 0 and the weights sit at ~3e29.
WEIGHT_LIMIT = 1e4

def lr_at(step: int, config: TrainConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    if step < config.warmup:
        return config.lr * (step + 1) / (config.warmup + 1)
    if config.schedule == "constant":
        return config.lr
    progress = (step - config.warmup) / max(1, total_steps - config.warmup)  # in [0, 1)
    if config.schedule == "linear":
        return config.lr * (1.0 - progress)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Trainer:
    """Holds the model, data and optimizer of one run directory.

    `resume`: continue from `<output_dir>/checkpoint`. `overwrite`: replace an existing run (set
    aside by train(), deleted once this run has a checkpoint, restored if it fails before that).
    Without either, an output directory that already holds a run is refused. `before_load(trainer)`
    runs after these checks, before the data and the model load (`fourbit finetune` plans the run
    there and refuses one that will not fit on its GPU).

    The run directory stays locked from construction until train() returns or raises; a Trainer
    that is not trained releases it with close() (or when it is garbage-collected, or the process ends).
    """

    def __init__(self, config: TrainConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
                 before_load=None):
        if resume and overwrite:
            raise InvalidInput("--resume and --overwrite exclude each other", "pass one of them")
        config.check_environment()
        self.config = config
        self.run_dir = config.output_dir
        self.run = rundir.RunDir(config.output_dir)
        self.on_step = None  # optional callback(trainer, step) after each optimizer step (tests use it)
        self.runtime = distributed.setup(config.distributed, device=config.device)  # one process or a torchrun rank
        self.is_main = self.runtime.is_main  # only rank 0 writes files
        if config.batch_size % self.runtime.world_size:  # each global micro-batch is split by rows
            raise InvalidInput(
                f"--batch-size {config.batch_size} does not split evenly over {self.runtime.world_size} ranks",
                f"use a multiple of {self.runtime.world_size}",
            )
        self.progress = progress and self.is_main
        self.resume = resume
        self._big_norms = 0  # consecutive steps with a gradient norm above GRAD_NORM_LIMIT
        self.metrics: list[dict] = []
        self.overwrite = False  # whether train() replaces a run (decided by rank 0)
        self.planned: dict | None = None  # what before_load (fourbit.plan.gate) predicted; in summary.json
        try:
            self._open_run_dir(resume, overwrite)
            if before_load is not None:  # after every check, before anything loads: e.g. refuse a run that will not fit
                before_load(self)
            self._setup()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the run directory (train() does this itself when it ends)."""
        if self.is_main:
            self.run.release()

    @classmethod
    def around(cls, config: TrainConfig, model, tokenizer, runtime, *, eval_records=(), total_steps: int = 1) -> "Trainer":
        """A Trainer holding a model prepared elsewhere (`prepare_model`, `wrap_model`), with no run
        directory and no data: what `fourbit.plan` runs `step_on` and `evaluate` of without memory."""
        self = cls.__new__(cls)
        self.config, self.runtime, self.is_main, self.progress, self.on_step = config, runtime, runtime.is_main, False, None
        self.run_dir, self.run, self.resume, self.overwrite, self._big_norms = config.output_dir, None, False, False, 0
        self.metrics, self.step, self.total_steps, self.planned = [], 0, total_steps, None
        self.checkpointing = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())  # set by use_checkpointing
        self.share_prefix = runtime.world_size == 1 and not self.checkpointing  # as _setup decides
        self.device, self.autocast = runtime.device, uses_autocast(config, runtime.device)
        self.model, self.tokenizer, self.eval_records = model, tokenizer, list(eval_records)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(config, self.params)
        return self

    # ---- setup -------------------------------------------------------------------------------
    def _open_run_dir(self, resume: bool, overwrite: bool) -> None:
        """Lock the run directory and refuse what cannot work, before anything loads or changes (rank 0
        does it; every rank stops if it refused). --overwrite's replacement happens in train()."""
        refused: BaseException | None = None
        if self.is_main:
            try:
                self.run.lock()
                self.overwrite = self.run.check(resume=resume, overwrite=overwrite)
                if resume and os.path.isdir(self.checkpoint_dir):  # (else load() recovers an interrupted swap, then checks)
                    saved = rundir.read_json(os.path.join(self.checkpoint_dir, "trainer_state.json"))
                    self._check_same_config(saved.get("config", {}))
            except BaseException as err:
                refused = err
        if self.runtime.reduce(1.0 if refused else 0.0, op="max") > 0:
            if refused is not None:
                raise refused
            raise UserError(f"rank 0 refused the run directory {self.run_dir!r}", "see rank 0's error")

    def _check_same_config(self, saved: dict) -> None:
        """InvalidInput naming each field that differs; output_dir may (a run directory can move)."""
        wanted = self.config.to_dict()
        changed = sorted(k for k in set(wanted) | set(saved) if saved.get(k) != wanted.get(k) and k != "output_dir")
        if changed:
            listing = ", ".join(f"{k}: saved {saved.get(k)!r}, now {wanted.get(k)!r}" for k in changed[:6])
            raise InvalidInput(
                f"--resume with a different config (fields {changed}): {listing}",
                "resume with the original settings, or start a new run with --overwrite",
            )

    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.run_dir, checkpoint.CHECKPOINT)

    def _setup(self) -> None:
        c = self.config
        self.device = self.runtime.device
        self.autocast = uses_autocast(c, self.device)
        compute = torch.bfloat16 if self.autocast else torch.float32

        # the data first: a bad file fails in a second, not after the model has loaded
        train_records, self.eval_records = split_records(c)
        per_epoch = len(train_records) // c.batch_size
        if per_epoch == 0:
            raise InvalidInput(
                f"batch_size={c.batch_size} exceeds the {len(train_records)} training examples", "lower --batch-size or add data"
            )
        self.total_steps = c.steps or max(1, math.ceil(c.epochs * per_epoch / c.grad_accum))

        torch.manual_seed(c.seed)
        random.seed(c.seed)
        model, tokenizer, self.source = load_base(c.model, c.base_weights, compute_dtype=compute)
        self.tokenizer = tokenizer
        self.param_summary, self.checkpointing = prepare_model(model, c)
        self.model = model = wrap_model(model, self.runtime)  # DDP or FSDP2 under torchrun; moved to the device
        self.share_prefix = self.runtime.world_size == 1 and not self.checkpointing  # forward.answer_logits

        self.data = encode_all(tokenizer, train_records, c.max_length)
        encode_all(tokenizer, self.eval_records, c.max_length)  # the same limits and refusals as training records

        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(c, self.params)
        self.step = 0
        if self.resume:
            state = checkpoint.load(self.checkpoint_dir, model, self.optimizer)
            self._check_same_config(state["config"])  # checked before loading too, unless a swap was recovered
            self.step, self.metrics = state["step"], state["metrics"]
            if self.is_main:
                self._rewrite_metrics()
            self.runtime.barrier()

    # ---- bookkeeping -------------------------------------------------------------------------
    def _rewrite_metrics(self) -> None:
        write_bytes(os.path.join(self.run_dir, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in self.metrics).encode())

    def _log(self, row: dict) -> None:
        self.metrics.append(row)
        if self.is_main:
            rundir.append_line(os.path.join(self.run_dir, "metrics.jsonl"), json.dumps(row))

    def evaluate(self) -> float | None:
        if not self.eval_records:
            return None
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return exact_match(self.model, self.tokenizer, self.eval_records, device=self.device,
                               max_length=self.config.max_length, share_prefix=self.share_prefix)

    def save_checkpoint(self) -> str:
        """Collective: every rank gathers, rank 0 writes."""
        extra = {"config": self.config.to_dict(), "metrics": self.metrics, "source": self.source}
        path = checkpoint.save(self.checkpoint_dir, self.model, self.optimizer, step=self.step, extra=extra)
        if self.is_main:  # the new run can now be resumed: a run it replaces may go
            self.run.checkpointed()
        return path

    # ---- divergence --------------------------------------------------------------------------
    def _check_divergence(self, loss: float, grad_norm: float) -> None:
        """Diverged before the optimizer applies a step that wrecks the weights (module docstring).
        loss and grad_norm are global values, so every rank reaches the same verdict."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self._diverged(f"loss {loss}, gradient norm {grad_norm}")
        self._big_norms = self._big_norms + 1 if grad_norm > GRAD_NORM_LIMIT else 0
        if self._big_norms >= GRAD_NORM_PATIENCE:
            self._diverged(f"gradient norm {grad_norm:.3g} above {GRAD_NORM_LIMIT:g} for {GRAD_NORM_PATIENCE} steps in a row")

    def _check_weights(self) -> None:
        """Diverged if a LoRA weight left the healthy range (WEIGHT_LIMIT) in the step just taken."""
        local = [(p.to_local() if hasattr(p, "to_local") else p).detach() for p in self.params]  # FSDP: own shard
        top = torch.stack([t.abs().amax().float() if t.numel() else t.new_zeros((), dtype=torch.float32) for t in local]).max()
        top = float(self.runtime.reduce(top, op="max"))  # every rank must reach the same verdict
        if not (math.isfinite(top) and top <= WEIGHT_LIMIT):
            self._diverged(f"a LoRA weight reached magnitude {top:.3g} (limit {WEIGHT_LIMIT:g})")

    def _diverged(self, why: str):
        kept = (f"the checkpoint in {self.checkpoint_dir} is kept" if checkpoint.exists(self.checkpoint_dir)
                else "no checkpoint had been written")
        raise Diverged(
            f"training diverged at step {self.step + 1}: {why} (lr {lr_at(self.step, self.config, self.total_steps):.3g}); "
            f"{kept}, nothing of this step was saved",
            "lower --lr (or --alpha) and start again with --overwrite",
        )

    # ---- one step ----------------------------------------------------------------------------
    def train_step(self) -> dict:
        c, t0 = self.config, time.perf_counter()
        pad = self.tokenizer.pad_token_id
        batches = [batch_at(self.data, self.step * c.grad_accum + i, c.batch_size, c.seed, pad) for i in range(c.grad_accum)]
        return self.step_on(batches, t0)

    def step_on(self, batches: list[dict], t0: float | None = None, layouts: list | None = None) -> dict:
        """One optimizer step on these global micro-batches (train_step's; `fourbit.plan` traces it
        with its own, without memory). `layouts`: the `forward.AnswerLayout` of each of this rank's
        micro-batches; by default read from their values (the plan, whose tensors have none, passes them)."""
        c, t0 = self.config, time.perf_counter() if t0 is None else t0
        n_tokens = sum(int(b["attention_mask"].sum()) for b in batches)  # of the global batches
        batches = [self.runtime.shard(b) for b in batches]  # this rank's rows
        layouts = layouts or [layout_of(b) for b in batches]
        n_answer = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
        self.model.train()
        total = 0.0
        for b, layout in zip(batches, layouts):
            ids, mask, labels = (b[k].to(self.device) for k in ("input_ids", "attention_mask", "labels"))
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                logits, target = answer_logits(self.model, ids, mask, labels, layout, share_prefix=self.share_prefix)  # (B, P, V), (B, P)
            loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=IGNORE, reduction="sum")
            # scaled so the ranks' averaged gradients are those of the global token mean
            loss = self.runtime.global_mean_loss(loss_sum, n_answer)
            total += self.runtime.reduce(loss.item())
            loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, c.clip_norm if c.clip_norm > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor holding the global norm
            grad_norm = grad_norm.full_tensor()
        self._check_divergence(total, float(grad_norm))
        lr = lr_at(self.step, c, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._check_weights()
        self.step += 1
        seconds = time.perf_counter() - t0
        return {
            "step": self.step, "loss": total, "lr": lr, "grad_norm": float(grad_norm),
            "tokens": n_tokens, "tokens_per_s": n_tokens / seconds, "step_s": seconds,
            "peak_mem_mb": _peak_memory_mb(self.device),
        }

    # ---- the loop ----------------------------------------------------------------------------
    def train(self) -> dict:
        """Run to total_steps; returns the summary, or {"interrupted": True, "signal": n, ...}
        after SIGINT/SIGTERM. Raises Diverged (nothing written) and restores a run that --overwrite
        set aside if this one fails before its first checkpoint. Releases the run directory."""
        try:
            if self.is_main:
                self.run.begin(self.overwrite)
            self.runtime.barrier()
            return self._train()
        except BaseException:
            if self.is_main and self.run.failed():
                print(f"the run in {self.run_dir!r} that --overwrite was replacing is restored")
            raise
        finally:
            self.close()

    def _stopping(self, stop: list[int]) -> bool:
        """Whether any rank has been asked to stop: torchrun forwards a signal to every rank, but not
        at the same instant, and all ranks must stop after the same step (the checkpoint is collective)."""
        return self.runtime.reduce(1.0 if stop else 0.0, op="max") > 0

    def _train(self) -> dict:
        c = self.config
        stop: list[int] = []  # the signal that asked to stop, once one did

        def on_signal(signum, frame):  # SIGINT and SIGTERM alike
            if stop:  # the second one: abandon the step now (the last checkpoint stays)
                raise KeyboardInterrupt
            stop.append(signum)

        in_main_thread = threading.current_thread() is threading.main_thread()
        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if in_main_thread else {}
        try:
            if self.step == 0 and not any("exact_match" in r for r in self.metrics):
                before = self.evaluate()
                if before is not None:
                    self._log({"step": 0, "exact_match": before})
            bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.progress, desc="finetune")
            while self.step < self.total_steps and not self._stopping(stop):
                row = self.train_step()
                self._log(row)
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}", mem_mb=f"{row['peak_mem_mb']:.0f}")
                if c.eval_interval and self.step % c.eval_interval == 0 and self.step < self.total_steps:
                    self._log({"step": self.step, "exact_match": self.evaluate()})
                if c.checkpoint_interval and self.step % c.checkpoint_interval == 0:
                    self.save_checkpoint()
                if self.on_step is not None:
                    self.on_step(self, self.step)
            bar.close()
            if self.step < self.total_steps:  # stopped by a signal; still under the handler, so a
                signum = stop[0] if stop else signal.SIGTERM  # second one abandons the checkpoint write
                path = self.save_checkpoint()
                if self.is_main:
                    print(f"{signal.Signals(signum).name}: stopped after step {self.step}; checkpoint in {path}")
                return {"interrupted": True, "signal": int(signum), "step": self.step, "checkpoint": path}
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

        after = self.evaluate()
        if after is not None:
            self._log({"step": self.step, "exact_match": after})
        self.save_checkpoint()
        with full_lora_weights(self.model) as plain:  # collective under FSDP (gathers the LoRA tensors)
            if self.is_main:
                save_adapter(plain, os.path.join(self.run_dir, "adapter"), base_model_name_or_path=self.source)
        summary = self._summary()
        if self.is_main:
            method = "QLoRA" if c.base_weights == "nf4" else f"LoRA, {c.base_weights} base"
            plot_metrics(self.metrics, os.path.join(self.run_dir, "loss.png"), title=f"{os.path.basename(self.source)} {method} r={c.r}")
            rundir.write_json(os.path.join(self.run_dir, "summary.json"), summary)
        self.runtime.barrier()
        return summary

    def _summary(self) -> dict:
        c = self.config
        em = [r["exact_match"] for r in self.metrics if "exact_match" in r]
        steps = [r for r in self.metrics if "loss" in r]
        summary = {
            "interrupted": False, "step": self.step, "run_dir": self.run_dir,
            "exact_match_before": em[0] if em else None, "exact_match_after": em[-1] if em else None,
            "first_loss": steps[0]["loss"] if steps else None, "last_loss": steps[-1]["loss"] if steps else None,
            "params": self.param_summary, "grad_checkpointing": self.checkpointing, "config": c.to_dict(),
        }
        if self.planned is not None:
            measured = {"measured_peak_bytes": torch.cuda.max_memory_allocated(self.device), "measured_by": "torch.cuda.max_memory_allocated"} \
                if self.device.type == "cuda" else \
                {"measured_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                 "measured_by": "peak RSS of the process (a cross-check: it also holds Python, libraries and the dense load)"}
            summary["memory"] = {**self.planned, **measured}
        return summary


def train(config: TrainConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    """Run (or continue) a QLoRA fine-tune; returns the summary written to summary.json."""
    return Trainer(config, resume=resume, overwrite=overwrite, progress=progress).train()
