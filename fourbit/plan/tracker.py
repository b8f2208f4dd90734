"""LiveBytes: count the bytes of every live tensor storage while fake (or real) code runs.

A `TorchDispatchMode` sees every aten op below autograd: each tensor an op returns is looked up by
its storage; a storage not seen before is added (its `nbytes`, on its device) and gets a
`weakref.finalize` that subtracts it again when the storage dies. Views share a storage and count
once; a tensor that autograd saves for backward lives exactly as long as autograd keeps it, because
the storage dies only then. This is what a caching allocator's `allocated_bytes` counts, minus its
rounding, which `round_to` adds back (CUDA's allocator hands out multiples of 512 bytes).

Under `FakeTensorMode` nothing is allocated: the storages are fake and only their sizes exist, so
a 70B model's step is counted on a laptop. Data-dependent Python (an `.item()`, a `bool(t)`, a
`.tolist()`, `torch.equal`, also of meta tensors) cannot be answered without values: the mode answers
them itself with a neutral value (1, True), which takes the healthy branch of every check the training step makes
(finite gradients, a loss to log) and changes no tensor size.

Every byte carries a category (see CATEGORIES): the planner registers the model's tensors under
their roles before the step, allocations take the category the tracker is told is current
(`category(...)` context), tensors that autograd packs for backward move to "activations", and a
parameter's `.grad` to "gradients". Each time the live total reaches a new high the tracker keeps the
per-category sums and where the step was (`where`: phase and module), so the peak comes with its
breakdown.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["CATEGORIES", "LiveBytes", "Peak"]

CATEGORIES = {
    "base_4bit": "4-bit weights (codes, absmax, nested state)",
    "dense_weights": "dense weights kept (embeddings, norms, lm_head, buffers)",
    "lora": "LoRA parameters",
    "gradients": "gradients of the trained parameters",
    "optimizer": "optimizer states on the device",
    "optimizer_host": "optimizer states paged out to the host",
    "activations": "activations saved for backward",
    "logits_loss": "logits and loss",
    "workspace": "dequantize workspace",
    "transient": "other transient buffers",
    "data": "the batch",
}

_ops = torch.ops.aten
# answered without values: the healthy branch of every check (finite, non-empty, equal)
_DEVICE = torch.ops.prim.device.default
_NEUTRAL = {_ops._local_scalar_dense.default, _ops.equal.default, _ops.is_nonzero.default}


class Peak(dict):
    """Bytes per category at the moment of the peak, plus `.total` and `.where`."""

    total: int = 0
    where: str = ""


class LiveBytes(TorchDispatchMode):
    """Live storage bytes per device and category; see the module docstring.

    `device`: the device whose bytes form the peak (others are counted in `other`, e.g. the host
    copies of paged optimizer states while planning a GPU run). `round_to`: the allocator's
    granularity (512 on CUDA, 1 on CPU). `on_op`: optional hook(func, args, kwargs, mode) -> result
    or NotImplemented, for ops whose real implementation allocates what their fake one does not.
    """

    def __init__(self, device: torch.device, *, round_to: int = 1,
                 on_op: Callable | None = None):
        super().__init__()
        self.device = torch.device(device)
        self.round_to = round_to
        self.on_op = on_op
        self.sums = {c: 0 for c in CATEGORIES}
        self.other = 0  # bytes on other devices (the host, planning a GPU)
        self.other_peak = 0
        self.total = 0
        self.peak = Peak()
        self.phase_peaks: dict[str, Peak] = {}  # the highest point of each phase
        self._records: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # storage -> [bytes, category, on device]
        self._category = "transient"
        self._phase = "setup"
        self.module = ""
        self.phase_peaks["setup"] = Peak()

    # ---- what is current ---------------------------------------------------------------------
    @contextlib.contextmanager
    def category(self, name: str):
        """Allocations inside the block take category `name`."""
        previous, self._category = self._category, name
        try:
            yield
        finally:
            self._category = previous

    @property
    def current_category(self) -> str:
        return self._category

    @current_category.setter
    def current_category(self, name: str) -> None:
        self._category = name

    @property
    def phase(self) -> str:
        return self._phase

    @phase.setter
    def phase(self, name: str) -> None:
        """Enter phase `name`: what is live on entry counts toward its peak too."""
        self._phase = name
        if name not in self.phase_peaks or self.total > self.phase_peaks[name].total:
            self.phase_peaks[name] = self._peak_now()

    def reset_peaks(self) -> None:
        """Forget the peaks so far (the next one starts from what is live now)."""
        self.phase_peaks = {}
        self.peak = self._peak_now()
        self.phase = self._phase

    @property
    def where(self) -> str:
        return f"{self.phase}: {self.module}" if self.module else self.phase

    # ---- counting ----------------------------------------------------------------------------
    def _size(self, storage, device: torch.device) -> int:
        n = storage.nbytes()
        if n and self.round_to > 1 and device.type != "cpu":
            n = -(-n // self.round_to) * self.round_to
        return n

    def _same_device(self, device: torch.device) -> bool:
        return device.type == self.device.type and (self.device.index is None or device.index in (None, self.device.index))

    def add(self, tensor: torch.Tensor, category: str | None = None) -> None:
        """Count `tensor`'s storage once, under `category` (default: the current one); a storage
        already counted keeps its category (`move` changes it)."""
        storage = tensor.untyped_storage()
        record = self._records.get(storage)
        if record is not None:
            return
        device = tensor.device
        n = self._size(storage, device)
        on_device = self._same_device(device)
        record = [n, category or self._category, on_device]
        self._records[storage] = record
        weakref.finalize(storage, self._release, record)
        if on_device:
            self.sums[record[1]] += n
            self.total += n
            if self.total > self.peak.total:
                self.peak = self._peak_now()
            if self.total > self.phase_peaks[self._phase].total:
                self.phase_peaks[self._phase] = self._peak_now()
        else:
            self.other += n
            self.other_peak = max(self.other_peak, self.other)

    def add_all(self, tensors: Iterable[torch.Tensor], category: str) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self.add(t, category)

    def move(self, tensor: torch.Tensor, category: str) -> None:
        """Recount a storage already seen under another category (a packed activation, a .grad)."""
        record = self._records.get(tensor.untyped_storage())
        if record is None:
            self.add(tensor, category)
            return
        if record[2] and record[1] != category:
            self.sums[record[1]] -= record[0]
            self.sums[category] += record[0]
        record[1] = category

    def resized(self, storage, nbytes: int) -> None:
        """A counted storage changed size in place (FSDP2 frees and refills its unsharded parameters
        with `untyped_storage().resize_`, keeping the tensors that autograd saved)."""
        record = self._records.get(storage)
        if record is None:
            return
        device = self.device if record[2] else torch.device("cpu")
        new = -(-nbytes // self.round_to) * self.round_to if nbytes and self.round_to > 1 and device.type != "cpu" else nbytes
        delta, record[0] = new - record[0], new
        if record[2]:
            self.sums[record[1]] += delta
            self.total += delta
            if self.total > self.peak.total:
                self.peak = self._peak_now()
            if self.total > self.phase_peaks[self._phase].total:
                self.phase_peaks[self._phase] = self._peak_now()
        else:
            self.other += delta
            self.other_peak = max(self.other_peak, self.other)

    @contextlib.contextmanager
    def resizes(self):
        """Inside, `UntypedStorage.resize_` reports to this tracker (see `resized`); restored after."""
        original = torch.UntypedStorage.resize_
        tracker = self

        def resize_(storage, size):
            out = original(storage, size)
            tracker.resized(storage, int(size))
            return out

        torch.UntypedStorage.resize_ = resize_
        try:
            yield
        finally:
            torch.UntypedStorage.resize_ = original

    def category_of(self, tensor: torch.Tensor) -> str | None:
        record = self._records.get(tensor.untyped_storage())
        return None if record is None else record[1]

    def _release(self, record: list) -> None:
        n, category, on_device = record
        if on_device:
            self.sums[category] -= n
            self.total -= n
        else:
            self.other -= n

    def _peak_now(self) -> Peak:
        peak = Peak({c: v for c, v in self.sums.items() if v})
        peak.total, peak.where = self.total, self.where
        return peak

    # ---- the mode ----------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _DEVICE:  # asked for every fake tensor's device by C++: the hottest op, no bytes
            return func(*args)
        kwargs = kwargs or {}
        if func in _NEUTRAL:
            if func is not _ops._local_scalar_dense.default or args[0].dtype == torch.bool:
                return True
            return 1.0 if args[0].is_floating_point() else 1
        if func is _ops._to_copy.default and args[0].is_meta and kwargs.get("device", "meta") != torch.device("meta"):
            # a meta tensor read on the host (`.tolist()` of a check): ones, the same neutral answer
            return torch.ones(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
        out = NotImplemented if self.on_op is None else self.on_op(func, args, kwargs, self)
        if out is NotImplemented:
            out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.add(t)
        return out
