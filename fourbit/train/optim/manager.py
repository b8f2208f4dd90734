"""Per-parameter optimizer settings, as bitsandbytes' `GlobalOptimManager` gives them.

    mng = fourbit.optim.GlobalOptimManager.get_instance()
    mng.register_parameters(model.parameters())          # positions, before .cuda() makes new tensors
    model.cuda()
    mng.override_config(model.fc1.weight, "optim_bits", 32)
    opt = fourbit.optim.Adam8bit(model.parameters())      # fc1.weight keeps float32 states

bitsandbytes 0.50 (optim/optimizer.py) resolves one config per parameter at every step: the group's
lr, betas, eps and weight_decay plus the optimizer's optim_bits, min_8bit_size, max_unorm and
skip_zeros, then the overrides registered for the parameter's position (group, index) at
`register_parameters` time, then those registered for the tensor object itself. `optim_bits` and
`min_8bit_size` are read when a parameter's states are created (its first step), the rest at every
step. `register_module_override(module, "weight", config)` is applied at the first step.

fourbit honours the same keys. Where bitsandbytes would carry a key without acting on it for
Adam/AdamW (alpha, t_alpha, t_beta3 are AdEMAMix's; anything else is a typo), or acts on one that
fourbit's AdamW does not implement (max_unorm > 0, skip_zeros=True), `resolve` raises instead of
training with a setting the user did not get. A fourbit optimizer also reads the overrides of
bitsandbytes' own manager when bitsandbytes is loaded, so code that mixes `bnb.optim.GlobalOptimManager`
with fourbit's optimizers (the `install()` route) is not silently ignored either.
"""

from __future__ import annotations

import sys

import torch

__all__ = ["GlobalOptimManager", "HONOURED", "apply_module_overrides", "overridden", "resolve", "validate"]

# keys a config may carry, with the values that leave fourbit's AdamW as it is (None: any value)
HONOURED = {"lr": None, "betas": None, "eps": None, "weight_decay": None, "optim_bits": None, "min_8bit_size": None}
_NEUTRAL = {"max_unorm": (0, 0.0), "skip_zeros": (False,), "alpha": (0, 0.0), "t_alpha": (None,), "t_beta3": (None,)}


class GlobalOptimManager:
    """One process-wide registry of per-parameter optimizer settings (bitsandbytes' API)."""

    _instance: GlobalOptimManager | None = None

    def __init__(self):
        raise RuntimeError("GlobalOptimManager is a singleton: call GlobalOptimManager.get_instance()")

    @classmethod
    def get_instance(cls) -> GlobalOptimManager:
        if cls._instance is None:
            cls._instance = cls.__new__(cls)
            cls._instance.initialize()
        return cls._instance

    def initialize(self) -> None:
        """Forget every override (bitsandbytes' tests call this between cases)."""
        self.pid2config: dict[int, dict] = {}  # id(tensor) -> config
        self.index2config: dict[tuple[int, int], dict] = {}  # (group, index) -> config
        self.module_weight_config_triple: list[tuple[torch.nn.Module, str, dict]] = []
        self.uses_config_override = False

    def register_parameters(self, params) -> None:
        """Remember the positions of already-overridden tensors, so an optimizer built later over
        copies of them (`model.cuda()`) finds the overrides by position."""
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for g, group in enumerate(groups):
            for i, p in enumerate(group["params"]):
                if id(p) in self.pid2config:
                    self.index2config[(g, i)] = self.pid2config[id(p)]

    def override_config(self, parameters, key=None, value=None, key_value_dict=None) -> None:
        """Override settings for one tensor or a list of them: `(p, "optim_bits", 8)` or
        `(p, key_value_dict={"lr": 1e-4, "betas": (0.9, 0.95)})`."""
        if key is not None and key_value_dict is not None:
            raise ValueError("override_config takes key and value, or key_value_dict, not both")
        if key is not None:
            if value is None:
                raise ValueError(f"override_config({key!r}) needs a value")
            key_value_dict = {key: value}
        if not key_value_dict:
            raise ValueError("override_config needs key and value, or a non-empty key_value_dict")
        _check_keys(key_value_dict, "override_config")
        self.uses_config_override = True
        for p in [parameters] if isinstance(parameters, torch.Tensor) else list(parameters):
            self.pid2config.setdefault(id(p), {}).update(key_value_dict)

    def register_module_override(self, module: torch.nn.Module, param_name: str, config: dict) -> None:
        """Override settings for `getattr(module, param_name)`, applied at an optimizer's first step."""
        _check_keys(config, "register_module_override")
        self.module_weight_config_triple.append((module, param_name, dict(config)))


def _check_keys(config: dict, where: str) -> None:
    unknown = sorted(set(config) - set(HONOURED) - set(_NEUTRAL))
    if unknown:
        raise ValueError(
            f"{where}: fourbit's Adam/AdamW have no setting {unknown}; they honour {sorted(HONOURED)}"
        )


def _managers() -> list:
    """fourbit's manager, and bitsandbytes' when bitsandbytes is loaded and has one."""
    out = [GlobalOptimManager.get_instance()]
    theirs = sys.modules.get("bitsandbytes.optim.optimizer")
    instance = getattr(getattr(theirs, "GlobalOptimManager", None), "_instance", None)
    if instance is not None and instance is not out[0]:
        out.append(instance)
    return out


def apply_module_overrides(param_groups: list[dict]) -> None:
    """bitsandbytes' `check_overrides`: module overrides become position and tensor overrides."""
    for mng in _managers():
        for module, name, config in getattr(mng, "module_weight_config_triple", ()):
            target = getattr(module, name, None)
            if not isinstance(target, torch.Tensor):
                raise ValueError(f"register_module_override: {type(module).__name__}.{name} is not a tensor")
            for g, group in enumerate(param_groups):
                for i, p in enumerate(group["params"]):
                    if p is target:
                        mng.pid2config[id(p)] = config
                        mng.index2config[(g, i)] = config


def overridden() -> bool:
    return any(mng.pid2config or mng.index2config for mng in _managers())


def resolve(base: dict, p: torch.Tensor, g: int, i: int) -> dict:
    """base (the group's and the optimizer's settings) updated with p's overrides, position first."""
    config = dict(base)
    for mng in _managers():
        config.update(mng.index2config.get((g, i), {}))
        config.update(mng.pid2config.get(id(p), {}))
    validate(config, f"a parameter of shape {tuple(p.shape)}")
    return config


def validate(config: dict, what: str) -> None:
    """ValueError for a key fourbit's AdamW would ignore, or a setting it does not implement."""
    _check_keys(config, f"the optimizer config of {what}")
    for key, neutral in _NEUTRAL.items():
        if key in config and config[key] not in neutral:
            raise ValueError(
                f"{key}={config[key]!r} is set for {what}; fourbit's Adam/AdamW do not implement it "
                f"(bitsandbytes' would use it): leave it at {neutral[0]!r}"
            )
    if config["optim_bits"] not in (8, 32):
        raise ValueError(f"optim_bits must be 8 or 32, got {config['optim_bits']!r} for {what}")
