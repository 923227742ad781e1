"""The ``fedcompress`` command line.

    fedcompress run --dataset mnist5k --clients 10 --rounds 10 --compressor none --out runs/none
    fedcompress compare --compressors none,fp16 --rounds 5 --out runs/cmp

Subcommands live in ``SUBCOMMANDS`` (name -> ``"module:function"`` or a callable): the function
takes the subparsers object and adds its parser, with ``set_defaults(handler=...)``; the handler
takes the parsed args and returns an exit code. A new subcommand = one function and one entry.
Exit codes: 0 ok, 2 bad input (unknown dataset/model/partition/compressor, bad numbers, missing
local data), 1 anything else.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from .errors import BadInput

EXIT_BAD_INPUT = 2

# One torch thread by default, for two reasons: (1) on a small machine shared with other jobs, OpenMP
# workers wait on descheduled peers, so more threads can make local SGD several times slower (compare
# `fedcompress run --threads 1` with `--threads 2`: summary.json's wall_seconds); (2) float
# reductions depend on the thread count, so a fixed count keeps "same seed, same run" true whatever
# the machine's load. On an idle machine try --threads 2.
DEFAULT_THREADS = 1


# ---------------------------------------------------------------------------------------------
# Shared experiment arguments


def _int_at_least(lo: int):
    """An argparse type: an integer >= lo."""

    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"{s} must be >= {lo}")
        return v

    return parse


_positive_int = _int_at_least(1)
_nonneg_int = _int_at_least(0)


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not (v > 0 and v < float("inf")):
        raise argparse.ArgumentTypeError(f"{s} must be a finite number > 0")
    return v


def _fraction(s: str) -> float:
    v = _positive_float(s)
    if v > 1:
        raise argparse.ArgumentTypeError(f"{s} must be in (0, 1]")
    return v


DEFAULT_ROUNDS = 10


def add_experiment_args(p: argparse.ArgumentParser) -> None:
    """The arguments of one FedAvg experiment (shared by run, compare and anyone else)."""
    from .fedavg.data import DATASETS, PARTITIONS
    from .fedavg.driver import DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS, DEFAULT_LR, DEFAULT_MAX_CLIENTS_PER_ROUND
    from .fedavg.models import MODELS

    p.add_argument("--dataset", default="mnist5k", choices=DATASETS, help="default: %(default)s")
    p.add_argument(
        "--data-dir",
        default=None,
        help="local folder for --dataset mnist or fashion (IDX; fashion defaults to the folder of the "
        "Debian package dataset-fashion-mnist) or femnist (LEAF JSON)",
    )
    p.add_argument(
        "--clients", type=_positive_int, default=10, help="number of clients (default: %(default)s)"
    )
    p.add_argument("--rounds", type=_positive_int, default=DEFAULT_ROUNDS, help=f"default: {DEFAULT_ROUNDS}")
    p.add_argument("--partition", default="iid", choices=PARTITIONS, help="default: %(default)s")
    p.add_argument(
        "--alpha", type=_positive_float, default=0.5, help="Dirichlet concentration (default: %(default)s)"
    )
    p.add_argument("--model", default="cnn", choices=MODELS, help="default: %(default)s")
    k = p.add_mutually_exclusive_group()
    k.add_argument(
        "--clients-per-round",
        type=_positive_int,
        default=None,
        help=f"clients sampled per round (default: min(clients, {DEFAULT_MAX_CLIENTS_PER_ROUND}))",
    )
    k.add_argument(
        "--fraction", type=_fraction, default=None, help="fraction of clients per round, in (0, 1]"
    )
    p.add_argument(
        "--epochs", type=_positive_int, default=DEFAULT_EPOCHS, help="local epochs (default: %(default)s)"
    )
    p.add_argument(
        "--batch-size", type=_positive_int, default=DEFAULT_BATCH_SIZE, help="default: %(default)s"
    )
    p.add_argument(
        "--lr", type=_positive_float, default=DEFAULT_LR, help="local SGD lr (default: %(default)s)"
    )
    p.add_argument("--seed", type=_nonneg_int, default=0, help="default: %(default)s")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=DEFAULT_THREADS,
        help="torch.set_num_threads (default: %(default)s; results depend slightly on the count)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace, compressor: str):
    from .fedavg.driver import ExperimentConfig

    cfg = ExperimentConfig(
        dataset=args.dataset,
        clients=args.clients,
        rounds=args.rounds,
        compressor=compressor,
        partition=args.partition,
        alpha=args.alpha,
        model=args.model,
        clients_per_round=args.clients_per_round,
        fraction=args.fraction,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        data_dir=args.data_dir,
        device=args.device,
    )
    try:
        cfg.validate()
    except ValueError as e:
        raise BadInput(str(e)) from None
    return cfg


def check_compressor(spec: str) -> str:
    """Build the compressor once so a bad spec fails before any data is loaded or trained."""
    from .api import get_compressor

    try:
        return get_compressor(spec).spec
    except ValueError as e:
        raise BadInput(f"compressor {spec!r}: {e}") from None
    except ImportError as e:  # registered, but its module is not there (yet)
        raise BadInput(f"compressor {spec!r} is registered but cannot be imported: {e}") from None


def load_data(cfg):
    from .fedavg.data import load_dataset

    try:
        return load_dataset(cfg.dataset, cfg.clients, cfg.partition, cfg.alpha, cfg.seed, cfg.data_dir)
    except (FileNotFoundError, ValueError) as e:  # FormatError is a ValueError
        raise BadInput(str(e)) from None


def _setup_torch(args) -> None:
    import torch

    torch.set_num_threads(args.threads)


# ---------------------------------------------------------------------------------------------
# run


def add_run(sub) -> None:
    p = sub.add_parser("run", help="run one FedAvg experiment", description="Run FedAvg with one compressor.")
    add_experiment_args(p)
    p.add_argument(
        "--compressor",
        default="none",
        help="compressor spec, e.g. none, fp16, sz:rel=1e-2, mask:keep=0.125,unbiased=true (commas separate "
        "its key=value pairs)",
    )
    p.add_argument("--out", default=None, help="output folder (default: runs/<compressor>)")
    p.set_defaults(handler=cmd_run)


def _safe_name(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", spec).strip("_") or "run"


def cmd_run(args) -> int:
    from .fedavg.driver import final_line, run_experiment

    check_compressor(args.compressor)
    cfg = config_from_args(args, args.compressor)
    _setup_torch(args)
    data = load_data(cfg)
    out = args.out or os.path.join("runs", _safe_name(args.compressor))
    summary = run_experiment(cfg, out_dir=out, progress=not args.no_progress, data=data)
    # the driver's plot has no title; redraw it with one saying what was run
    from .fedavg.plots import plot_accuracy_vs_mb

    plot_accuracy_vs_mb(
        {args.compressor: summary},
        os.path.join(out, "accuracy_vs_mb.png"),
        title=f"{args.compressor}: {cfg.dataset}, {cfg.clients} clients, {cfg.rounds} rounds, seed {cfg.seed}",
    )
    print(final_line(summary))
    print(f"wrote {os.path.join(out, 'metrics.jsonl')}, summary.json, accuracy_vs_mb.png", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------
# compare


def add_compare(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="the papers' tables (docs/results.md), or several compressors side by side",
        description="Without --compressors: the results tables (rows none, fp16, mask, sz, sz with error "
        "feedback, fedsynth with fixed and trainable labels and at 1/2 resolution from 32x, and the real-subset "
        "controls, at byte budgets "
        "8x..256x) for each setting (mnist5k-10, mnist5k-10-dirichlet, fashion-60, the extra mnist5k-60, and "
        "the text setting fortunes-43 at 1.3x..16x, only when --parts names it) "
        "and FedSZ's sz sweep, written to --report-dir/results.md with plots (default: the run cache, "
        "runs/results; `--report-dir docs` regenerates the project's docs/results.md). The settings are "
        "fixed; --parts, --rows, --ratios, --seeds and --threads pick what runs. "
        "With --compressors: FedAvg once per spec (same seed, split and model "
        "init) and one table; with --seeds, once per spec and seed, and mean ± std.",
    )
    add_experiment_args(p)
    p.add_argument(
        "--compressors",
        default=None,
        help="comma-separated specs, e.g. none,fp16,mask:keep=0.1. Splitting: a comma starts a new spec "
        "unless the piece after it is key=value without a colon, which continues the previous spec's "
        "keys: 'none,sz:rel=1e-2,target=weights,mask:keep=0.1,unbiased=true' is 3 specs (none; "
        "sz:rel=1e-2,target=weights; mask:keep=0.1,unbiased=true). Tables, plot legends and run folders "
        "use each spec as typed",
    )
    p.add_argument(
        "--out",
        default=None,
        help="output folder with --compressors (default: runs/compare); with several --seeds, one "
        "sub-folder per seed (seedS/SPEC)",
    )
    add_table_args(p, out_flag="--report-dir")
    p.set_defaults(handler=cmd_compare, rounds=None)  # None: each mode's own default


def split_specs(text: str) -> list[str]:
    """Split on commas that start a new spec: "sz:rel=1e-2,mode=abs,none" -> 2 specs.

    A piece containing "=" but no ":" continues the previous spec's key=value list.
    """
    specs: list[str] = []
    for piece in (s.strip() for s in text.split(",")):
        if not piece:
            continue
        if specs and "=" in piece and ":" not in piece:
            specs[-1] += "," + piece
        else:
            specs.append(piece)
    return specs


def markdown_table(summaries: dict[str, dict[str, Any]]) -> str:
    """One row per compressor. A summary that is a mean over seeds (``experiments.mean_summary``) shows
    accuracy as mean ± sample std, and bytes and ratio as the mean; seconds add up over the seeds.
    "last 5": the mean accuracy over the last 5 rounds (the results report's steadier second measure)."""
    from .experiments.summary import last_rounds_accuracy

    def pm(s, key, scale, fmt):
        v = fmt.format(s[key] * scale)
        return v + (" ± " + fmt.format(s[key + "_std"] * scale) if key + "_std" in s else "")

    rows = [
        "| compressor | final acc (%) | last 5 (%) | best acc (%) | upstream MB | dense MB | ratio | download MB "
        "| seconds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for spec, s in summaries.items():
        last = {**s, "last_accuracy": last_rounds_accuracy(s)}  # a mean over seeds has it (and its std)
        rows.append(
            f"| {spec} | {pm(s, 'final_accuracy', 100, '{:.2f}')} | {pm(last, 'last_accuracy', 100, '{:.2f}')} | "
            f"{pm(s, 'best_accuracy', 100, '{:.2f}')} | "
            f"{s['upstream_bytes'] / 1e6:.3f} | {s['dense_upstream_bytes'] / 1e6:.3f} | "
            f"{s['compression_ratio']:.2f} | {s['download_bytes'] / 1e6:.3f} | {s['wall_seconds']:.1f} |"
        )
    return "\n".join(rows) + "\n"


def cmd_compare(args) -> int:
    from .fedavg.driver import final_line, run_experiment
    from .fedavg.plots import plot_accuracy_vs_mb

    if args.compressors is None:  # the results tables: their settings are fixed (experiments.plan)
        if args.rounds is not None or args.clients_per_round is not None:
            raise BadInput(
                "--rounds/--clients-per-round apply with --compressors; the tables' settings are fixed "
                "(pick them with --parts, see docs/results.md)"
            )
        return cmd_results(args)
    from .experiments import load_cached, machine_line, mean_summary

    if args.rounds is None:
        args.rounds = DEFAULT_ROUNDS
    specs = split_specs(args.compressors)
    if not specs:
        raise BadInput("--compressors is empty; give comma-separated specs such as none,fp16")
    names = [check_compressor(s) for s in specs]  # every spec checked before any training
    if len(set(names)) != len(names):
        raise BadInput(f"--compressors lists the same compressor twice: {names}")
    # the spec as typed labels the row, the legend and the folder (the canonical form spells out
    # every default: sz_rel=0.01_abs=0.0_min_lossy=1024_target=update_ef=False)
    folders = [_safe_name(s) for s in specs]
    if len(set(folders)) != len(folders):
        raise BadInput(f"--compressors: two specs share a run folder name: {folders}")
    seeds = args.seeds or (args.seed,)
    cfg = config_from_args(args, specs[0])
    _setup_torch(args)
    out = args.out or os.path.join("runs", "compare")
    os.makedirs(out, exist_ok=True)
    per_seed: dict[str, list[dict[str, Any]]] = {spec: [] for spec in specs}
    for seed in seeds:
        cfg.seed = seed
        data = load_data(cfg)  # one split per seed, shared by every compressor
        for spec, folder in zip(specs, folders, strict=True):
            cfg.compressor = spec
            run_dir = os.path.join(out, f"seed{seed}", folder) if len(seeds) > 1 else os.path.join(out, folder)
            s = None if args.no_reuse else load_cached(run_dir, cfg.to_dict(), cfg.rounds)
            if s is not None:
                print(f"reused {run_dir} (same config; --no-reuse runs it again)", file=sys.stderr)
            else:
                s = run_experiment(cfg, out_dir=run_dir, progress=not args.no_progress, data=data)
            print(final_line(s), file=sys.stderr)
            per_seed[spec].append(s)
    if len(seeds) == 1:
        summaries = {spec: runs[0] for spec, runs in per_seed.items()}
    else:
        summaries = {spec: mean_summary(runs, list(seeds)) for spec, runs in per_seed.items()}
    table = markdown_table(summaries)
    seed_text = (
        f"seed {seeds[0]}"
        if len(seeds) == 1
        else f"seeds {','.join(map(str, seeds))} (mean ± sample std over seeds; same split and init per seed "
        "for every row)"
    )
    head = (
        f"FedAvg on {cfg.dataset} ({cfg.partition}), {cfg.clients} clients, {cfg.per_round()} per round, "
        f"{cfg.rounds} rounds, model {cfg.model}, E={cfg.epochs} B={cfg.batch_size} lr={cfg.lr}, "
        f"{seed_text}\n\nMachine (as measured): {machine_line()}\n\n"
    )
    with open(os.path.join(out, "compare.md"), "w") as f:
        f.write(head + table)
    with open(os.path.join(out, "compare.json"), "w") as f:
        json.dump(
            {k: {kk: vv for kk, vv in v.items() if kk != "history"} for k, v in summaries.items()},
            f,
            indent=2,
        )
    title = f"{cfg.dataset}, {cfg.clients} clients, {cfg.rounds} rounds, " + (
        f"seed {seeds[0]}" if len(seeds) == 1 else f"mean of {len(seeds)} seeds"
    )
    plot_accuracy_vs_mb(summaries, os.path.join(out, "compare.png"), title=title)
    print(table, end="")
    return 0


# ---------------------------------------------------------------------------------------------
# results and bench (the pipelines: fedcompress.experiments, fedcompress.benchtable)


def add_table_args(p, out_flag: str = "--out") -> None:
    """The report's options, shared by ``results`` and ``compare`` (without --compressors)."""
    from .experiments.plan import PARTS, ROW_LABELS

    p.add_argument(
        "--quick",
        action="store_true",
        help="digits, 12 clients, 2 rounds, budget 16x only, sweep at 1e-2 (the test's mode)",
    )
    p.add_argument(
        out_flag,
        dest="report_dir",
        default=None,
        help="folder for results.md, results.json and plots (default: the --runs folder; the project's "
        "docs/results.md is rewritten only with --report-dir docs)",
    )
    p.add_argument("--runs", default=None, help="run cache folder (default: runs/results[-quick])")
    p.add_argument(
        "--archive",
        default=None,
        help="run archive folder: one compact JSON per finished run, read where the cache lacks a run and "
        "written after every run, so a report can be rewritten on another machine (default: REPORT_DIR/runs "
        "when --out/--report-dir is given, else none; 'none' turns it off)",
    )
    p.add_argument(
        "--seeds",
        type=parse_seeds,
        default=None,
        help="comma list of seeds, e.g. 0,1,2: every row runs once per seed (the seed fixes split, client "
        "sampling and model init, the same for every row) and tables show mean ± sample std; each seed's "
        "runs are cached on their own (default: --seed, else 0)",
    )
    p.add_argument("--no-reuse", action="store_true", help="re-run even where a cached run matches")
    p.add_argument(
        "--cached-only",
        action="store_true",
        help="train nothing: write the report from the runs already in --runs (missing rows say so)",
    )
    p.add_argument(
        "--parts",
        default=None,
        help="comma list of " + ",".join(PARTS) + " (default: mnist5k-10,mnist5k-10-dirichlet,fashion-60,sweep)",
    )
    p.add_argument("--rows", default=None, help="comma list of " + ",".join(ROW_LABELS) + " (default: all)")
    p.add_argument(
        "--ratios", default=None,
        help="byte budgets > 1, comma list (default: each setting's, 8..256 for iid, 1.3..16 for text)"
    )


def parse_seeds(text: str) -> tuple[int, ...]:
    """"0,1,2" -> (0, 1, 2): distinct integers >= 0 (an argparse type: errors exit with code 2)."""
    try:
        seeds = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: expected comma-separated integers >= 0") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: expected distinct integers >= 0, e.g. 0,1,2")
    return seeds


def add_results(sub) -> None:
    p = sub.add_parser(
        "results",
        help="the results tables (the same as `compare` without --compressors)",
        description="Run the results tables (rows x byte budgets per setting) and the sz REL sweep; write "
        "OUT/results.md, results.json and PNG plots (OUT: --out, default the --runs folder; `--out docs` "
        "regenerates the project's docs/results.md). Runs are cached under --runs and reused.",
    )
    add_table_args(p)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    p.set_defaults(handler=cmd_results)


def cmd_results(args) -> int:
    import torch

    from .experiments import ROW_LABELS, Plan, run_results
    from .experiments.plan import PARTS

    plan = Plan.quick() if args.quick else Plan()
    try:
        if args.parts:
            plan.parts = tuple(x for x in args.parts.split(",") if x)
        if args.rows:
            plan.rows = tuple(x for x in args.rows.split(",") if x)
        if args.ratios:
            # whole numbers stay int: a budget's spec (mask:ratio=16) names its run's cache folder
            plan.budgets = tuple(int(v) if v.is_integer() else v for v in map(float, args.ratios.split(",")))
        if getattr(args, "seeds", None):
            plan.seeds = args.seeds
        elif getattr(args, "seed", None) is not None:  # compare's --seed
            plan.seeds = (args.seed,)
    except ValueError as e:
        raise BadInput(str(e)) from None
    parts = ("quick", "sweep") if args.quick else PARTS
    bad = [p for p in plan.parts if p not in parts] + [r for r in plan.rows if r not in ROW_LABELS]
    bad_budget = plan.budgets is not None and not all(1 < b < float("inf") for b in plan.budgets)
    if bad or not plan.parts or not plan.rows or bad_budget:
        raise BadInput(
            f"bad --parts/--rows/--ratios ({bad or 'empty, or a budget <= 1'}); parts: {','.join(parts)}; "
            f"rows: {','.join(ROW_LABELS)}; budgets: finite numbers > 1"
        )
    torch.set_num_threads(args.threads)
    runs_dir = args.runs or os.path.join("runs", "results-quick" if args.quick else "results")
    report_dir = args.report_dir or runs_dir  # never the project's docs/ unless asked
    archive_dir = args.archive or (os.path.join(args.report_dir, "runs") if args.report_dir else None)
    if archive_dir == "none":
        archive_dir = None
    command = (
        "fedcompress " + " ".join(a for a in sys.argv[1:])
        if sys.argv[1:2] in (["results"], ["compare"])
        else ("fedcompress compare" + (" --quick" if args.quick else ""))
    )

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    text = run_results(
        plan,
        report_dir,
        runs_dir,
        reuse=not args.no_reuse,
        cached_only=args.cached_only,
        command=command,
        log=log,
        incremental=not args.quick,
        archive_dir=archive_dir,
    )
    print(text)
    log(f"[results] wrote {os.path.join(report_dir, 'results.md')}")
    return 0


def add_bench(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="run the microbenchmarks in bench/ and print one table",
        description="Run bench/bench_*.py with pytest-benchmark (source checkout) and print one table: op, "
        "provider, input size, MB/s, ratio, speed against the peers of the same group.",
    )
    p.add_argument(
        "--quick", action="store_true", help="about a minute: fewer rounds, skip the slowest groups"
    )
    p.add_argument("-k", default=None, help="pytest -k expression to pick benchmarks")
    p.add_argument("--files", default=None, help="comma list of bench files, e.g. bench_mask.py")
    p.add_argument(
        "--bench-dir", default=None, help="folder holding bench_*.py (default: found automatically)"
    )
    p.set_defaults(handler=cmd_bench)


def cmd_bench(args) -> int:
    import importlib.util

    from .benchtable import find_bench_dir, run_bench

    missing = [m for m in ("pytest", "pytest_benchmark") if importlib.util.find_spec(m) is None]
    if missing:
        raise BadInput(
            f"fedcompress bench needs the test extras ({', '.join(missing)} not installed): in the source "
            'checkout run `pip install -e ".[test]"` (pytest, pytest-benchmark and the peer codecs it compares '
            "against)"
        )
    d = args.bench_dir or find_bench_dir()
    if d is None or not os.path.isdir(d):
        raise BadInput(
            "no bench/ folder found (looked beside the fedcompress package and under the current directory). "
            "The microbenchmarks ship with the source checkout: run from the repository root, or after "
            "`pip install -e .`, or pass --bench-dir."
        )
    rc, text = run_bench(
        d,
        args.quick,
        args.k,
        args.files.split(",") if args.files else None,
        log=lambda m: print(m, file=sys.stderr, flush=True),
    )
    print(text)
    return rc


# ---------------------------------------------------------------------------------------------
# Subcommand registry and entry point

# name -> "module:function" (imported lazily) or the function; the function adds a parser to the
# subparsers object and sets `handler`. An optional one may be a string so that its import
# failing leaves the other subcommands working.
SUBCOMMANDS: dict[str, str | Callable[[Any], None]] = {
    "run": add_run,
    "compare": add_compare,
    "results": add_results,
    "bench": add_bench,
}


def register_subcommand(name: str, adder: str | Callable[[Any], None]) -> None:
    """Add a subcommand (``adder`` as in SUBCOMMANDS)."""
    SUBCOMMANDS[name] = adder


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedcompress", description="Compression for federated learning: experiments and benchmarks."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, adder in SUBCOMMANDS.items():
        if isinstance(adder, str):
            mod, fn = adder.split(":")
            try:
                adder = getattr(importlib.import_module(mod), fn)
            except (ImportError, AttributeError) as e:  # a broken optional subcommand must not break the rest
                sub.add_parser(name, help=f"(unavailable: {e})").set_defaults(handler=_unavailable(name, e))
                continue
        adder(sub)
    return parser


def _unavailable(name: str, err: Exception):
    def handler(args) -> int:
        raise BadInput(f"subcommand {name!r} is unavailable: {err}")

    return handler


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse exits with 2 and lists choices for bad choices
    try:
        return int(args.handler(args) or 0)
    except BadInput as e:
        print(f"fedcompress {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
