"""Linear4bit: a frozen linear layer whose weight lives in 4 bits (NF4 or FP4, bitsandbytes' format).

    y = x @ dequantize(W)^T + b          x: (..., K), W: (N, K) = (out, in), y: (..., N)

Storage (SPEC §2, §5). For an N x K weight with block size bs there are nb = ceil(N*K / bs) blocks:
    weight          ((N*K + 1)//2, 1) uint8       two 4-bit codes per byte (or a float `quant_storage`
                                                  view of the same bytes); an nn.Parameter with
                                                  requires_grad=False, so parameter counts see it
    quant_state     QuantState                    absmax (nb,) (uint8 codes with double quantization,
                                                  float32 otherwise), the code table, offset, nested
    bias            (N,)                          ordinary trainable-or-not parameter, any float dtype

The packed bytes and the QuantState belong together: replace them together (load_state_dict and
from_linear do). Swapping `weight` for another Parameter over the same bytes is allowed (FSDP2
does it through setattr when it shards and gathers the layer).

With double quantization that is 4 bits + 8/bs bits + 32/(256*bs) bits per weight: 4.127 bits for
bs = 64, i.e. 0.516 bytes per weight.

The forward casts x to `compute_dtype` (default: x's own dtype), runs `matmul_4bit` (which never
keeps a dense copy of W alive after the call) and casts the result back to x's dtype. The bias is
cast for the call only; bitsandbytes instead converts its bias Parameter in place, we do not.

What differs from `bitsandbytes.nn.Linear4bit` on purpose:
  * Nothing quantizes as a side effect of `.to()` / `.cuda()`: moving a layer moves the packed bytes
    and the QuantState tensors, bit for bit. Quantization happens in the constructor, in
    `from_linear`, or when a dense weight is loaded through `load_state_dict`.
  * `load_state_dict` of a 4-bit checkpoint replaces the packed bytes *and* the whole QuantState
    (bitsandbytes copies the bytes and keeps its old absmax, silently).
  * No forward ever rewrites the stored bytes (bitsandbytes repacks in place on AVX512-BF16 CPUs in
    eval mode; SPEC §6).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .. import dispatch
from ..nf4.checks import check_blocksize, check_quant_type
from ..nf4.state import QuantState
from .autograd import matmul_4bit

__all__ = ["Linear4bit"]

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


class Linear4bit(nn.Module):
    """A frozen 4-bit linear layer; see the module docstring for storage and forward.

    Build one from a dense layer with `Linear4bit.from_linear(linear, ...)`. The constructor makes a
    fresh layer initialised like `nn.Linear` (Kaiming-uniform weight) and quantizes it, which is what
    a checkpoint then overwrites through `load_state_dict`.
    """

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
        super().__init__()
        dense = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup(
            dense,
            quant_type=quant_type,
            double_quant=double_quant,
            blocksize=blocksize,
            compute_dtype=compute_dtype,
            quant_storage=quant_storage,
        )

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
        """Quantize `linear.weight` (N, K) into a new layer; the bias is shared, not copied.

        The new layer's QuantState remembers the weight's dtype: `dequantize()` returns that dtype.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._setup(
            linear,
            quant_type=quant_type,
            double_quant=double_quant,
            blocksize=blocksize,
            compute_dtype=compute_dtype,
            quant_storage=quant_storage,
        )
        return layer

    def _setup(self, dense: nn.Linear, *, quant_type, double_quant, blocksize, compute_dtype, quant_storage):
        check_quant_type(quant_type)
        check_blocksize(blocksize)
        if compute_dtype is not None and compute_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"compute_dtype must be None, torch.float32, torch.float16 or torch.bfloat16, got {compute_dtype}")
        self.in_features = dense.in_features
        self.out_features = dense.out_features
        self.quant_type = quant_type
        self.double_quant = bool(double_quant)
        self.blocksize = blocksize
        self.compute_dtype = compute_dtype
        self.quant_storage = quant_storage
        packed, state = dispatch.quantize(
            dense.weight.detach(),
            blocksize=blocksize,
            quant_type=quant_type,
            double_quant=double_quant,
            quant_storage=quant_storage,
        )
        self._set_quantized(packed, state)
        if dense.bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(dense.bias.data, requires_grad=dense.bias.requires_grad)

    def _set_quantized(self, packed: torch.Tensor, state: QuantState) -> None:
        """Install packed codes and their state, replacing both; the layer's config follows the state."""
        if tuple(state.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"quantized weight has shape {tuple(state.shape)} but this layer is "
                f"(out_features, in_features) = ({self.out_features}, {self.in_features})"
            )
        need = (state.numel + 1) // 2
        if packed.numel() * packed.element_size() != need:
            raise ValueError(f"packed weight holds {packed.numel() * packed.element_size()} bytes, shape {tuple(state.shape)} needs {need}")
        state = _share_tables(state)
        self._parameters["weight"] = self._packed_parameter(packed, state)
        self.quant_state = state
        self.quant_type = state.quant_type
        self.blocksize = state.blocksize
        self.double_quant = state.double_quant
        self.quant_storage = packed.dtype

    def _packed_parameter(self, packed: torch.Tensor, state: QuantState) -> nn.Parameter:
        """The frozen Parameter that holds the packed bytes (fourbit.nn wraps it in a Params4bit)."""
        return nn.Parameter(packed, requires_grad=False)

    # ---- compute -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features in its last dimension, this layer expects {self.in_features}")
        compute = self.compute_dtype or x.dtype
        bias = None if self.bias is None else self.bias.to(compute)
        y = matmul_4bit(x.to(compute), self.weight, self.quant_state, bias)  # (..., N)
        return y.to(x.dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense (N, K) weight, in `dtype` or the dtype that was quantized."""
        return dispatch.dequantize(self.weight.detach(), self.quant_state, dtype=dtype)

    def quantized_bytes(self) -> int:
        """Bytes held by the packed weight and every tensor of its QuantState (bias excluded)."""
        tensors = [self.weight, self.quant_state.code, *self.quant_state.as_tensors()]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={self.quant_type}, double_quant={self.double_quant}, blocksize={self.blocksize}, "
            f"compute_dtype={self.compute_dtype}"
        )

    # ---- devices: move bytes, never re-quantize ------------------------------------------------
    def _apply(self, fn, recurse=True):
        """Move/cast like nn.Module, except that the packed weight only ever changes device: dtype
        casts such as `model.half()` must not reinterpret a float `quant_storage` view of the codes."""
        weight = self._parameters.pop("weight")
        try:
            super()._apply(fn, recurse)
        finally:
            rest = dict(self._parameters)
            self._parameters.clear()
            self._parameters.update({"weight": weight, **rest})  # keep "weight" first, as nn.Linear
        target = fn(torch.empty(0, dtype=torch.uint8, device=weight.device)).device
        if target != weight.device:
            self._set_quantized(weight.data.to(target), self.quant_state.to(target))
        return self

    # ---- checkpoints in bitsandbytes' keys -----------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """weight, bias, then weight.absmax / quant_map / nested_* / quant_state.bitsandbytes__<type>."""
        destination[prefix + "weight"] = self.weight if keep_vars else self.weight.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
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
            try:
                self._load_weight(state_dict[wkey], {k: state_dict[k] for k in state_keys}, wkey)
            except (KeyError, ValueError, TypeError) as err:
                error_msgs.append(f"{wkey}: {err}")
        if self.bias is not None:
            if bkey not in state_dict:
                missing_keys.append(bkey)
            elif tuple(state_dict[bkey].shape) != (self.out_features,):
                error_msgs.append(f"{bkey}: expected shape ({self.out_features},), got {tuple(state_dict[bkey].shape)}")
            else:
                with torch.no_grad():
                    self.bias.copy_(state_dict[bkey])

    def _load_weight(self, weight: torch.Tensor, state_items: dict, wkey: str) -> None:
        device = self.weight.device
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
                weight.detach().to(device),
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
