"""The compile report (python -m fourbit.kernels.analysis.report): GPU builds of the kernels without a GPU.

The CLI runs in a child process without TRITON_INTERPRET (an interpreted triton cannot compile), on
the specs that matter: the dequantize kernel (the bandwidth-bound hot path: 128-bit loads of the
packed bytes and 128-bit stores, no spills) and the quantize kernels (no spills, 128-bit loads).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fourbit.kernels.analysis.report import ARCHS, format_table, sass_counts

REPO = Path(__file__).resolve().parents[1]
SPECS = ["dequantize_4bit[bfloat16,bs64,dq]", "dequantize_4bit[float32,bs64,dq]", "quantize_4bit[nf4,float32,bs64]",
         "quantize_nested"]  # fmt: skip


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "fourbit.kernels.analysis.report", "--json", str(out)]
    cmd += ["--module", "fourbit.kernels.quantize", "--module", "fourbit.kernels.dequantize"]
    for name in SPECS:
        cmd += ["--only", name]
    child = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return child, (json.loads(out.read_text()) if out.exists() else None)


def test_report_prints_every_arch_and_passes(report):
    child, data = report
    assert child.returncode == 0, child.stdout[-6000:] + child.stderr[-4000:]
    for arch in ARCHS:
        assert f" {arch} " in child.stdout
    assert data is not None
    assert {(r["kernel"], r["arch"]) for r in data["rows"]} == {(k, a) for k in SPECS[:3] for a in ARCHS} | {
        ("quantize_nested[bs256]", a) for a in ARCHS
    }


def test_kernels_do_not_spill(report):
    _, data = report
    for row in data["rows"]:
        assert row["spill_stores"] == row["spill_loads"] == row["ldl"] == row["stl"] == 0, row


def test_dequantize_moves_data_in_128_bit_accesses(report):
    _, data = report
    for row in data["rows"]:
        if row["kernel"].startswith("dequantize"):
            # the packed stream is the only thing that could be loaded 128 bits wide; the rest are
            # per-thread scalars (scale, its code byte, code gathers from one L1 line)
            assert row["widest_ldg"] == 128 and row["ldg_bits"]["128"] >= 1, row
            assert set(row["stg_bits"]) == {"128"}, f"every output store must be 128-bit: {row}"
        if row["kernel"].startswith("quantize_4bit"):
            assert row["widest_ldg"] == 128, row


def test_sass_counting_on_a_listing():
    listing = """
        /*0070*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0080*/              @!P0 LDG.E.U8 R9, desc[UR4][R6.64] ;
        /*0090*/                   LDG.E R10, desc[UR4][R6.64] ;
        /*00a0*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R4.64] ;
        /*00b0*/                   STG.E.64 desc[UR4][R2.64], R8 ;
        /*00c0*/                   STL [R1], R5 ;
        /*00d0*/                   LDL R5, [R1] ;
        /*00e0*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*00f0*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;
        /*0100*/                   EXIT ;
    """
    counts = sass_counts(listing)
    assert counts["ldg_bits"] == {8: 1, 32: 1, 128: 2}
    assert counts["stg_bits"] == {64: 1} and counts["widest_stg"] == 64
    assert (counts["ldl"], counts["stl"], counts["hgmma"], counts["hmma"]) == (1, 1, 1, 1)
    assert counts["instructions"] == 10


def test_table_marks_failures():
    row = {
        "kernel": "k", "arch": "sm_80", "registers": 255, "spill_stores": 8, "spill_loads": 8, "shared_bytes": 0,
        "ldg_bits": {32: 4}, "stg_bits": {}, "ldl": 1, "stl": 1, "hmma": 0, "hgmma": 0, "ok": False,
        "problems": ["spills 8/8 B, LDL 1, STL 1"],
    }  # fmt: skip
    table = format_table([row])
    assert "FAIL: spills 8/8 B" in table and "32x4" in table
