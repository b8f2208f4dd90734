"""fourbit.inspect: look inside 4-bit quantization of a real model (`fourbit inspect`).

    from fourbit.inspect import inspect_model, write_report, format_codebook
    report = inspect_model("minilm", layer=None, blocksizes=(32, 64, 128, 256))   # a JSON-able dict
    paths = write_report(report, "runs/inspect/minilm")    # inspect.png, inspect.md, inspect.json
    print(format_codebook())                               # the NF4 table from normal quantiles

For every linear weight (or one, `layer`) and every format (NF4, NF4+DQ, FP4, Int4 absmax) and
blocksize: relative error, SQNR, bits per weight split into codes / absmax / nested absmax / offset
(`stats`). At the main blocksize (64) also: the distribution of block-normalised weights w / absmax,
how often each 4-bit code is used, and the blocks NF4 quantizes worst (the outliers) with their share
of the error. Everything is computed with `fourbit.nf4.quantize` / `dequantize`, the same functions
the library trains with.
"""

from __future__ import annotations

import time

import torch

from .codebook import codebook_rows, format_codebook
from .render import summary_text, write_report
from .sources import EMBEDDED_SOURCES, linear_weights, resolve, weight_names
from .stats import FORMATS, HIST_BINS, FormatStats, analyse_tensor, int4_round_trip, storage_bits
from ..errors import InvalidInput

__all__ = [
    "EMBEDDED_SOURCES", "FORMATS", "inspect_model", "write_report", "summary_text", "format_codebook", "codebook_rows",
    "int4_round_trip", "storage_bits",
]

DEFAULT_BLOCKSIZES = (32, 64, 128, 256)


def inspect_model(
    model: str = "smollm2",
    *,
    layer: str | None = None,
    blocksizes=DEFAULT_BLOCKSIZES,
    main_blocksize: int = 64,
    top: int = 10,
) -> dict:
    """Analyse the linear weights of `model` (see `sources.resolve`); returns the report as a dict."""
    blocksizes = tuple(sorted({int(b) for b in blocksizes} | {main_blocksize}))
    from ..nf4.checks import check_blocksize

    for bs in blocksizes:
        check_blocksize(bs)
    label, files = resolve(model)
    t0 = time.perf_counter()
    totals = {key: FormatStats() for key in ((f, b) for f in FORMATS for b in blocksizes)}
    layers, hist, usage, block_errors, candidates = [], torch.zeros(HIST_BINS), {}, [], []
    for name, w in linear_weights(files, layer):
        a = analyse_tensor(w, blocksizes, main_blocksize)
        for key, st in a["stats"].items():
            totals[key].add(st)
        layers.append({
            "name": name, "shape": list(w.shape), "numel": w.numel(),
            "formats": {f: {str(b): _errors(a["stats"][(f, b)]) for b in blocksizes} for f in FORMATS},
        })
        hist += a["hist"]
        for fmt, counts in a["usage"].items():
            usage[fmt] = usage.get(fmt, 0) + counts
        block_errors.append(a["block_error"])
        candidates += _worst_in_layer(name, w.shape, a, main_blocksize, top)
    if not layers:
        names = weight_names(files)
        hint = f"; linear weights here: {', '.join(names[:6])}{' ...' if len(names) > 6 else ''}" if names else ""
        raise InvalidInput(f"{label}: no linear weight {'named ' + repr(layer) if layer else 'found'}{hint}")
    all_errors = torch.cat(block_errors)
    total_error = float(all_errors.sum())
    worst = sorted(candidates, key=lambda c: -c["squared_error"])[:top]
    for c in worst:
        c["share_of_model_error"] = c["squared_error"] / total_error if total_error else 0.0
    k = max(1, all_errors.numel() // 100)
    summary = {f: {str(b): totals[(f, b)].summary() for b in blocksizes} for f in FORMATS}
    return {
        "model": model, "label": label, "files": files, "layer": layer, "blocksizes": list(blocksizes),
        "main_blocksize": main_blocksize, "n_layers": len(layers), "numel": sum(x["numel"] for x in layers),
        "totals": summary, "layers": layers,
        "ordering": sorted(FORMATS, key=lambda f: summary[f][str(main_blocksize)]["rel_error"]),
        "histogram": {"min": -1.0, "max": 1.0, "counts": hist.tolist()},
        "code_usage": {f: c.tolist() for f, c in usage.items()},
        "code_entropy_bits": {f: _entropy(c) for f, c in usage.items()},
        "worst_blocks": worst,
        "outliers": {
            "blocks": all_errors.numel(),
            "top_1pct_share": float(all_errors.topk(k).values.sum()) / total_error if total_error else 0.0,
            "median_block_squared_error": float(all_errors.median()),
        },
        "seconds": time.perf_counter() - t0,
    }


def _errors(stats: FormatStats) -> dict:
    """A layer's error figures (its storage follows from shape, format and blocksize: `storage_bits`)."""
    s = stats.summary()
    return {k: s[k] for k in ("rel_error", "rel_sq_error", "sqnr_db")}


def _entropy(counts: torch.Tensor) -> float:
    """Bits of information per weight in the code choice (4 at most: all 16 codes equally used)."""
    p = counts.double() / counts.sum()
    p = p[p > 0]
    return float(-(p * p.log2()).sum())


def _worst_in_layer(name: str, shape, a: dict, bs: int, top: int) -> list[dict]:
    """The `top` blocks of one layer with the largest NF4 squared error, described."""
    err, sig, absmax = a["block_error"], a["block_signal"], a["absmax"]
    layer_error = float(err.sum())
    cols = int(shape[-1])
    out = []
    for b in err.topk(min(top, err.numel())).indices.tolist():
        n_in = min(bs, int(torch.tensor(shape).prod()) - b * bs)
        rms = (float(sig[b]) / n_in) ** 0.5
        out.append({
            "layer": name, "block": b, "row": b * bs // cols, "col": b * bs % cols,
            "absmax": float(absmax[b]), "rms": rms, "crest": float(absmax[b]) / rms if rms else 0.0,
            "rel_error": (float(err[b]) / float(sig[b])) ** 0.5 if sig[b] > 0 else 0.0,
            "zero_codes": int(a["zeros"][b]), "block_size": n_in, "squared_error": float(err[b]),
            "share_of_layer_error": float(err[b]) / layer_error if layer_error else 0.0,
        })
    return out
