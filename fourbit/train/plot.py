"""The run's picture: training loss per step, and exact-match accuracy where it was measured."""

from __future__ import annotations

import os

__all__ = ["plot_metrics"]


def plot_metrics(rows: list[dict], path: str, title: str = "") -> str:
    """Write a PNG of loss vs step (left axis) and eval exact match vs step (right axis), atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..nf4.files import atomic_write

    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "exact_match" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], color="tab:blue", marker=".", label="train loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (answer tokens)", color="tab:blue")
    ax.set_yscale("log")
    if evals:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in evals], [r["exact_match"] for r in evals], color="tab:red", marker="o", label="exact match")
        ax2.set_ylabel("eval exact match", color="tab:red")
        ax2.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return os.fspath(path)
