"""Params4bit: the weight Parameter of a Linear4bit, dense until it is quantized, then packed.

Two states, as in bitsandbytes 0.50 (whose `Params4bit` this follows attribute for attribute, so
code written against it — transformers, accelerate, FSDP — finds what it looks for):

    bnb_quantized=False   data is the dense (N, K) float weight; `blocksize`, `quant_type`,
                          `compress_statistics` (double quantization) and `quant_storage` say how
                          it will be quantized. `layer.weight.detach().copy_(w)` writes into it.
    bnb_quantized=True    data is the packed ((N*K+1)//2, 1) codes (uint8, or a float
                          `quant_storage` view of the same bytes) and `quant_state` describes them.

The switch happens in place (the same Parameter object) on the first `.to(device)` / `.cuda()` /
`.cpu()` with a real device (not "meta"): moving a dense weight means quantizing it there. After
that, `.to()` only moves bytes, never re-quantizes and never casts them (a `.to(float16)` of a
bfloat16 `quant_storage` would otherwise reinterpret the codes).

What code that walks a checkpoint's keys expects is there: `weight.absmax`, `.code`, `.quant_map`,
`.offset`, `.state2`, `.nested_absmax`, `.nested_blocksize`, `.nested_quant_map`, `.nested_dtype`,
`.nested_offset` read through to the QuantState (FSDP's state-dict traversal resolves the key
"weight.absmax" as getattr(weight, "absmax")), and `torch.chunk` / `torch.split` return Params4bit
pieces carrying the same attributes (FSDP2 shards parameters with them).

Pickling (torch.save of a whole layer, deepcopy) keeps the class; bitsandbytes' own comes back
from pickle as a plain Parameter with the attributes attached.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .. import dispatch
from ..nf4.checks import check_blocksize, check_quant_type
from ..nf4.state import QuantState

__all__ = ["Params4bit"]

_ATTRS = ("blocksize", "compress_statistics", "quant_type", "quant_state", "quant_storage", "bnb_quantized", "module")


def _read_through(name: str, get, *, nested: bool = False):
    """A property answering from the QuantState (from its nested state if `nested`), or
    AttributeError while there is none. A property, not __getattr__: torch.compile traces
    descriptors but breaks the graph on __getattr__ of a tensor subclass."""

    def prop(self):
        state = self.__dict__.get("quant_state")
        if state is not None and nested:
            state = state.nested
        if state is None:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
        return get(state)

    return property(prop)


def _rebuild(cls, data, requires_grad, attrs):
    param = cls(data, requires_grad)
    param.__dict__.update(attrs)
    return param


class Params4bit(nn.Parameter):
    """See the module docstring. fourbit's own default quant_type is "nf4" (fourbit.nn.Params4bit
    keeps bitsandbytes' "fp4")."""

    def __new__(
        cls,
        data: torch.Tensor | None = None,
        requires_grad: bool = False,
        quant_state: QuantState | None = None,
        blocksize: int | None = None,
        compress_statistics: bool = True,
        quant_type: str = "nf4",
        quant_storage: torch.dtype = torch.uint8,
        module: nn.Module | None = None,
        bnb_quantized: bool = False,
        **kwargs,
    ) -> "Params4bit":
        # extra keywords are accepted and ignored, as bitsandbytes does: accelerate and transformers
        # re-create parameters with `type(p)(data, **p.__dict__)`
        data = torch.empty(0) if data is None else data
        self = torch.Tensor._make_subclass(cls, data, requires_grad)
        self.blocksize = 64 if blocksize is None else blocksize
        self.compress_statistics = compress_statistics
        self.quant_type = quant_type
        self.quant_state = None if quant_state is None else cls._adopt_state(quant_state)
        self.quant_storage = quant_storage
        self.bnb_quantized = bnb_quantized
        self.module = module
        return self

    # ---- the QuantState class this parameter hands out (fourbit.nn uses bitsandbytes' names) ----
    @classmethod
    def _adopt_state(cls, state: QuantState) -> QuantState:
        return state

    @classmethod
    def _state_from_dict(cls, d: dict, device) -> QuantState:
        return QuantState.from_dict(d, device=device)

    # ---- read-through attributes (bitsandbytes' names; FSDP state-dict traversal) --------------
    absmax = _read_through("absmax", lambda s: s.absmax)
    code = _read_through("code", lambda s: s.code)
    quant_map = _read_through("quant_map", lambda s: s.code)
    offset = _read_through("offset", lambda s: s.offset)
    state2 = _read_through("state2", lambda s: s.nested)
    nested_absmax = _read_through("nested_absmax", lambda s: s.absmax, nested=True)
    nested_blocksize = _read_through("nested_blocksize", lambda s: s.blocksize, nested=True)
    nested_quant_map = _read_through("nested_quant_map", lambda s: s.code, nested=True)
    nested_dtype = _read_through("nested_dtype", lambda s: s.dtype, nested=True)
    nested_offset = _read_through("nested_offset", lambda s: s.offset)

    # ---- copies and pickling keep the class and every attribute ----------------------------------
    def _attrs(self) -> dict:
        return {k: self.__dict__.get(k) for k in _ATTRS}

    def __reduce_ex__(self, proto):
        return (_rebuild, (type(self), self.data, self.requires_grad, self._attrs()))

    def __copy__(self):
        return _rebuild(type(self), self.data, self.requires_grad, self._attrs())

    def __deepcopy__(self, memo):
        attrs = self._attrs()
        attrs["quant_state"] = copy.deepcopy(attrs["quant_state"], memo)
        # inside a deep copy of the layer, the copy's weight points at the copied layer
        attrs["module"] = memo.get(id(attrs["module"])) if attrs["module"] is not None else None
        new = _rebuild(type(self), self.data.clone(memory_format=torch.preserve_format), self.requires_grad, attrs)
        memo[id(self)] = new
        return new

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        result = super().__torch_function__(func, types, args, kwargs or {})
        if func not in (torch.chunk, torch.split, torch.Tensor.chunk, torch.Tensor.split):
            return result
        src = args[0]
        attrs = src._attrs()
        return tuple(_rebuild(cls, piece, src.requires_grad, attrs) for piece in result)

    # ---- quantization and moves ----------------------------------------------------------------
    @classmethod
    def from_prequantized(cls, data, quantized_stats, requires_grad=False, device="cuda", module=None, **kwargs) -> "Params4bit":
        """Wrap packed bytes and their serialized quant state (the `weight.*` checkpoint entries)."""
        state = cls._state_from_dict(quantized_stats, device)
        param = cls(data.to(device), requires_grad, state, state.blocksize, state.nested is not None,
                    state.quant_type, data.dtype, module, True)
        if module is not None:
            module._weight_quantized(param)
        return param

    def _quantize(self, device) -> "Params4bit":
        """Quantize the dense data onto `device`, in place; returns self."""
        if self.data.is_meta:
            raise ValueError(
                "this 4-bit weight is still on the meta device (built under init_empty_weights or "
                "device='meta'): load real weights first (load_state_dict, or assign a Params4bit)"
            )
        check_quant_type(self.quant_type)
        check_blocksize(self.blocksize)
        packed, state = dispatch.quantize(
            self.data.contiguous().to(device),
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            double_quant=self.compress_statistics,
            quant_storage=self.quant_storage,
        )
        self.requires_grad_(False)
        self.data = packed
        self.quant_state = self._adopt_state(state)
        self.bnb_quantized = True
        if self.module is not None:
            self.module._weight_quantized(self)
        return self

    def to(self, *args, **kwargs):
        """Dense: quantize in place onto a real device (bitsandbytes' behaviour), or move/cast while
        staying dense (device None or "meta"). Quantized: move bytes and state, nothing else."""
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if not self.bnb_quantized:
            if device is not None and device.type != "meta":
                return self._quantize(device)
            moved = super().to(device=device, dtype=dtype, non_blocking=non_blocking)
            return _rebuild(type(self), moved.data if isinstance(moved, nn.Parameter) else moved, self.requires_grad, self._attrs())
        if device is None or device == self.device:
            return self
        attrs = self._attrs()
        state = attrs["quant_state"]
        attrs["quant_state"] = None if state is None else self._adopt_state(state.to(device))
        return _rebuild(type(self), self.data.to(device, non_blocking=non_blocking), self.requires_grad, attrs)

    def cpu(self):
        return self.to("cpu")

    def cuda(self, device=None, non_blocking=False):
        return self.to("cuda" if device is None else device, non_blocking=non_blocking)
