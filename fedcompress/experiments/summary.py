"""Seeds and machines: mean ± std over seeds, and the machine line every report carries."""

from __future__ import annotations

import math
import os
import statistics
from typing import Any

from .plan import Run


def machine_info() -> dict[str, Any]:
    """The machine as measured now: logical CPUs (and those this process may use), CPU model, torch
    threads, GPU (name) or none, and the 1-minute load average where the OS gives one."""
    import platform

    import torch

    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    try:
        load = round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        load = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpus": os.cpu_count(),
        "cpus_usable": usable,
        "cpu_model": model or platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "load_average_1min": load,
    }


def machine_line(info: dict[str, Any] | None = None) -> str:
    """e.g. "2 CPUs (Intel(R) Xeon(R) ...), 1 torch thread, no GPU, load average 5.1"."""
    m = info or machine_info()
    cpus = f"{m['cpus']} CPUs" + (f" ({m['cpus_usable']} usable)" if m["cpus_usable"] != m["cpus"] else "")
    t = m["torch_threads"]
    line = f"{cpus} ({m['cpu_model']}), {t} torch thread{'s' if t != 1 else ''}, " + (
        f"GPU {m['gpu']}" if m["gpu"] else "no GPU"
    )
    return line + (f", load average {m['load_average_1min']}" if m["load_average_1min"] is not None else "")


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1 in the denominator; 0.0 for a single value)."""
    m = statistics.fmean(values)
    return m, (statistics.stdev(values, m) if len(values) > 1 else 0.0)


def merge_seeds(runs: list[Run]) -> list[Run]:
    """One Run per (part, row, target): its summary averages the finished seeds' summaries
    (final accuracy and ratio: mean, with ``final_accuracy_std``; history: the per-round mean), so
    the tables and plots read the mean. Runs of a single seed come back as they are."""
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault((r.part, r.row, r.target), []).append(r)
    out = []
    for group in groups.values():
        if len(group) == 1:
            out.append(group[0])
            continue
        first, done = group[0], [r for r in group if r.summary]
        notes = sorted({f"seed {r.seed}: {r.note}" for r in group if r.summary is None and r.note})
        merged = Run(first.part, first.row, first.target, first.spec,
                     note="; ".join(notes), seed=first.seed, seeds_done=len(done))  # fmt: skip
        if done:
            merged.summary = mean_summary([r.summary for r in done], [r.seed for r in done])
            merged.summary["seeds_planned"] = len(group)
        out.append(merged)
    return out


def diverged_round(summary: dict) -> int | None:
    """The round a run's model went non-finite: the driver's ``diverged_round`` (it stops there), or
    for runs from before it stopped, the first round whose test loss is not finite."""
    if summary.get("diverged_round"):
        return int(summary["diverged_round"])
    bad = (r["round"] for r in summary.get("history", []) if not math.isfinite(r.get("loss", 0.0)))
    return next(bad, None)


COLLAPSE_AFTER, COLLAPSE_FRACTION = 3, 0.6  # issue 14's no-collapse criterion (Dirichlet 0.3)


def collapse_round(summary: dict) -> int | None:
    """The first round after the third whose accuracy fell below 60 % of the best accuracy of the
    rounds before it, or None. A fall, not a slow start: measured against the run's overall best,
    a run still climbing at round 4 (21, 33, 41, 55 % ... 90 % at the end) read as collapsed."""
    best = 0.0
    for r in summary.get("history", []):
        if r["round"] > COLLAPSE_AFTER and r["accuracy"] < COLLAPSE_FRACTION * best:
            return r["round"]
        best = max(best, r["accuracy"])
    return None


LAST_ROUNDS = 5  # the report's second measure: the mean accuracy over a run's last 5 rounds


def last_rounds_accuracy(summary: dict, k: int = LAST_ROUNDS) -> float:
    """Mean test accuracy over the last ``k`` rounds of a run's history (all of them if fewer): steadier
    than the last round alone where a row swings by points from round to round (FedSynth). A mean over
    seeds (``mean_summary``) carries it already, as the mean of each seed's own value, with its std."""
    if "last_accuracy" in summary:
        return summary["last_accuracy"]
    return statistics.fmean(r["accuracy"] for r in summary["history"][-k:])


MEAN_KEYS = ("final_accuracy", "best_accuracy", "compression_ratio", "upstream_bytes", "dense_upstream_bytes",
             "download_bytes", "initial_accuracy", "codec_overhead")  # fmt: skip


def mean_summary(summaries: list[dict], seeds: list[int]) -> dict:
    """The mean of several runs' summaries (one per seed): every key of MEAN_KEYS they all have is
    averaged and gets a ``<key>_std`` (sample std), ``wall_seconds`` is summed, and ``history`` is
    the per-round mean of accuracy and cumulative upstream bytes (for the curves)."""
    out: dict[str, Any] = {"seeds": list(seeds)}
    for k in MEAN_KEYS:
        if all(k in s for s in summaries):
            out[k], out[k + "_std"] = mean_std([s[k] for s in summaries])
    out["last_accuracy"], out["last_accuracy_std"] = mean_std([last_rounds_accuracy(s) for s in summaries])
    out["wall_seconds"] = sum(s.get("wall_seconds", 0.0) for s in summaries)
    out["diverged_rounds"] = [diverged_round(s) for s in summaries]  # None where the seed did not
    out["collapse_rounds"] = [collapse_round(s) for s in summaries]
    rounds = min(len(s["history"]) for s in summaries)
    out["history"] = [
        {
            "round": summaries[0]["history"][i]["round"],
            "accuracy": statistics.fmean(s["history"][i]["accuracy"] for s in summaries),
            "upstream_bytes": statistics.fmean(s["history"][i]["upstream_bytes"] for s in summaries),
        }
        for i in range(rounds)
    ]
    return out
