"""The report's PNG plots (accuracy against upstream MB)."""

from __future__ import annotations

import os

from .plan import Plan, Run
from .tables import baseline_run


def plots(plan: Plan, runs: list[Run], out: str, part: str) -> list[str]:
    """Two small PNGs for ``part``: accuracy vs round and accuracy vs MB sent up, one panel per budget
    (none in every panel as the reference; the y axis starts near none's plateau's lower end so the
    gaps between rows stay visible)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    base = baseline_run(runs, part)
    budgets = plan.budgets_of(part)
    paths = []
    for kind in ("round", "mb"):
        fig, axes = plt.subplots(
            1, len(budgets), figsize=(3.4 * len(budgets), 3.0), dpi=72, squeeze=False
        )
        for ax, ratio in zip(axes[0], budgets, strict=True):
            sel = ([base] if base else []) + [
                r for r in runs if r.part == part and r.target == ratio and r.summary and r.row != "none"
            ]
            for r in sel:
                h = r.summary["history"]
                xs = [0] + [row["round"] if kind == "round" else row["upstream_bytes"] / 1e6 for row in h]
                ys = [r.summary["initial_accuracy"] * 100] + [row["accuracy"] * 100 for row in h]
                ax.plot(xs, ys, lw=1, label=f"{r.row} {r.summary['compression_ratio']:.1f}x")
            if kind == "mb":
                ax.set_xscale("symlog", linthresh=0.1)
            if base:
                top = max(row["accuracy"] for row in base.summary["history"]) * 100
                ax.set_ylim(max(0.0, top - 15), min(100.0, top + 1.5))
            ax.set_title(f"{part}, {ratio}x", fontsize=9)
            ax.set_xlabel("round" if kind == "round" else "MB sent up (cumulative)", fontsize=8)
            ax.set_ylabel("test accuracy (%)", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(True, alpha=0.3)
            if sel:  # a budget with no finished run: an empty panel, no legend
                ax.legend(fontsize=6)
        fig.tight_layout()
        name = f"results_{part}_acc_vs_{kind}.png"
        fig.savefig(os.path.join(out, name))
        plt.close(fig)
        paths.append(name)
    return paths
