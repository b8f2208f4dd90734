import json

import pytest

pytest.importorskip("bitsandbytes")


def test_bench_quant_smoke(tmp_path):
    from benchmarks import bench_quant

    assert bench_quant.main(["--smoke", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "quant.json").read_text())
    assert {r["provider"] for r in rows} == {"fourbit", "bitsandbytes"}
    assert {r["op"] for r in rows} == {"quantize", "dequantize"}
    assert all(r["median_ms"] > 0 and r["versions"]["torch"] for r in rows)
    table = (tmp_path / "quant.md").read_text()
    assert "vs bitsandbytes" in table
    assert (tmp_path / "quant.png").stat().st_size > 1000
