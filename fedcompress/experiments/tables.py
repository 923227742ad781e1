"""The report's markdown tables: one per setting (rows x budgets, iso-accuracy), and the sz sweep."""

from __future__ import annotations

import re

from .plan import ISO_PT, ROW_LABELS, ROWS, Plan, Run
from .summary import collapse_round, diverged_round, last_rounds_accuracy

# the two measures a setting's tables show: the last round's accuracy (the goals' measure) and the
# mean over the last LAST_ROUNDS rounds
FINAL, LAST = "final", "last"


def _acc(run: Run, measure: str = FINAL) -> float:
    s = run.summary
    if measure == LAST:
        return 100 * last_rounds_accuracy(s)
    return s["final_accuracy"] * 100


def _acc_text(run: Run, measure: str = FINAL) -> str:
    """"96.20" for one seed; "96.20 ± 0.12" for a mean over seeds (plus "[2 of 3 seeds]" when
    some seeds have not finished)."""
    s = run.summary
    std_key = "last_accuracy_std" if measure == LAST else "final_accuracy_std"
    if std_key not in s:
        return f"{_acc(run, measure):.2f}"
    short = f" [{len(s['seeds'])} of {s['seeds_planned']} seeds]" if len(s["seeds"]) < s["seeds_planned"] else ""
    return f"{_acc(run, measure):.2f} ± {s[std_key] * 100:.2f}{short}"


def _event_text(run: Run, event: str, key: str, find) -> str:
    """", diverged in round 4" for one seed; ", diverged in 2 of 3 seeds (rounds 4, 7)" for a mean."""
    s = run.summary
    if key not in s:
        r = find(s)
        return f", {event} in round {r}" if r else ""
    rounds = [r for r in s[key] if r]
    if not rounds:
        return ""
    which = ("rounds " if len(rounds) > 1 else "round ") + ", ".join(str(r) for r in rounds)
    return f", {event} in {len(rounds)} of {len(s[key])} seeds ({which})"


def _events_text(run: Run) -> str:
    """Diverged (the model went non-finite), else collapsed (a round after the third below 60 % of
    the best before it: issue 14's criterion); a cell says which, per seed for a mean."""
    text = _event_text(run, "diverged", "diverged_rounds", diverged_round)
    return text or _event_text(run, "collapsed", "collapse_rounds", collapse_round)


def _cell(run: Run | None, measure: str = FINAL) -> str:
    if run is None:
        return "—"
    if run.summary is None:  # why: the report's "Not run" list
        return "not run"
    if measure == LAST:  # the ratio and events are in the first table already
        return _acc_text(run, LAST)
    return f"{_acc_text(run)} ({run.summary['compression_ratio']:.1f}x{_events_text(run)})"


def baseline_run(runs: list[Run], part: str) -> Run | None:
    return next((r for r in runs if r.part == part and r.row == "none" and r.summary), None)


def _complete(run: Run) -> bool:
    """Finished for every planned seed (a mean over fewer seeds is not compared with none's)."""
    s = run.summary
    return bool(s) and len(s.get("seeds", [0])) >= s.get("seeds_planned", 1)


def iso_ratio(row_runs: list[Run], base: float, measure: str = FINAL) -> Run | None:
    """The run with the largest reached ratio whose mean accuracy is within ISO_PT of none's ``base``
    (runs missing some of their seeds do not count)."""
    ok = [r for r in row_runs if _complete(r) and _acc(r, measure) >= base - ISO_PT]
    return max(ok, key=lambda r: r.summary["compression_ratio"], default=None)


def setting_table(plan: Plan, runs: list[Run], part: str, measure: str = FINAL) -> str:
    """Rows x budgets: mean accuracy ± std (ratio reached), and the iso-accuracy column; with
    ``measure=LAST`` the same on each run's mean over its last rounds (no ratios, no specs line)."""
    budgets = plan.budgets_of(part)
    base_run = baseline_run(runs, part)
    base = _acc(base_run, measure) if base_run else None
    mine = [r for r in runs if r.part == part]
    lines = []
    fixed = [r for r in mine if ROWS.get(r.row, (0, 0))[1] is None]
    if fixed:
        lines.append(
            "Fixed-ratio rows: "
            + "; ".join(
                f"{ROW_LABELS[r.row]} {_cell(r, measure)}"
                + (f", {_acc(r, measure) - base:+.2f} pt" if base is not None and r.summary and r.row != "none" else "")
                for r in fixed
            )
            + ".\n"
        )
    iso_head = f"largest ratio within {ISO_PT} pt of none"
    lines.append("| compressor | " + " | ".join(f"{b}x" for b in budgets) + f" | {iso_head} |")
    lines.append("|---|" + "---:|" * (len(budgets) + 1))
    for row in plan.rows:
        if ROWS[row][1] is None:
            continue
        row_runs = [r for r in mine if r.row == row]
        cells = [_cell(next((r for r in row_runs if r.target == b), None), measure) for b in budgets]
        if base is None:
            iso = "— (no none run)"
        elif not any(_complete(r) for r in row_runs):
            iso = "— (seeds missing)" if any(r.summary for r in row_runs) else "—"
        else:
            best = iso_ratio(row_runs, base, measure)
            iso = f"{best.summary['compression_ratio']:.1f}x" if best else f"none of these (all > {ISO_PT} pt below)"
        lines.append(f"| {ROW_LABELS[row]} | " + " | ".join(cells) + f" | {iso} |")
    lines.append("")
    if measure == LAST:
        return "\n".join(lines) + "\n"
    specs = (plan.row_spec(part, row, "R") for row in plan.rows if ROWS[row][1])
    lines.append("Specs: " + ", ".join(f"`{spec}`" for spec in specs) + ".\n")
    return "\n".join(lines) + "\n"


def timing_table(plan: Plan, runs: list[Run]) -> str:
    """Per setting: how many runs (a merged cell counts its seeds), their summed wall time, and per row
    the mean codec_overhead."""
    lines = ["| setting | runs | wall (sum, min) | codec_overhead by row (mean over runs) |", "|---|---:|---:|---|"]
    for part in plan.parts:
        mine = [r for r in runs if r.part == part and r.summary]
        if not mine:
            continue
        wall = sum(r.summary.get("wall_seconds", 0.0) for r in mine) / 60
        by_row: dict[str, list[float]] = {}
        for r in mine:
            v = r.summary.get("codec_overhead")
            if v is not None:
                by_row.setdefault(r.row, []).append(v)
        ovh = ", ".join(f"{row} {100 * sum(v) / len(v):.2f} %" for row, v in by_row.items() if row != "none")
        n = sum(r.seeds_done for r in mine)
        lines.append(f"| {part} | {n} | {wall:.1f} | {ovh or '—'} |")
    return "\n".join(lines) + "\n"


def sweep_table(plan: Plan, runs: list[Run]) -> str:
    base_run = baseline_run(runs, "sweep") or baseline_run(runs, plan.sweep_setting)
    base = _acc(base_run) if base_run else None
    lines = ["| target | REL bound | ratio reached | final acc (%) | vs none (pt) |", "|---|---:|---:|---:|---:|"]
    for r in (r for r in runs if r.part == "sweep" and r.row.startswith("sz-")):
        tgt = r.row.split("-", 1)[1]
        if r.summary is None:
            lines.append(f"| {tgt} | {r.target:g} | — | not run | — |")
            continue
        d = f"{_acc(r) - base:+.2f}" if base is not None else "—"
        lines.append(f"| {tgt} | {r.target:g} | {r.summary['compression_ratio']:.2f}x | {_acc_text(r)} | {d} |")
    return "\n".join(lines) + "\n"


def not_run_lines(runs: list[Run]) -> list[str]:
    """One line per (part, row, reasons) with runs missing: which budgets, and why (each reason
    once), so a budget is never listed beside a reason that is another budget's."""
    groups: dict[tuple[str, str, str], list[Run]] = {}
    for r in runs:
        if r.summary is None:
            # merge_seeds joins "seed S: <note>" with "; "; a note may hold "; " itself
            notes = re.split(r"; (?=seed \d+: )", r.note or "not run yet")
            why = "; ".join(sorted({re.sub(r"^seed \d+: ", "", n) for n in notes}))
            groups.setdefault((r.part, r.row, why), []).append(r)
    out = []
    for (part, row, why), rs in groups.items():
        targets = ", ".join(f"{r.target:g}" + ("" if part == "sweep" else "x") for r in rs)
        out.append(f"- {part}, {ROW_LABELS.get(row, row)}: {targets} ({why})")
    return out
