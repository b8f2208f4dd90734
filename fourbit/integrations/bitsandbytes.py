"""Run bitsandbytes' own 4-bit ops on fourbit's kernels: code that imports bitsandbytes stays as it
is, and its `Linear4bit`, `quantize_4bit`, `matmul_4bit`, ... compute with fourbit.

    import bitsandbytes as bnb
    from fourbit.integrations import bitsandbytes as fourbit_bnb
    fourbit_bnb.install()              # or: with fourbit_bnb.installed(): ...
    layer = bnb.nn.Linear4bit(4096, 4096, quant_type="nf4").to("cuda")   # fourbit quantizes
    y = layer(x)                       # fourbit's fused matmul (Triton on CUDA)
    fourbit_bnb.uninstall()            # bitsandbytes' own kernels again

How: bitsandbytes 0.50 names each op once (`torch.library.define("bitsandbytes::quantize_4bit", ...)`
in bitsandbytes/_ops.py) and each backend registers a kernel for it per device. `install()` adds
fourbit's kernels for the CPU and CUDA dispatch keys through one `torch.library.Library`; the
dispatcher runs the newest registration for a key, and `uninstall()` deletes ours, which brings
bitsandbytes' back. The ops taken over (everything a 4-bit layer's forward and backward and
`quantize_4bit` with double quantization call):

    quantize_4bit          A -> packed codes, float32 absmax           fourbit.dispatch.quantize
    dequantize_4bit(.out)  packed, absmax -> dense                     fourbit.dispatch.dequantize
    gemm_4bit              A @ W^T + bias, nested absmax decoded in    fourbit.dispatch.matmul (CPU: below)
    gemv_4bit(.out)        the same with a float32 absmax              fourbit.dispatch.matmul (CPU: below)
    quantize_blockwise     8-bit blockwise codes (nested absmax)       fourbit.dispatch.quantize_blockwise
    dequantize_blockwise(.out)                                         fourbit.dispatch.dequantize_blockwise

So results follow fourbit, i.e. bitsandbytes' CUDA rounding rules everywhere: on CPU they differ
from bitsandbytes' own CPU build exactly where that build differs from its CUDA kernels (SPEC §2:
the partial tail block and the FP4 thresholds and sign of tiny values; §3: the 8-bit lookup-table
quantizer; §4: the absmax index of rows that are not whole blocks), and a bitsandbytes layer then
computes bit for bit what `fourbit.nn.Linear4bit` computes. The 8-bit and optimizer ops stay
bitsandbytes' (fourbit.optim has drop-in optimizer classes).

The `.out` overloads refuse an `out` of the wrong shape or dtype with ValueError, as bitsandbytes'
CUDA kernels do (its CPU kernels would cast silently).

`gemv_4bit` and `gemm_4bit` on CPU with float32 or float16 A decode W in A's dtype (fourbit's C
decoder) and multiply with torch's F.linear, as bitsandbytes' CPU build does on CPUs without
AVX512-BF16, so they return that build's bits; bfloat16 A takes fourbit's fused GEMV / matmul.
Why: bitsandbytes' own test_gemv_4bit holds a float32 GEMV to F.linear on the decoded W within noise
calibrated on a GPU (mean difference over sqrt(K) below 2.4e-8), and on an AVX2 CPU F.linear itself is
2.6e-8 from float64 at K = 4096, so a float32 GEMV more accurate than F.linear (fourbit's: 1.0e-8)
still fails it; float16 fails its ratio bound (1.0068 against 1.005 at K = 2048). fourbit's own API
(`fourbit.functional.matmul_4bit`, `fourbit.nn.Linear4bit`) keeps the fused GEMV for every dtype.

AVX512-BF16 CPUs: there bitsandbytes repacks a 4-bit weight for its CPU kernel before `gemv_4bit`
(`Linear4bit.forward` in eval mode without grad, and its tests explicitly): codes in tiles of 32
rows, absmax transposed to (K / blocksize, N) in bfloat16, double quantization undone. `gemv_4bit`
recognises that layout by its 2-D absmax and reads it (`_from_cpu_layout`), so such weights compute
with fourbit too, from the bf16-rounded scales that the layout keeps.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from .. import dispatch
from ..nf4.codes import FP4_CODE, NF4_CODE
from ..nf4.quant import pack
from ..nf4.state import QuantState

__all__ = ["OPS", "install", "installed", "is_installed", "uninstall"]

_DISPATCH_KEYS = ("CPU", "CUDA")
_LIB: torch.library.Library | None = None


def _quant_type_of(code: torch.Tensor) -> str:
    """gemv_4bit gets the 16-entry table, not its name."""
    table = code.detach().float().cpu()
    for name, ref in (("nf4", NF4_CODE), ("fp4", FP4_CODE)):
        if torch.equal(table, ref):
            return name
    raise ValueError(f"gemv_4bit: the code table is neither nf4 nor fp4: {table.tolist()}")


def _state(shape, dtype, blocksize, quant_type, absmax, absmax_8bit=None, absmax_code=None, absmax_offset=None) -> QuantState:
    """bitsandbytes' op arguments as a fourbit QuantState. With double quantization bitsandbytes
    passes the nested float32 scales as `absmax` and the 8-bit codes as `absmax_8bit`."""
    if absmax_8bit is None:
        return QuantState.from_tensors(absmax, None, None, None, shape=shape, dtype=dtype, blocksize=blocksize, quant_type=quant_type)
    return QuantState.from_tensors(absmax_8bit, absmax, absmax_code, absmax_offset, shape=shape, dtype=dtype,
                                   blocksize=blocksize, quant_type=quant_type)


def _quantize_4bit(A, blocksize, quant_type, quant_storage):
    packed, state = dispatch.quantize(A, blocksize=blocksize, quant_type=quant_type, double_quant=False, quant_storage=quant_storage)
    return packed, state.absmax


def _dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype):
    return dispatch.dequantize(A.reshape(-1, 1), _state(shape, dtype, blocksize, quant_type, absmax), dtype=dtype)


def _check_out(op: str, out: torch.Tensor, shape, dtype: torch.dtype) -> None:
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{op}: out has shape {tuple(out.shape)}, the result has {tuple(shape)}")
    if out.dtype != dtype:
        raise ValueError(f"{op}: out is {out.dtype}, the result is {dtype} (no silent cast)")


def _dequantize_4bit_out(A, absmax, blocksize, quant_type, shape, dtype, out):
    _check_out("dequantize_4bit.out", out, shape, dtype)
    out.copy_(_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype))


# float32 / float16 A on CPU computes as bitsandbytes' CPU build does (module docstring)
_AS_BNB_CPU = (torch.float32, torch.float16)


def _matmul(A, B, state, bias=None):
    if A.device.type == "cpu" and A.dtype in _AS_BNB_CPU:
        return torch.nn.functional.linear(A, dispatch.dequantize(B.reshape(-1, 1), state), bias)
    return dispatch.matmul(A, B.reshape(-1, 1), state, bias)


def _gemm_4bit(A, B, shapeB, absmax, blocksize, quant_type, bias=None, absmax_8bit=None, absmax_code=None, absmax_offset=None):
    state = _state(shapeB, A.dtype, blocksize, quant_type, absmax, absmax_8bit, absmax_code, absmax_offset)
    return _matmul(A, B, state, bias)


_TILE_ROWS = 32  # rows per tile in bitsandbytes' AVX512-BF16 CPU layout


def _from_cpu_layout(B: torch.Tensor, absmax: torch.Tensor, shapeB, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' AVX512-BF16 CPU layout -> (packed codes ((N*K/2, 1) uint8), float32 absmax (N*K/bs,)).

    That layout stores, for each tile of 32 rows and each pair of columns (2c, 2c+1), 32 bytes:
    byte 2r + j holds row r's code of column 2c + j in its low nibble and row 16 + r's in its high
    nibble (r < 16, j < 2). absmax is (K / blocksize, N) bfloat16, i.e. transposed.
    """
    n, k = (int(d) for d in shapeB)
    if n % _TILE_ROWS or k % 2 or k % blocksize or tuple(absmax.shape) != (k // blocksize, n) or B.numel() * 2 != n * k:
        raise ValueError(
            f"gemv_4bit: a 2-D absmax {tuple(absmax.shape)} means bitsandbytes' AVX512-BF16 layout, which needs "
            f"N % 32 == 0, K % blocksize == 0, absmax (K/blocksize, N) and N*K/2 bytes; got shape {(n, k)}, "
            f"blocksize {blocksize}, {B.numel()} bytes"
        )
    tiles = B.contiguous().view(torch.uint8).reshape(n // _TILE_ROWS, k // 2, _TILE_ROWS)  # (N/32, K/2, 32)
    halves = torch.cat([tiles & 0xF, tiles >> 4], dim=-1)  # (N/32, K/2, 64): rows 0-15 then 16-31, 2 columns each
    codes = halves.reshape(n // _TILE_ROWS, k // 2, _TILE_ROWS, 2).permute(0, 2, 1, 3).reshape(-1)  # (N*K,) row-major
    return pack(codes), absmax.float().t().reshape(-1)  # the usual byte order, scales row-major


def _gemv_4bit(A, B, shapeB, absmax, code, blocksize):
    if absmax.dim() == 2:
        B, absmax = _from_cpu_layout(B, absmax, shapeB, blocksize)
    return _matmul(A, B, _state(shapeB, A.dtype, blocksize, _quant_type_of(code), absmax))


def _gemv_4bit_out(A, B, shapeB, absmax, code, blocksize, out):
    _check_out("gemv_4bit.out", out, (*A.shape[:-1], shapeB[0]), A.dtype)
    out.copy_(_gemv_4bit(A, B, shapeB, absmax, code, blocksize))


def _quantize_blockwise(A, code, blocksize):
    return dispatch.quantize_blockwise(A, code, blocksize)


def _dequantize_blockwise(A, absmax, code, blocksize, dtype):
    return dispatch.dequantize_blockwise(A, absmax, code, blocksize, dtype)


def _dequantize_blockwise_out(A, absmax, code, blocksize, dtype, out):
    _check_out("dequantize_blockwise.out", out, A.shape, dtype)
    out.copy_(_dequantize_blockwise(A, absmax, code, blocksize, dtype))


# bitsandbytes op name (overload included) -> fourbit kernel. Each entry looks its fourbit function
# up when called, so a test can count calls by patching fourbit.dispatch.
OPS = {
    "quantize_4bit": _quantize_4bit,
    "dequantize_4bit": _dequantize_4bit,
    "dequantize_4bit.out": _dequantize_4bit_out,
    "gemm_4bit": _gemm_4bit,
    "gemv_4bit": _gemv_4bit,
    "gemv_4bit.out": _gemv_4bit_out,
    "quantize_blockwise": _quantize_blockwise,
    "dequantize_blockwise": _dequantize_blockwise,
    "dequantize_blockwise.out": _dequantize_blockwise_out,
}


def is_installed() -> bool:
    return _LIB is not None


def install() -> None:
    """Register fourbit's kernels for bitsandbytes' 4-bit ops on CPU and CUDA (idempotent)."""
    global _LIB
    if _LIB is not None:
        return
    try:
        import bitsandbytes  # noqa: F401  (defines the bitsandbytes:: ops)
    except ImportError:
        raise ImportError(
            "fourbit.integrations.bitsandbytes.install() runs bitsandbytes' ops on fourbit and needs bitsandbytes "
            "(pip install 'bitsandbytes==0.50.*'); without it, `import fourbit as bnb` gives the same names"
        ) from None
    missing = [name for name in OPS if not hasattr(torch.ops.bitsandbytes, name.split(".")[0])]
    if missing:
        raise RuntimeError(f"this bitsandbytes ({bitsandbytes.__version__}) defines no {missing}; fourbit targets 0.50")
    lib = torch.library.Library("bitsandbytes", "IMPL")
    with warnings.catch_warnings():
        # the dispatcher warns that we override bitsandbytes' kernel for the key: that is the point
        warnings.simplefilter("ignore", UserWarning)
        for name, kernel in OPS.items():
            for key in _DISPATCH_KEYS:
                lib.impl(name, kernel, key)
    _LIB = lib


def uninstall() -> None:
    """Remove fourbit's registrations; bitsandbytes' own kernels answer again."""
    global _LIB
    if _LIB is not None:
        _LIB._destroy()
        _LIB = None


@contextlib.contextmanager
def installed():
    """`install()` for the duration of a with-block (left installed if it already was)."""
    was = is_installed()
    install()
    try:
        yield
    finally:
        if not was:
            uninstall()
