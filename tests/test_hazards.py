"""The static hazard check (fourbit.kernels.analysis.hazards): what the interpreter cannot see.

Its three rules are first checked on hand-written SASS, each with the listing that breaks it and
the one that keeps it. Then on real builds for sm_90a (tests/kernel_builds.py, the `compiled`
fixtures in tests/conftest.py), with both Triton versions the project supports: CI's (3.9) and the
GPU machine's (3.6, its own ptxas 12.8). Every kernel the dispatcher routes under each version must
pass; the swapped tiles must fail under 3.6 (which is why `matmul_plan.SWAP_TRITON` gates them off
there); and three deliberately broken builds, one per rule, must fail.
"""

from __future__ import annotations

import pytest

from fourbit.kernels.analysis import hazards, sass

WGMMA_LOOP = """
        /*0000*/                   CS2R R24, SRZ ;
        /*0010*/                   WARPGROUP.ARRIVE ;
        /*0020*/                   LDSM.16.MT88.4 R152, [R182+0x1a000] ;
        /*0030*/                   WARPGROUP.ARRIVE ;
        /*0040*/                   HGMMA.64x16x16.F32.BF16 R24, R152, gdesc[UR20], R24, gsb0 ;
        /*0050*/                   WARPGROUP.DEPBAR.LE gsb0, {wait} ;
        /*0060*/                   {write} ;
        /*0070*/               @P0 BRA 0x20 ;
        /*0080*/                   {final} ;
        /*0090*/                   STG.E.64 desc[UR4][R2.64], R24 ;
        /*00a0*/                   EXIT ;
"""


def _loop(wait="0x0", write="IADD3 R1, R1, 0x1, RZ", final="WARPGROUP.DEPBAR.LE gsb0, 0x0"):
    return hazards.check(WGMMA_LOOP.format(wait=wait, write=write, final=final))


def test_wgmma_register_rules():
    assert _loop() == []  # every wgmma retired before anything touches its registers
    # wait_group 1 leaves the HGMMA pending: the next trip's LDSM at the loop head, reached through
    # the back-edge, rewrites its A registers R152..R155
    found = _loop(wait="0x1")
    assert [(f.rule, f.addr) for f in found] == [("wgmma", 0x20)] and "A register" in found[0].text
    # ... and so does an IADD3 before the back-edge
    found = _loop(wait="0x1", write="IADD3 R153, R1, 0x1, RZ")
    assert [(f.rule, f.addr) for f in found] == [("wgmma", 0x20), ("wgmma", 0x60)]
    # the accumulator (R24..R31: 64x16 float32 over 128 threads) may not be read before the last wait
    found = _loop(wait="0x1", final="NOP")
    assert [(f.rule, f.addr) for f in found] == [("wgmma", 0x20), ("wgmma", 0x90)] and "accumulator" in found[1].text
    # a register written after WARPGROUP.ARRIVE (wgmma.fence), then read by the HGMMA
    found = hazards.check("""
        /*0000*/                   CS2R R24, SRZ ;
        /*0010*/                   WARPGROUP.ARRIVE ;
        /*0020*/                   IADD3 R153, R1, 0x1, RZ ;
        /*0030*/                   HGMMA.64x16x16.F32.BF16 R24, R152, gdesc[UR20], R24, gsb0 ;
        /*0040*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0050*/                   EXIT ;
    """)
    assert [(f.rule, f.addr) for f in found] == [("wgmma", 0x30)] and "ARRIVE" in found[0].text


PROXY = """
        /*0000*/                   STS [R2], R4 ;
        /*0010*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0020*/                   {fence} ;
        /*0030*/                   WARPGROUP.ARRIVE ;
        /*0040*/                   HGMMA.64x16x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT, gsb0 ;
        /*0050*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0060*/                   EXIT ;
"""


def test_async_proxy_fence_rule():
    assert hazards.check(PROXY.format(fence="FENCE.VIEW.ASYNC.S")) == []
    found = hazards.check(PROXY.format(fence="NOP"))
    assert [(f.rule, f.addr) for f in found] == [("proxy", 0x40)] and "0x0" in found[0].text


TABLE = """
        /*0000*/                   STS.128 [R2], R4 ;
        /*0010*/               @P1 BRA 0x{skip} ;
        /*0020*/                   {barrier} ;
        /*0030*/                   LDS R8, [R3] ;
        /*0040*/                   LDG.E R9, desc[UR4][R10.64] ;
        /*0050*/                   LDS RZ, [RZ] ;
        /*0060*/                   STS [R3], R9 ;
        /*0070*/                   LDS R11, [R3] ;
        /*0080*/               @P0 BRA 0x30 ;
        /*0090*/                   EXIT ;
"""


def test_shared_table_barrier_rule():
    """A table written before the loop must pass a barrier on every path before the loop reads it;
    `LDS RZ, [RZ]` reads nothing; exchanges inside the loop (0x60 -> 0x70) are Triton's own."""
    assert hazards.check(TABLE.format(skip="20", barrier="BAR.SYNC.DEFER_BLOCKING 0x0")) == []
    found = hazards.check(TABLE.format(skip="20", barrier="NOP"))
    assert [(f.rule, f.addr) for f in found] == [("table", 0x30), ("table", 0x70)]
    found = hazards.check(TABLE.format(skip="30", barrier="BAR.SYNC.DEFER_BLOCKING 0x0"))  # one path skips it
    assert [(f.rule, f.addr) for f in found] == [("table", 0x30), ("table", 0x70)]


def test_register_effects():
    ins = {i.opcode + "." + ".".join(i.modifiers): i for i in sass.parse("""
        /*0000*/                   LDSM.16.MT88.4 R152, [R182+0x1a000] ;
        /*0010*/                   IMAD.WIDE.U32 R2, R12, 0x4, R6 ;
        /*0020*/                   SHFL.IDX PT, R5, R4, R8, 0x1f ;
        /*0030*/                   ISETP.NE.AND P0, PT, R0, RZ, PT ;
        /*0040*/                   STG.E.128 desc[UR4][R2.64], R8 ;
        /*0050*/                   HGMMA.64x256x16.F32.BF16 R24, R164, gdesc[UR20], R24, gsb0 ;
    """)}
    assert hazards.writes(ins["LDSM.16.MT88.4"]) == {152, 153, 154, 155}
    assert hazards.writes(ins["IMAD.WIDE.U32"]) == {2, 3} and hazards.reads(ins["IMAD.WIDE.U32"]) == {12, 6}
    assert hazards.writes(ins["SHFL.IDX"]) == {5} and hazards.writes(ins["ISETP.NE.AND"]) == set()
    assert hazards.reads(ins["STG.E.128"]) == {2, 3, 8, 9, 10, 11} and hazards.writes(ins["STG.E.128"]) == set()
    assert hazards.writes(ins["HGMMA.64x256x16.F32.BF16"]) == set(range(24, 152))
    assert {164, 165, 166, 167} <= hazards.reads(ins["HGMMA.64x256x16.F32.BF16"])


@pytest.mark.slow
def test_routed_kernels_pass_under_the_main_triton(compiled):
    """Every kernel the dispatcher may pick on sm_90a (bf16 x, nested scales, bs 64, M 1..8192),
    and every kernel the cost model's rows launch, as built by CI's Triton."""
    assert compiled["routed"] and all(not found for found in compiled["routed"].values()), compiled["routed"]
    assert all(not facts["hazards"] for facts in compiled["kernels"].values())
    if compiled["gates"]["swapped_tiles"]:  # Triton 3.9: the swapped tiles are routed and pass
        assert any(",swap]" in name for name in compiled["routed"]) and not any(compiled["swapped"].values())


@pytest.mark.slow
def test_routed_kernels_pass_under_triton36_and_the_swapped_tiles_are_gated_off(compiled_triton36):
    """Triton 3.6 (the GPU machine's): what it routes passes; its swapped tiles fail (the forward
    rewrites pending A registers, both lack the proxy fence), so the version gate keeps them off and
    M = 2048 takes dequantize + cuBLAS."""
    built = compiled_triton36
    assert built["toolchain"]["triton"].startswith("3.6") and built["toolchain"]["ptxas"].startswith("12.8")
    assert built["routed"] and all(not found for found in built["routed"].values()), built["routed"]
    assert not any(",swap]" in name for name in built["routed"])
    assert built["gates"]["swapped_tiles"] is False and built["gates"]["triton"] == "3.6"
    assert set(map(tuple, built["routes"].values())) <= {("gemm", "dequantize+cublas"), ("backward", "dequantize+cublas")}
    forward, backward = (built["swapped"][name] for name in sorted(built["swapped"], key=lambda n: "backward" in n))
    assert sum(f.startswith("wgmma") for f in forward) >= 30, forward  # the issue counted 66 rewrites on one path
    assert any(f.startswith("proxy") for f in forward) and any(f.startswith("proxy") for f in backward)


@pytest.mark.slow
def test_deliberately_broken_builds_fail(compiled):
    """One safeguard removed from a routed kernel's PTX, assembled again: each rule catches its own."""
    broken = compiled["mutations"]
    rules = {name: {f.split(" ", 1)[0] for f in found} for name, found in broken.items()}
    assert rules == {"swapped gemm, wait_group raised": {"wgmma"}, "swapped backward, proxy fence removed": {"proxy"},
                     "tensor-core GEMV, table barrier removed": {"table"}}, broken
