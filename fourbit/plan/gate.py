"""What `fourbit finetune` does before it loads anything: plan its own run, and on a GPU refuse one
that will not fit, with the plan's verdict and the first change that fits (`--no-plan` skips it).

A planner that fails on a run (a bug: a user's mistake fails the run itself the same way) warns
and lets the run go on. The plan is kept on the Trainer (`trainer.planned`), which writes the predicted peak beside the
measured one into summary.json: on CUDA `torch.cuda.max_memory_allocated`, the quantity the plan
predicts; on the CPU the process's peak RSS, a cross-check only (it also holds Python, the libraries
and the dense model the loader reads before quantizing).
"""

from __future__ import annotations

import warnings

import torch.distributed as dist

from ..errors import Unavailable, UserError
from .gpus import format_bytes, local_target
from .planner import plan

__all__ = ["check_fits"]


def check_fits(trainer) -> None:
    """Plan `trainer.config` on this machine's device; Unavailable if a GPU run does not fit."""
    config, runtime = trainer.config, trainer.runtime
    if dist.is_initialized():  # a fake process group cannot stand beside torchrun's real one
        trainer.planned = {"skipped": "under torchrun: plan with `fourbit plan --distributed ... --world-size N` first"}
        return
    target = local_target("cuda" if runtime.device.type == "cuda" else "cpu")
    try:
        p = plan(config, target=target, suggest=False)
    except UserError:
        raise  # the run itself would fail the same way (a bad model path, data file, flag)
    except Exception as err:  # noqa: BLE001 -- a planner bug must not stop a run that may well fit
        warnings.warn(f"fourbit finetune: the memory plan failed ({type(err).__name__}: {err}); training without it "
                      "(please report this with the flags)", RuntimeWarning, stacklevel=2)
        trainer.planned = {"failed": f"{type(err).__name__}: {err}"}
        return
    if target.device == "cuda" and not p.fits:
        p = plan(config, target=target, suggest="first")
        fix = next((s for s in p.suggestions if s.fits), None)
        raise Unavailable(
            f"the run needs {format_bytes(p.peak)} at its peak ({p.where}) but {target.name} leaves "
            f"{format_bytes(target.usable)} usable; nothing was loaded",
            (f"{fix.change} (planned peak {format_bytes(fix.peak)})" if fix else "see `fourbit plan` with the same flags")
            + ", or --no-plan to try anyway",
        )
    trainer.planned = {"predicted_peak_bytes": p.peak, "where": p.where, "target": target.name,
                       "planned_in_s": round(p.seconds, 2)}
    if trainer.is_main:
        print(f"plan: peak {format_bytes(p.peak)} at {p.where} on {target.name} ({p.seconds:.1f} s to plan)")
