"""The report's markdown tables: Table 1 at matched ratios, the goals, and the sz REL sweep."""

from __future__ import annotations

from .plan import GOAL_16X_PT, GOAL_64X_PT, GOAL_SWEEP_PT, GOAL_SWEEP_RATIO, ROW_LABELS, Plan, Run


def _acc(run: Run) -> float:
    return run.summary["final_accuracy"] * 100


def _cell(run: Run | None, base: float | None) -> str:
    if run is None:
        return "—"
    if run.summary is None:
        return f"not run ({run.note})" if run.note else "not run (yet)"
    d = f", {_acc(run) - base:+.2f} pt" if base is not None and run.row != "none" else ""
    return f"{_acc_text(run)} % ({run.summary['compression_ratio']:.2f}x{d})"


def _acc_text(run: Run) -> str:
    """"96.20" for one seed; "96.20 ± 0.12" for a mean over seeds (plus "[2 of 3 seeds]" when
    some seeds have not finished)."""
    s = run.summary
    if "final_accuracy_std" not in s:
        return f"{_acc(run):.2f}"
    short = f" [{len(s['seeds'])} of {s['seeds_planned']} seeds]" if len(s["seeds"]) < s["seeds_planned"] else ""
    return f"{_acc(run):.2f} ± {s['final_accuracy_std'] * 100:.2f}{short}"


def baseline_run(runs: list[Run], part: str) -> Run | None:
    return next((r for r in runs if r.part == part and r.row == "none" and r.summary), None)


def table1(plan: Plan, runs: list[Run], part: str) -> str:
    rows = plan.rows if part == "iid" else plan.noniid_rows
    base_run = baseline_run(runs, part)
    base = _acc(base_run) if base_run else None
    head = "| compressor | " + " | ".join(f"~{r}x: acc (ratio reached, vs none)" for r in plan.ratios) + " |"
    lines = [head, "|---|" + "---:|" * len(plan.ratios)]
    for row in rows:
        if row == "none":
            lines.append(f"| none (1x) | {_cell(base_run, None)} |" + " |" * (len(plan.ratios) - 1))
            continue
        cells = [
            _cell(next((r for r in runs if r.part == part and r.row == row and r.target == t), None), base)
            for t in plan.ratios
        ]
        lines.append(f"| {ROW_LABELS[row]} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Specs (parameters chosen for each ratio; calibrated ratio = on client 0's first update):")
    lines.append("")
    for r in runs:
        if r.part == part and r.row != "none":
            cal = (
                f" (calibrated {r.calibrated_ratio:.2f}x)" if r.calibrated_ratio == r.calibrated_ratio else ""
            )
            lines.append(f"- ~{r.target:g}x {r.row}: `{r.spec}`{cal}")
    lines.append("")
    lines.extend(goal_lines(plan, runs, part, base))
    return "\n".join(lines) + "\n"


def goal_lines(plan: Plan, runs: list[Run], part: str, base: float | None) -> list[str]:
    out = []
    if base is None:
        return ["Goals: cannot be checked (no `none` run)."]
    for ratio, pt in ((16, GOAL_16X_PT), (64, GOAL_64X_PT)):
        cands = [r for r in runs if r.part == part and r.target == ratio and r.summary and r.row != "none"]
        if ratio not in plan.ratios:
            continue
        if not cands:
            out.append(
                f"- Goal at {ratio}x (best within {pt} pt of none): **not measured** (no run finished)."
            )
            continue
        best = max(cands, key=_acc)
        d = _acc(best) - base
        ok = d >= -pt
        out.append(
            f"- Goal at {ratio}x (best compressor within {pt} pt of none): best is {ROW_LABELS[best.row]} "
            f"at {_acc_text(best)} % ({best.summary['compression_ratio']:.2f}x), {d:+.2f} pt vs none "
            f"{base:.2f} % -> **{'reached' if ok else 'NOT reached'}**."
        )
    return out


def sweep_table(plan: Plan, runs: list[Run]) -> str:
    base_run = baseline_run(runs, "iid")
    base = _acc(base_run) if base_run else None
    lines = [
        "| target | REL bound | ratio reached | final acc (%) | vs none (pt) | calibrated ratio (round 1) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    sw = [r for r in runs if r.part == "sweep"]
    for r in sw:
        tgt = r.row.split("-", 1)[1]
        if r.summary is None:
            lines.append(f"| {tgt} | {r.target:g} | — | not run ({r.note or 'not run'}) | — | — |")
            continue
        d = f"{_acc(r) - base:+.2f}" if base is not None else "—"
        lines.append(
            f"| {tgt} | {r.target:g} | {r.summary['compression_ratio']:.2f}x | {_acc_text(r)} | {d} | "
            f"{r.calibrated_ratio:.2f}x |"
        )
    lines.append("")
    ok = [
        r
        for r in sw
        if r.row == "sz-update"
        and r.summary
        and base is not None
        and r.summary["compression_ratio"] >= GOAL_SWEEP_RATIO
        and _acc(r) - base >= -GOAL_SWEEP_PT
    ]
    if base is None or not any(r.summary for r in sw):
        lines.append(
            f"- Goal (sz on updates >= {GOAL_SWEEP_RATIO:g}x at <= {GOAL_SWEEP_PT} pt loss): "
            "**not measured**."
        )
    elif ok:
        b = max(ok, key=lambda r: r.summary["compression_ratio"])
        lines.append(
            f"- Goal (sz on updates >= {GOAL_SWEEP_RATIO:g}x at <= {GOAL_SWEEP_PT} pt loss): "
            f"**reached** at REL "
            f"{b.target:g}: {b.summary['compression_ratio']:.2f}x, {_acc(b) - base:+.2f} pt."
        )
    else:
        lines.append(
            f"- Goal (sz on updates >= {GOAL_SWEEP_RATIO:g}x at <= {GOAL_SWEEP_PT} pt loss): **NOT reached** "
            "by any REL bound of the sweep. Why a per-tensor REL 1e-2 bound cannot reach 20x on these updates "
            "(their codes carry 2.5-2.9 bits per value even under context models): docs/sz.md, "
            "`python bench/sz_update_limits.py`."
        )
    return "\n".join(lines) + "\n"
