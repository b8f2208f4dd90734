"""The NF4/FP4 format against bitsandbytes 0.50 (CPU backend), over hypothesis-drawn inputs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fourbit import nf4
from fourbit.nf4.codes import FP4_THRESHOLDS, NF4_THRESHOLDS
from fourbit.nf4.quant import double_quantize
from helpers import cpu_stored_absmax, explain_4bit_differences, explain_8bit_differences

bnb = pytest.importorskip("bitsandbytes")
F = bnb.functional

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
STORAGES = [torch.uint8, torch.float16, torch.bfloat16, torch.float32]

shapes = st.one_of(
    st.sampled_from([(1,), (7,), (63,), (65,), (4097,), (64, 64), (3, 65), (2, 3, 7), (5, 33, 17)]),
    st.lists(st.integers(1, 97), min_size=1, max_size=3).map(tuple),
)


def random_tensor(shape, dtype, seed, kind):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if kind == "heavy":  # outliers, like real LLM weights
        x = x * torch.where(torch.rand(shape, generator=g) < 0.01, 20.0, 1.0)
    elif kind == "zero_blocks":  # some all-zero blocks
        flat = x.reshape(-1)
        flat[: min(flat.numel(), 96)] = 0
    elif kind == "tiny":
        x = x * 1e-3
    return x.to(dtype)


@pytest.mark.bnb
def test_code_tables_equal_bitsandbytes():
    assert torch.equal(nf4.NF4_CODE, F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(nf4.FP4_CODE, F.get_4bit_type("fp4", device="cpu"))
    for signed in (True, False):
        assert torch.equal(nf4.dynamic_map(signed), F.create_dynamic_map(signed))


def test_nf4_rederived_from_normal_quantiles():
    assert torch.equal(nf4.derive_nf4(), nf4.NF4_CODE)
    # the exact QLoRA offset (not truncated) gets several values wrong: the truncation matters
    assert not torch.equal(nf4.derive_nf4(1 - 0.5 * (1 / 30 + 1 / 32)), nf4.NF4_CODE)


def test_thresholds_are_cuda_values():
    cuda_nf4 = [-0.84809637, -0.61063290, -0.45999527, -0.33967942, -0.23460740, -0.13791174, -0.045525018,
                0.039790150, 0.12025525, 0.20352125, 0.29201376, 0.38931254, 0.50166345, 0.64278692, 0.86147845]
    assert torch.allclose(NF4_THRESHOLDS, torch.tensor(cuda_nf4), rtol=0, atol=1e-8)
    assert FP4_THRESHOLDS.tolist() == torch.tensor(
        [0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333]).tolist()


def test_dynamic_map_layout():
    signed, unsigned = nf4.dynamic_map(True), nf4.dynamic_map(False)
    assert signed[127] == 0 and signed[255] == 1 and signed[0] == torch.tensor(-0.99296875)
    assert unsigned[0] == 0 and unsigned[255] == 1
    assert bool((signed[1:] >= signed[:-1]).all()) and bool((unsigned[1:] >= unsigned[:-1]).all())


@pytest.mark.bnb
@settings(max_examples=60)
@given(
    shape=shapes,
    dtype=st.sampled_from(DTYPES),
    blocksize=st.sampled_from(nf4.ALLOWED_BLOCKSIZES),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    double_quant=st.booleans(),
    storage=st.sampled_from(STORAGES),
    kind=st.sampled_from(["normal", "heavy", "zero_blocks", "tiny"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_quantize_matches_bitsandbytes(shape, dtype, blocksize, quant_type, double_quant, storage, kind, seed):
    x = random_tensor(shape, dtype, seed, kind)
    nbytes = (x.numel() + 1) // 2
    itemsize = torch.empty(0, dtype=storage).element_size()
    if nbytes % itemsize:
        with pytest.raises(ValueError, match="not a multiple"):
            nf4.quantize(x, blocksize=blocksize, quant_type=quant_type, quant_storage=storage)
        return
    packed, state = nf4.quantize(
        x, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant, quant_storage=storage
    )
    ref, ref_state = F.quantize_4bit(
        x, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant, quant_storage=storage
    )
    assert packed.dtype == ref.dtype and packed.shape == ref.shape
    assert state.shape == ref_state.shape and state.dtype == ref_state.dtype
    assert torch.equal(state.code, ref_state.code)
    if not torch.equal(packed.view(torch.uint8), ref.view(torch.uint8)):
        explain_4bit_differences(x, packed, ref, blocksize, quant_type)  # raises if any is unexplained
    raw_absmax = nf4.quantize(x, blocksize=blocksize, quant_type=quant_type, double_quant=False)[1].absmax
    cpu_absmax = cpu_stored_absmax(raw_absmax, x.numel(), blocksize)
    if double_quant:
        qabs, offset, nested = double_quantize(cpu_absmax)  # our double quantization of the CPU's scales
        assert torch.equal(offset, ref_state.offset)
        assert torch.equal(nested.absmax, ref_state.state2.absmax)
        assert torch.equal(state.nested.code, ref_state.state2.code)
        assert state.absmax.dtype == ref_state.absmax.dtype == torch.uint8
        explain_8bit_differences(cpu_absmax - offset, qabs, ref_state.absmax, nested.code)
        if torch.equal(cpu_absmax, raw_absmax):
            assert torch.equal(state.offset, offset) and torch.equal(state.absmax, qabs)
        # our nested codes are the exact nearest (ties to even) of the normalised scales
        if raw_absmax.numel() <= 256 and state.nested.absmax.item() > 0:
            s = (raw_absmax - state.offset) * (1.0 / state.nested.absmax[0])
            assert torch.equal(state.absmax, nf4.nearest_code(s, state.nested.code).to(torch.uint8))
    else:
        assert torch.equal(cpu_absmax, ref_state.absmax)
        assert torch.equal(state.absmax, raw_absmax)


def _bnb_cpp_row_bug(shape, blocksize) -> bool:
    """bitsandbytes' AVX-512 C++ dequantizer (last dim even, blocksize < 2048) looks scales up per
    row and is wrong when the row length is not a multiple of the blocksize (SPEC §4)."""
    last = shape[-1] if shape else 1
    return last % 2 == 0 and blocksize < 2048 and last % blocksize != 0


@pytest.mark.bnb
@settings(max_examples=50)
@given(
    shape=shapes,
    dtype=st.sampled_from(DTYPES),
    out_dtype=st.sampled_from(DTYPES),
    blocksize=st.sampled_from(nf4.ALLOWED_BLOCKSIZES),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    double_quant=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
@example(shape=(1, 1, 1), dtype=torch.float32, out_dtype=torch.float32, blocksize=32, quant_type="nf4",
         double_quant=False, seed=0)  # one packed byte: bitsandbytes' (1, m) shim, see above
def test_dequantize_bitsandbytes_bytes(shape, dtype, out_dtype, blocksize, quant_type, double_quant, seed):
    x = random_tensor(shape, dtype, seed, "heavy")
    if _bnb_cpp_row_bug(x.shape, blocksize):
        x = x.reshape(-1)[: (x.numel() // 2) * 2 + 1]  # odd length: bitsandbytes takes its torch path
    if x.dim() > 2 and (x.numel() + 1) // 2 == 1:
        # one packed byte is a (1, 1) tensor, which bitsandbytes' shim for the transposed (1, m) form
        # answers with out.t(): a RuntimeError for a 3-D output. The bytes do not depend on the shape.
        x = x.reshape(-1)
    ref, ref_state = F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant)
    state = nf4.QuantState.from_dict(ref_state.as_dict(packed=True))
    ours = nf4.dequantize(ref, state, dtype=out_dtype)
    ref_state.dtype = out_dtype  # bitsandbytes writes quant_state.dtype
    with torch._dynamo.config.patch(disable=True):  # its torch path would recompile per shape
        theirs = F.dequantize_4bit(ref, ref_state)
    # bitsandbytes' CPU build returns 1-D shapes as (1, n) and transposes when the packed tensor is
    # (1, m) (SPEC §4); ours always has the quantized shape, so compare the flat values.
    assert ours.shape == x.shape and ours.dtype == theirs.dtype == out_dtype
    assert torch.equal(ours.reshape(-1), theirs.reshape(-1))


@settings(max_examples=40)
@given(
    shape=shapes,
    dtype=st.sampled_from(DTYPES),
    blocksize=st.sampled_from(nf4.ALLOWED_BLOCKSIZES),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    double_quant=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_error_bound(shape, dtype, blocksize, quant_type, double_quant, seed):
    """|x - dq(q(x))| <= half the largest code gap x the block's scale (plus the scale's own
    double-quantization error, and float32 rounding)."""
    x = random_tensor(shape, dtype, seed, "heavy").float()
    packed, state = nf4.quantize(x, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
    x_hat = nf4.dequantize(packed, state, dtype=torch.float32).reshape(-1)
    code = nf4.code_for(quant_type).sort().values
    half_gap = ((code[1:] - code[:-1]).max() / 2).item()
    if quant_type == "fp4":  # CUDA's hand-typed thresholds sit up to 14 ulp off the midpoints
        half_gap *= 1 + 1e-5
    absmax = nf4.quantize(x, blocksize=blocksize, quant_type=quant_type, double_quant=False)[1].absmax
    scale_hat = state.dequantized_absmax()
    idx = torch.arange(x.numel()) // blocksize
    bound = half_gap * absmax[idx] + (absmax - scale_hat).abs()[idx] + 1e-6 * absmax[idx]
    err = (x.reshape(-1) - x_hat).abs()
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item()}"


def test_packing_layout_and_odd_tail():
    x = torch.tensor([1.0, -1.0, 0.0])  # codes 15, 0, 7 (NF4) and the padding nibble is code(0.0) = 7
    packed, state = nf4.quantize(x, blocksize=64, double_quant=False)
    assert packed.shape == (2, 1) and packed.dtype == torch.uint8
    assert packed.reshape(-1).tolist() == [0xF0, 0x77]
    assert state.absmax.tolist() == [1.0]


def test_zero_blocks_and_empty_tensor():
    x = torch.zeros(130)
    packed, state = nf4.quantize(x, blocksize=64)
    assert bool((packed == 0x77).all())
    assert torch.equal(nf4.dequantize(packed, state), x)
    for double_quant in (False, True):
        packed, state = nf4.quantize(torch.empty(0, 5), double_quant=double_quant)
        assert packed.shape == (0, 1) and state.absmax.numel() == 0
        out = nf4.dequantize(packed, state)
        assert out.shape == (0, 5)


def test_bad_inputs_get_clear_errors():
    x = torch.randn(10, 10)
    x[3, 4] = float("nan")
    x[5, 0] = float("inf")
    with pytest.raises(ValueError, match=r"2 non-finite.*\(3, 4\)"):
        nf4.quantize(x)
    for bad in (torch.ones(4, dtype=torch.int32), torch.ones(4, dtype=torch.bool), torch.ones(4, dtype=torch.complex64)):
        with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
            nf4.quantize(bad)
    for bs in (16, 48, 8192, 0, -64, 64.0):
        with pytest.raises(ValueError, match=r"blocksize must be one of \[32, 64"):
            nf4.quantize(torch.randn(64), blocksize=bs)
    with pytest.raises(ValueError, match="quant_type"):
        nf4.quantize(torch.randn(64), quant_type="int4")
    with pytest.raises(ValueError, match="not a multiple of 4"):
        nf4.quantize(torch.randn(10), quant_storage=torch.float32)
    packed, state = nf4.quantize(torch.randn(64))
    with pytest.raises(ValueError, match="needs 32"):
        nf4.dequantize(packed[:-1], state)


@pytest.mark.parametrize("double_quant", [True, False])
def test_quant_state_tensor_form_round_trips(double_quant):
    """as_tensors / from_tensors: the one way a QuantState crosses a custom-op or kernel boundary."""
    _, state = nf4.quantize(torch.randn(33, 70), blocksize=32, quant_type="fp4", double_quant=double_quant)
    tensors = state.as_tensors()
    assert (tensors[1] is None) == (not double_quant) and len(tensors) == 4
    rebuilt = nf4.QuantState.from_tensors(*tensors, shape=[33, 70], dtype=torch.float32, blocksize=32, quant_type="fp4")
    assert rebuilt.equal(state) and rebuilt.absmax is state.absmax  # the same tensors, not copies
    if double_quant:
        assert rebuilt.nested.absmax is state.nested.absmax and rebuilt.offset is state.offset
        state.nested.blocksize = 128
        with pytest.raises(ValueError, match="blocks of 256"):
            state.as_tensors()
