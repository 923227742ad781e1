"""The run cache (``<runs>/seed<S>/<setting>/<spec>/``), the run archive, and running what they lack.

The cache holds each run as the driver wrote it (summary.json, metrics.jsonl with per-client lists,
plots) on the machine that ran it, and is not committed. The archive (``--archive``, by default
``<report dir>/runs``, so ``--report-dir docs`` keeps ``docs/runs/``) holds one compact JSON per
finished run: the summary and every numeric per-round column, ~10-25 KB for a 40-100 round run. A
report needs nothing else, so a report committed with its archive can be rewritten, and extended by
new runs, on a machine that has never run the old ones (the cache of the first ~480 runs was lost
with the machine it lived on, 2026-11-30).
"""

from __future__ import annotations

import json
import os
import re

from .plan import Plan, Run, config


def load_cached(out: str, config: dict, rounds: int, revision: int | None = None) -> dict | None:
    """The finished run in ``out`` (summary.json + metrics.jsonl) if it has this exact config, the
    compressor's ``revision`` (``Compressor.REVISION``, a summary without one counts as 0; None: the
    current REVISION of ``config["compressor"]``) and every round (up to the round it diverged in,
    where it stopped), else None (also for a run killed mid-write)."""
    try:
        with open(os.path.join(out, "summary.json")) as f:
            s = json.load(f)
        with open(os.path.join(out, "metrics.jsonl")) as f:
            s["history"] = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return None
    return s if _finished(s, config, rounds, revision) else None


def _finished(s, config: dict, rounds: int, revision: int | None) -> bool:
    """Whether summary ``s`` (with its history) is a finished run of ``config`` at ``revision``
    (None: the current one of its compressor, so no caller can check against a stale default)."""
    if not isinstance(s, dict) or not isinstance(s.get("history"), list):
        return False
    if revision is None:
        from ..api import compressor_class, parse_spec

        revision = compressor_class(parse_spec(config["compressor"])[0]).REVISION
    if s.get("compressor_revision", 0) != revision:
        return False
    last = s.get("diverged_round") or rounds
    rounds_seen = [r.get("round") if isinstance(r, dict) else None for r in s["history"]]
    return s.get("config") == config and rounds_seen == list(range(1, last + 1))


ARCHIVE_FORMAT = 1


def archive_path(plan: Plan, archive_dir: str, run: Run) -> str:
    """``<archive>/seed<S>/<setting>/<spec>.json``, named as the run cache's folders."""
    return os.path.join(archive_dir, f"seed{run.seed}", plan.folder(run.part), _safe(run.spec) + ".json")


def _compact(v):
    """Floats to 7 significant digits (seconds and losses carry noise far above that; accuracies are
    counts over the test set, exact at 7); everything else as it is."""
    return float(f"{v:.7g}") if isinstance(v, float) else v


def write_archive(path: str, summary: dict) -> None:
    """Archive a finished run: its summary without the history, and the history's numeric columns
    (the per-client lists stay in the cache). Written to a temporary file, then renamed."""
    hist = summary["history"]
    first = hist[0] if hist else {}
    cols = [k for k in first if all(isinstance(r.get(k), (int, float)) or r.get(k) is None for r in hist)]
    doc = {
        "format": ARCHIVE_FORMAT,
        "summary": {k: _compact(v) for k, v in summary.items() if k != "history"},
        "history": {k: [_compact(r.get(k)) for r in hist] for k in cols},
    }
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, separators=(",", ":"), sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def load_archived(path: str, config: dict, rounds: int, revision: int | None = None) -> dict | None:
    """The archived run at ``path`` as ``load_cached`` returns a cached one (the history as a list of
    per-round dicts), under the same checks; None when absent, unreadable or malformed."""
    try:
        with open(path) as f:
            doc = json.load(f)
        if doc.get("format") != ARCHIVE_FORMAT:
            return None
        s, cols = dict(doc["summary"]), doc["history"]
        n = len(cols["round"])
        if any(not isinstance(v, list) or len(v) != n for v in cols.values()):
            return None
        s["history"] = [{k: v[i] for k, v in cols.items()} for i in range(n)]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return s if _finished(s, config, rounds, revision) else None


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
    archive_dir: str | None = None,
) -> None:
    """Run (or reuse, from the cache or else the archive) every run; ``data_for(setting, seed)``
    gives a run's data (called only for runs that train); ``on_run()`` after each one that ran (e.g.
    rewrite the report). With ``archive_dir``, every finished run is archived there."""
    from ..fedavg.driver import run_experiment

    for i, run in enumerate(runs):
        if run.note:
            continue
        cfg = config(plan, run.part, run.spec, run.seed)
        data_part = plan.folder(run.part)
        out = run_dir(plan, runs_dir, run)
        arch = archive_path(plan, archive_dir, run) if archive_dir else None
        s = load_cached(out, cfg.to_dict(), cfg.rounds) if reuse else None
        where = "the cache"
        if s is None and reuse and arch:
            s, where = load_archived(arch, cfg.to_dict(), cfg.rounds), "the archive"
        if s is not None:
            run.summary = s
            if arch and where == "the cache" and not os.path.exists(arch):
                write_archive(arch, s)
            log(f"[results] {i + 1}/{len(runs)} reused seed {run.seed} {run.part} {run.spec} from {where}")
            continue
        if cached_only:
            run.note = "no finished run in the cache or the archive (--cached-only)"
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
        if arch:
            write_archive(arch, s)
        log(
            f"[results] {i + 1}/{len(runs)} seed {run.seed} {run.part} {run.spec}: "
            f"acc {s['final_accuracy'] * 100:.2f}% "
            f"ratio {s['compression_ratio']:.2f}x {s['wall_seconds']:.0f}s"
        )
        if on_run is not None:
            on_run()
