"""What ``fedcompress results`` runs: the plan (rows, ratios, sweep), its rows' labels and one Run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

RATIOS = (8, 16, 64)
SWEEP_REL = (1e-1, 1e-2, 1e-3, 1e-4)
# The goals, in accuracy points (pt = percentage points of test accuracy).
GOAL_16X_PT, GOAL_64X_PT, GOAL_SWEEP_RATIO, GOAL_SWEEP_PT = 0.5, 1.0, 20.0, 0.5


@dataclass
class Plan:
    """What ``fedcompress results`` runs. ``quick``: digits, few rounds, two ratios."""

    dataset: str = "mnist5k"
    clients: int = 60
    rounds: int = 10
    clients_per_round: int = 5
    epochs: int = 2
    batch_size: int = 20
    lr: float = 0.05
    seeds: tuple[int, ...] = (0,)
    alpha: float = 0.3
    ratios: tuple[int, ...] = RATIOS
    sweep: tuple[float, ...] = SWEEP_REL
    # 5 outer steps, not FedSynth's default 30: every outer step is one hypergradient, so at 30 the
    # FedSynth rows would take most of the report's time (results.json lists each run's wall_seconds)
    fedsynth_outer_steps: int = 5
    parts: tuple[str, ...] = ("iid", "sweep", "dirichlet")
    rows: tuple[str, ...] = ("none", "mask", "mask-unbiased", "sz", "fedsynth-fixed", "fedsynth-trainable")
    noniid_rows: tuple[str, ...] = rows
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def seed(self) -> int:
        """The first seed: the one the compressors' parameters are calibrated on."""
        return self.seeds[0]

    @classmethod
    def quick(cls) -> Plan:
        """Every table and row once, on digits (8x8), 12 clients, 2 rounds of 3: seconds, not minutes."""
        return cls(
            dataset="digits",
            clients=12,
            rounds=2,
            clients_per_round=3,
            epochs=1,
            ratios=(16,),
            sweep=(1e-2,),
            fedsynth_outer_steps=1,
        )


ROW_LABELS = {
    "none": "none",
    "mask": "mask (keep=1/ratio, unbiased=false)",
    "mask-unbiased": "mask (keep=1/ratio, unbiased=true)",
    "sz": "sz (update, REL calibrated)",
    "fedsynth-fixed": "fedsynth (labels=fixed)",
    "fedsynth-trainable": "fedsynth (labels=trainable)",
}


def _config(plan: Plan, partition: str, spec: str, seed: int | None = None):
    from ..fedavg.driver import ExperimentConfig

    return ExperimentConfig(
        dataset=plan.dataset,
        clients=plan.clients,
        rounds=plan.rounds,
        compressor=spec,
        partition="iid" if partition == "iid" else "dirichlet",
        alpha=plan.alpha,
        clients_per_round=plan.clients_per_round,
        epochs=plan.epochs,
        batch_size=plan.batch_size,
        lr=plan.lr,
        seed=plan.seed if seed is None else seed,
    )


def compressor_available(name: str) -> str | None:
    """None if the compressor ``name`` can be built, else why not (one line)."""
    from ..api import compressor_class

    try:
        compressor_class(name)
    except (ImportError, ValueError, AttributeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


@dataclass
class Run:
    part: str  # iid | dirichlet | sweep
    row: str  # table row key
    target: float  # the ratio aimed at (0 for none / sweep)
    spec: str
    calibrated_ratio: float = float("nan")
    note: str = ""
    summary: dict | None = None
    seed: int = 0
    seeds_done: int = 1  # merged runs: how many seeds the summary averages
