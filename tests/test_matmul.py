"""4-bit matmul: the chunked reference (fourbit.nf4.matmul) and the fused Triton kernels
(fourbit.kernels.matmul, run by Triton's interpreter on CPU), both against float64.

Tolerances (relative Frobenius norm against x64 @ w64.T with w64 the exact dequantized weight):
float32 computes with 24-bit significands, so 1e-5 leaves room for K-long sums; float16 rounds W
and the output (2^-11 each, random signs), so 2e-3; bfloat16 (8-bit significand) 1.6e-2.
"""

import importlib
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fourbit.kernels._triton_utils import interpreting
from fourbit.nf4 import dequantize, quantize
from helpers import assert_within_rounding, rel_err

ref = importlib.import_module("fourbit.nf4.matmul")  # the module: fourbit.nf4.matmul is also the function
kern = importlib.import_module("fourbit.kernels.matmul")

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DEVICE = "cpu" if interpreting() or not torch.cuda.is_available() else "cuda"
KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])  # interpreter: no bf16 math
needs_triton = pytest.mark.skipif(DEVICE == "cpu" and not interpreting(),
                                  reason="triton was imported without TRITON_INTERPRET=1 and there is no GPU")


def weight(n, k, bs=64, dq=True, quant_type="nf4", device="cpu"):
    packed, state = quantize(torch.randn(n, k, device=device), blocksize=bs, double_quant=dq, quant_type=quant_type)
    return packed, state, dequantize(packed, state, dtype=torch.float32).double()  # w64: (N, K) exact


# ---- reference ---------------------------------------------------------------------------------
@given(
    n=st.integers(1, 40), k=st.integers(1, 200), bs=st.sampled_from([32, 64, 256]), dq=st.booleans(),
    quant_type=st.sampled_from(["nf4", "fp4"]), lead=st.sampled_from([(1,), (3,), (2, 5), (0,)]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), has_bias=st.booleans(),
)
def test_reference_equals_dequantize_then_linear(n, k, bs, dq, quant_type, lead, dtype, has_bias):
    """Bit-exact with bitsandbytes' CPU path (F.linear on the weight dequantized into x's dtype),
    including K not a multiple of the blocksize, where blocks cross rows."""
    packed, state, _ = weight(n, k, bs, dq, quant_type)
    x = torch.randn(*lead, k).to(dtype)
    bias = torch.randn(n) if has_bias else None
    want = torch.nn.functional.linear(x, dequantize(packed, state, dtype=dtype), None if bias is None else bias.to(dtype))
    assert torch.equal(ref.matmul(x, packed, state, bias), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_against_float64_many_chunks(dtype, monkeypatch):
    monkeypatch.setattr(ref, "_CHUNK_VALUES", 1000)  # (300, 100) bs 64 -> 32-row chunks on block edges
    packed, state, w64 = weight(300, 100)
    x = torch.randn(2, 7, 100).to(dtype)
    bias = torch.randn(300)
    want = x.double() @ w64.T + bias.to(dtype).double()
    assert rel_err(ref.matmul(x, packed, state, bias), want) < TOL[dtype]


@pytest.mark.parametrize("k", [128, 100])
def test_reference_backward(k, monkeypatch):
    monkeypatch.setattr(ref, "_CHUNK_VALUES", 2000)
    packed, state, w64 = weight(45, k)
    gy = torch.randn(3, 2, 45)
    assert rel_err(ref.matmul_backward(gy, packed, state), gy.double() @ w64) < TOL[torch.float32]


def test_reference_out_argument_and_errors():
    packed, state, _ = weight(8, 64)
    x = torch.randn(3, 64)
    out = torch.full((3, 8), float("nan"))
    assert ref.matmul(x, packed, state, out=out) is out and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="K=64"):
        ref.matmul(torch.randn(3, 65), packed, state)
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        ref.matmul(x, packed, state, torch.randn(9))
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        ref.matmul(x.long(), packed, state)
    with pytest.raises(ValueError, match="out must be"):
        ref.matmul(x, packed, state, out=torch.empty(3, 9))
    p3, s3 = quantize(torch.randn(2, 4, 64))
    with pytest.raises(ValueError, match="2-D quantized weight"):
        ref.matmul(x, p3, s3)


# ---- Triton kernels ----------------------------------------------------------------------------
# (x shape, N, K, blocksize, double quant, bias): M in {1, 2, 3, 4} (GEMV: odd N, BLOCK_W larger than
# the block (bs 32) and smaller (bs 256), a ragged last K step (K = 192), 3-D x), M in {16, 17, 64}
# (dequantize + cuBLAS). Weights the kernels refuse (K % blocksize != 0, K % 64 != 0) go to the
# reference in fourbit.dispatch: tests/test_dispatch.py.
CASES = [
    ((1, 128), 33, 128, 64, True, True),  # GEMV
    ((3, 1, 256), 17, 256, 32, False, False),  # GEMV, M = 3 of BLOCK_M = 4, plain fp32 scales, 3-D
    ((2, 192), 40, 192, 64, True, True),  # GEMV, ragged last step
    ((4, 1024), 9, 1024, 256, True, False),  # GEMV, several K steps
    ((2, 8, 192), 33, 192, 64, True, True),  # M = 16: dequantize + cuBLAS, 3-D
    ((17, 512), 31, 512, 256, True, False),
    ((64, 128), 9, 128, 64, True, True),
]


def _check_forward(xshape, n, k, bs, dq, has_bias, dtype, route=None):
    packed, state, w64 = weight(n, k, bs, dq, device=DEVICE)
    x = torch.randn(xshape, device=DEVICE).to(dtype)
    bias = torch.randn(n, device=DEVICE).to(dtype) if has_bias else None
    out = torch.full((*xshape[:-1], n), float("nan"), dtype=dtype, device=DEVICE)  # poisoned
    y = kern.matmul(x, packed, state, bias, out=out, route=route)
    assert y is out and y.dtype == dtype and y.shape == (*xshape[:-1], n)
    want = x.double() @ w64.T + (0 if bias is None else bias.double())
    assert rel_err(y, want) < TOL[dtype]
    assert rel_err(kern.matmul(x, packed, state, bias, route=route), y.double()) < TOL[dtype]  # allocating call agrees
    return x, packed, state, bias, y


@needs_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("xshape,n,k,bs,dq,has_bias", CASES)
def test_kernel_forward_against_float64(xshape, n, k, bs, dq, has_bias, dtype):
    x, packed, state, bias, y = _check_forward(xshape, n, k, bs, dq, has_bias, dtype)
    if x.numel() // k > kern.gemv_max_m(dtype, bs):  # dequantize + F.linear: the reference's math
        assert torch.equal(y, ref.matmul(x, packed, state, bias))


@needs_triton
@pytest.mark.parametrize("xshape,n,k,bs,dq,has_bias", [CASES[0], CASES[1], CASES[4], CASES[5]])
def test_kernel_fused_gemm_against_float64(xshape, n, k, bs, dq, has_bias):
    _check_forward(xshape, n, k, bs, dq, has_bias, torch.float16, route=("gemm", "fused"))


def _assert_within_rounding(y, want, terms, dtype):
    assert_within_rounding(y, want, terms, dtype, TOL[dtype])


def _check_swapped(m, n, k, bs, dq, has_bias, quant_type, dtype, gemm_cfg, backward_cfg):
    packed, state, w64 = weight(n, k, bs, dq, quant_type, device=DEVICE)
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    bias = torch.randn(n, device=DEVICE).to(dtype) if has_bias else None
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)  # poisoned
    y = kern.matmul(x, packed, state, bias, out=out, route=("gemm", "fused"), config=gemm_cfg)
    want = x.double() @ w64.T + (0 if bias is None else bias.double())
    _assert_within_rounding(y, want, x.double().abs() @ w64.abs().T, dtype)
    gy = torch.randn(m, n, device=DEVICE).to(dtype)
    gx = torch.full((m, k), float("nan"), dtype=dtype, device=DEVICE)
    kern.matmul_backward(gy, packed, state, out=gx, route=("backward", "fused"), config=backward_cfg)
    _assert_within_rounding(gx, gy.double() @ w64, gy.double().abs() @ w64.abs(), dtype)


@needs_triton
@pytest.mark.parametrize("dtype", [d for d in KERNEL_DTYPES if d != torch.float32])
def test_swapped_tiles_as_planned_against_float64(dtype):
    """The tiles the dispatcher runs from M = 1024 on Hopper (y^T = W x^T and dx^T = W^T dy^T, W the
    register operand), on ragged M and N: 257 rows of x in 256-row tiles, 130 rows of W in 128."""
    gemm_cfg = kern.plan("gemm", 2048, 4096, 4096, path="fused").config
    assert gemm_cfg == "256x128x64,w8s3,swap" and kern.plan("backward", 2048, 4096, 4096, path="fused").config == (
        "256x64x128,w8s3,swap")
    _check_swapped(257, 130, 384, 128, False, True, "nf4", dtype, (256, 128, 64, 8, 3, True), (256, 64, 128, 8, 3, True))


@needs_triton
@settings(max_examples=12, deadline=None)
@given(m=st.integers(1, 80), n=st.integers(1, 80), kb=st.integers(1, 4), bs=st.sampled_from([64, 128]),
       dq=st.booleans(), has_bias=st.booleans(), quant_type=st.sampled_from(["nf4", "fp4"]))
def test_swapped_tiles_against_float64(m, n, kb, bs, dq, has_bias, quant_type):
    """Small swapped tiles (32 x 32 programs) over drawn shapes: several K and N trips, partial tiles
    in M and N, blocks wider than a K step (bs 128 with 64-wide gemm steps)."""
    _check_swapped(m, n, 128 * kb, bs, dq, has_bias, quant_type, torch.float16, (32, 32, 64, 4, 1, True),
                   (32, 32, 128, 4, 1, True))


@needs_triton
@pytest.mark.parametrize("has_bias", [False, True])
def test_empty_k_gives_the_bias(has_bias):
    """K = 0: no products, y = bias (or zeros), as the reference; the launchers never start a kernel
    whose loop assumes K > 0 (the swapped tiles, routed at M = 1100)."""
    packed, state = quantize(torch.randn(8, 0, device=DEVICE), blocksize=64)
    x = torch.randn(1100, 0, device=DEVICE).to(torch.float16)
    bias = torch.randn(8, device=DEVICE).to(torch.float16) if has_bias else None
    out = torch.full((1100, 8), float("nan"), dtype=torch.float16, device=DEVICE)
    y = kern.matmul(x, packed, state, bias, out=out, route=("gemm", "fused"), config=(256, 128, 64, 8, 3, True))
    assert torch.equal(y, ref.matmul(x, packed, state, bias))
    assert torch.equal(y, bias.expand(1100, 8) if has_bias else torch.zeros_like(y))


@needs_triton
def test_empty_n_gives_a_zero_gradient():
    """N = 0: dx = dy @ W sums over nothing (the reshape of dy once failed: (-1, 0) is ambiguous)."""
    packed, state = quantize(torch.randn(0, 128, device=DEVICE), blocksize=64)
    gy = torch.randn(5, 0, device=DEVICE).to(torch.float16)
    out = torch.full((5, 128), float("nan"), dtype=torch.float16, device=DEVICE)
    assert torch.equal(kern.matmul_backward(gy, packed, state, out=out), torch.zeros(5, 128, dtype=torch.float16, device=DEVICE))
    assert torch.equal(ref.matmul_backward(gy, packed, state), out)


@needs_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("route", [None, ("backward", "fused")])
@pytest.mark.parametrize("xshape,n,k,bs,dq", [c[:5] for c in CASES[:2] + CASES[4:6]])
def test_kernel_backward_against_float64(xshape, n, k, bs, dq, route, dtype):
    packed, state, w64 = weight(n, k, bs, dq, device=DEVICE)
    gy = torch.randn(*xshape[:-1], n, device=DEVICE).to(dtype)
    out = torch.full(xshape, float("nan"), dtype=dtype, device=DEVICE)  # poisoned
    gx = kern.matmul_backward(gy, packed, state, out=out, route=route)
    assert gx is out
    assert rel_err(gx, gy.double() @ w64) < TOL[dtype]
    if route is None:  # dequantize + mm: the reference's math
        assert torch.equal(gx, ref.matmul_backward(gy, packed, state))


@needs_triton
def test_kernel_gemv_shuffle_decode_matches_table():
    """The GEMV and dequantize decode a word with warp shuffles on GPUs, which the interpreter cannot
    run: replay their PTX on the host (32 lanes, lane j holding code[j % 16]) for every nibble value
    in every position and compare with the table lookup the interpreter uses."""
    from fourbit.kernels import _decode

    code = torch.randn(16).tolist()
    words = [0x76543210, 0xFEDCBA98, 0x0F1E2D3C, 0xFFFFFFFF, 0]
    for word in words:
        outs = _replay_ptx(_decode.WORD_ASM.value, {8: word}, code, 8)
        want = [code[(word >> (8 * (e // 2) + 4 * (1 - e % 2))) & 15] for e in range(8)]
        assert outs == want
        outs = _replay_ptx(_decode.BYTES_ASM.value, {8: word}, code, 8)  # (hi0..hi3, lo0..lo3)
        want = [code[(word >> (8 * i + 4)) & 15] for i in range(4)] + [code[(word >> (8 * i)) & 15] for i in range(4)]
        assert outs == want


@needs_triton
@given(m=st.integers(1, 16), n=st.integers(1, 40), blocks=st.integers(1, 20), bs=st.sampled_from([64, 128, 256]),
       dq=st.booleans(), has_bias=st.booleans(), fp16=st.booleans(), quant_type=st.sampled_from(["nf4", "fp4"]))
def test_tensor_core_gemv_against_float64(m, n, blocks, bs, dq, has_bias, fp16, quant_type):
    """The mma GEMV (its fragments emulated by the interpreter) on drawn shapes: 1 to 16 rows of x
    (one or two 8-row tiles), N not a multiple of the 16-row program, K from one 64-weight block to
    20 (ragged trips: 8 blocks per trip with 4 warps), every blocksize it takes, both codebooks."""
    k = 64 * blocks
    if k % bs:
        bs = 64
    dtype = torch.float16 if fp16 else torch.bfloat16
    packed, state, w64 = weight(n, k, bs, dq, quant_type, device=DEVICE)
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    bias = torch.randn(n, device=DEVICE).to(dtype) if has_bias else None
    assert kern.plan("gemv", m, n, k, dtype=dtype, nested=dq, blocksize=bs).config.startswith("mma")
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)  # poisoned
    y = kern.matmul(x, packed, state, bias, out=out, route=("gemv", "fused"))
    want = x.double() @ w64.T + (0 if bias is None else bias.double())
    assert y is out
    _assert_within_rounding(y, want, x.double().abs() @ w64.abs().T, dtype)


@needs_triton
def test_tensor_core_gemv_pair_lookup_matches_table():
    """The GEMV decodes a byte with prmt + mad + ld.shared from a shared table the interpreter cannot
    build: replay the PTX on the host against a 32-copy table laid out as `_fill_table` writes it,
    for every byte value in every position and every lane, and compare with the pair table."""
    from fourbit.kernels import matmul_gemv_mma as mma
    from fourbit.nf4 import NF4_CODE

    for dtype in (torch.bfloat16, torch.float16):
        table = mma.pair_table(NF4_CODE, dtype, torch.device("cpu")).tolist()
        bits = NF4_CODE.to(dtype).view(torch.int16).tolist()
        assert all(table[b] & 0xFFFF == bits[b >> 4] & 0xFFFF and (table[b] >> 16) & 0xFFFF == bits[b & 15] & 0xFFFF
                   for b in range(256))
        base = 1024  # any address: the lookup adds, it does not OR
        code = NF4_CODE.clone()
        first = mma.pair_table(code, dtype, torch.device("cpu"))
        assert mma.pair_table(code, dtype, torch.device("cpu")) is first  # built once per codebook tensor
        code[0] = 0.5  # an in-place change is seen (the tensor's version moves)
        assert mma.pair_table(code, dtype, torch.device("cpu"))[0] != first[0]
        for nt in (128, 256):  # the stores `_fill_table` issues with 4 and 8 warps: st.shared.v4 of entry b
            smem = {}
            for t in range(nt):
                for b in range(t, 256, nt):
                    for j in range(8):
                        for w in range(4):
                            smem.setdefault(base + b * 128 + ((j + b) % 8) * 16 + 4 * w, []).append(table[b])
            assert len(smem) == 8192 and all(len(v) == 1 for v in smem.values())  # every word once
            smem = {addr: v[0] for addr, v in smem.items()}
            for lane in (0, 5, 31):
                for word in (0x03020100, 0xFFFEFDFC, 0x7F80017E, 0x12345678):
                    outs = _replay_lookup(mma.LOOKUP_ASM.value, word, base + 4 * lane, smem)
                    assert outs == [table[(word >> (8 * i)) & 255] for i in range(4)]


def test_tensor_core_gemv_keeps_one_element_per_thread(tmp_path):
    """The mma fragments are per lane, so every tensor of the GEMV must map element t to lane t % 32
    of warp t // 32: Triton's 1-D blocked layout with one element per thread, or the [warps, 32]
    layout of the final reduction. Compiled for sm_90a in a child process (the interpreter cannot)."""
    import subprocess
    import sys
    from pathlib import Path

    script = (
        "import importlib, re\n"
        "from fourbit.kernels.analysis.report import _compile, ARCHS\n"
        "m = importlib.import_module('fourbit.kernels.matmul')\n"
        "for s in m.compile_specs():\n"
        "    if 'gemv_mma' in s.name and s.constexprs['TILES'] == 2:\n"
        "        ir = _compile(s, ARCHS['sm_90a'])[0].asm['ttgir']\n"
        "        print(s.num_warps, *sorted(set(re.findall(r'^#(?:blocked|linear|mma)\\w* = (.*)$', ir, re.M))), sep='\\n')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    child = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1], env=env,
                           capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    lines = child.stdout.strip().splitlines()
    assert sum(line.isdigit() for line in lines) == 2 and sum(line.startswith("#ttg") for line in lines) >= 2, lines
    warps = None
    for line in lines:
        if line.isdigit():
            warps = int(line)
            continue
        assert line in (f"#ttg.blocked<{{sizePerThread = [1], threadsPerWarp = [32], warpsPerCTA = [{warps}], order = [0]}}>",
                        f"#ttg.blocked<{{sizePerThread = [1, 1], threadsPerWarp = [1, 32], warpsPerCTA = [{warps}, 1], "
                        "order = [1, 0]}>"), line


def _ptx_instructions(asm: str):
    """(line, opcode, operands) of each instruction of an inline-asm block (declarations skipped)."""
    for line in asm.split(";"):
        line = line.strip(" {}\n\t")
        if line and not line.startswith(".reg"):
            op, rest = line.split(None, 1)
            yield line, op, [a.strip() for a in rest.split(",")]


def _replay_lookup(asm: str, word: int, lane_addr: int, smem: dict[int, int]) -> list[int]:
    """Run the prmt/mad/ld.shared subset of PTX for one lane ($4 the word, $5 the lane's address)."""
    regs: dict[str, int] = {"$4": word, "$5": lane_addr}
    for line, op, args in _ptx_instructions(asm):
        if op == "prmt.b32":  # selector 0x444i: byte i of a to byte 0, bytes 1-3 from b (= 0)
            assert args[2] == "0" and args[3].startswith("0x444"), line
            regs[args[0]] = (regs[args[1]] >> (8 * int(args[3][-1]))) & 0xFF
        elif op == "mad.lo.u32":
            regs[args[0]] = (regs[args[1]] * int(args[2]) + regs[args[3]]) & 0xFFFFFFFF
        elif op == "ld.shared.u32":
            regs[args[0]] = smem[regs[args[1].strip("[]")]]
        else:
            raise AssertionError(f"unexpected instruction {line!r}")
    return [regs[f"${i}"] for i in range(4)]


def _replay_ptx(asm: str, inputs: dict[int, int], code: list[float], n_out: int) -> list[float]:
    """Run the shr/shfl subset of PTX for one lane; operand $9 is the lane's table register."""
    import re

    regs: dict[str, object] = {f"${i}": v for i, v in inputs.items()}
    for line, op, args in _ptx_instructions(asm):
        if op == "shr.b32":
            regs[args[0]] = (regs[args[1]] & 0xFFFFFFFF) >> int(args[2])
        elif op == "shfl.sync.idx.b32":
            assert args[1] == "$9" and args[3:] == ["31", "-1"], line
            regs[args[0]] = code[(regs[args[2]] & 31) % 16]  # the source lane's table entry
        else:
            raise AssertionError(f"unexpected instruction {line!r}")
    assert all(re.fullmatch(r"\$\d+", r) or r.startswith("s") for r in regs)
    return [regs[f"${i}"] for i in range(n_out)]


@needs_triton
def test_kernel_fp4_and_fused_shape_rule():
    packed, state, w64 = weight(20, 128, 64, True, "fp4", device=DEVICE)
    for m in (1, 5):
        x = torch.randn(m, 128, device=DEVICE)
        assert rel_err(kern.matmul(x, packed, state), x.double() @ w64.T) < TOL[torch.float32]
    assert kern.fused_shape_supported(state)
    assert not kern.fused_shape_supported(weight(4, 100, device=DEVICE)[1])


@needs_triton
def test_kernel_errors():
    packed, state, _ = weight(8, 64, device=DEVICE)
    with pytest.raises(TypeError, match="use the reference"):
        kern.matmul(torch.randn(2, 64, dtype=torch.float64, device=DEVICE), packed, state)
    with pytest.raises(ValueError, match="K=64"):
        kern.matmul(torch.randn(2, 32, device=DEVICE), packed, state)
    with pytest.raises(ValueError, match="N=8"):
        kern.matmul_backward(torch.randn(2, 9, device=DEVICE), packed, state)
    with pytest.raises(ValueError, match="out must be"):
        kern.matmul(torch.randn(2, 64, device=DEVICE), packed, state, out=torch.empty(2, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="at most 4 rows"):
        kern.matmul(torch.randn(5, 64, device=DEVICE), packed, state, route=("gemv", "fused"))
    with pytest.raises(ValueError, match="route"):
        kern.matmul(torch.randn(5, 64, device=DEVICE), packed, state, route=("backward", "fused"))
    p100, s100, _ = weight(8, 100, device=DEVICE)  # K % blocksize != 0: refused, dispatch runs the reference
    for route in (None, ("gemm", "dequantize+cublas")):
        with pytest.raises(ValueError, match="K % 64 == 0"):
            kern.matmul(torch.randn(1, 100, device=DEVICE), p100, s100, route=route)
    with pytest.raises(ValueError, match="K % 64 == 0"):
        kern.matmul_backward(torch.randn(1, 8, device=DEVICE), p100, s100)


@needs_triton
def test_workspace_is_reused():
    packed, state, _ = weight(40, 128, device=DEVICE)
    x = torch.randn(20, 128, device=DEVICE)
    kern.matmul(x, packed, state)
    buf = kern._WORKSPACES[(x.device, x.dtype)]
    small, small_state, w64 = weight(8, 64, device=DEVICE)
    y = kern.matmul(x[:, :64], small, small_state)  # a smaller weight decodes into the same buffer
    assert kern._WORKSPACES[(x.device, x.dtype)] is buf
    assert rel_err(y, x[:, :64].double() @ w64.T) < TOL[torch.float32]


REPORT_SPECS = ["matmul_gemm[bf16,bs64,dq,128x128x64,w8s4]", "matmul_backward[bf16,bs64,dq,64x128x64,w4s4]",
                "matmul_gemv[bf16,bs64,dq,m1,16x512B,w4]", "matmul_gemv_mma[bf16,bs64,dq,m16,w8]"]


def test_compile_report_tensor_cores_no_spills(tmp_path):
    """GPU builds without a GPU (child process: an interpreted triton cannot compile): the GEMM and
    the backward use HGMMA on sm_90a and HMMA on sm_80, the GEMV reads W with 128-bit loads, none spill."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "fourbit.kernels.analysis.report", "--module", "fourbit.kernels.matmul", "--arch", "sm_80",
           "sm_90a", "--json", str(out)]
    for name in REPORT_SPECS:
        cmd += ["--only", name]
    child = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                           timeout=600)
    assert child.returncode == 0, child.stdout + child.stderr
    rows = {(r["kernel"], r["arch"]): r for r in json.loads(out.read_text())["rows"]}
    # --only matches substrings: the GEMV's M = 1 specialization ({M=1}) comes along, and must pass too
    assert set(rows) >= {(name, arch) for name in REPORT_SPECS for arch in ("sm_80", "sm_90a")}
    for (name, arch), r in rows.items():
        assert r["ok"] and r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        if "gemv_mma" in name:  # mma.sync: HMMA on both; 64-bit weight loads (8 bytes of a row per lane)
            assert r["widest_ldg"] == 64 and r["hmma"] > 0
        elif "gemv" in name:
            assert r["widest_ldg"] == 128
        else:
            assert r["hgmma" if arch == "sm_90a" else "hmma"] > 0


def test_gemv_plan_fills_the_gpu_without_split_k():
    """Both GEMVs cover the SMs in one launch (no partials in memory): the tensor-core GEMV with
    16-row programs (8 warps splitting K where that leaves fewer than 3 programs per SM); the SIMT
    GEMV (fp32 x) halves BLOCK_N until the grid covers the SMs."""
    for n, k in [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672), (28672, 8192)]:
        for m in (1, 8, 9, 16):
            (launch,) = kern.plan("gemv", m, n, k).launches
            assert launch.spec.name.startswith("matmul_gemv_mma") and launch.grid == (-(-n // 16),)
            assert launch.spec.constexprs["TILES"] == (1 if m <= 8 else 2) and launch.spec.constexprs["EVEN"]
            assert launch.spec.num_warps == (8 if n < 3 * 16 * kern.SMS else 4)
            assert launch.iterations * launch.weight_bytes_per_iteration * launch.grid[0] >= n * k // 2
        for m in (1, 2, 4):
            p = kern.plan("gemv", m, n, k, dtype=torch.float32)
            (launch,) = p.launches
            assert launch.grid[0] >= kern.SMS and len(launch.grid) == 1
            assert launch.spec.constexprs["EVEN"] and launch.spec.options == {"enable_fp_fusion": True}
            assert launch.iterations * launch.weight_bytes_per_iteration * launch.grid[0] >= n * k // 2
    assert kern.plan("gemv", 1, 1024, 4096, dtype=torch.float32).launches[0].spec.constexprs["BLOCK_N"] == 4  # 256 programs
    assert kern.plan("gemv", 1, 64, 192, dtype=torch.float32).launches[0].spec.constexprs["BLOCK_W"] == 32  # 24 words
    assert not kern.plan("gemv", 1, 64, 192).launches[0].spec.constexprs["EVEN"]  # 3 blocks, 8 per trip
    with pytest.raises(ValueError, match="M <= 4"):
        kern.plan("gemv", 5, 64, 64, dtype=torch.float32, path="fused")
    with pytest.raises(ValueError, match="M <= 4"):
        kern.plan("gemv", 5, 64, 64, blocksize=32, path="fused")
    with pytest.raises(ValueError, match="M <= 16"):
        kern.plan("gemv", 17, 64, 64)


def test_default_routes_and_plans():
    assert kern.default_route(1) == ("gemv", "fused") and kern.default_route(16) == ("gemv", "fused")
    assert kern.default_route(17) == ("gemm", "dequantize+cublas")
    assert kern.default_route(4, dtype=torch.float32) == ("gemv", "fused")
    assert kern.default_route(5, dtype=torch.float32) == kern.default_route(5, blocksize=32) == ("gemm", "dequantize+cublas")
    assert kern.default_route(8192, backward=True) == ("backward", "dequantize+cublas")
    from fourbit import dispatch

    assert dispatch.GEMV_MAX_M <= kern.GEMV_MAX_M
    routes = {m: (dispatch.matmul_route(m, 4096, 4096), dispatch.matmul_route(m, 4096, 4096, backward=True))
              for m in (1, 2, 3, 16, 17, 64, 65, 2048)}
    assert routes[1] == routes[3] == routes[16] == (("gemv", "fused"), ("backward", "fused"))
    assert routes[17] == routes[64] == (("gemm", "fused"), ("backward", "fused"))
    simt = {m: dispatch.matmul_route(m, 4096, 4096, dtype=torch.float32) for m in (2, 3)}
    assert simt == {2: ("gemv", "fused"), 3: ("gemm", "fused")}
    assert dispatch.matmul_route(3, 4096, 4096, blocksize=32) == ("gemm", "fused")
    assert routes[65] == (("gemm", "dequantize+cublas"), ("backward", "dequantize+cublas"))
    assert routes[2048] == (("gemm", "fused"), ("backward", "fused"))  # the swapped tiles (Hopper, bf16/fp16)
    for m in (1023, 8192):
        assert dispatch.matmul_route(m, 4096, 4096) == ("gemm", "dequantize+cublas")
    assert dispatch.matmul_route(2048, 4096, 4096, dtype=torch.float32) == ("gemm", "dequantize+cublas")
    assert dispatch.matmul_route(2048, 4096, 4160, backward=True) == ("backward", "dequantize+cublas")  # K % 128
    p = kern.plan("gemm", 2048, 4096, 14336)
    assert p.path == "dequantize+cublas" and p.cublas_mnk == (2048, 4096, 14336)
    assert p.launches[0].spec.name == "dequantize_4bit[bfloat16,bs64,dq]"
    assert kern.plan("backward", 2048, 4096, 14336).cublas_mnk == (2048, 14336, 4096)
    fused = kern.plan("gemm", 16, 4096, 4096, path="fused")  # small-M tiles, enough programs for the SMs
    assert fused.config == "16x32x128,w4s4" and fused.launches[0].grid == (128,)  # the most programs
    assert kern.plan("gemm", 16, 14336, 4096, path="fused").config == "16x128x128,w4s4"  # 112 >= 132 // 2


def test_compile_specs_cover_every_planned_config():
    """The compile report (and the cost model) build exactly what the launchers run."""
    names = [s.name for s in kern.compile_specs()]
    assert len(names) == len(set(names))
    planned = set()
    for n, k in [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672), (28672, 8192), (1024, 4096), (512, 4096)]:
        for m in (1, 2, 3, 4, 9, 16):
            planned.add(kern.plan("gemv", m, n, k).launches[0].spec.name)
        for op in ("gemm", "backward"):
            for m in (16, 64, 2048):
                planned |= {p.launches[0].spec.name for p in kern.launch_plans(op, m, n, k) if p.path == "fused"}
                planned.add(kern.plan(op, m, n, k, path="fused").launches[0].spec.name)
    assert planned <= set(names), planned - set(names)


def test_tuning_cache_round_trip(tmp_path, monkeypatch):
    """`tune` keeps the fastest candidate in a JSON file that later plans read (never under the
    interpreter, where plans always use the rule)."""
    from fourbit.kernels import matmul_tune

    monkeypatch.setenv("FOURBIT_TUNE_CACHE", str(tmp_path / "tune.json"))
    monkeypatch.setattr(matmul_tune, "_TUNE_TABLE", None)
    key = ("gemv", 1, 4096, 4096, "torch.float32", True, 64, "sm90")
    candidates = kern._gemv_candidates(1, 4096, 4096)
    assert 2 <= len(candidates) <= 4 and kern._gemv_candidates(1, 4096, 4096, torch.bfloat16) == [(8,), (4,)]
    kern.plan.cache_clear()
    try:
        best = matmul_tune._tune_store(key, candidates, lambda cfg: {candidates[1]: 1.0}.get(cfg, 2.0))
        assert best == candidates[1]
        assert matmul_tune._tuned(key) is None  # interpreter: the rule
        monkeypatch.setattr(matmul_tune, "_TUNE_TABLE", None)  # a new process reads the file
        monkeypatch.setattr(matmul_tune, "interpreting", lambda: False)
        assert matmul_tune._tuned(key) == candidates[1]
        assert kern.plan("gemv", 1, 4096, 4096, dtype=torch.float32).config == "m{},{}x{}B,w{}".format(
            best[0], best[1], 4 * best[2], best[3])
    finally:
        kern.plan.cache_clear()


def test_bench_matmul_smoke(tmp_path):
    """The benchmark still runs: correctness checks, one repetition per provider, JSON + table."""
    import json

    from benchmarks import bench_matmul

    assert bench_matmul.main(["--smoke", "--dtype", "bfloat16", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "matmul.json").read_text())
    assert {r["provider"] for r in rows} == {"fourbit-reference", "bitsandbytes", "dense"}
    assert {r["shape"] for r in rows} == {"1x96x128", "17x96x128"}
    assert bench_matmul.main(["--smoke", "--dtype", "float32", "--ms", "3", "--shapes", "40x64", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "matmul.json").read_text())
    assert {(r["shape"], r["dtype"]) for r in rows} == {("3x40x64", "float32")}
    with pytest.raises(SystemExit):
        bench_matmul.main(["--smoke", "--shapes", "40by64"])
    assert (tmp_path / "matmul.md").exists()
