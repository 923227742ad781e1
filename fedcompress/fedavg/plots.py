"""Accuracy against megabytes sent up, one curve per compressor (matplotlib, Agg backend)."""

from __future__ import annotations

import os
from typing import Any


def plot_accuracy_vs_mb(
    summaries: dict[str, dict[str, Any]], path: str | os.PathLike, title: str | None = None
) -> None:
    """One curve per summary: x = cumulative upstream MB (starting at 0 with the initial model),
    y = test accuracy (%). Log x-axis when the curves span more than 20x."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    spans = []
    for label, s in summaries.items():
        hist = s["history"]
        xs = [r["upstream_bytes"] / 1e6 for r in hist]
        ys = [r["accuracy"] * 100 for r in hist]
        if "initial_accuracy" in s:
            xs, ys = [0.0] + xs, [s["initial_accuracy"] * 100] + ys
        ax.plot(xs, ys, marker="o", markersize=3, label=f"{label} ({s['compression_ratio']:.1f}x)")
        if xs[-1] > 0:
            spans.append(xs[-1])
    if spans and max(spans) / max(min(spans), 1e-12) > 20:
        ax.set_xscale("symlog", linthresh=max(min(spans) / 10, 1e-6))
    ax.set_xlabel("cumulative upstream (MB)")
    ax.set_ylabel("test accuracy (%)")
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
