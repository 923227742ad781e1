"""The run cache (``<runs>/seed<S>/<setting>/<spec>/``) and running what it lacks."""

from __future__ import annotations

import json
import os
import re

from .plan import Plan, Run, config


def load_cached(out: str, config: dict, rounds: int, revision: int = 0) -> dict | None:
    """The finished run in ``out`` (summary.json + metrics.jsonl) if it has this exact config, the
    compressor's current ``revision`` (``Compressor.REVISION``; absent = 0) and every round (up to
    the round it diverged in, where it stopped), else None (also for a run killed mid-write)."""
    try:
        with open(os.path.join(out, "summary.json")) as f:
            s = json.load(f)
        with open(os.path.join(out, "metrics.jsonl")) as f:
            s["history"] = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return None
    if s.get("compressor_revision", 0) != revision:
        return None
    last = s.get("diverged_round") or rounds
    if s.get("config") != config or [r.get("round") for r in s["history"]] != list(range(1, last + 1)):
        return None
    return s


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", s).strip("_")


def run_dir(plan: Plan, runs_dir: str, run: Run) -> str:
    """``<runs>/seed<S>/<setting>/<spec>``: the sweep shares its setting's folder (one none run)."""
    return os.path.join(runs_dir, f"seed{run.seed}", plan.folder(run.part), _safe(run.spec))


def execute(
    plan: Plan,
    runs: list[Run],
    data_for,
    runs_dir: str,
    reuse: bool = True,
    log=print,
    on_run=None,
    cached_only: bool = False,
) -> None:
    """Run (or reuse) every run; ``data_for(setting, seed)`` gives a run's data (called only for runs
    that train); ``on_run()`` after each one that ran (e.g. rewrite the report)."""
    from ..api import compressor_class, parse_spec
    from ..fedavg.driver import run_experiment

    for i, run in enumerate(runs):
        if run.note:
            continue
        cfg = config(plan, run.part, run.spec, run.seed)
        data_part = plan.folder(run.part)
        out = run_dir(plan, runs_dir, run)
        revision = compressor_class(parse_spec(run.spec)[0]).REVISION
        s = load_cached(out, cfg.to_dict(), cfg.rounds, revision) if reuse else None
        if s is not None:
            run.summary = s
            log(f"[results] {i + 1}/{len(runs)} reused seed {run.seed} {run.part} {run.spec}")
            continue
        if cached_only:
            run.note = "no finished run in the cache (--cached-only)"
            continue
        try:
            run.summary = run_experiment(
                cfg, out_dir=out, data=data_for(data_part, run.seed)
            )
        except Exception as e:  # one broken compressor must not lose the other rows
            run.note = f"failed: {type(e).__name__}: {e}"
            log(f"[results] seed {run.seed} {run.spec} {run.note}")
            continue
        s = run.summary
        log(
            f"[results] {i + 1}/{len(runs)} seed {run.seed} {run.part} {run.spec}: "
            f"acc {s['final_accuracy'] * 100:.2f}% "
            f"ratio {s['compression_ratio']:.2f}x {s['wall_seconds']:.0f}s"
        )
        if on_run is not None:
            on_run()
