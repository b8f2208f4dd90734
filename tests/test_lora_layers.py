"""Linear4bit and LoRALinear on their own: numerics against float64, checkpoints in bitsandbytes'
keys (both directions), stored bytes that never change, LoRA maths, merge, bad arguments."""

from __future__ import annotations

import math

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fourbit.lora import Linear4bit, LoRALinear
from fourbit.nf4 import dequantize as nf4_dequantize
from helpers import BOTH_BACKENDS, assert_gemv_parity, rel_err, use_backend

# relative-norm bounds for a (..., K) @ (K, N) product computed in each dtype against float64
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def dense(n_out: int, k: int, bias: bool = True, dtype=torch.float32) -> nn.Linear:
    layer = nn.Linear(k, n_out, bias=bias, dtype=dtype)
    with torch.no_grad():
        layer.weight.normal_(0, 0.05)
        if bias:
            layer.bias.normal_(0, 0.1)
    return layer


def reference(layer: Linear4bit, x: torch.Tensor) -> torch.Tensor:
    """x @ W^T + b in float64, W the exact float32 dequantized weight."""
    w = layer.dequantize(torch.float32).double()  # (N, K)
    y = x.double() @ w.T
    return y if layer.bias is None else y + layer.bias.double()


def snapshot(layer: Linear4bit):
    return layer.weight.detach().clone(), layer.quant_state.to("cpu")


def unchanged(layer: Linear4bit, snap) -> bool:
    packed, state = snap
    return torch.equal(layer.weight.detach().cpu(), packed) and layer.quant_state.equal(state)


# ---- Linear4bit ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_float64(dtype, bias):
    layer = Linear4bit.from_linear(dense(40, 96, bias, dtype))  # K = 96: blocks of 64 cross rows
    x = torch.randn(2, 3, 96).to(dtype)
    y = layer(x)
    assert y.shape == (2, 3, 40) and y.dtype == dtype
    assert rel_err(y, reference(layer, x)) < TOL[dtype]


def test_compute_dtype_is_used_and_output_keeps_input_dtype():
    layer = Linear4bit.from_linear(dense(24, 64), compute_dtype=torch.float32)
    x = torch.randn(5, 64).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    # computed in float32, then rounded once to bf16: equal to rounding the float32 result
    assert torch.equal(y, layer(x.float()).to(torch.bfloat16))


def test_backward_gives_input_and_bias_gradients_only():
    layer = Linear4bit.from_linear(dense(40, 128))
    x = torch.randn(7, 128, requires_grad=True)
    gy = torch.randn(7, 40)
    layer(x).backward(gy)
    w = layer.dequantize(torch.float32).double()
    assert rel_err(x.grad, gy.double() @ w) < TOL[torch.float32]
    assert rel_err(layer.bias.grad, gy.double().sum(0)) < TOL[torch.float32]
    assert layer.weight.grad is None and not layer.weight.requires_grad


def test_dequantize_is_the_reference_dequantization():
    lin = dense(33, 64, dtype=torch.bfloat16)
    layer = Linear4bit.from_linear(lin, blocksize=128, double_quant=False)
    w = layer.dequantize()
    assert w.dtype == torch.bfloat16 and w.shape == (33, 64)
    assert torch.equal(w, nf4_dequantize(layer.weight, layer.quant_state))
    assert rel_err(w, lin.weight) < 0.12  # NF4 on Gaussian weights: ~10 % relative error


def test_constructor_is_lazy_and_the_first_move_quantizes_like_from_linear():
    """The constructor allocates nn.Linear's initialisation and quantizes nothing; the first
    `.to(device)` quantizes that weight in place (same Parameter object) into from_linear's bytes."""
    torch.manual_seed(3)
    layer = Linear4bit(64, 16, bias=True)
    torch.manual_seed(3)
    lin = nn.Linear(64, 16)
    assert isinstance(layer, nn.Linear) and layer.quant_state is None and not layer.weight.bnb_quantized
    assert torch.equal(layer.weight, lin.weight) and torch.equal(layer.bias, lin.bias)
    param = layer.weight
    layer.to("cpu")
    assert layer.weight is param and param.bnb_quantized and param.quant_state is layer.quant_state
    assert torch.equal(layer.weight, Linear4bit.from_linear(lin).weight)
    assert layer.weight.dtype == torch.uint8 and layer.weight.shape == (64 * 16 // 2, 1)
    moved = layer.weight.data.clone()
    layer.to("cpu")  # a second move only moves bytes
    assert torch.equal(layer.weight.data, moved)


def test_state_dict_round_trip_and_dense_load():
    src = Linear4bit.from_linear(dense(48, 64), blocksize=128, double_quant=False)
    dst = Linear4bit(64, 48)  # nf4, double quant, blocksize 64: all replaced by the checkpoint
    dst.load_state_dict(src.state_dict())
    assert dst.quant_state.equal(src.quant_state)
    assert (dst.blocksize, dst.double_quant) == (128, False)
    x = torch.randn(4, 64)
    assert torch.equal(dst(x), src(x))
    # a dense nn.Linear checkpoint is quantized with the layer's own settings
    lin = dense(48, 64)
    dst2 = Linear4bit(64, 48)
    dst2.load_state_dict(lin.state_dict())
    assert torch.equal(dst2.weight, Linear4bit.from_linear(lin).weight)


@settings(max_examples=25)
@given(
    n_out=st.integers(1, 40),
    k=st.integers(1, 130),
    bias=st.booleans(),
    blocksize=st.sampled_from([32, 64, 128]),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    double_quant=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
)
def test_any_layer_round_trips_through_its_state_dict(n_out, k, bias, blocksize, quant_type, double_quant, dtype):
    """Odd shapes (blocks crossing rows, an odd number of codes), both code books, with and without
    double quantization: a fresh layer loaded from the state dict is the same layer."""
    src = Linear4bit.from_linear(dense(n_out, k, bias, dtype), blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
    dst = Linear4bit(k, n_out, bias)
    dst.load_state_dict(src.state_dict())
    assert dst.quant_state.equal(src.quant_state) and torch.equal(dst.weight, src.weight)
    x = torch.randn(3, k)
    assert torch.equal(dst(x), src(x))
    assert rel_err(src(x), reference(src, x)) < TOL[torch.float32]


def test_a_model_checkpoint_saves_with_safetensors(tmp_path):
    """Layers share their code tables in memory, but not in a checkpoint (safetensors refuses
    tensors that share storage)."""
    make = lambda: nn.Sequential(Linear4bit.from_linear(dense(32, 64)), nn.ReLU(), Linear4bit.from_linear(dense(16, 32)))
    src, dst = make(), make()
    assert src[0].quant_state.code is src[2].quant_state.code
    safetensors.torch.save_file(src.state_dict(), tmp_path / "model.safetensors")
    dst.load_state_dict(safetensors.torch.load_file(tmp_path / "model.safetensors"))
    x = torch.randn(3, 64)
    assert torch.equal(dst(x), src(x))


def test_loading_replaces_the_whole_quant_state():
    """bitsandbytes copies the bytes of a loaded checkpoint but keeps its old absmax; we don't."""
    a = Linear4bit.from_linear(dense(32, 64))
    b = Linear4bit.from_linear(dense(32, 64))
    assert not torch.equal(a.quant_state.nested.absmax, b.quant_state.nested.absmax)
    b.load_state_dict(a.state_dict())
    assert b.quant_state.equal(a.quant_state) and torch.equal(b.weight, a.weight)
    assert b.quant_state.absmax.data_ptr() != a.quant_state.absmax.data_ptr()  # copies, not aliases


def test_bad_checkpoints_name_the_key():
    layer = Linear4bit(64, 32)
    other = Linear4bit(64, 16).state_dict()
    with pytest.raises(RuntimeError, match=r"weight.*shape \(16, 64\)"):
        layer.load_state_dict(other)
    sd = layer.to("cpu").state_dict()  # quantized now (a still-dense layer saves a dense weight)
    del sd["weight.quant_state.bitsandbytes__nf4"]
    with pytest.raises(RuntimeError, match="no 'weight.quant_state.bitsandbytes__"):
        layer.load_state_dict(sd)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        layer.load_state_dict({**layer.state_dict(), "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="expects 64"):
        layer(torch.randn(2, 63))


def test_forward_never_changes_stored_bytes():
    layer = Linear4bit.from_linear(dense(64, 128))
    snap = snapshot(layer)
    x = torch.randn(3, 128)
    layer.eval()
    with torch.no_grad():
        y_eval = layer(x)
    assert unchanged(layer, snap)
    layer.train()
    xg = x.clone().requires_grad_(True)
    layer(xg).sum().backward()
    assert unchanged(layer, snap)
    assert torch.equal(layer(x), y_eval)


def test_moving_and_casting_never_requantize():
    """`model.half()` must not reinterpret a bfloat16 quant_storage view of the codes."""
    layer = Linear4bit.from_linear(dense(32, 64), quant_storage=torch.bfloat16)
    bytes_before = layer.weight.detach().view(torch.uint8).clone()
    state_before = layer.quant_state.to("cpu")
    for move in (lambda m: m.half(), lambda m: m.to(torch.float64), lambda m: m.to("cpu"), lambda m: m.float()):
        move(layer)
        assert layer.weight.dtype == torch.bfloat16
        assert torch.equal(layer.weight.detach().view(torch.uint8), bytes_before)
        assert layer.quant_state.equal(state_before)
    assert layer.bias.dtype == torch.float32
    names = [n for n, _ in layer.named_parameters()]
    assert names == ["weight", "bias"]
    if torch.cuda.is_available():
        layer.cuda()
        assert layer.weight.is_cuda and layer.quant_state.absmax.is_cuda
        assert torch.equal(layer.weight.detach().cpu().view(torch.uint8), bytes_before)
        assert layer.quant_state.to("cpu").equal(state_before)


def test_quantized_bytes_per_weight():
    layer = Linear4bit.from_linear(dense(1024, 1024))
    # 4 bits + 8 bits per 64 + 32 bits per 256 * 64, plus the 0-dim offset and two shared tables
    assert layer.quantized_bytes() / (1024 * 1024) < 0.5175


# ---- bitsandbytes interop (their CPU backend; train mode avoids their in-place AVX512 repack) ----
try:
    import bitsandbytes as bnb
except ImportError:  # only the interop tests below skip
    bnb = None
needs_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes is in the test extra: pip install 'fourbit[test]'")


def bnb_layer(lin: nn.Linear, **kw) -> "bnb.nn.Linear4bit":
    layer = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, quant_type="nf4", **kw)
    layer.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False, quant_type="nf4", module=layer)
    if lin.bias is not None:
        layer.bias = nn.Parameter(lin.bias.detach().clone())
    layer = layer.to("cpu")  # bitsandbytes quantizes here, keeping the weight's dtype
    layer.support_avx512bf16_for_cpu = False
    return layer.train()


@pytest.mark.bnb
@needs_bnb
def test_state_dict_layout_equals_bitsandbytes():
    lin = dense(96, 128, dtype=torch.bfloat16)
    theirs = bnb_layer(lin).state_dict()
    ours = Linear4bit.from_linear(lin).state_dict()
    assert list(ours) == list(theirs)
    for k in theirs:
        assert (ours[k].dtype, ours[k].shape) == (theirs[k].dtype, theirs[k].shape), k
    # the JSON blob, byte for byte (offset included: both take torch's mean of the same absmax)
    assert torch.equal(ours["weight.quant_state.bitsandbytes__nf4"], theirs["weight.quant_state.bitsandbytes__nf4"])


@pytest.mark.bnb
@needs_bnb
@BOTH_BACKENDS
def test_bitsandbytes_checkpoint_loads_bit_identical(tmp_path, backend, monkeypatch):
    use_backend(monkeypatch, backend)
    lin = dense(64, 192)  # K a multiple of 64: bnb's CPU dequant is wrong otherwise (SPEC §4)
    theirs = bnb_layer(lin, compute_dtype=torch.float32)
    safetensors.torch.save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, tmp_path / "bnb.safetensors")
    ours = Linear4bit(192, 64)
    ours.load_state_dict(safetensors.torch.load_file(tmp_path / "bnb.safetensors"))
    x = torch.randn(2, 5, 192)
    assert_gemv_parity(ours(x), theirs(x), backend)
    assert torch.equal(ours.dequantize(), bnb.functional.dequantize_4bit(theirs.weight.data, theirs.weight.quant_state))


@pytest.mark.bnb
@needs_bnb
@BOTH_BACKENDS
def test_our_checkpoint_loads_into_bitsandbytes(tmp_path, backend, monkeypatch):
    """The route transformers takes for a 4-bit checkpoint: Params4bit.from_prequantized."""
    use_backend(monkeypatch, backend)
    ours = Linear4bit.from_linear(dense(64, 128), compute_dtype=torch.float32)
    safetensors.torch.save_file(ours.state_dict(), tmp_path / "ours.safetensors")
    sd = safetensors.torch.load_file(tmp_path / "ours.safetensors")
    theirs = bnb.nn.Linear4bit(128, 64, quant_type="nf4", compute_dtype=torch.float32, device="meta")
    stats = {k[len("weight.") :]: v for k, v in sd.items() if k.startswith("weight.")}
    theirs.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu", module=theirs)
    theirs.bias = nn.Parameter(sd["bias"])
    theirs.support_avx512bf16_for_cpu = False
    x = torch.randn(6, 128)
    assert_gemv_parity(ours(x), theirs.train()(x), backend)


@pytest.mark.bnb
@needs_bnb
def test_the_bitsandbytes_eval_trap_is_real_and_ours_is_immune():
    """On AVX512-BF16 CPUs bnb repacks its weight in place on an eval/no-grad forward. If this CPU
    lacks the feature the trap cannot fire and only our half of the test runs."""
    lin = dense(64, 128)
    theirs = bnb_layer(lin, compute_dtype=torch.float32)
    ours = Linear4bit.from_linear(lin, compute_dtype=torch.float32)
    x = torch.randn(4, 128)
    if bnb.functional.has_avx512bf16():
        theirs.support_avx512bf16_for_cpu = True
        before = theirs.weight.data.clone()
        with torch.no_grad():
            theirs.eval()(x)
        assert not torch.equal(theirs.weight.data, before)  # their stored bytes moved
    snap = snapshot(ours)
    with torch.no_grad():
        ours.eval()(x)
    assert unchanged(ours, snap)


# ---- LoRALinear ------------------------------------------------------------------------------
def lora(r=4, alpha=8, k=64, n=32, **kw) -> LoRALinear:
    layer = LoRALinear(Linear4bit.from_linear(dense(n, k)), r=r, alpha=alpha, **kw)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    return layer


def test_lora_initialisation_follows_peft():
    layer = LoRALinear(Linear4bit.from_linear(dense(32, 256)), r=8, alpha=16)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=sqrt(5)) on fan_in 256
    a = layer.lora_A.weight
    assert a.shape == (8, 256) and a.abs().max() <= bound and a.abs().max() > 0.9 * bound
    x = torch.randn(3, 256)
    assert torch.equal(layer(x), layer.base(x))


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_forward_matches_float64(use_rslora):
    layer = lora(r=4, alpha=8, use_rslora=use_rslora)
    scale = 8 / (math.sqrt(4) if use_rslora else 4)
    assert layer.scaling == scale
    x = torch.randn(2, 5, 64)
    a, b = layer.lora_A.weight.double(), layer.lora_B.weight.double()
    expected = reference(layer.base, x) + scale * (x.double() @ a.T @ b.T)
    assert rel_err(layer(x), expected) < TOL[torch.float32]


def test_lora_gradcheck_float64():
    """The adapter's own gradients (matmul_4bit only takes fp32/fp16/bf16, so the base here is a dense
    float64 nn.Linear; Linear4bit's backward is checked against float64 above)."""
    layer = LoRALinear(dense(8, 64, dtype=torch.float64), r=2, alpha=4, dtype=torch.float64)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, 64, dtype=torch.float64, requires_grad=True)
    a, b = layer.lora_A.weight, layer.lora_B.weight
    assert torch.autograd.gradcheck(lambda x, a, b: torch.func.functional_call(layer, {"lora_A.weight": a, "lora_B.weight": b}, (x,)), (x, a, b))
    layer(x).sum().backward()
    assert layer.lora_A.weight.grad is not None and layer.lora_B.weight.grad is not None


def test_lora_with_checkpoint_gives_same_gradients():
    layer = lora(dropout=0.0)
    x = torch.randn(4, 64)
    layer(x).square().sum().backward()
    grads = [p.grad.clone() for p in (layer.lora_A.weight, layer.lora_B.weight)]
    layer.zero_grad()
    for reentrant in (False, True):
        xr = x.clone().requires_grad_(reentrant)  # the reentrant variant needs an input with grad
        torch.utils.checkpoint.checkpoint(layer, xr, use_reentrant=reentrant).square().sum().backward()
        for p, g in zip((layer.lora_A.weight, layer.lora_B.weight), grads):
            assert torch.equal(p.grad, g)
        layer.zero_grad()


def test_disabled_and_dropout():
    layer = lora(dropout=0.5)
    x = torch.randn(4, 64)
    with layer.disabled():
        assert torch.equal(layer(x), layer.base(x))
    assert layer.enabled
    layer.eval()
    assert torch.equal(layer(x), layer(x))  # no dropout in eval
    layer.train()
    torch.manual_seed(0)
    y1 = layer(x)
    torch.manual_seed(1)
    assert not torch.equal(y1, layer(x))


def test_merge_folds_the_update():
    layer = lora(r=4, alpha=8)
    x = torch.randn(5, 64)
    merged = layer.merge()
    assert isinstance(merged, nn.Linear) and merged.weight.dtype == torch.float32
    assert rel_err(merged(x), layer(x)) < TOL[torch.float32]
    q, err = layer.merge_requantized()
    assert isinstance(q, Linear4bit) and q.blocksize == layer.base.blocksize
    w = merged.weight.double()
    assert err == pytest.approx(rel_err(q.dequantize(torch.float64), w), rel=1e-12)
    assert 0.0 < err < 0.12
    dense_lora = LoRALinear(dense(32, 64), r=2, alpha=2)
    with torch.no_grad():
        dense_lora.lora_B.weight.normal_()
    assert rel_err(dense_lora.merge()(x), dense_lora(x)) < TOL[torch.float32]
    with pytest.raises(TypeError, match="Linear4bit base"):
        dense_lora.merge_requantized()


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"r": 0}, "rank r"),
        ({"r": -2}, "rank r"),
        ({"r": 2.0}, "rank r"),
        ({"alpha": 0}, "alpha"),
        ({"alpha": -1.0}, "alpha"),
        ({"dropout": -0.1}, "dropout"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_lora_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        LoRALinear(Linear4bit(64, 8), **kw)
