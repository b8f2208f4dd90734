"""Input validation shared by the reference and the Triton kernels.

Every check raises with what was wrong and what would be right; nothing here mutates data.
"""

from __future__ import annotations

import torch

from ..errors import InvalidInput

__all__ = [
    "ALLOWED_BLOCKSIZES",
    "FLOAT_DTYPES",
    "STORAGE_DTYPES",
    "check_blocksize",
    "check_float_dtype",
    "check_float_tensor",
    "check_scales_fit",
    "check_finite",
    "check_quant_type",
    "check_storage",
    "check_same_device",
]

ALLOWED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
STORAGE_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32)


def check_blocksize(blocksize: int, allowed: tuple[int, ...] = ALLOWED_BLOCKSIZES) -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in allowed:
        raise InvalidInput(f"blocksize must be one of {list(allowed)}, got {blocksize!r}")
    return blocksize


def check_quant_type(quant_type: str) -> str:
    if quant_type not in ("nf4", "fp4"):
        raise InvalidInput(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    return quant_type


def check_float_tensor(x: torch.Tensor, name: str = "input") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if x.is_meta:
        raise InvalidInput(
            f"{name} is a meta tensor: it has a shape ({tuple(x.shape)}) but no values to quantize",
            "load the real weights first (e.g. model.to_empty(device='cpu') then load_state_dict, or load "
            "the model without device='meta' / init_empty_weights)",
        )


def check_float_dtype(dtype: torch.dtype, name: str = "dtype", *, allowed: tuple = FLOAT_DTYPES) -> None:
    """An output dtype for dequantized values: an integer dtype would truncate every value silently.
    The reference also writes float64 (gradcheck, exact merges); the kernels write the three below."""
    if dtype not in allowed:
        raise TypeError(f"{name} must be one of {', '.join(str(d).removeprefix('torch.') for d in allowed)}, got {dtype}")


def check_finite(x: torch.Tensor, name: str = "input") -> None:
    """Refuse NaN/inf: bitsandbytes' CPU and CUDA kernels turn them into different garbage."""
    bad = ~torch.isfinite(x)
    count = int(bad.sum())
    if count:
        first = torch.nonzero(bad.reshape(x.shape) if x.dim() else bad.reshape(1))[0].tolist()
        value = x.reshape(-1)[int(torch.nonzero(bad.reshape(-1))[0])].item()
        raise InvalidInput(
            f"{name} has {count} non-finite value(s) (NaN or ±inf); the first is {value} at index {tuple(first)}",
            "quantization needs finite values: clean or clamp the tensor first",
        )


def check_storage(quant_storage: torch.dtype, nbytes: int) -> int:
    if quant_storage not in STORAGE_DTYPES:
        raise TypeError(f"quant_storage must be one of {[str(d) for d in STORAGE_DTYPES]}, got {quant_storage}")
    itemsize = torch.empty(0, dtype=quant_storage).element_size()
    if nbytes % itemsize:
        raise ValueError(
            f"quant_storage={quant_storage} holds {itemsize} bytes per element, but the packed weight has "
            f"{nbytes} bytes, which is not a multiple of {itemsize}; use torch.uint8 or pad the tensor"
        )
    return itemsize


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{k} on {v}" for k, v in devices.items())
        raise ValueError(f"tensors must be on one device, got {listing}; move them with .to(device)")
    return next(iter(devices.values()))


def check_scales_fit(x: torch.Tensor, state) -> None:
    """Refuse a double-quantized state whose rebuilt scales overflow x's dtype. The offset is
    mean(absmax), a float32 sum first: finite values near the float32 limit (3e38) make it inf, and
    every value would dequantize to inf (bitsandbytes: NaN). |code| <= 1, so every dequantized value
    is finite iff every rebuilt scale is finite in x's dtype: one check on n / blocksize values."""
    if bool(torch.isfinite(state.dequantized_absmax().to(x.dtype)).all()):
        return
    largest = float(x.detach().abs().max())
    raise InvalidInput(
        f"cannot double-quantize this tensor: its largest magnitude {largest:.6g} makes the nested scale "
        f"offset {float(state.offset):.6g} or a rebuilt scale overflow {x.dtype}",
        "scale the tensor down (e.g. divide by a power of two and fold it into the next layer), or pass "
        "double_quant=False",
    )

