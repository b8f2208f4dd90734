"""QuantState: everything needed to turn packed 4-bit codes back into a tensor.

Layout (bitsandbytes 0.50, SPEC §2–5):
    absmax     float32 (nb,)          one scale per block of `blocksize` flat elements, or, with
               uint8   (nb,)          double quantization, its 8-bit codes (see `nested`)
    shape, dtype                       of the original tensor
    blocksize, quant_type ("nf4"/"fp4"), code (the 16-entry table)
    offset     float32 0-dim           mean of the float32 absmax (double quantization only)
    nested     QuantState              absmax2 float32 (ceil(nb/256),), 256-entry signed dynamic map,
                                       blocksize 256, dtype float32

Tensor form (`as_tensors` / `from_tensors`): (absmax, nested_absmax, nested_code, offset), the
tensors a custom op or a kernel takes (a QuantState is not a type an op schema can hold), with
None for the last three without double quantization; `nested_state` builds the nested state. No
other module takes a QuantState apart or assembles one from these pieces.

Serialized form (`to_dict`) is the one bitsandbytes and transformers write into safetensors:
`absmax`, `quant_map`, `nested_absmax`, `nested_quant_map` tensors plus a uint8 tensor
`quant_state.bitsandbytes__<quant_type>` holding the UTF-8 JSON of the non-tensor fields.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Mapping

import torch

from .blockwise import dequantize_blockwise
from .checks import ALLOWED_BLOCKSIZES, FLOAT_DTYPES
from .codes import code_for, dynamic_map

__all__ = ["QuantState", "NESTED_BLOCKSIZE"]

NESTED_BLOCKSIZE = 256
_CODES: dict[tuple[str, torch.device], torch.Tensor] = {}
_BLOB_KEY = "quant_state.bitsandbytes__"
_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _code_on(quant_type: str, device: torch.device) -> torch.Tensor:
    """The 16-entry table on `device`, copied there once: rebuilding a state inside a custom op on
    every call must not copy host to device (which would also break CUDA-graph capture)."""
    key = (quant_type, device)
    if key not in _CODES:
        _CODES[key] = code_for(quant_type).to(device)
    return _CODES[key]


@dataclasses.dataclass
class QuantState:
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    code: torch.Tensor
    offset: torch.Tensor | None = None
    nested: "QuantState | None" = None

    @property
    def double_quant(self) -> bool:
        return self.nested is not None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n

    @property
    def device(self) -> torch.device:
        return self.absmax.device

    def __getattr__(self, name: str):
        """`state.bitsandbytes__nf4`: the serialized blob, so the checkpoint key
        "weight.quant_state.bitsandbytes__nf4" resolves attribute by attribute (FSDP's state-dict
        traversal does getattr along the dotted key)."""
        quant_type = self.__dict__.get("quant_type")
        if quant_type is not None and name == "bitsandbytes__" + quant_type:
            return self.to_dict()[_BLOB_KEY + quant_type]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def dequantized_absmax(self) -> torch.Tensor:
        """The float32 per-block scales: stored directly, or rebuilt from the nested 8-bit codes as
        fl32(code8[q] * absmax2[i // 256]) + offset (two float32 roundings, as bitsandbytes)."""
        if self.nested is None:
            return self.absmax
        scales = dequantize_blockwise(self.absmax, self.nested.absmax, self.nested.code, self.nested.blocksize)
        return scales + self.offset

    # ---- tensor form -----------------------------------------------------------------------------
    @classmethod
    def nested_state(cls, absmax2: torch.Tensor, n_scales: int, code: torch.Tensor) -> "QuantState":
        """The state of double-quantized scales: `n_scales` 8-bit codes in blocks of 256 under the
        signed dynamic map `code` (256,), one float32 absmax2 per block, (ceil(n_scales / 256),)."""
        return cls(absmax=absmax2, shape=torch.Size([n_scales]), dtype=torch.float32, blocksize=NESTED_BLOCKSIZE,
                   quant_type="dynamic8", code=code)

    def as_tensors(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(absmax, nested_absmax, nested_code, offset), the last three None without double
        quantization. With shape, dtype, blocksize and quant_type, `from_tensors` rebuilds the state."""
        if self.nested is None:
            return self.absmax, None, None, None
        if self.nested.blocksize != NESTED_BLOCKSIZE:
            raise ValueError(f"nested scales must come in blocks of {NESTED_BLOCKSIZE}, got {self.nested.blocksize}")
        return self.absmax, self.nested.absmax, self.nested.code, self.offset

    @classmethod
    def from_tensors(cls, absmax: torch.Tensor, nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None,
                     offset: torch.Tensor | None, *, shape, dtype: torch.dtype, blocksize: int, quant_type: str,
                     code: torch.Tensor | None = None) -> "QuantState":
        """The inverse of `as_tensors`. `code` defaults to the quant_type's table on absmax's device."""
        state = cls(absmax=absmax, shape=torch.Size(shape), dtype=dtype, blocksize=blocksize, quant_type=quant_type,
                    code=_code_on(quant_type, absmax.device) if code is None else code)
        if nested_absmax is not None:
            state.offset = offset
            state.nested = cls.nested_state(nested_absmax, absmax.numel(), nested_code)
        return state

    def to(self, device: torch.device | str) -> "QuantState":
        """A copy with every tensor on `device` (never re-quantizes)."""
        return dataclasses.replace(
            self,
            absmax=self.absmax.to(device),
            code=self.code.to(device),
            offset=None if self.offset is None else self.offset.to(device),
            nested=None if self.nested is None else self.nested.to(device),
        )

    def equal(self, other: "QuantState") -> bool:
        """Bit-for-bit equality of every field (tensors compared with torch.equal on CPU)."""
        if not isinstance(other, QuantState):
            return False
        same = (
            tuple(self.shape) == tuple(other.shape)
            and self.dtype == other.dtype
            and self.blocksize == other.blocksize
            and self.quant_type == other.quant_type
            and _same(self.absmax, other.absmax)
            and _same(self.code, other.code)
            and (self.offset is None) == (other.offset is None)
            and (self.nested is None) == (other.nested is None)
        )
        if same and self.offset is not None:
            same = _same(self.offset, other.offset)
        if same and self.nested is not None:
            same = self.nested.equal(other.nested)
        return same

    # ---- serialization -------------------------------------------------------------------------
    def to_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Tensors under bitsandbytes' keys (e.g. prefix="weight." gives "weight.absmax", ...)."""
        tensors = {"absmax": self.absmax, "quant_map": self.code}
        meta = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": _dtype_name(self.dtype),
            "shape": [int(d) for d in self.shape],
        }
        if self.nested is not None:
            tensors["nested_absmax"] = self.nested.absmax
            tensors["nested_quant_map"] = self.nested.code.clone()
            meta.update(
                nested_blocksize=self.nested.blocksize,
                nested_dtype=_dtype_name(self.nested.dtype),
                nested_offset=self.offset.item(),
            )
        blob = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
        tensors[_BLOB_KEY + self.quant_type] = blob
        return {prefix + k: v for k, v in tensors.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, torch.Tensor], device: torch.device | str | None = None) -> "QuantState":
        """Rebuild from `to_dict` output or bitsandbytes' `QuantState.as_dict(packed=True)`, with or
        without a key prefix such as "weight.". Every stored tensor is checked; errors name the key."""
        blobs = [k for k in d if _BLOB_KEY in k]
        if len(blobs) != 1:
            raise KeyError(
                f"expected exactly one key ending in '{_BLOB_KEY}nf4' or '{_BLOB_KEY}fp4', found {blobs or 'none'} "
                f"among {sorted(d)[:8]}"
            )
        blob_key = blobs[0]
        prefix, _, suffix_type = blob_key.rpartition(_BLOB_KEY)
        meta = _decode_blob(blob_key, d[blob_key])
        quant_type = meta.get("quant_type")
        if quant_type != suffix_type:
            raise ValueError(f"{blob_key}: the key says quant_type {suffix_type!r} but its JSON says {quant_type!r}")
        code = code_for(quant_type)
        blocksize = _meta_field(meta, blob_key, "blocksize", int)
        if blocksize not in ALLOWED_BLOCKSIZES:
            raise ValueError(f"{blob_key}: blocksize {blocksize} is not one of {list(ALLOWED_BLOCKSIZES)}")
        shape = torch.Size(_meta_field(meta, blob_key, "shape", list))
        dtype = _DTYPE_NAMES.get(_meta_field(meta, blob_key, "dtype", str))
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"{blob_key}: dtype {meta['dtype']!r} is not one of {list(_DTYPE_NAMES)}")
        numel = 1
        for s in shape:
            numel *= s
        nb = -(-numel // blocksize)

        nested_keys = [k for k in ("nested_blocksize", "nested_dtype", "nested_offset") if k in meta]
        nested = bool(nested_keys)
        if nested and len(nested_keys) != 3:
            raise ValueError(f"{blob_key}: JSON has {nested_keys} but double quantization needs all three nested fields")
        absmax = _tensor(d, prefix + "absmax", torch.uint8 if nested else torch.float32, (nb,))
        quant_map = _tensor(d, prefix + "quant_map", torch.float32, (16,))
        if not torch.equal(quant_map.cpu(), code):
            raise ValueError(f"{prefix}quant_map does not equal the {quant_type} table; the file is corrupt or not {quant_type}")
        state = cls(absmax=absmax, shape=shape, dtype=dtype, blocksize=blocksize, quant_type=quant_type, code=code)
        if nested:
            nbs = _meta_field(meta, blob_key, "nested_blocksize", int)
            if nbs != NESTED_BLOCKSIZE:
                raise ValueError(f"{blob_key}: nested_blocksize must be {NESTED_BLOCKSIZE}, got {nbs}")
            if meta["nested_dtype"] != "float32":
                raise ValueError(f"{blob_key}: nested_dtype must be 'float32', got {meta['nested_dtype']!r}")
            offset = _meta_field(meta, blob_key, "nested_offset", (int, float))
            absmax2 = _tensor(d, prefix + "nested_absmax", torch.float32, (-(-nb // nbs),))
            nested_map = _tensor(d, prefix + "nested_quant_map", torch.float32, (256,))
            if not torch.equal(nested_map.cpu(), dynamic_map(signed=True)):
                raise ValueError(f"{prefix}nested_quant_map is not the signed dynamic map")
            state.offset = torch.tensor(offset, dtype=torch.float32)
            state.nested = cls.nested_state(absmax2, nb, nested_map.clone())
        if device is not None:
            state = state.to(device)
        else:
            state = state.to(absmax.device)
        return state


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu(), b.cpu())


def _decode_blob(key: str, blob: torch.Tensor) -> dict:
    if not isinstance(blob, torch.Tensor) or blob.dtype != torch.uint8 or blob.dim() != 1:
        raise ValueError(f"{key}: expected a 1-D uint8 tensor of UTF-8 JSON, got {getattr(blob, 'dtype', type(blob))}")
    try:
        meta = json.loads(bytes(blob.cpu().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{key}: not valid UTF-8 JSON ({err})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{key}: JSON must be an object, got {type(meta).__name__}")
    return meta


def _meta_field(meta: dict, key: str, name: str, kind):
    if name not in meta:
        raise KeyError(f"{key}: JSON has no field {name!r} (has {sorted(meta)})")
    value = meta[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{key}: field {name!r} has the wrong type: {value!r}")
    return value


def _tensor(d: Mapping[str, torch.Tensor], key: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if key not in d:
        raise KeyError(f"missing key {key!r} in the quantized state (keys: {sorted(d)[:8]})")
    t = d[key]
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{key}: expected a tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise ValueError(f"{key}: expected dtype {dtype}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{key}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    return t
