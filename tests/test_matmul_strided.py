"""Every tensor argument of every Triton matmul route as a view: a storage offset (unaligned), a
step along the last dimension, rows of a wider buffer, column-major, the packed bytes as the
(nbytes, 1) column bitsandbytes stores. Each call must equal the same route on contiguous copies
bit for bit (same kernel, same data) and float64 within the rounding bound. The buffers around a
view hold NaN (floats) or 0xAB (bytes), so a kernel that indexes a view as if it were contiguous
reads garbage. Run by Triton's interpreter on CPU: few, small draws per route.
"""

import dataclasses
import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fourbit.kernels._triton_utils import interpreting
from fourbit.nf4 import dequantize, quantize
from helpers import assert_within_rounding

kern = importlib.import_module("fourbit.kernels.matmul")

DEVICE = "cpu" if interpreting() or not torch.cuda.is_available() else "cuda"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not interpreting(),
                                reason="triton was imported without TRITON_INTERPRET=1 and there is no GPU")
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# route name -> (op, path, x dtype, rows of x (min, max), K step, config for `tune`-style override)
ROUTES = {
    "gemv-mma": ("gemv", "fused", torch.float16, (1, 16), 64, None),
    "gemv-simt": ("gemv", "fused", torch.float32, (1, 2), 64, None),
    "gemm": ("gemm", "fused", torch.float16, (3, 40), 64, None),
    "gemm-swapped": ("gemm", "fused", torch.float16, (1, 40), 64, (32, 32, 64, 4, 1, True)),
    "gemm-dequantize": ("gemm", "dequantize+cublas", torch.float16, (1, 40), 64, None),
    "backward": ("backward", "fused", torch.float16, (1, 40), 64, None),
    "backward-swapped": ("backward", "fused", torch.float16, (1, 40), 128, (32, 32, 128, 4, 1, True)),
    "backward-dequantize": ("backward", "dequantize+cublas", torch.float16, (1, 40), 64, None),
}
LAYOUTS_2D = ["contiguous", "offset", "step", "rows", "transposed"]
LAYOUTS_1D = ["contiguous", "offset", "step"]


def relaid(t: torch.Tensor, layout: str) -> torch.Tensor:
    """t's values in another memory layout; the buffer's other elements are garbage."""
    if layout == "contiguous":
        return t
    fill = float("nan") if t.is_floating_point() else 0xAB
    if layout == "offset":  # starts one element into its buffer: unaligned for any vector load
        buf = torch.full((t.numel() + 1,), fill, dtype=t.dtype, device=t.device)
        out = buf[1:].view(t.shape)
    elif layout == "step":  # every other element along the last dimension
        buf = torch.full((*t.shape[:-1], 2 * t.shape[-1]), fill, dtype=t.dtype, device=t.device)
        out = buf[..., ::2]
    elif layout == "rows":  # rows of a buffer 64 elements wider
        buf = torch.full((*t.shape[:-1], t.shape[-1] + 64), fill, dtype=t.dtype, device=t.device)
        out = buf[..., 3:3 + t.shape[-1]]
    elif layout == "transposed":  # column-major
        out = torch.full(t.shape[::-1], fill, dtype=t.dtype, device=t.device).t()
    elif layout == "column":  # packed bytes as bitsandbytes stores them
        return t.reshape(-1, 1).clone()
    else:
        raise ValueError(layout)
    out.copy_(t)
    return out


def relaid_state(state, absmax: str, nested: str, code: str):
    """The state with its scale tensors (and the nested state's) in other layouts."""
    out = dataclasses.replace(state, absmax=relaid(state.absmax, absmax), code=relaid(state.code, code))
    if state.nested is not None:
        out.nested = dataclasses.replace(state.nested, absmax=relaid(state.nested.absmax, nested),
                                         code=relaid(state.nested.code, nested))
        out.offset = relaid(state.offset.reshape(1), nested) if nested != "contiguous" else state.offset
    return out


def run(name, x, packed, state, bias, out):
    op, path, _, _, _, config = ROUTES[name]
    if op == "backward":
        return kern.matmul_backward(x, packed, state, out=out, route=(op, path), config=config)
    return kern.matmul(x, packed, state, bias, out=out, route=(op, path), config=config)


@pytest.mark.parametrize("name", list(ROUTES))
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_every_argument_may_be_a_view(name, data):
    op, path, dtype, (m_lo, m_hi), k_step, _ = ROUTES[name]
    m = data.draw(st.integers(m_lo, m_hi), "M")
    n = data.draw(st.integers(1, 40), "N")
    k = k_step * data.draw(st.integers(1, 3), "K steps")
    dq = data.draw(st.booleans(), "double quant")
    layouts = {
        "x": data.draw(st.sampled_from(LAYOUTS_2D), "x layout"),
        "packed": data.draw(st.sampled_from(["contiguous", "offset", "column"]), "packed layout"),
        "absmax": data.draw(st.sampled_from(LAYOUTS_1D), "absmax layout"),
        "nested": data.draw(st.sampled_from(LAYOUTS_1D), "nested layout"),
        "code": data.draw(st.sampled_from(LAYOUTS_1D), "code layout"),
        "bias": data.draw(st.sampled_from(["none", *LAYOUTS_1D]), "bias layout") if op != "backward" else "none",
        "out": data.draw(st.sampled_from(["new", "offset"]), "out layout"),
    }
    packed, state = quantize(torch.randn(n, k, device=DEVICE), blocksize=64, double_quant=dq)
    w64 = dequantize(packed, state, dtype=torch.float32).double()  # (N, K), exact
    rows_in, rows_out = (n, k) if op == "backward" else (k, n)
    x = torch.randn(m, rows_in, device=DEVICE).to(dtype)  # x, or dy for the backward
    bias = torch.randn(n, device=DEVICE).to(dtype) if layouts["bias"] != "none" else None
    want = run(name, x, packed, state, bias, None)  # every argument contiguous

    out = None if layouts["out"] == "new" else relaid(torch.zeros(m, rows_out, dtype=dtype, device=DEVICE), "offset")
    got = run(name, relaid(x, layouts["x"]), relaid(packed, layouts["packed"]),
              relaid_state(state, layouts["absmax"], layouts["nested"], layouts["code"]),
              None if bias is None else relaid(bias, layouts["bias"]), out)
    assert out is None or got is out
    assert torch.equal(got, want), (layouts, (got.double() - want.double()).abs().max())
    if op == "backward":
        exact, terms = x.double() @ w64, x.double().abs() @ w64.abs()
    else:
        exact = x.double() @ w64.T + (0 if bias is None else bias.double())
        terms = x.double().abs() @ w64.abs().T
    assert_within_rounding(got, exact, terms, dtype, TOL[dtype])
