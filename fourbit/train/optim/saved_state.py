"""The saved form of fourbit's AdamW states: `state_dict()` and `load_state_dict()` of every optimizer
in `adamw.py`.

The layout is bitsandbytes 0.50's (`Optimizer8bit.state_dict`), so checkpoints move both ways
between fourbit's and bitsandbytes' AdamW / AdamW8bit / PagedAdamW / PagedAdamW8bit / Adam*:

    {"state": {i: {"step": int, "nonfinite_skips": int,
                   "__bnb_optimizer_quant_state__": {"state1": m, "state2": v,       shaped like p
                                                     "absmax1", "absmax2",          8-bit: float32,
                                                     "qmap1", "qmap2"}}},           one per 256
     "param_groups": [...], "fourbit": {"format", "optim_bits", "min_8bit_size"}}

bitsandbytes nests the state tensors under that key so that FSDP's optimizer-state gathering, which
expects parameter-shaped tensors, leaves them alone; it ignores "fourbit" and "nonfinite_skips".
Tensors are whole and unpaged (paged and unpaged optimizers read each other's dicts). A dict
without the "fourbit" entry is read as bitsandbytes' (tensors nested or not). Loading validates
every entry against its parameter before changing anything, so a mismatched dict leaves the
optimizer as it was. The functions take the optimizer as `self`: they are its methods, kept in
their own module.
"""

from __future__ import annotations

import torch

from ...errors import BadFile
from ...nf4.adamw import QBLOCK
from .pager import StateLayout

__all__ = ["FORMAT", "WRAPPED", "export_state_dict", "import_state_dict"]

FORMAT = "fourbit-adamw"
WRAPPED = "__bnb_optimizer_quant_state__"  # bitsandbytes' key for the nested state tensors
# bitsandbytes' AdEMAMix knobs, present in every one of its param groups; neutral for AdamW
_BNB_GROUP_KEYS = {"alpha": (0, 0.0), "t_alpha": (None,), "t_beta3": (None,)}


def _export(self, p: torch.Tensor) -> dict:
    """The saved form of p's state: bitsandbytes' keys, whole (unpaged) tensors, fresh copies."""
    state = self.state[p]
    out = {"step": state["step"], "nonfinite_skips": state["nonfinite_skips"]}
    if self.paged:
        layout = StateLayout(state["bits"], self.page_bytes)
        parts: dict[str, list[torch.Tensor]] = {}
        for _, pid, at, count, _ in self._segments(p):
            for key, view in layout.views(self.pool.read(pid), at, count).items():
                parts.setdefault(key, []).append(view)
        tensors = {key: torch.cat(chunks) for key, chunks in parts.items()}
    else:
        tensors = {k: state[k].clone() for k in ("state1", "state2", "absmax1", "absmax2") if k in state}
    if tensors["state1"].numel() == p.numel():  # shaped like p, as bitsandbytes (a local shard stays flat)
        tensors["state1"], tensors["state2"] = tensors["state1"].view(p.shape), tensors["state2"].view(p.shape)
    if state["bits"] == 8:
        tensors["qmap1"], tensors["qmap2"] = (q.clone() for q in self._qmaps_on(p.device))
    out[WRAPPED] = tensors
    return out


def export_state_dict(self) -> dict:
    index: dict[int, int] = {}
    groups = []
    for group in self.param_groups:
        saved = {k: v for k, v in group.items() if k != "params"}
        saved["params"] = [index.setdefault(id(p), len(index)) for p in group["params"]]
        groups.append(saved)
    state = {
        index[id(p)]: _export(self, p) for group in self.param_groups for p in group["params"] if p in self.state
    }
    info = {"format": FORMAT, "optim_bits": self.optim_bits, "min_8bit_size": self.min_8bit_size}
    return {"state": state, "param_groups": groups, "fourbit": info}


def _unwrap(saved: dict) -> dict:
    """One parameter's saved entry with bitsandbytes' nested tensors brought up a level."""
    flat = {k: v for k, v in saved.items() if k != WRAPPED}
    flat.update(saved.get(WRAPPED, {}))
    return flat


def _check_saved(self, p: torch.Tensor, i: int, saved: dict, config: dict) -> int:
    """The state bits of a saved entry for parameter index i; ValueError if it cannot be p's state
    (config: p's settings, GlobalOptimManager overrides included)."""
    for key in ("step", "state1", "state2"):
        if key not in saved:
            raise ValueError(f"saved state of parameter {i} lacks {key!r}; it has {sorted(saved)}")
    s1, s2 = saved["state1"], saved["state2"]
    bits = 8 if s1.dtype == torch.uint8 else 32
    if bits != self._bits_for(p, config):
        raise ValueError(
            f"parameter {i} ({p.numel()} elements) needs {self._bits_for(p, config)}-bit states here, "
            f"the saved ones are {bits}-bit"
        )
    want_dtype = torch.uint8 if bits == 8 else torch.float32
    for name, t in (("state1", s1), ("state2", s2)):
        if t.dtype != want_dtype or t.numel() != p.numel():
            raise ValueError(
                f"saved {name} of parameter {i} is {t.dtype} with {t.numel()} elements; "
                f"the parameter has shape {tuple(p.shape)} ({p.numel()} elements), so {want_dtype} is needed"
            )
    if bits == 8:
        nb = -(-p.numel() // QBLOCK)
        for name in ("absmax1", "absmax2"):
            t = saved.get(name)
            if t is None or t.dtype != torch.float32 or t.numel() != nb:
                raise ValueError(f"saved {name} of parameter {i} must be float32 with {nb} blocks, got {t!r}")
        for name, qmap in zip(("qmap1", "qmap2"), self._qmaps_on(torch.device("cpu"))):
            t = saved.get(name)
            if t is not None and not torch.equal(t.detach().cpu(), qmap):
                raise ValueError(f"saved {name} of parameter {i} is not the {'signed' if name == 'qmap1' else 'unsigned'} dynamic map")
    return bits


def _import(self, p: torch.Tensor, saved: dict, config: dict) -> None:
    state = self.state[p] if p in self.state else self._init_state(p, config)
    state["step"] = int(saved["step"])
    state["nonfinite_skips"] = int(saved.get("nonfinite_skips", 0))
    if not self.paged:
        for key in ("state1", "state2", "absmax1", "absmax2"):
            if key in state:  # live tensors keep their shape (p's, as bitsandbytes')
                state[key].view(-1).copy_(saved[key].reshape(-1))
        return
    layout = StateLayout(state["bits"], self.page_bytes)
    for _, pid, at, count, start in self._segments(p):  # pages are shared: read, modify, write
        page = self.pool.read(pid)
        for key, view in layout.views(page, at, count).items():
            scale = 1 if key in ("state1", "state2") else QBLOCK
            view.copy_(saved[key].reshape(-1)[start // scale : start // scale + view.numel()])
        self.pool.write(pid, page)


def _check_format(self, state_dict) -> None:
    """ValueError unless state_dict is fourbit's AdamW dict or bitsandbytes' 0.50 layout."""
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
        keys = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
        raise ValueError(f"not a fourbit AdamW state dict (nor a bitsandbytes one); it has {keys}")
    info = state_dict.get("fourbit")
    if info is None:  # bitsandbytes': every saved entry holds state1/state2, nested or not
        for i, saved in state_dict["state"].items():
            if not isinstance(saved, dict) or "state1" not in _unwrap(saved):
                keys = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
                raise ValueError(
                    f"not a fourbit AdamW state dict (nor a bitsandbytes one): parameter {i} holds {keys}, "
                    "not state1/state2"
                )
        return
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ValueError(f"not a fourbit AdamW state dict: its 'fourbit' entry is {info!r}")
    if info["optim_bits"] != self.optim_bits:
        raise ValueError(
            f"the state dict comes from an AdamW with {info['optim_bits']}-bit states; this optimizer "
            f"({type(self).__name__}) keeps {self.optim_bits}-bit states"
        )


def _group_items(saved: dict) -> dict:
    """A saved param group's settings; bitsandbytes' AdEMAMix keys are dropped when neutral."""
    items = {}
    for key, value in saved.items():
        if key == "params":
            continue
        if key in _BNB_GROUP_KEYS:
            if value not in _BNB_GROUP_KEYS[key]:
                raise ValueError(f"the saved param group has {key}={value!r}: an AdEMAMix state, not AdamW")
            continue
        items[key] = value
    return items


def import_state_dict(self, state_dict: dict) -> None:
    missing = [k for k in ("state", "param_groups") if k not in state_dict]
    if missing:
        raise BadFile(
            f"the optimizer state dict has no {' or '.join(repr(k) for k in missing)} entry (it has {sorted(state_dict)})",
            "pass the dict optimizer.state_dict() returned, unmodified",
        )
    _check_format(self, state_dict)
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(self.param_groups):
        raise ValueError(
            f"the state dict has {len(saved_groups)} parameter groups, this optimizer {len(self.param_groups)}"
        )
    pairs = []
    for g, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"parameter group {g} has {len(group['params'])} parameters, the saved one {len(saved['params'])}"
            )
        pairs += [(p, i) for p, i in zip(group["params"], saved["params"])]
    saved_state = {i: _unwrap(saved) for i, saved in state_dict["state"].items()}
    group_items = [_group_items(saved) for saved in saved_groups]
    configs = {}
    for g, group in enumerate(self.param_groups):
        for j, p in enumerate(group["params"]):
            configs[id(p)] = self._config(group, p, g, j)
    for p, i in pairs:  # validate everything before changing anything
        if i in saved_state:
            _check_saved(self, p, i, saved_state[i], configs[id(p)])
    for p, i in pairs:
        if i in saved_state:
            _import(self, p, saved_state[i], configs[id(p)])
        elif p in self.state:
            del self.state[p]
    for group, items in zip(self.param_groups, group_items):
        group.update(items)
