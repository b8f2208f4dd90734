"""fourbit.cpu, the C kernels for CPU tensors, against the reference (fourbit.nf4).

Exact ops (4-bit quantize / dequantize, 8-bit blockwise, both AdamW steps, matmul_backward, the chunked
matmul) must give the reference's bytes; the fused GEMV (M <= GEMV_MAX_M) computes in float32 and must
sit within F.linear's tolerance against float64 (relative norm, as tests/test_matmul.py) and, per
element, within the rounding a float32 dot product and one output rounding allow. Every test runs on
each instruction set this CPU has (`isa`: the widest, and the portable C path). Outputs are poisoned
before a kernel writes them; shapes, dtypes and strides are drawn by hypothesis.
"""

from __future__ import annotations

import importlib
import shutil
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fourbit import cpu, nf4
from fourbit.cpu import _lib
from fourbit.cpu.matmul import compute_dtype
from fourbit.nf4 import adamw as ref_adamw
from fourbit.nf4 import blockwise as ref_blockwise
from fourbit.nf4.checks import ALLOWED_BLOCKSIZES

ref_matmul = importlib.import_module("fourbit.nf4.matmul")  # the module: fourbit.nf4.matmul is also the function

OK, WHY = cpu.available()
if not OK and shutil.which("cc") is None and shutil.which("gcc") is None:
    pytest.skip(f"no C compiler on this machine: {WHY}", allow_module_level=True)
# with a compiler the kernels must load: a broken build fails here instead of skipping
assert OK, WHY

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
OUT_ROUNDING = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
# the reference's plan rounds W to x's dtype first (2x slack on the unit); the fused GEMV keeps it in float32
W_ROUNDING = {torch.float32: 2.0**-16, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
FLOATS = [torch.float32, torch.float16, torch.bfloat16]
ISAS = sorted({_lib.isa_name(), "scalar"}, key=_lib.ISAS.index)


@pytest.fixture(params=ISAS, scope="module")
def isa(request):
    before = _lib.isa_name()
    assert _lib.set_isa(request.param) == request.param
    yield request.param
    _lib.set_isa(before)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def values(n: int, seed: int, dtype: torch.dtype, *, zeros: bool = False) -> torch.Tensor:
    """n values over many magnitudes (normal times 10^U(-6, 3)), optionally with an all-zero stretch."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 10 ** (torch.rand(n, generator=g) * 9 - 6)
    if zeros and n > 8:
        x[n // 4 : n // 4 + min(n // 2, 300)] = 0
    return x.to(dtype)


SIZES = st.one_of(st.sampled_from([1, 7, 63, 64, 65, 4097]), st.integers(1, 3000))


# ---- 4-bit quantize / dequantize --------------------------------------------------------------
@given(n=SIZES, dtype=st.sampled_from(FLOATS), bs=st.sampled_from(ALLOWED_BLOCKSIZES), qt=st.sampled_from(["nf4", "fp4"]),
       dq=st.booleans(), zeros=st.booleans(), transposed=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_quantize_and_dequantize_equal_the_reference(isa, n, dtype, bs, qt, dq, zeros, transposed, seed):
    x = values(n, seed, dtype, zeros=zeros)
    if transposed and n % 3 == 0:  # a strided view: both read it in row-major order
        x = x.view(3, n // 3).t()
    want_packed, want = nf4.quantize(x, blocksize=bs, quant_type=qt, double_quant=dq)
    packed, state = cpu.quantize(x, blocksize=bs, quant_type=qt, double_quant=dq)
    assert same_bytes(packed, want_packed)
    assert same_bytes(state.absmax, want.absmax) and state.shape == want.shape and state.dtype == want.dtype
    if dq:
        assert same_bytes(state.offset, want.offset) and same_bytes(state.nested.absmax, want.nested.absmax)
    for out_dtype in FLOATS + [torch.float64]:
        assert same_bytes(cpu.dequantize(want_packed, want, dtype=out_dtype), nf4.dequantize(want_packed, want, dtype=out_dtype))


def test_dequantize_rounds_ties_overflow_and_chunks_as_torch(isa):
    """bf16 ties to even (absmax whose low 16 bits are 0x8000: code 1.0 reproduces it exactly), fp16
    overflow to inf and subnormals; dequantize_into writes a block-aligned range of a poisoned buffer."""
    ties = torch.tensor([1.0 + k * 2.0**-8 + 2.0**-16 for k in range(64)])  # bf16 ties, both parities
    w = torch.cat([ties.repeat_interleave(64) * torch.linspace(0.2, 1.0, 64).repeat(64),
                   torch.full((64,), 7.0e4), torch.full((64,), 3.0e-6)])  # fp16 overflow, subnormals
    for block in range(64):
        w[block * 64] = ties[block]  # each block's absmax is a tie
    packed, state = nf4.quantize(w, blocksize=64, double_quant=False)
    for dtype in (torch.bfloat16, torch.float16):
        assert same_bytes(cpu.dequantize(packed, state, dtype=dtype), nf4.dequantize(packed, state, dtype=dtype))
    full = nf4.dequantize(packed, state, dtype=torch.float32)
    out = torch.full((640,), float("nan"))
    assert cpu.dequantize_into(packed, state, out, start=1280) is out and torch.equal(out, full[1280:1920])
    with pytest.raises(ValueError, match="block-aligned"):
        cpu.dequantize_into(packed, state, out, start=100)


def test_quantize_rejects_non_finite_like_the_reference():
    x = torch.randn(300)
    x[77] = float("inf")
    with pytest.raises(ValueError) as ours:
        cpu.quantize(x)
    with pytest.raises(ValueError) as theirs:
        nf4.quantize(x)
    assert str(ours.value) == str(theirs.value)


# ---- 8-bit blockwise --------------------------------------------------------------------------
def random_code(seed: int) -> torch.Tensor:
    """A sorted 256-entry code with clusters far denser than the dynamic maps' (the bins of the
    nearest-code table then hold several midpoints and take the binary search)."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.rand(200, generator=g) * 2 - 1, 0.5 + torch.rand(56, generator=g) * 1e-5]).sort().values


@given(n=SIZES, dtype=st.sampled_from(FLOATS), bs=st.sampled_from([64, 256, 1000, 4096]),
       which=st.sampled_from(["signed", "unsigned", "random"]), special=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_blockwise_equals_the_reference(isa, n, dtype, bs, which, special, seed):
    code = {"signed": nf4.dynamic_map(signed=True), "unsigned": nf4.dynamic_map(signed=False)}.get(which) \
        if which != "random" else random_code(seed)
    x = values(n, seed, dtype, zeros=True)
    if which == "unsigned":
        x = x.abs()
    if special and n >= 8:  # exact midpoints (ties go to the even index), NaN, inf
        mids = ref_blockwise.code_midpoints(code)
        k = min(n - 3, mids.numel())
        x[:k] = mids[:k].to(dtype)
        x[-1], x[-2] = float("nan"), float("inf")
        x[0] = 1.0  # absmax of the first block: the midpoints stay midpoints after scaling
    q, absmax = cpu.quantize_blockwise(x, code, bs)
    want_q, want_absmax = ref_blockwise.quantize_blockwise(x, code, bs)
    assert same_bytes(q, want_q) and same_bytes(absmax, want_absmax)
    for out_dtype in FLOATS:
        assert same_bytes(cpu.dequantize_blockwise(want_q, want_absmax, code, bs, out_dtype),
                          ref_blockwise.dequantize_blockwise(want_q, want_absmax, code, bs, out_dtype))


# ---- AdamW ------------------------------------------------------------------------------------
HYPER = st.fixed_dictionaries({
    "lr": st.sampled_from([1e-4, 2e-3, 0.1]), "beta1": st.sampled_from([0.9, 0.5]), "beta2": st.sampled_from([0.999, 0.95]),
    "eps": st.sampled_from([1e-8, 1e-6]), "weight_decay": st.sampled_from([0.0, 0.01]), "step": st.integers(1, 1000)})


@given(n=SIZES, p_dtype=st.sampled_from(FLOATS), g_dtype=st.sampled_from(FLOATS), hyper=HYPER, seed=st.integers(0, 2**31 - 1))
def test_adamw_steps_equal_the_reference(isa, n, p_dtype, g_dtype, hyper, seed):
    g = torch.Generator().manual_seed(seed)
    p, grad = torch.randn(n, generator=g).to(p_dtype), (torch.randn(n, generator=g) * 1e-2).to(g_dtype)
    m, v = torch.randn(n, generator=g) * 1e-2, torch.rand(n, generator=g) * 1e-4
    ours, want = [t.clone() for t in (p, grad, m, v)], [t.clone() for t in (p, grad, m, v)]
    cpu.adamw_update_32bit(*ours, **hyper)
    ref_adamw.adamw_update_32bit(*want, **hyper)
    assert all(same_bytes(a, b) for a, b in zip(ours, want))

    qmap1, qmap2 = nf4.dynamic_map(signed=True), nf4.dynamic_map(signed=False)
    q1, a1 = ref_blockwise.quantize_blockwise(m, qmap1)
    q2, a2 = ref_blockwise.quantize_blockwise(v, qmap2)
    ours, want = [t.clone() for t in (p, grad, q1, q2, a1, a2)], [t.clone() for t in (p, grad, q1, q2, a1, a2)]
    cpu.adamw_update_8bit(*ours, qmap1, qmap2, **hyper)
    ref_adamw.adamw_update_8bit(*want, qmap1, qmap2, **hyper)
    assert all(same_bytes(a, b) for a, b in zip(ours, want))


@given(sizes=st.lists(st.one_of(st.integers(0, 700), st.sampled_from([1, 256, 257, 40000])), min_size=1, max_size=12),
       dtypes=st.lists(st.sampled_from(FLOATS), min_size=12, max_size=12), hyper=HYPER, threads=st.sampled_from([1, 2, 3]),
       seed=st.integers(0, 2**31 - 1))
def test_adamw_many_equals_the_reference_per_tensor(isa, sizes, dtypes, hyper, threads, seed):
    """One call for a group (the optimizer's path) gives each tensor the single step's bytes, whatever the
    sizes (empty, partial 256-blocks, one large enough to be split over threads) and dtypes."""
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randn(n, generator=g).to(d) for n, d in zip(sizes, dtypes)]
    gs = [(torch.randn(n, generator=g) * 1e-2).to(d) for n, d in zip(sizes, reversed(dtypes))]
    ms, vs = [torch.randn(n, generator=g) * 1e-2 for n in sizes], [torch.rand(n, generator=g) * 1e-4 for n in sizes]
    ours, want = ([[t.clone() for t in ts] for ts in (ps, gs, ms, vs)] for _ in range(2))
    with mock.patch.object(_lib, "threads", lambda: threads):
        cpu.adamw_update_32bit_many(*ours, **hyper)
    ref_adamw.adamw_update_32bit_many(*want, **hyper)
    assert all(same_bytes(a, b) for xs, ys in zip(ours, want) for a, b in zip(xs, ys))

    qmap1, qmap2 = nf4.dynamic_map(signed=True), nf4.dynamic_map(signed=False)
    q1s, a1s = zip(*(ref_blockwise.quantize_blockwise(m, qmap1) for m in ms))
    q2s, a2s = zip(*(ref_blockwise.quantize_blockwise(v, qmap2) for v in vs))
    ours, want = ([[t.clone() for t in ts] for ts in (ps, gs, q1s, q2s, a1s, a2s)] for _ in range(2))
    with mock.patch.object(_lib, "threads", lambda: threads):
        cpu.adamw_update_8bit_many(*ours, qmap1, qmap2, **hyper)
    ref_adamw.adamw_update_8bit_many(*want, qmap1, qmap2, **hyper)
    assert all(same_bytes(a, b) for xs, ys in zip(ours, want) for a, b in zip(xs, ys))


@given(sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=10), dtype=st.sampled_from(FLOATS + [torch.float64]),
       bad=st.lists(st.tuples(st.integers(0, 9), st.floats(0, 1), st.sampled_from([float("nan"), float("inf"), -float("inf")])),
                    max_size=4),
       seed=st.integers(0, 2**31 - 1))
def test_any_nonfinite_finds_every_nan_and_infinity(sizes, dtype, bad, seed):
    g = torch.Generator().manual_seed(seed)
    xs = [(torch.randn(n, generator=g) * 1e3).to(dtype) for n in sizes]
    xs = [x.clamp(-60000, 60000) if dtype == torch.float16 else x for x in xs]
    for t, where, value in bad:
        if t < len(xs) and xs[t].numel():
            xs[t][min(int(where * xs[t].numel()), xs[t].numel() - 1)] = value
    want = [not bool(torch.isfinite(x).all()) for x in xs]
    assert cpu.any_nonfinite(xs) == want
    assert ref_adamw.any_nonfinite(xs) == want


# ---- matmul -----------------------------------------------------------------------------------
@given(n=st.integers(1, 40), kb=st.integers(1, 6), k_extra=st.sampled_from([0, 0, 0, 1, 33]),
       bs=st.sampled_from([32, 64, 256]), dq=st.booleans(), qt=st.sampled_from(["nf4", "fp4"]), m=st.integers(1, 64),
       dtype=st.sampled_from(FLOATS), has_bias=st.booleans(), strided=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_matmul_against_float64(isa, n, kb, k_extra, bs, dq, qt, m, dtype, has_bias, strided, seed):
    """K = kb * bs (+ k_extra: rows that start inside a block, odd K); M up to 64 crosses GEMV_MAX_M."""
    k = kb * bs + k_extra
    g = torch.Generator().manual_seed(seed)
    packed, state = nf4.quantize(torch.randn(n, k, generator=g), blocksize=bs, double_quant=dq, quant_type=qt)
    w64 = nf4.dequantize(packed, state, dtype=torch.float32).double()
    x = torch.randn(m, 2 * k if strided else k, generator=g).to(dtype)
    if strided:
        x = x[:, ::2]  # every other column: a non-contiguous x
    bias = torch.randn(n, generator=g) if has_bias else None
    out = torch.full((m, n), float("nan"), dtype=dtype)  # poisoned
    y = cpu.matmul(x, packed, state, bias, out=out)
    assert y is out and y.dtype == dtype
    want = x.double() @ w64.T + (0 if bias is None else bias.to(dtype).double())
    terms = x.double().abs() @ w64.abs().T + (0 if bias is None else bias.to(dtype).double().abs())
    err = (y.double() - want).abs()
    unit = 2.0**-16 if m <= cpu.GEMV_MAX_M or compute_dtype(dtype) == torch.float32 else W_ROUNDING[dtype]
    assert bool((err <= unit * terms + 2 * OUT_ROUNDING[dtype] * want.abs() + 1e-30).all()), (err / terms).max()
    if want.numel() >= 32:
        assert ((y.double() - want).norm() / want.norm()).item() < TOL[dtype]
    if m > cpu.GEMV_MAX_M and dtype == torch.float32:  # the reference's own plan: the same bits
        assert torch.equal(y, nf4.matmul(x, packed, state, bias))
    assert torch.equal(cpu.matmul(x, packed, state, bias), y)  # the allocating call agrees


@pytest.mark.parametrize("dtype", FLOATS)
def test_matmul_chunks_and_backward_equal_the_reference(isa, dtype, monkeypatch):
    """float32 (and half dtypes where the CPU multiplies them natively): the reference's bits; otherwise
    the float32 product rounded once to the dtype, which is what the half-precision result must equal."""
    monkeypatch.setattr(ref_matmul, "_CHUNK_VALUES", 1000)  # (300, 100) bs 64 -> 10-row chunks on block edges
    packed, state = nf4.quantize(torch.randn(300, 100))
    x = torch.randn(2, 9, 100).to(dtype)
    bias = torch.randn(300)
    gy = torch.randn(3, 2, 300).to(dtype)
    if compute_dtype(dtype) == dtype:
        assert torch.equal(cpu.matmul(x, packed, state, bias), nf4.matmul(x, packed, state, bias))
        assert torch.equal(cpu.matmul_backward(gy, packed, state), ref_matmul.matmul_backward(gy, packed, state))
        return
    w32 = nf4.dequantize(packed, state, dtype=torch.float32)
    want = torch.nn.functional.linear(x.float(), w32, bias.to(dtype).float()).to(dtype)
    assert torch.equal(cpu.matmul(x, packed, state, bias), want)
    assert torch.equal(cpu.matmul_backward(gy, packed, state), (gy.float() @ w32).to(dtype))


def test_gemv_threads_do_not_change_results():
    """Rows of W are split over threads; each output's arithmetic is the same whatever the split."""
    packed, state = nf4.quantize(torch.randn(2048, 512))
    x = torch.randn(3, 512)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu.matmul(x, packed, state)
        torch.set_num_threads(2)
        two = cpu.matmul(x, packed, state)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_isa_choice_is_capped_at_what_the_cpu_runs():
    lib = _lib.library()
    best = _lib.ISAS[lib.fourbit_cpu_best_isa()]
    before = _lib.isa_name()
    try:
        assert _lib.set_isa("avx512") == best  # this CPU's best (its self-check passed)
        assert _lib.set_isa("scalar") == "scalar"
    finally:
        _lib.set_isa(before)
    with pytest.raises(ValueError, match="isa must be one of"):
        _lib.set_isa("sse9")


@pytest.mark.bnb
def test_bench_cpu_smoke(tmp_path):
    """One tiny repetition of benchmarks/bench_cpu.py (every section, both providers checked for
    correctness first), and its goal table generated from the rows it wrote."""
    pytest.importorskip("bitsandbytes")
    from benchmarks import bench_cpu

    bench_cpu.main(["--smoke", "--out", str(tmp_path)])
    table = (tmp_path / "cpu_goals.md").read_text()
    for op in ("dequantize", "quantize", "matmul_4bit", "quantize_blockwise", "dequantize_blockwise", "adamw32", "adamw8"):
        assert f"| {op} |" in table, op
    assert "A fresh output's cost" in table
    assert (tmp_path / "cpu.json").exists()
