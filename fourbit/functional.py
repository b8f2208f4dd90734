"""bitsandbytes-compatible names for the 4-bit functions: change `bitsandbytes.functional` to
`fourbit.functional` in research code and nothing else.

    packed, state = quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    w_hat = dequantize_4bit(packed, state)
    y = matmul_4bit(x, packed, quant_state=state, bias=b)      # also exported as fourbit.matmul_4bit

Signatures and defaults are bitsandbytes 0.50's, including the trap: `quant_type` defaults to
"fp4", not the "nf4" that QLoRA uses, and `compress_statistics` (double quantization) defaults to
False here while `Linear4bit` defaults it to True. Pass both explicitly. fourbit's own API
(`fourbit.quantize`, `fourbit.lora.Linear4bit`) defaults to nf4 with double quantization.

Everything delegates to fourbit's implementation (`fourbit.dispatch`, `fourbit.lora.autograd`);
this module only adapts argument conventions. Bytes follow bitsandbytes' CUDA kernels (SPEC §0).
"""

from __future__ import annotations

import json
import warnings

import torch

from . import dispatch
from .lora.autograd import matmul_4bit as _matmul_4bit
from .nf4 import state as _state
from .nf4.checks import check_blocksize, check_quant_type
from .nf4.codes import code_for
from .nf4.quant import double_quantize

__all__ = [
    "QuantState",
    "dequantize_4bit",
    "dequantize_fp4",
    "dequantize_nf4",
    "matmul_4bit",
    "quantize_4bit",
    "quantize_fp4",
    "quantize_nf4",
]


_META_FIELDS = ("quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset")


class QuantState(_state.QuantState):
    """fourbit's QuantState under bitsandbytes' constructor and method names.

    bitsandbytes calls the nested state `state2` and keeps a boolean `nested`; here `nested` is the
    nested state itself (truthy exactly when bitsandbytes' flag is True) and `state2` reads it.
    `to(device)` moves the tensors in place, as bitsandbytes does, and returns the state.
    """

    def __init__(self, absmax, shape=None, code=None, blocksize=None, quant_type=None, dtype=None, offset=None, state2=None, nested=None):
        if code is None and quant_type in ("nf4", "fp4"):
            code = code_for(quant_type).to(absmax.device)
        super().__init__(
            absmax=absmax,
            shape=None if shape is None else torch.Size(shape),
            dtype=dtype,
            blocksize=blocksize,
            quant_type=quant_type,
            code=code,
            offset=offset,
            nested=state2 if state2 is not None else nested,
        )

    @classmethod
    def adopt(cls, state: _state.QuantState) -> "QuantState":
        """The same tensors viewed through this class (no copy)."""
        if isinstance(state, cls):
            return state
        return cls(state.absmax, state.shape, state.code, state.blocksize, state.quant_type, state.dtype, state.offset, state.nested)

    @property
    def state2(self):
        return self.nested

    def to(self, device):
        moved = _state.QuantState.to(self, device)
        self.absmax, self.code, self.offset, self.nested = moved.absmax, moved.code, moved.offset, moved.nested
        return self

    def as_dict(self, packed: bool = False) -> dict:
        """bitsandbytes' dict: with packed=True the safetensors-ready tensors (to_dict); otherwise
        tensors and plain values (quant_type, blocksize, dtype name, shape tuple, nested_*)."""
        if packed:
            return self.to_dict()
        d = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": self.code,
            "dtype": str(self.dtype).removeprefix("torch."),
            "shape": tuple(self.shape),
        }
        if self.nested is not None:
            d.update(
                nested_absmax=self.nested.absmax,
                nested_blocksize=self.nested.blocksize,
                nested_quant_map=self.nested.code.clone(),
                nested_dtype=str(self.nested.dtype).removeprefix("torch."),
                nested_offset=self.offset.item(),
            )
        return d

    @classmethod
    def from_dict(cls, qs_dict, device=None) -> "QuantState":
        """Rebuild from `as_dict(packed=True)` items (with or without a key prefix), or from the
        unpacked `as_dict()` form, whose plain fields are first packed into the JSON blob so that
        both forms go through the same validation."""
        if "quant_type" in qs_dict:
            meta = {k: qs_dict[k] for k in _META_FIELDS if k in qs_dict}
            meta["shape"] = [int(d) for d in meta.get("shape", ())]
            blob = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
            qs_dict = {k: v for k, v in qs_dict.items() if k not in _META_FIELDS}
            qs_dict["quant_state.bitsandbytes__" + str(meta["quant_type"])] = blob
        return cls.adopt(_state.QuantState.from_dict(qs_dict, device=device))


def quantize_4bit(
    A: torch.Tensor,
    absmax: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    blocksize=None,
    compress_statistics=False,
    quant_type="fp4",
    quant_storage=torch.uint8,
) -> tuple[torch.Tensor, QuantState]:
    """(packed ((n+1)//2, 1), QuantState). `absmax` / `out`, if given, receive the float32 block
    scales (before double quantization) and the packed bytes, as in bitsandbytes."""
    blocksize = 64 if blocksize is None else blocksize
    check_blocksize(blocksize)
    check_quant_type(quant_type)
    if absmax is None:
        packed, state = dispatch.quantize(
            A, blocksize=blocksize, quant_type=quant_type, double_quant=compress_statistics, quant_storage=quant_storage
        )
    else:
        packed, state = dispatch.quantize(A, blocksize=blocksize, quant_type=quant_type, double_quant=False, quant_storage=quant_storage)
        if absmax.shape != state.absmax.shape or absmax.dtype != torch.float32:
            raise ValueError(f"absmax buffer must be float32 of shape {tuple(state.absmax.shape)}, got {absmax.dtype} {tuple(absmax.shape)}")
        absmax.copy_(state.absmax)
        if compress_statistics:
            state.absmax, state.offset, state.nested = double_quantize(state.absmax)
    if out is not None:
        if out.shape != packed.shape or out.dtype != packed.dtype:
            raise ValueError(f"out must be {packed.dtype} of shape {tuple(packed.shape)}, got {out.dtype} {tuple(out.shape)}")
        packed = out.copy_(packed)
    return packed, QuantState.adopt(state)


def quantize_nf4(A, absmax=None, out=None, blocksize=None, compress_statistics=False, quant_storage=torch.uint8):
    return quantize_4bit(A, absmax, out, blocksize, compress_statistics, "nf4", quant_storage)


def quantize_fp4(A, absmax=None, out=None, blocksize=None, compress_statistics=False, quant_storage=torch.uint8):
    return quantize_4bit(A, absmax, out, blocksize, compress_statistics, "fp4", quant_storage)


def dequantize_4bit(
    A: torch.Tensor,
    quant_state: QuantState | None = None,
    absmax: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    blocksize: int | None = None,
    quant_type="fp4",
) -> torch.Tensor:
    """Dense tensor of quant_state.shape. Without a quant_state, `absmax` (float32 scales) and `out`
    (whose shape and dtype are the result's) describe it, as in bitsandbytes. bitsandbytes'
    compatibility shim is kept: packed input of shape (1, m) gives a transposed result."""
    if quant_state is None:
        if absmax is None or out is None:
            raise ValueError("dequantize_4bit needs quant_state, or both absmax and out (which give the shape and dtype)")
        blocksize = 64 if blocksize is None else blocksize
        check_blocksize(blocksize)
        check_quant_type(quant_type)
        quant_state = QuantState(absmax=absmax, shape=out.shape, dtype=out.dtype, blocksize=blocksize, quant_type=quant_type)
    result = dispatch.dequantize(A, quant_state)
    if out is not None:
        result = out.copy_(result)
    return result.t() if A.shape[0] == 1 else result


def dequantize_nf4(A, quant_state=None, absmax=None, out=None, blocksize=None):
    return dequantize_4bit(A, quant_state, absmax, out, blocksize, "nf4")


def dequantize_fp4(A, quant_state=None, absmax=None, out=None, blocksize=None):
    return dequantize_4bit(A, quant_state, absmax, out, blocksize, "fp4")


def matmul_4bit(A: torch.Tensor, B: torch.Tensor, quant_state: QuantState, out: torch.Tensor | None = None, bias: torch.Tensor | None = None):
    """y = A @ dequantize(B)^T + bias, differentiable in A and bias. B may be the packed tensor or
    its `.t()` (bitsandbytes accepts both); quant_state.shape is the authority on [N, K]. A weight
    quantized in [K, N] orientation still works, with bitsandbytes' DeprecationWarning."""
    if quant_state is None:
        raise ValueError("matmul_4bit needs the quant_state returned by quantize_4bit")
    if len(quant_state.shape) != 2:
        raise ValueError(f"matmul_4bit: quant_state.shape must be 2-D [N, K], got {tuple(quant_state.shape)}")
    packed = B.reshape(-1, 1)  # ((N*K+1)//2, 1) whatever view the caller passed
    k = A.shape[-1]
    if k == quant_state.shape[0] and k != quant_state.shape[1]:
        warnings.warn(
            f"matmul_4bit: the weight was quantized in [K, N] orientation (shape {list(quant_state.shape)}); "
            "quantize it as [N, K] = (out_features, in_features)",
            DeprecationWarning,
            stacklevel=2,
        )
        w = dispatch.dequantize(packed, quant_state, dtype=A.dtype)  # (K, N)
        result = torch.nn.functional.linear(A, w.t(), None if bias is None else bias.to(A.dtype))
    else:
        result = _matmul_4bit(A, packed, quant_state, None if bias is None else bias.to(A.dtype))
    if out is not None:
        return out.copy_(result)
    return result
