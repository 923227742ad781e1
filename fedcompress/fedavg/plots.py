"""Accuracy against megabytes sent up, one curve per compressor (matplotlib, Agg backend)."""

from __future__ import annotations

import os
import textwrap
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
        # wrapped: a canonical spec lists every key (FedSynth's run to 200 characters)
        text = textwrap.fill(f"{label} ({s['compression_ratio']:.1f}x)", 60, break_on_hyphens=False)
        ax.plot(xs, ys, marker="o", markersize=3, label=text)
        if xs[-1] > 0:
            spans.append(xs[-1])
    if spans and max(spans) / max(min(spans), 1e-12) > 20:
        ax.set_xscale("symlog", linthresh=max(min(spans) / 10, 1e-6))
    ax.set_xlabel("cumulative upstream (MB)")
    ax.set_ylabel("test accuracy (%)")
    if title:  # wrapped: a long spec in one line leaves tight_layout no room
        ax.set_title(textwrap.fill(title, 70), fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    # bbox_inches="tight" instead of tight_layout(): the latter gives up (with a warning) on some
    # tick-label widths, e.g. a two-round run whose x range is a fraction of a MB
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
