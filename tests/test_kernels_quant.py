"""Triton quantize/dequantize (fourbit.kernels) against the reference (fourbit.nf4): bit for bit.

Where the kernels run:
  * on a CUDA device when there is one (and TRITON_INTERPRET is off): every test runs here;
  * otherwise under Triton's CPU interpreter. Triton fixes interpreted-or-compiled at its first
    import, so tests/conftest.py sets TRITON_INTERPRET=1 before anything imports triton when there
    is no CUDA device. If triton was imported compiled anyway (TRITON_INTERPRET=0 given explicitly,
    no GPU), `test_grid_under_interpreter` reruns this file in a child Python with the interpreter.

bf16 output: Triton 3.9's interpreter truncates fp32 -> bf16 instead of rounding to nearest even.
The kernel keeps the native cast; under the interpreter each bf16 value must equal either rounding
of the (bit-exact) fp32 result, on a GPU it must equal torch's correctly rounded cast.
Outputs are poisoned: every `torch.empty` inside a launcher returns NaN / 0xA5 filled memory.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fourbit.nf4 as reference
from fourbit.kernels._triton_utils import interpreting
from fourbit.nf4.codes import dynamic_map

REPO = Path(__file__).resolve().parents[1]
INTERPRETED = interpreting()
ON_GPU = torch.cuda.is_available() and not INTERPRETED
DEVICE = "cuda" if ON_GPU else "cpu"
kernels_here = pytest.mark.skipif(
    not (INTERPRETED or ON_GPU), reason="no GPU: runs in the TRITON_INTERPRET=1 child (test_grid_under_interpreter)"
)
BLOCKSIZES = (32, 64, 256, 4096)


@pytest.mark.skipif(INTERPRETED or ON_GPU, reason="the kernel tests run in this process")
def test_grid_under_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "FOURBIT_TEST_CHILD": "1"}
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-x", "-p", "no:cacheprovider", "-W", "ignore::RuntimeWarning"]
    child = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    tail = child.stdout[-8000:] + child.stderr[-4000:]
    assert child.returncode == 0, f"interpreter run failed:\n{tail}"
    assert " passed" in child.stdout and " failed" not in child.stdout, tail


@pytest.fixture
def poisoned(monkeypatch):
    """Make every torch.empty return garbage, so an element the kernel forgets to write shows up."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(0xA5 if t.dtype == torch.uint8 else -7)

    monkeypatch.setattr(torch, "empty", empty)


def fresh(shape, dtype, *, zero_block: int = 0) -> torch.Tensor:
    """Random normal data (a new seed every run, printed on failure); the first `zero_block`
    flat elements are zero so an all-zero block is always covered."""
    seed = int.from_bytes(os.urandom(4), "little")
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * torch.rand((), generator=g) * 10).to(dtype)
    x.view(-1)[:zero_block] = 0
    fresh.seed = seed
    return x.to(DEVICE)


def triton_ops():
    from fourbit import kernels

    return kernels


def assert_state_equal(got: reference.QuantState, want: reference.QuantState, what: str) -> None:
    assert got.equal(want), f"{what}: QuantState differs (seed {fresh.seed})\n got {got}\nwant {want}"


def assert_dequant_equal(got: torch.Tensor, packed, state, dtype, what: str) -> None:
    want = reference.dequantize(packed, state, dtype=dtype)
    assert got.dtype == want.dtype and got.shape == want.shape, what
    if dtype != torch.bfloat16 or ON_GPU:
        assert torch.equal(got, want), f"{what}: {(got != want).sum()} values differ (seed {fresh.seed})"
        return
    exact = reference.dequantize(packed, state, dtype=torch.float32).reshape(-1)  # bit-exact in fp32 (tested)
    truncated = (exact.view(torch.int32) >> 16).to(torch.int16)
    bits = got.reshape(-1).view(torch.int16)
    ok = (bits == want.reshape(-1).view(torch.int16)) | (bits == truncated)
    assert ok.all(), f"{what}: {(~ok).sum()} bf16 values are neither rounding of the fp32 result (seed {fresh.seed})"


# ---- quantize ---------------------------------------------------------------------------------


@kernels_here
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_equals_reference(blocksize, dtype, quant_type, poisoned):
    # 3 rows of bs + 5: an odd count, a partial tail block, blocks crossing rows, one zero block
    x = fresh((3, blocksize + 5), dtype, zero_block=blocksize)
    want_packed, want_state = reference.quantize(x, blocksize=blocksize, quant_type=quant_type)
    packed, state = triton_ops().quantize(x, blocksize=blocksize, quant_type=quant_type)
    what = f"quantize {quant_type} bs{blocksize} {dtype}"
    assert torch.equal(packed, want_packed), f"{what}: {(packed != want_packed).sum()} bytes differ (seed {fresh.seed})"
    assert_state_equal(state, want_state, what)


@kernels_here
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_many_nested_blocks_and_plain_scales(quant_type, poisoned):
    x = fresh((301, 32), torch.float16)[:, :31]  # non-contiguous; 9331 values -> 292 blocks -> 2 nested
    for double_quant in (True, False):
        want_packed, want_state = reference.quantize(x, blocksize=32, quant_type=quant_type, double_quant=double_quant)
        packed, state = triton_ops().quantize(x, blocksize=32, quant_type=quant_type, double_quant=double_quant)
        assert torch.equal(packed, want_packed)
        assert_state_equal(state, want_state, f"{quant_type} double_quant={double_quant}")


@kernels_here
def test_quantize_storage_views_and_empty(poisoned):
    x = fresh((64, 8), torch.bfloat16)
    for storage in (torch.bfloat16, torch.float32):
        want, want_state = reference.quantize(x, quant_storage=storage)
        got, state = triton_ops().quantize(x, quant_storage=storage)
        # compare bytes: a float view of random codes can hold NaN patterns, and NaN != NaN
        assert got.dtype == storage and torch.equal(got.view(torch.uint8), want.view(torch.uint8))
        assert_state_equal(state, want_state, f"storage {storage}")
    empty = torch.zeros(0, 16, device=DEVICE)
    want, want_state = reference.quantize(empty)
    got, state = triton_ops().quantize(empty)
    assert got.shape == want.shape == (0, 1)
    assert_state_equal(state, want_state, "empty")


@kernels_here
def test_quantize_equal_scales_give_zero_nested_absmax(poisoned):
    # every block has absmax 3.0: absmax - mean = 0 everywhere, so absmax2 = 0 and all codes are 0
    x = torch.full((40, 64), -1.5, device=DEVICE)
    x[:, 0] = 3.0
    want_packed, want_state = reference.quantize(x)
    packed, state = triton_ops().quantize(x)
    assert torch.equal(packed, want_packed)
    assert_state_equal(state, want_state, "equal scales")
    assert float(state.nested.absmax.abs().max()) == 0.0


def tie_scales() -> list[torch.Tensor]:
    """Scale vectors [0, 2, 1 + m, 1 - m] (m a midpoint of the signed dynamic map): their mean is 1,
    so the nested step sees +-m (up to rounding), often exactly on a midpoint between two codes.
    Returns vectors with such exact ties whose lower code index is odd (the tie must move up to the
    even index) and ones where it is even (the tie stays), as the reference's arithmetic sees them."""
    code = dynamic_map(signed=True)
    midpoints = (code[:-1] + code[1:]) * 0.5
    odd, even = [], []
    for j in range(255):
        scales = torch.cat([torch.tensor([0.0, 2.0]), 1 + midpoints[j : j + 1], 1 - midpoints[j : j + 1]])
        v = scales - scales.mean()
        s = v * (1.0 / v.abs().max())
        below = torch.bucketize(s, midpoints)
        tie = below != torch.bucketize(s, midpoints, right=True)
        if (tie & (below % 2 == 1)).any():
            odd.append(scales)
        elif tie.any():
            even.append(scales)
    assert len(odd) >= 4 and len(even) >= 4, "too few exact ties: the construction no longer works"
    return odd[:4] + even[:4]


@kernels_here
def test_nested_ties_go_to_the_even_code(poisoned):
    from fourbit.kernels.quantize import _double_quantize
    from fourbit.nf4.quant import double_quantize

    for scales in tie_scales():
        scales = scales.to(DEVICE)
        want_q, want_offset, want_nested = double_quantize(scales)
        q, offset, nested = _double_quantize(scales)
        assert torch.equal(q, want_q), f"scales {scales.tolist()}: codes {q.tolist()} != reference {want_q.tolist()}"
        assert torch.equal(offset, want_offset) and torch.equal(nested.absmax, want_nested.absmax)


# ---- dequantize -------------------------------------------------------------------------------


@kernels_here
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_dequantize_equals_reference(blocksize, quant_type, double_quant, poisoned):
    x = fresh((3, blocksize + 5), torch.float16, zero_block=blocksize)
    packed, state = reference.quantize(x, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
    for dtype in (None, torch.float32, torch.float16, torch.bfloat16):
        got = triton_ops().dequantize(packed, state, dtype=dtype)
        want_dtype = dtype or torch.float16
        assert_dequant_equal(got, packed, state, want_dtype, f"dequantize {quant_type} bs{blocksize} -> {want_dtype}")


@kernels_here
def test_dequantize_many_nested_blocks_and_storage_view(poisoned):
    x = fresh((600, 33), torch.bfloat16)  # 19800 values, bs 64 -> 310 blocks -> 2 nested blocks
    packed, state = reference.quantize(x, quant_storage=torch.float16)
    got = triton_ops().dequantize(packed, state, dtype=torch.float32)
    assert_dequant_equal(got, packed, state, torch.float32, "bf16 weight, fp16 storage")


# ---- bad input --------------------------------------------------------------------------------


def _without_interpreter(code: str) -> str:
    """Run `code` in a child Python that starts without TRITON_INTERPRET; its stdout, stripped."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    child = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stdout + child.stderr[-3000:]
    return child.stdout.strip()


def test_cpu_tensor_without_interpreter_says_how_to_run():
    """Compiled triton (no interpreter) given CPU tensors: a clear error, checked in a child Python
    that imports triton without TRITON_INTERPRET (this process has the interpreter on)."""
    code = (
        "import torch, fourbit.nf4 as ref, fourbit.kernels as k\n"
        "x = torch.randn(64, 64)\n"
        "packed, state = ref.quantize(x)\n"
        "for call in (lambda: k.quantize(x), lambda: k.dequantize(packed, state)):\n"
        "    try:\n"
        "        call()\n"
        "    except RuntimeError as e:\n"
        "        assert 'TRITON_INTERPRET=1' in str(e) and 'reference' in str(e), e\n"
        "    else:\n"
        "        raise SystemExit('no error')\n"
        "print('refused')\n"
    )
    if torch.cuda.is_available():
        pytest.skip("with a GPU the child would not refuse CPU tensors for the reason tested here")
    assert _without_interpreter(code) == "refused"


def test_interpreter_switched_on_after_triton_import_is_named():
    """TRITON_INTERPRET=1 set after triton was imported compiled: the launcher says so instead of
    failing deep inside the interpreter."""
    code = (
        "import os, torch, triton\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "import fourbit.kernels as k\n"
        "try:\n"
        "    k.quantize(torch.randn(64, 64))\n"
        "except RuntimeError as e:\n"
        "    assert 'before anything imports triton' in str(e), e\n"
        "    print('named')\n"
    )
    assert _without_interpreter(code) == "named"


def test_device_mix_is_refused():
    packed, state = reference.quantize(torch.randn(64, 64))
    moved = state.to("meta")
    with pytest.raises(ValueError, match="absmax is on meta"):
        triton_ops().dequantize(packed, moved)
    state.nested = state.nested.to("meta")
    with pytest.raises(ValueError, match="one device"):
        triton_ops().dequantize(packed, state)


def test_argument_errors_name_the_problem():
    ops = triton_ops()
    x = torch.randn(8, 64)
    with pytest.raises(ValueError, match="blocksize must be one of"):
        ops.quantize(x, blocksize=48)
    with pytest.raises(ValueError, match="quant_type"):
        ops.quantize(x, quant_type="int4")
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        ops.quantize(x.to(torch.int32))
    x[3, 5] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        ops.quantize(x)
    packed, state = reference.quantize(torch.randn(8, 64))
    with pytest.raises(TypeError, match="dtype must be"):
        ops.dequantize(packed, state, dtype=torch.float64)
    with pytest.raises(ValueError, match="bytes but shape"):
        ops.dequantize(packed[:-1], state)
    state.absmax = state.absmax[:-1]
    with pytest.raises(ValueError, match="state.absmax must be 8 torch.uint8"):
        ops.dequantize(packed, state)
