"""Median FedSynth update ratio of finished runs: |replayed update| / |the update the client aimed at|.

The client aims at its SGD update, plus the carried residual under ``ef`` (docs/fedsynth.md, "Error
feedback"), and the driver writes each client's ratio to metrics.jsonl as ``chosen[].update_ratio``.
A ratio far below 1 under ``ef`` says the residual has grown to several times the SGD update.

    python bench/fedsynth_update_ratio.py RUN_DIR [RUN_DIR ...] [--from-round 10]

RUN_DIR is a run's folder (its metrics.jsonl), e.g. runs/compare/seed0/<spec>/ from
``fedcompress compare --compressors SPEC --seeds 0,1,2``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics


def update_ratios(run_dir: str, from_round: int) -> list[float]:
    """Every client's ``update_ratio`` from round ``from_round`` on (None entries skipped)."""
    out = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if row["round"] >= from_round:
                out += [c["update_ratio"] for c in row.get("chosen") or [] if c.get("update_ratio") is not None]
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="run folders holding metrics.jsonl")
    p.add_argument("--from-round", type=int, default=10, help="first round counted (default: 10)")
    a = p.parse_args(argv)
    print("| run | client updates | median update ratio |\n|---|---:|---:|")
    for d in a.runs:
        r = update_ratios(d, a.from_round)
        print(f"| {d} | {len(r)} | {statistics.median(r):.3f} |" if r else f"| {d} | 0 | — |")


if __name__ == "__main__":
    main()
