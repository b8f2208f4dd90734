"""Linear4bit: a frozen linear layer whose weight lives in 4 bits (NF4 or FP4, bitsandbytes' format).

    y = x @ dequantize(W)^T + b          x: (..., K), W: (N, K) = (out, in), y: (..., N)

Storage (SPEC §2, §5). For an N x K weight with block size bs there are nb = ceil(N*K / bs) blocks:
    weight          Params4bit: ((N*K + 1)//2, 1) uint8, two 4-bit codes per byte (or a float
                                `quant_storage` view of the same bytes), requires_grad=False
    quant_state     QuantState  absmax (nb,) (uint8 codes with double quantization, float32
                                otherwise), the code table, offset, nested; also `weight.quant_state`
    bias            (N,)        ordinary trainable-or-not parameter, any float dtype

With double quantization that is 4 bits + 8/bs bits + 32/(256*bs) bits per weight: 4.127 bits for
bs = 64, i.e. 0.516 bytes per weight.

The layer is an `nn.Linear` subclass, as bitsandbytes' is, so code that looks for linear layers
with `isinstance(m, nn.Linear)` (PEFT's "all-linear", transformers, FSDP wrap policies) finds it.
Code that must tell it apart from a dense layer checks `isinstance(m, Linear4bit)` first.

Life cycle (bitsandbytes 0.50's, see params.py):
  * The constructor only allocates a dense weight like `nn.Linear` (nothing on "meta" or under
    `accelerate.init_empty_weights()`), and quantizes nothing: a random init is not worth the
    quantization. A 4096 x 4096 constructor now costs what nn.Linear's does (2-core CPU, medians
    of 5: 0.41 s, nn.Linear 0.38 s, bitsandbytes 0.36 s; 1.29 s when it quantized).
  * The dense weight is quantized, in place, by the first of: `.to(device)` / `.cuda()` / `.cpu()`
    with a real device; `load_state_dict` (a dense checkpoint is quantized with the layer's
    settings, a 4-bit one replaces bytes and QuantState together); the first forward.
  * `from_linear` quantizes at once (what `quantize_model` calls, layer by layer).
  * Under torch.compile a still-dense layer quantizes eagerly, outside the graph, on the first
    call; `fullgraph=True` needs a layer quantized before compiling.
  * Afterwards nothing quantizes as a side effect: `.to()` / `.cuda()` / `.half()` move the packed
    bytes and the QuantState bit for bit (dtype casts never touch a float `quant_storage` view).

The forward casts x to `compute_dtype` (default: x's own dtype), runs `matmul_4bit` (which never
keeps a dense copy of W alive after the call) and casts the result back to x's dtype. The bias is
cast for the call only (fourbit.nn's bitsandbytes-flavoured layer converts it in place, as
bitsandbytes does).

What differs from `bitsandbytes.nn.Linear4bit` on purpose:
  * `load_state_dict` of a 4-bit checkpoint replaces the packed bytes *and* the whole QuantState
    (bitsandbytes copies the bytes and keeps its old absmax, silently); a dense checkpoint is
    quantized at load, not at the next `.to()`.
  * A forward on a still-dense layer quantizes it (bitsandbytes fails an assertion there).
  * No forward ever rewrites the stored bytes (bitsandbytes repacks in place on AVX512-BF16 CPUs in
    eval mode; SPEC §6), and no `.to()` casts them.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .. import dispatch
from ..nf4.checks import check_blocksize, check_quant_type
from ..nf4.state import QuantState
from .autograd import matmul_4bit
from .params import Params4bit

__all__ = ["Linear4bit", "Params4bit"]

_BLOB = "quant_state.bitsandbytes__"
_SHARED_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _shared(table: torch.Tensor, kind: str) -> torch.Tensor:
    """One read-only copy per (table, device): a 16-entry code table plus a 256-entry nested map
    is 1088 bytes, which would cost 0.01 bytes/weight on a 576 x 192 layer if every layer kept its own."""
    key = (kind, table.device)
    cached = _SHARED_TABLES.get(key)
    if cached is not None and torch.equal(cached, table):
        return cached
    if cached is None:
        _SHARED_TABLES[key] = table
    return table


def _share_tables(state: QuantState) -> QuantState:
    """The same state with its code tables replaced by equal shared tensors (a new state object)."""
    nested = state.nested
    if nested is not None:
        nested = dataclasses.replace(nested, code=_shared(nested.code, nested.quant_type))
    return dataclasses.replace(state, code=_shared(state.code, state.quant_type), nested=nested)


@torch.compiler.disable
def _quantize_outside_graph(weight: Params4bit) -> None:
    """A first forward under torch.compile quantizes eagerly, outside the graph (its checks are
    data-dependent); with fullgraph=True that is an error: quantize before compiling."""
    weight._quantize(weight.device)


def _check_compute_dtype(compute_dtype) -> None:
    if compute_dtype is not None and compute_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"compute_dtype must be None, torch.float32, torch.float16 or torch.bfloat16, got {compute_dtype}")


class Linear4bit(nn.Linear):
    """A frozen 4-bit linear layer; see the module docstring for storage, life cycle and forward.

    `Linear4bit.from_linear(linear, ...)` quantizes a dense layer at once. The constructor builds a
    layer like `nn.Linear` (Kaiming-uniform dense weight, on `device`) that quantizes later, when
    it is moved, loaded or first called.
    """

    _params_class = Params4bit  # fourbit.nn's layers use its bitsandbytes-named subclass

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        quant_type: str = "nf4",
        double_quant: bool = True,
        blocksize: int = 64,
        compute_dtype: torch.dtype | None = None,
        quant_storage: torch.dtype = torch.uint8,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        check_quant_type(quant_type)
        check_blocksize(blocksize)
        _check_compute_dtype(compute_dtype)
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.compute_dtype = compute_dtype
        self.quant_state = None
        self._install_dense(self._params_class(
            self.weight.data,
            requires_grad=False,
            blocksize=blocksize,
            compress_statistics=double_quant,
            quant_type=quant_type,
            quant_storage=quant_storage,
            module=self,
        ))

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        quant_type: str = "nf4",
        double_quant: bool = True,
        blocksize: int = 64,
        compute_dtype: torch.dtype | None = None,
        quant_storage: torch.dtype = torch.uint8,
    ) -> "Linear4bit":
        """Quantize `linear.weight` (N, K) into a new layer now; the bias is shared, not copied.

        The new layer's QuantState remembers the weight's dtype: `dequantize()` returns that dtype.
        """
        if not isinstance(linear, nn.Linear) or isinstance(linear, Linear4bit):
            raise TypeError(f"from_linear needs a dense nn.Linear, got {type(linear).__name__}")
        check_quant_type(quant_type)
        check_blocksize(blocksize)
        _check_compute_dtype(compute_dtype)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.compute_dtype = compute_dtype
        layer.quant_state = None
        packed, state = dispatch.quantize(
            linear.weight.detach(),
            blocksize=blocksize,
            quant_type=quant_type,
            double_quant=double_quant,
            quant_storage=quant_storage,
        )
        layer._set_quantized(packed, state)
        if linear.bias is None:
            layer.register_parameter("bias", None)
        else:
            layer.bias = nn.Parameter(linear.bias.data, requires_grad=linear.bias.requires_grad)
        return layer

    # ---- installing a weight: dense (waiting) or packed with its state -------------------------
    def _as_own_param(self, param: Params4bit) -> Params4bit:
        """`param`, or the same tensor and attributes under this layer's Params4bit class."""
        if type(param) is self._params_class:
            return param
        attrs = {k: getattr(param, k) for k in ("quant_state", "blocksize", "compress_statistics", "quant_type", "quant_storage")}
        return self._params_class(param.data, False, module=self, bnb_quantized=param.bnb_quantized, **attrs)

    def _set_quantized(self, packed: torch.Tensor, state: QuantState) -> None:
        """Install packed codes and their state, replacing both."""
        self._install(self._params_class(packed, False, state, state.blocksize, state.nested is not None, state.quant_type, packed.dtype, self, True))

    def _install(self, param: Params4bit) -> None:
        """Make a quantized Params4bit the weight; the layer's config follows its state."""
        param = self._as_own_param(param)
        state = param.quant_state
        if tuple(state.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"quantized weight has shape {tuple(state.shape)} but this layer is "
                f"(out_features, in_features) = ({self.out_features}, {self.in_features})"
            )
        need = (state.numel + 1) // 2
        if param.numel() * param.element_size() != need:
            raise ValueError(f"packed weight holds {param.numel() * param.element_size()} bytes, shape {tuple(state.shape)} needs {need}")
        state = _share_tables(state)
        param.quant_state, param.module = state, self
        self._parameters["weight"] = param
        self.quant_state = state
        self.quant_type, self.blocksize, self.double_quant = state.quant_type, state.blocksize, state.double_quant
        self.quant_storage = param.dtype

    def _install_dense(self, param: Params4bit) -> None:
        """Make a dense Params4bit the weight (quantized later, with its own settings)."""
        if tuple(param.shape) != (self.out_features, self.in_features):
            raise ValueError(f"dense weight has shape {tuple(param.shape)}, this layer needs ({self.out_features}, {self.in_features})")
        param = self._as_own_param(param)
        param.module = self
        self._parameters["weight"] = param
        self.quant_state = None
        self.quant_type, self.blocksize = param.quant_type, param.blocksize
        self.double_quant, self.quant_storage = bool(param.compress_statistics), param.quant_storage

    @property
    def quant_state(self) -> QuantState | None:
        """The weight's QuantState (None while it is dense). When other code has swapped the weight
        for a plain Parameter over the same bytes (FSDP2 does), the state installed with them."""
        weight = self._parameters.get("weight")
        if isinstance(weight, Params4bit):
            return weight.quant_state
        return self.__dict__.get("_quant_state")

    @quant_state.setter
    def quant_state(self, state: QuantState | None) -> None:
        self.__dict__["_quant_state"] = state

    def _weight_quantized(self, param: Params4bit) -> None:
        """Called by a Params4bit that quantized itself in place (params.py)."""
        if self._parameters.get("weight") is param:
            self._install(param)

    def __setattr__(self, name, value):
        if name == "weight" and "quant_type" in self.__dict__:
            if isinstance(value, Params4bit):
                (self._install if value.bnb_quantized else self._install_dense)(value)
                return
            if isinstance(value, torch.Tensor) and value.is_floating_point() and tuple(value.shape) == (self.out_features, self.in_features):
                # a dense weight assigned as a plain tensor waits to be quantized with our settings
                self._install_dense(self._params_class(value.detach(), False, None, self.blocksize, self.double_quant,
                                                       self.quant_type, self.quant_storage, self, False))
                return
        super().__setattr__(name, value)  # anything else: e.g. FSDP2's Parameter over the packed bytes

    def _resolve(self) -> tuple[torch.Tensor, QuantState]:
        """(packed weight, its QuantState), quantizing a still-dense weight first. A Params4bit that
        other code wrote into `_parameters` directly (accelerate does) is adopted here."""
        weight = self.weight
        if isinstance(weight, Params4bit):
            if not weight.bnb_quantized:
                _quantize_outside_graph(weight)
                weight = self.weight
            if weight.quant_state is not self.__dict__.get("_quant_state"):
                self._install(weight)
                weight = self.weight
        elif self.quant_state is None:
            raise RuntimeError(f"{type(self).__name__}: weight is a {type(weight).__name__} and the layer has no QuantState for it")
        return weight, self.quant_state

    # ---- compute -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features in its last dimension, this layer expects {self.in_features}")
        if not x.is_floating_point():  # nn.Linear refuses it too; casting would truncate the result to integers
            raise TypeError(f"Linear4bit takes a floating-point input, got {x.dtype}")
        weight, state = self._resolve()
        compute = self.compute_dtype or x.dtype
        bias = None if self.bias is None else self.bias.to(compute)
        y = matmul_4bit(x.to(compute), weight, state, bias)  # (..., N)
        return y.to(x.dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense (N, K) weight, in `dtype` or the dtype that was quantized."""
        weight, state = self._resolve()
        return dispatch.dequantize(weight.detach(), state, dtype=dtype)

    def quantized_bytes(self) -> int:
        """Bytes held by the packed weight and every tensor of its QuantState (bias excluded)."""
        weight, state = self._resolve()
        tensors = [weight, state.code, *state.as_tensors()]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={self.quant_type}, double_quant={self.double_quant}, blocksize={self.blocksize}, "
            f"compute_dtype={self.compute_dtype}"
        )

    # ---- devices: a dense weight quantizes on its first real move, packed bytes only move ------
    def _apply(self, fn, recurse=True):
        """Move/cast like nn.Module for the bias and children. A dense weight goes through
        Params4bit.to (a real device quantizes it there). Packed bytes only ever change device:
        dtype casts such as `model.half()` must not reinterpret a float `quant_storage` view."""
        weight = self._parameters.pop("weight", None)
        try:
            super()._apply(fn, recurse)
        finally:
            rest = dict(self._parameters)
            self._parameters.clear()
            self._parameters.update({"weight": weight, **rest})  # keep "weight" first, as nn.Linear
        if isinstance(weight, Params4bit) and not weight.bnb_quantized:
            with torch.no_grad():
                applied = fn(weight)
            if applied is not weight:
                if not isinstance(applied, Params4bit):
                    attrs = {k: getattr(weight, k) for k in ("blocksize", "compress_statistics", "quant_type", "quant_storage")}
                    applied = self._params_class(applied.detach(), False, module=self, **attrs)
                (self._install if applied.bnb_quantized else self._install_dense)(applied)
            elif weight.bnb_quantized and weight.quant_state is not self.__dict__.get("_quant_state"):
                self._install(weight)
            return self
        if weight is None:
            return self
        state = weight.quant_state if isinstance(weight, Params4bit) else self.quant_state
        target = fn(torch.empty(0, dtype=torch.uint8, device=weight.device)).device
        if target != weight.device:
            self._set_quantized(weight.data.to(target), state.to(target))
        return self

    # ---- checkpoints in bitsandbytes' keys -----------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """weight, bias, then weight.absmax / quant_map / nested_* / quant_state.bitsandbytes__<type>
        (a still-dense weight is saved dense, as nn.Linear saves it)."""
        weight = self.weight
        destination[prefix + "weight"] = weight if keep_vars else weight.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        if isinstance(weight, Params4bit):
            if not weight.bnb_quantized:
                return
            if weight.quant_state is not self.__dict__.get("_quant_state"):
                self._install(weight)
        items = self.quant_state.to_dict(prefix=prefix + "weight.")
        # the code table is shared by all layers (see _shared); safetensors refuses tensors that
        # share memory, so each checkpoint entry gets its own 64-byte copy
        items[prefix + "weight.quant_map"] = items[prefix + "weight.quant_map"].clone()
        destination.update(items)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        """Accept either a 4-bit checkpoint (bitsandbytes / transformers / ours: packed weight plus
        its quant-state keys, which replace ours entirely) or a dense nn.Linear checkpoint (the
        weight is quantized with this layer's settings)."""
        wkey, bkey = prefix + "weight", prefix + "bias"
        state_keys = {k for k in state_dict if k.startswith(wkey + ".")}
        for key in state_dict:
            if key.startswith(prefix) and key not in (wkey, bkey) and key not in state_keys:
                unexpected_keys.append(key)
        if self.bias is None and bkey in state_dict:
            unexpected_keys.append(bkey)
        if wkey not in state_dict:
            missing_keys.append(wkey)
        else:
            # a dense checkpoint into a still-dense layer is cast to the layer's dtype first, as
            # nn.Linear's copy_ would (with assign=True nn.Linear takes the tensor as it is)
            weight = self.weight
            cast = None if local_metadata.get("assign_to_params_buffers") or getattr(weight, "bnb_quantized", True) else weight.dtype
            try:
                self._load_weight(state_dict[wkey], {k: state_dict[k] for k in state_keys}, wkey, cast)
            except (KeyError, ValueError, TypeError) as err:
                error_msgs.append(f"{wkey}: {err}")
        if self.bias is not None:
            if bkey not in state_dict:
                missing_keys.append(bkey)
            elif tuple(state_dict[bkey].shape) != (self.out_features,):
                error_msgs.append(f"{bkey}: expected shape ({self.out_features},), got {tuple(state_dict[bkey].shape)}")
            elif self.bias.is_meta:  # built on "meta": take the checkpoint's tensor (a copy)
                self.bias = nn.Parameter(state_dict[bkey].detach().clone(), requires_grad=self.bias.requires_grad)
            else:
                with torch.no_grad():
                    self.bias.copy_(state_dict[bkey])

    def _load_weight(self, weight: torch.Tensor, state_items: dict, wkey: str, cast: torch.dtype | None = None) -> None:
        device = self.weight.device
        if device.type == "meta":  # built on "meta": the weight lands where the checkpoint is
            device = weight.device
        if state_items:
            if not any(_BLOB in k for k in state_items):
                raise KeyError(f"has {sorted(state_items)} but no '{wkey}.{_BLOB}<nf4|fp4>' blob")
            # copies, so the layer never aliases the caller's checkpoint tensors
            copied = {k: v.detach().to(device, copy=True) for k, v in state_items.items()}
            state = QuantState.from_dict(copied, device=device)
            self._set_quantized(weight.detach().to(device, copy=True), state)
            return
        if weight.is_floating_point() and tuple(weight.shape) == (self.out_features, self.in_features):
            packed, state = dispatch.quantize(
                weight.detach().to(device, dtype=cast),
                blocksize=self.blocksize,
                quant_type=self.quant_type,
                double_quant=self.double_quant,
                quant_storage=self.quant_storage,
            )
            self._set_quantized(packed, state)
            return
        raise ValueError(
            f"got a {weight.dtype} tensor of shape {tuple(weight.shape)} without quant-state keys; expected "
            f"either a dense ({self.out_features}, {self.in_features}) float weight or a packed weight with "
            f"'{wkey}.absmax', '{wkey}.quant_map' and '{wkey}.{_BLOB}<type>'"
        )
