"""AdamW with 32-bit or 8-bit states, optionally paged: drop-in for bitsandbytes' optimizers.

    opt = PagedAdamW(model.parameters(), lr=2e-4, device_budget_bytes=64 << 20)
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)

| class           | states                                  | paged | bitsandbytes equivalent   |
|-----------------|-----------------------------------------|-------|---------------------------|
| AdamW           | float32 m, v (optim_bits=8: as AdamW8bit)| no    | bnb.optim.AdamW           |
| AdamW8bit       | uint8 m, v + absmax per 256 elements    | no    | bnb.optim.AdamW8bit       |
| PagedAdamW      | float32                                 | yes   | bnb.optim.PagedAdamW      |
| PagedAdamW8bit  | uint8                                   | yes   | bnb.optim.PagedAdamW8bit  |

Defaults follow bitsandbytes: lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, and in
8-bit optimizers tensors with fewer than `min_8bit_size` = 4096 elements keep float32 states.
The maths is in `fourbit/nf4/adamw.py` (the reference); on CUDA each step runs as one fused Triton
launch per state segment (`fourbit/kernels/adamw.py`, bit-identical); `fourbit.dispatch` picks. The
paging is in `pager.py`, the saved form (`state_dict`) in `saved_state.py`. Paged and unpaged optimizers give the same bits: the pager only decides where the
states live.

Choices where bitsandbytes gives none or differs:
* A gradient with a NaN or an infinity skips that parameter's step entirely (parameter, states and
  step count unchanged), counts it in `nonfinite_skips` and warns; `nonfinite="raise"` raises.
  bitsandbytes' 32-bit step lets the NaN into the states; its CUDA 8-bit step zeroes the states of
  the non-finite elements. Skipping keeps a single bad batch from erasing what the states learnt.
* Sparse gradients raise (AdamW's states are dense).
* Live states (`optimizer.state[p]`) have bitsandbytes' layout when unpaged: "state1"/"state2"
  shaped like p, float32, or uint8 with "qmap1"/"qmap2" and "absmax1"/"absmax2", so code that reads
  or edits moments works unchanged. Paged optimizers hold an "offset" into their pages instead: a
  page carries the states of several parameters and moves between a device slot and a host buffer,
  so a tensor in `state[p]` would go stale at the next eviction (bitsandbytes keeps one address by
  allocating CUDA unified memory, and on CPU does not page at all); `state_dict()` gives them whole.
* `GlobalOptimManager` overrides (optim_bits, min_8bit_size, lr, betas, eps, weight_decay) and
  bitsandbytes' `args` object are honoured; a setting fourbit does not implement raises (manager.py).
* `state_dict()` (saved_state.py) has bitsandbytes 0.50's layout (its key names, tensors shaped like
  the parameter under "__bnb_optimizer_quant_state__") plus a "fourbit" entry naming the state
  format, so checkpoints move both ways between fourbit's and bitsandbytes' optimizers;
  `load_state_dict` refuses a dict from another optimizer (torch's), with other state bits, or
  with other shapes. Paged and unpaged dicts are interchangeable.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ... import dispatch
from ...errors import InvalidInput
from ...nf4 import dynamic_map
from ...nf4.adamw import QBLOCK
from . import manager, saved_state
from .pager import DEFAULT_PAGE_BYTES, PagePool, PagerStats, StateLayout

__all__ = ["AdamW", "AdamW8bit", "PagedAdamW", "PagedAdamW8bit"]

_NONFINITE = ("skip", "raise")
_DEVICE_HEADROOM = 0.9  # default budget: this share of the device memory free at the first step


_STATE_KEYS = ("state1", "state2", "absmax1", "absmax2", "qmap1", "qmap2")


class _AdamWBase(torch.optim.Optimizer):
    """Shared machinery. `optim_bits` picks the state format, `paged` where the states live."""

    def __init__(
        self,
        params,
        *,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        amsgrad: bool,
        optim_bits: int,
        args: Any,
        min_8bit_size: int,
        paged: bool,
        device_budget_bytes: int | None,
        page_bytes: int,
        nonfinite: str,
    ):
        if not 0.0 <= lr:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if amsgrad:
            raise ValueError("amsgrad=True is not supported (bitsandbytes ignores or rejects it too)")
        if args is not None:  # bitsandbytes' `args` object replaces these keywords (optimizer.py)
            optim_bits, min_8bit_size = args.optim_bits, args.min_8bit_size
        if nonfinite not in _NONFINITE:
            raise ValueError(f"nonfinite must be one of {list(_NONFINITE)}, got {nonfinite!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.optim_bits = optim_bits
        self.min_8bit_size = min_8bit_size
        extra = {k: getattr(args, k) for k in ("max_unorm", "skip_zeros") if hasattr(args, k)}
        self._base = dict(optim_bits=optim_bits, min_8bit_size=min_8bit_size, **extra)
        manager.validate(dict(self._base, **defaults), "this optimizer's args")
        self._overrides_applied = False
        self.paged = paged
        self.nonfinite = nonfinite
        self.nonfinite_skips = 0
        if paged:  # bad budgets and page sizes fail here, not at the first step
            PagePool.check_budget(device_budget_bytes, page_bytes)
            StateLayout(32, page_bytes)
        self.device_budget_bytes = device_budget_bytes
        self.page_bytes = page_bytes
        self.pool: PagePool | None = None
        self._sweeps = 0  # paged steps taken; odd sweeps walk the pages backwards (see pager.py)
        self._spaces: dict[int, dict] = {}  # state bits -> {"pages": [page ids], "size": elements used}
        self._qmaps: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- state ---------------------------------------------------------------------------------
    @property
    def pager_stats(self) -> PagerStats | None:
        return None if self.pool is None else self.pool.stats

    def _qmaps_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._qmaps:
            self._qmaps[device] = (dynamic_map(signed=True).to(device), dynamic_map(signed=False).to(device))
        return self._qmaps[device]

    def _config(self, group: dict, p: torch.Tensor, g: int, i: int, overridden: bool = True) -> dict:
        """p's settings: the group's and the optimizer's, then GlobalOptimManager overrides (manager.py)."""
        base = dict(self._base, lr=group["lr"], betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"])
        return manager.resolve(base, p, g, i) if overridden else base

    @staticmethod
    def _bits_for(p: torch.Tensor, config: dict) -> int:
        return 8 if config["optim_bits"] == 8 and p.numel() >= config["min_8bit_size"] else 32

    def _pool_for(self, device: torch.device) -> PagePool:
        if self.pool is None:  # a default CUDA budget is measured at the first step (see step())
            self.pool = PagePool(device, self.device_budget_bytes, self.page_bytes)
        elif self.pool.device != device:
            raise ValueError(f"a paged optimizer keeps one device; got parameters on {self.pool.device} and {device}")
        return self.pool

    def _init_state(self, p: torch.Tensor, config: dict) -> dict:
        """bitsandbytes' live layout when unpaged: state1/state2 shaped like p (float32, or uint8 with
        qmap1/qmap2 and one float32 absmax1/absmax2 per 256 elements). Paged: an offset into pages."""
        state = self.state[p]
        bits = self._bits_for(p, config)
        state.update(step=0, bits=bits, nonfinite_skips=0)
        n = p.numel()
        if self.paged:  # the next 256-aligned range of the state space, pages added as needed
            pool = self._pool_for(p.device)
            space = self._spaces.setdefault(bits, {"pages": [], "size": 0})
            state["offset"] = space["size"]
            space["size"] += -(-n // QBLOCK) * QBLOCK
            chunk = StateLayout(bits, self.page_bytes).chunk
            while len(space["pages"]) * chunk < space["size"]:
                space["pages"].append(pool.new_page())
        elif bits == 32:
            state["state1"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            state["state2"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        else:
            nb = -(-n // QBLOCK)
            state["state1"] = torch.zeros(p.shape, dtype=torch.uint8, device=p.device)
            state["state2"] = torch.zeros(p.shape, dtype=torch.uint8, device=p.device)
            state["qmap1"], state["qmap2"] = self._qmaps_on(p.device)
            state["absmax1"] = torch.zeros(nb, dtype=torch.float32, device=p.device)
            state["absmax2"] = torch.zeros(nb, dtype=torch.float32, device=p.device)
        return state

    def _segments(self, p: torch.Tensor) -> list[tuple[int, int, int, int, int]]:
        """(page index, page id, first element in the page, count, first element in p) covering p."""
        state = self.state[p]
        chunk = StateLayout(state["bits"], self.page_bytes).chunk
        pages = self._spaces[state["bits"]]["pages"]
        begin, end = state["offset"], state["offset"] + p.numel()
        out = []
        for k in range(begin // chunk, -(-end // chunk)):
            lo, hi = max(begin, k * chunk), min(end, (k + 1) * chunk)
            out.append((k, pages[k], lo - k * chunk, hi - lo, lo - begin))
        return out

    # -- the step ------------------------------------------------------------------------------
    def _update_group(self, items: list[tuple[torch.Tensor, torch.Tensor, dict]], hyper: dict) -> None:
        """Step every (p_flat, g_flat, state views) in `items` with the same hyperparameters: one kernel
        call per kind of state and pair of maps (420 LoRA tensors: one call, not 420)."""
        groups: dict[tuple, list] = {}
        for p_flat, g_flat, views in items:
            if "absmax1" in views:
                qmap1, qmap2 = views.get("qmap1"), views.get("qmap2")
                if qmap1 is None:  # paged: the maps are the optimizer's
                    qmap1, qmap2 = self._qmaps_on(p_flat.device)
                key = (8, p_flat.device, qmap1.data_ptr(), qmap2.data_ptr())
                groups.setdefault(key, [qmap1, qmap2, []])[2].append((p_flat, g_flat, views))
            else:
                groups.setdefault((32, p_flat.device), [None, None, []])[2].append((p_flat, g_flat, views))
        for key, (qmap1, qmap2, members) in groups.items():
            ps, gs = [m[0] for m in members], [m[1] for m in members]
            views = [m[2] for m in members]
            if key[0] == 8:
                dispatch.adamw_update_8bit_many(ps, gs, *([v[k] for v in views] for k in ("state1", "state2", "absmax1", "absmax2")),
                                                qmap1, qmap2, **hyper)
            else:
                dispatch.adamw_update_32bit_many(ps, gs, [v["state1"] for v in views], [v["state2"] for v in views], **hyper)

    def _ready_params(self) -> list[tuple[dict, torch.Tensor]]:
        """(config, p) for every parameter to update now; initialises states, skips non-finite grads."""
        if not self._overrides_applied:
            manager.apply_module_overrides(self.param_groups)
            self._overrides_applied = True
        candidates = []
        overridden = manager.overridden()
        for g, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW does not support sparse gradients; use torch.optim.SparseAdam")
                if p.is_meta or p.grad.is_meta:
                    raise InvalidInput(
                        f"a parameter of shape {tuple(p.shape)} is on the meta device (no data) and cannot be updated",
                        "load the real weights first (to_empty() + load_state_dict, or from_pretrained without meta init)",
                    )
                if p.grad.shape != p.shape:
                    raise RuntimeError(f"gradient shape {tuple(p.grad.shape)} differs from parameter {tuple(p.shape)}")
                candidates.append((self._config(group, p, g, i, overridden), p))
        # one call for all the gradients, before any parameter steps
        finite = [not bad for bad in dispatch.any_nonfinite([p.grad for _, p in candidates])]
        ready = []
        for (config, p), ok in zip(candidates, finite):
            state = self.state[p] if p in self.state else self._init_state(p, config)
            if not ok:
                if self.nonfinite == "raise":
                    raise FloatingPointError(f"non-finite gradient for a parameter of shape {tuple(p.shape)}")
                state["nonfinite_skips"] += 1
                self.nonfinite_skips += 1
                warnings.warn(
                    f"skipped the AdamW step of a parameter of shape {tuple(p.shape)}: its gradient has NaN or "
                    f"inf ({self.nonfinite_skips} skips so far; nonfinite='raise' makes this an error)",
                    RuntimeWarning,
                    stacklevel=3,
                )
                continue
            if not p.is_contiguous():
                p.data = p.data.contiguous()
            state["step"] += 1
            ready.append((config, p))
        return ready

    @staticmethod
    def _hyper(config: dict, step: int) -> dict:
        beta1, beta2 = config["betas"]
        return dict(
            lr=config["lr"], beta1=beta1, beta2=beta2, eps=config["eps"], weight_decay=config["weight_decay"], step=step
        )

    @staticmethod
    def _flat(state: dict, key: str) -> torch.Tensor:
        """A flat view of a live state tensor (made contiguous in place if code replaced it)."""
        if not state[key].is_contiguous():
            state[key] = state[key].contiguous()
        return state[key].view(-1)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        ready = self._ready_params()
        pool = self.pool
        if self.paged and self.device_budget_bytes is None and pool is not None and pool.device.type == "cuda":
            # "What fits after the model": measured now, with the weights, gradients and the
            # allocator's cached activation blocks in place, not when the optimizer was built.
            free, _ = torch.cuda.mem_get_info(self.pool.device)
            self.device_budget_bytes = max(int(free * _DEVICE_HEADROOM), self.page_bytes)
            self.pool.set_budget(self.device_budget_bytes)
        if not self.paged:
            by_hyper: dict[tuple, list] = {}
            for config, p in ready:
                state = self.state[p]
                views = {k: self._flat(state, k) for k in _STATE_KEYS if k in state}
                hyper = self._hyper(config, state["step"])
                by_hyper.setdefault(tuple(hyper.values()), [hyper, []])[1].append((p.view(-1), p.grad.reshape(-1), views))
            for hyper, items in by_hyper.values():
                self._update_group(items, hyper)
            return loss
        # Paged: one work item per segment, grouped by page, prefetching the next page while the
        # current one updates.
        work = []  # (state bits, page index, page id, first element in page, count, config, p, first element in p)
        for config, p in ready:
            bits = self.state[p]["bits"]
            work += [(bits, k, pid, at, count, config, p, start) for k, pid, at, count, start in self._segments(p)]
        work.sort(key=lambda item: item[:2] + (item[3],))
        if self._sweeps % 2 == 1:
            work.reverse()
        self._sweeps += 1
        i = 0
        while i < len(work):  # a run of segments on one page: one acquire, one kernel call per hyperparameters
            j = i
            while j < len(work) and work[j][:3] == work[i][:3]:
                j += 1
            bits, _, pid = work[i][:3]
            slot = self.pool.acquire(pid)
            if j < len(work):
                self.pool.prefetch(work[j][2])
            layout = StateLayout(bits, self.page_bytes)
            by_hyper: dict[tuple, list] = {}
            for _, _, _, at, count, config, p, start in work[i:j]:
                hyper = self._hyper(config, self.state[p]["step"])
                item = (p.view(-1)[start : start + count], p.grad.reshape(-1)[start : start + count],
                        layout.views(slot, at, count))
                by_hyper.setdefault(tuple(hyper.values()), [hyper, []])[1].append(item)
            for hyper, items in by_hyper.values():
                self._update_group(items, hyper)
            self.pool.release(pid)
            i = j
        return loss

    # -- saving and loading (fourbit/train/optim/saved_state.py) -------------------------------
    def state_dict(self) -> dict:
        return saved_state.export_state_dict(self)

    def load_state_dict(self, state_dict: dict) -> None:
        saved_state.import_state_dict(self, state_dict)


def _common(lr, betas, eps, weight_decay, amsgrad, args, min_8bit_size, device_budget_bytes, page_bytes, nonfinite):
    return dict(
        lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, args=args,
        min_8bit_size=min_8bit_size, device_budget_bytes=device_budget_bytes, page_bytes=page_bytes,
        nonfinite=nonfinite,
    )


class AdamW(_AdamWBase):
    """AdamW with float32 states (optim_bits=8: 8-bit states, like bnb.optim.AdamW)."""

    def __init__(
        self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, optim_bits=32,
        args=None, min_8bit_size=4096, is_paged=False, *, device_budget_bytes=None, page_bytes=DEFAULT_PAGE_BYTES,
        nonfinite="skip",
    ):
        common = _common(
            lr, betas, eps, weight_decay, amsgrad, args, min_8bit_size, device_budget_bytes, page_bytes, nonfinite
        )
        super().__init__(params, optim_bits=optim_bits, paged=is_paged, **common)


class AdamW8bit(_AdamWBase):
    """AdamW with 8-bit blockwise states (tensors below min_8bit_size elements keep float32 states)."""

    def __init__(
        self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, optim_bits=32,
        args=None, min_8bit_size=4096, is_paged=False, *, device_budget_bytes=None, page_bytes=DEFAULT_PAGE_BYTES,
        nonfinite="skip",
    ):
        if optim_bits != 32:  # bitsandbytes' signature keeps optim_bits=32 as a placeholder here
            raise ValueError(f"AdamW8bit always keeps 8-bit states; leave optim_bits at 32, got {optim_bits}")
        common = _common(
            lr, betas, eps, weight_decay, amsgrad, args, min_8bit_size, device_budget_bytes, page_bytes, nonfinite
        )
        super().__init__(params, optim_bits=8, paged=is_paged, **common)


class PagedAdamW(_AdamWBase):
    """AdamW with float32 states in pages, at most `device_budget_bytes` of them on the device.

    device_budget_bytes=None: 90 % of the device memory free at the first step (CUDA), no limit on CPU.
    """

    def __init__(
        self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, optim_bits=32,
        args=None, min_8bit_size=4096, *, device_budget_bytes=None, page_bytes=DEFAULT_PAGE_BYTES, nonfinite="skip",
    ):
        common = _common(
            lr, betas, eps, weight_decay, amsgrad, args, min_8bit_size, device_budget_bytes, page_bytes, nonfinite
        )
        super().__init__(params, optim_bits=optim_bits, paged=True, **common)


class PagedAdamW8bit(_AdamWBase):
    """AdamW with 8-bit states in pages (see PagedAdamW for the budget)."""

    def __init__(
        self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, optim_bits=32,
        args=None, min_8bit_size=4096, *, device_budget_bytes=None, page_bytes=DEFAULT_PAGE_BYTES, nonfinite="skip",
    ):
        if optim_bits != 32:
            raise ValueError(f"PagedAdamW8bit always keeps 8-bit states; leave optim_bits at 32, got {optim_bits}")
        common = _common(
            lr, betas, eps, weight_decay, amsgrad, args, min_8bit_size, device_budget_bytes, page_bytes, nonfinite
        )
        super().__init__(params, optim_bits=8, paged=True, **common)
