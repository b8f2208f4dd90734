"""matmul_4bit (fourbit.lora.autograd): autograd, what it saves, torch.library registration,
torch.compile without graph breaks, and Triton gradients against reference gradients."""

import torch

import pytest

from fourbit.kernels._triton_utils import interpreting
from fourbit.lora.autograd import matmul_4bit
from fourbit.nf4 import dequantize, quantize
from helpers import rel_err


def weight(n, k, bs=64, dq=True):
    packed, state = quantize(torch.randn(n, k), blocksize=bs, double_quant=dq)
    return packed, state, dequantize(packed, state, dtype=torch.float32).double()  # w64: (N, K)


@pytest.mark.parametrize("k,bs,dq", [(128, 64, True), (100, 32, False)])
def test_forward_and_gradients_against_float64(k, bs, dq, monkeypatch):
    monkeypatch.setenv("FOURBIT_BACKEND", "reference")
    packed, state, w64 = weight(24, k, bs, dq)
    x = torch.randn(2, 3, k, requires_grad=True)
    bias = torch.randn(24, requires_grad=True)
    y = matmul_4bit(x, packed, state, bias)
    gy = torch.randn_like(y)
    y.backward(gy)
    assert rel_err(y, x.detach().double() @ w64.T + bias.detach().double()) < 1e-5
    assert rel_err(x.grad, gy.double() @ w64) < 1e-5
    assert rel_err(bias.grad, gy.double().sum((0, 1))) < 1e-5
    assert packed.grad is None and not packed.requires_grad


def test_gradcheck_float64_reference(monkeypatch):
    monkeypatch.setenv("FOURBIT_BACKEND", "reference")
    packed, state, _ = weight(5, 96, bs=32)  # K % 64 != 0 and blocks of 32: several chunks' worth of shapes
    x = torch.randn(3, 96, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b: matmul_4bit(x, packed, state, b), (x, bias))


def test_saves_only_packed_weight_and_state(monkeypatch):
    """Saved-tensor hooks see everything autograd keeps for backward: no x, nothing of W's dense size."""
    monkeypatch.setenv("FOURBIT_BACKEND", "reference")
    n, k = 64, 256
    packed, state, _ = weight(n, k)
    x = torch.randn(4, k, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = matmul_4bit(x, packed, state, torch.randn(n, requires_grad=True))
    assert saved, "the hooks saw nothing: the test would pass vacuously"
    assert all(t.numel() < n * k for t in saved)  # no dequantized copy of W
    assert all(t.data_ptr() != x.data_ptr() for t in saved)  # x is not needed for dx
    assert sum(t.numel() * t.element_size() for t in saved) <= packed.numel() + 2 * state.absmax.numel() + 4096
    y.sum().backward()
    assert x.grad is not None


def test_opcheck_registration(monkeypatch):
    monkeypatch.setenv("FOURBIT_BACKEND", "reference")
    packed, state, _ = weight(12, 64)
    x = torch.randn(3, 64, requires_grad=True)
    bias = torch.randn(12, requires_grad=True)
    args = (x, packed, state.absmax, state.nested.absmax, state.nested.code, state.offset, bias, [12, 64], 64, "nf4",
            torch.float32)
    torch.library.opcheck(torch.ops.fourbit.matmul_4bit.default, args)


def test_torch_compile_fullgraph_matches_eager(monkeypatch):
    monkeypatch.setenv("FOURBIT_BACKEND", "reference")
    torch._dynamo.reset()
    packed, state, _ = weight(16, 128)
    bias = torch.randn(16)

    def loss(x):
        return matmul_4bit(torch.tanh(x), packed, state, bias).square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises
    x1 = torch.randn(2, 5, 128, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    loss(x1).backward()
    compiled(x2).backward()
    assert rel_err(x2.grad, x1.grad.double()) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available() and not interpreting(), reason="no GPU and no Triton interpreter")
@pytest.mark.parametrize("m,k,bs", [(3, 128, 64), (17, 256, 32)])
def test_triton_gradients_match_reference(m, k, bs, monkeypatch):
    device = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
    packed, state, _ = weight(33, k, bs)
    packed, state = packed.to(device), state.to(device)
    bias = torch.randn(33, device=device)
    x = torch.randn(m, k, device=device)
    gy = torch.randn(m, 33, device=device)
    grads = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("FOURBIT_BACKEND", backend)
        xb, bb = x.clone().requires_grad_(), bias.clone().requires_grad_()
        matmul_4bit(xb, packed, state, bb).backward(gy)
        grads[backend] = (xb.grad, bb.grad)
    for got, want in zip(grads["triton"], grads["reference"]):
        assert rel_err(got, want.double()) < 1e-5


def test_bad_state():
    with pytest.raises(TypeError, match="QuantState"):
        matmul_4bit(torch.randn(2, 4), torch.zeros(4, 1, dtype=torch.uint8), {"absmax": None})
    packed, state = quantize(torch.randn(2, 4, 64))
    with pytest.raises(ValueError, match="2-D quantized weight"):
        matmul_4bit(torch.randn(2, 64), packed, state)
