"""fedcompress results / bench tooling (fedcompress.experiments, fedcompress.benchtable): the plan, the quick
plan end to end, the report and its iso-accuracy column, the bench table and its extra_info schema."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

import fedcompress as fc
from fedcompress import benchtable as B
from fedcompress import cli
from fedcompress import experiments as R
from fedcompress.experiments.tables import _acc_text

# ---------------------------------------------------------------------------------------------
# the plan: settings x rows x budgets x seeds, every budget through the compressors' ratio=R key


def test_plan_runs_and_specs():
    plan = R.Plan(parts=("mnist5k-10", "sweep"), seeds=(0, 1))
    runs = R.build_runs(plan)
    one_seed = [r for r in runs if r.seed == 0]
    budgets = R.SETTINGS["mnist5k-10"].budgets
    assert budgets == (8, 16, 32, 64, 128, 256)
    # none + fp16, 12 budgeted rows x 6 budgets, the sweep's 2 targets x 4 bounds
    assert len(one_seed) == 2 + 12 * 6 + 2 * 4 and len(runs) == 2 * len(one_seed)
    spec = {(r.part, r.row, r.target): r.spec for r in one_seed}
    assert spec[("mnist5k-10", "mask", 64)] == "mask:ratio=64"
    assert spec[("mnist5k-10", "sz-ef", 8)] == "sz:ratio=8,ef=1"
    assert spec[("mnist5k-10", "sz-abs", 64)] == "sz:ratio=64,bound=abs"
    assert spec[("mnist5k-10", "fedsynth-trainable", 256)] == "fedsynth:ratio=256,labels=trainable"
    assert spec[("mnist5k-10", "real-subset", 16)] == "fedsynth:ratio=16,outer_steps=0"
    assert spec[("mnist5k-10", "fedsynth-ef", 64)] == "fedsynth:ratio=64,ef=1"
    assert spec[("mnist5k-10", "fp16", 2)] == "fp16"
    # the 1/2-resolution row runs from 32x only (ROW_BUDGETS): its cheap budgets carry the reason
    note = {(r.row, r.target): r.note for r in one_seed}
    assert spec[("mnist5k-10", "fedsynth-res2", 64)] == "fedsynth:ratio=64,res=2"
    assert spec[("mnist5k-10", "fedsynth-res2-ef", 64)] == "fedsynth:ratio=64,res=2,ef=1"
    assert spec[("mnist5k-10", "fedsynth-res2-ef-os30", 64)] == "fedsynth:ratio=64,res=2,ef=1,outer_steps=30"
    assert [b for b in budgets if not note[("fedsynth-res2-ef-os30", b)]] == [64]
    assert spec[("mnist5k-10", "real-subset-res2", 64)] == "fedsynth:ratio=64,res=2,outer_steps=0"
    for row in ("fedsynth-res2", "fedsynth-res2-ef", "real-subset-res2"):
        assert [b for b in budgets if not note[(row, b)]] == [32, 64, 128, 256]
    assert note[("fedsynth-res2", 16)].startswith("not run here: below 32x")
    assert not any(n for (row, _), n in note.items() if "-res2" not in row)
    assert spec[("sweep", "sz-weights", 1e-3)] == "sz:rel=0.001,target=weights"
    # FedSynth (the slowest) after everything else, for every seed
    first_fs = min(i for i, r in enumerate(runs) if r.spec.startswith("fedsynth"))
    assert all(r.spec.startswith("fedsynth") for r in runs[first_fs:])
    # the sweep shares its setting's run folder (one none run for both tables)
    sweep = next(r for r in runs if r.part == "sweep")
    assert R.run_dir(plan, "runs", sweep).startswith(os.path.join("runs", "seed0", "mnist5k-10"))
    cfg = R.config(plan, "mnist5k-10-dirichlet", "none", 2)
    assert (cfg.partition, cfg.alpha, cfg.clients, cfg.clients_per_round, cfg.seed) == ("dirichlet", 0.3, 10, 10, 2)
    # --ratios narrows each setting to the budgets it has
    assert R.Plan(budgets=(16, 128)).budgets_of("mnist5k-10-dirichlet") == (16,)
    # a setting's own row keys: Dirichlet's trainable labels use the real-loss loop, only there
    dplan = R.Plan(parts=("mnist5k-10-dirichlet",), rows=("fedsynth-fixed", "fedsynth-trainable"))
    dspec = {(r.row, r.target): r.spec for r in R.build_runs(dplan)}
    loop = "objective=loss,outer_steps=30,lr_x=0.03"
    assert dspec[("fedsynth-trainable", 64)] == f"fedsynth:ratio=64,labels=trainable,{loop}"
    assert dspec[("fedsynth-fixed", 64)] == "fedsynth:ratio=64"
    table = R.setting_table(dplan, R.build_runs(dplan), "mnist5k-10-dirichlet")
    assert f"`fedsynth:ratio=R,labels=trainable,{loop}`" in table and "`fedsynth:ratio=R`" in table


def test_text_setting_runs_the_lstm_at_the_papers_budgets():
    """fortunes-43 (issue 15): its own model and lr in every run's config (the cache key), the
    paper's 1.3x and 2.6x budgets beside 8x and 16x; the image settings' configs keep the CNN and
    the plan's lr, so their cached runs stay valid."""
    plan = R.Plan(parts=("fortunes-43",), rows=("none", "mask", "fedsynth-fixed"))
    runs = R.build_runs(plan)
    assert {r.target for r in runs if r.row == "mask"} == {1.3, 2.6, 8, 16}
    spec = {(r.row, r.target): r.spec for r in runs}
    assert spec[("mask", 1.3)] == "mask:ratio=1.3" and spec[("fedsynth-fixed", 2.6)] == "fedsynth:ratio=2.6"
    for r in runs:
        fc.get_compressor(r.spec)  # every spec parses
    cfg = R.config(plan, "fortunes-43", "mask:ratio=1.3", 0)
    assert (cfg.dataset, cfg.model, cfg.lr, cfg.partition, cfg.clients, cfg.clients_per_round) == (
        "fortunes", "lstm", 1.0, "natural", 43, 5)
    img = R.config(plan, "mnist5k-10", "none", 0)
    assert (img.model, img.lr) == ("cnn", plan.lr)
    table = R.setting_table(plan, runs, "fortunes-43")
    assert "| 1.3x | 2.6x | 8x | 16x |" in table
    # FedSynth's error feedback does not apply to the text client: its runs carry the reason and
    # are never started (execute skips runs with a note), while the image settings plan them
    plan = R.Plan(parts=("fortunes-43", "mnist5k-10"), rows=("fedsynth-ef",))
    ef = {(r.part, r.target): r for r in R.build_runs(plan)}
    assert all(ef[("fortunes-43", b)].note.startswith("not run here: FedSynth's error feedback") for b in (1.3, 16))
    assert not ef[("mnist5k-10", 16)].note and ef[("mnist5k-10", 16)].spec == "fedsynth:ratio=16,ef=1"
    R.execute(plan, [ef[("fortunes-43", 16)]], None, "/nonexistent", log=lambda *_: None)  # no data, no run
    # a run that had been tried would have failed here (no data) and carry "failed: ..." instead
    assert ef[("fortunes-43", 16)].summary is None and ef[("fortunes-43", 16)].note.startswith("not run here")


def test_setting_reference_is_printed_under_its_table(tmp_path):
    """A setting's published figures (the paper's Reddit row for fortunes-43) go under its own table."""
    import dataclasses

    assert "14.19" in R.SETTINGS["fortunes-43"].reference and not R.SETTINGS["mnist5k-10"].reference
    plan = R.Plan.quick()
    plan.settings = {"quick": dataclasses.replace(plan.settings["quick"], reference="paper: FedAvg 14.19")}
    text = R.run_results(plan, str(tmp_path / "docs"), str(tmp_path / "runs"), log=lambda m: None,
                         incremental=False, cached_only=True)
    table, rest = text.split("## digits, 12 clients (quick)", 1)[1].split("Reference: paper: FedAvg 14.19.", 1)
    assert "| compressor |" in table and "## Time per part" in rest


@pytest.mark.parametrize(
    "ratios,ok",
    [("1.3,16", True), ("16.0", True), ("1", False), ("0.5", False), ("inf", False), ("nan", False)],
)
def test_compare_ratios_take_numbers_above_one(ratios, ok, tmp_path, capsys):
    rc = cli.main(["compare", "--parts", "fortunes-43", "--rows", "mask", "--ratios", ratios, "--cached-only",
                   "--runs", str(tmp_path), "--no-progress"])
    assert (rc == 0) == ok, capsys.readouterr()
    if ok:  # a whole number stays an int: the run is mask:ratio=16, the folder its cache has
        report = (tmp_path / "results.md").read_text()
        assert "| 16x |" in report and "16.0x" not in report


# ---------------------------------------------------------------------------------------------
# report: the setting table and its iso-accuracy column, by hand


def _fake(part, row, target, acc, ratio, rounds=2, seed=0):
    hist = [{"round": i + 1, "accuracy": acc, "upstream_bytes": 1000 * (i + 1)} for i in range(rounds)]
    s = {
        "final_accuracy": acc,
        "compression_ratio": ratio,
        "initial_accuracy": 0.1,
        "history": hist,
        "wall_seconds": 60,
        "codec_overhead": 0.01,
    }
    return R.Run(part, row, target, f"{row}:ratio={target:g}", summary=s, seed=seed)


def test_iso_ratio_is_the_largest_ratio_within_half_a_point():
    runs = [_fake("s", "mask", 16, 0.970, 16.1), _fake("s", "mask", 64, 0.966, 64.3),
            _fake("s", "mask", 256, 0.950, 257.0), _fake("s", "mask", 32, 0.964, 32.2)]  # fmt: skip
    assert R.iso_ratio(runs, 97.0).target == 64  # 97.0 - 96.6 = 0.4 <= 0.5; 96.4 and 95.0 are not
    assert R.iso_ratio(runs, 97.4).target == 16  # only 97.0 is within 0.5 pt of 97.4
    assert R.iso_ratio(runs, 99.0) is None


def test_report_setting_table(tmp_path):
    plan = R.Plan(parts=("mnist5k-10", "sweep"), rows=("none", "fp16", "mask", "sz"), budgets=(16, 64),
                  sweep=(1e-1, 1e-2))  # fmt: skip
    p = "mnist5k-10"
    runs = [
        _fake(p, "none", 1, 0.90, 1.0),
        _fake(p, "fp16", 2, 0.901, 2.0),
        _fake(p, "mask", 16, 0.80, 16.3),
        _fake(p, "sz", 16, 0.897, 16.2),  # -0.3 pt: within 0.5
        _fake(p, "mask", 64, 0.70, 64.9),
        _fake(p, "sz", 64, 0.88, 64.5),  # -2 pt
        _fake("sweep", "sz-update", 1e-1, 0.85, 40.0),
        _fake("sweep", "sz-weights", 1e-2, 0.90, 5.0),
    ]
    text = R.report(plan, runs, str(tmp_path), "fedcompress compare", 3.0)
    assert "| compressor | 16x | 64x | largest ratio within 0.5 pt of none |" in text
    assert "| sz (bound searched per update) | 89.70 (16.2x) | 88.00 (64.5x) | 16.2x |" in text
    assert "| mask (unbiased) | 80.00 (16.3x) | 70.00 (64.9x) | none of these (all > 0.5 pt below) |" in text
    assert "fp16 90.10 (2.0x), +0.10 pt" in text
    assert "| update | 0.1 | 40.00x | 85.00 | -5.00 |" in text  # the sweep reads its setting's none
    assert "| mnist5k-10 | 6 | 6.0 | fp16 1.00 %, mask 1.00 %, sz 1.00 % |" in text  # time per part
    for name in ("results_mnist5k-10_acc_vs_round.png", "results_mnist5k-10_acc_vs_mb.png"):
        size = os.path.getsize(tmp_path / name)
        assert 0 < size < 200_000
    assert (tmp_path / "results.md").read_text() == text
    assert json.loads((tmp_path / "results.json").read_text())["runs"][3]["row"] == "sz"


# ---------------------------------------------------------------------------------------------
# quick plan, end to end through the FedAvg driver


def test_quick_plan_end_to_end(tmp_path):
    torch.set_num_threads(1)
    plan = R.Plan.quick()
    out, runs_dir = str(tmp_path / "docs"), str(tmp_path / "runs")
    archive = str(tmp_path / "docs" / "runs")
    text = R.run_results(plan, out, runs_dir, log=lambda m: None, incremental=False, archive_dir=archive)
    res = json.loads(open(os.path.join(out, "results.json")).read())
    by = {(r["part"], r["row"], r["target"]): r for r in res["runs"]}
    available = {n: R.compressor_available(n) is None for n in ("sz", "mask", "fedsynth")}
    for row in plan.rows:
        r = by[("quick", row, {"none": 1.0, "fp16": 2.0}.get(row, 16.0))]
        if not available.get(r["spec"].split(":")[0], True):
            assert "not available" in r["note"]
            continue
        assert r["final_accuracy"] is not None, r
        if row not in ("none", "fp16"):  # the budget: every upload <= dense / 16, so the run's ratio >= 16
            assert 16 <= r["compression_ratio"] < 17.5, r
    # the ratio in the table is the driver's: dense / upstream from the run's own summary.json
    s = json.load(open(os.path.join(runs_dir, "seed0", "quick", "mask_ratio=16", "summary.json")))
    assert s["compression_ratio"] == pytest.approx(s["dense_upstream_bytes"] / s["upstream_bytes"])
    assert f"({s['compression_ratio']:.1f}x)" in text
    assert "## FedSZ sweep" in text and "control: real subset" in text
    # second call reuses every cached run (no training: fast, same numbers)
    logs = []
    text2 = R.run_results(plan, out, runs_dir, log=logs.append, incremental=False)
    assert any("reused" in m for m in logs) and not any("acc " in m for m in logs)
    strip = lambda t: t.split("\n", 3)[3]  # noqa: E731  (drop the dated header)
    assert strip(text2).split("## Time per part")[0] == strip(text).split("## Time per part")[0]
    # the archive alone (the cache gone, as on a new machine) gives the same tables, training nothing
    shutil.rmtree(runs_dir)
    os.remove(os.path.join(out, "results_quick_acc_vs_round.png"))  # the curves come back from the archive
    logs = []
    text3 = R.run_results(plan, out, runs_dir, log=logs.append, incremental=False, archive_dir=archive,
                          cached_only=True)
    assert any("from the archive" in m for m in logs) and not any("acc " in m for m in logs)
    assert strip(text3).split("## Time per part")[0] == strip(text).split("## Time per part")[0]
    assert os.path.getsize(os.path.join(out, "results_quick_acc_vs_round.png")) > 0


def test_archive_round_trip_and_checks(tmp_path):
    """cache.write_archive / load_archived: the run comes back as the cache gives it (numbers to 7
    digits, per-client lists dropped), and only for its own config, revision and rounds."""
    from fedcompress.experiments import cache

    cfg = {"dataset": "digits", "seed": 0}
    hist = [{"round": r, "accuracy": 0.5 + r / 10, "loss": 1 / 3, "upstream_bytes": 1000 * r, "clients": [0, 1],
             "chosen": [{"client": 0, "rel": 0.01}]} for r in (1, 2)]
    summary = {"final_accuracy": 0.7, "config": cfg, "compressor_revision": 2, "diverged_round": None,
               "history": hist}
    path = str(tmp_path / "a" / "run.json")
    cache.write_archive(path, summary)
    got = cache.load_archived(path, cfg, 2, revision=2)
    assert got["final_accuracy"] == 0.7 and got["config"] == cfg
    assert got["history"] == [{"round": r, "accuracy": 0.5 + r / 10, "loss": 0.3333333, "upstream_bytes": 1000 * r}
                              for r in (1, 2)]
    assert cache.load_archived(path, {**cfg, "seed": 1}, 2, revision=2) is None  # another config
    assert cache.load_archived(path, cfg, 2, revision=3) is None  # the compressor changed since
    assert cache.load_archived(path, cfg, 3, revision=2) is None  # a round missing
    assert cache.load_archived(str(tmp_path / "absent.json"), cfg, 2, revision=2) is None
    text = open(path).read()
    doc = json.loads(text)
    for bad in (text[: len(text) // 2], "[]", "null", json.dumps({**doc, "format": 99}),
                json.dumps({**doc, "history": {**doc["history"], "loss": [0.1]}}),  # a short column
                json.dumps({**doc, "history": "x"}), json.dumps({**doc, "summary": [1]})):
        with open(path, "w") as f:
            f.write(bad)
        assert cache.load_archived(path, cfg, 2, revision=2) is None


# ---------------------------------------------------------------------------------------------
# bench table from a pytest-benchmark JSON (hand-computed MB/s, ratio, speed vs peers)


def test_bench_rows_by_hand():
    data = {
        "benchmarks": [
            {
                "name": "test_encode_fedcompress_cpp_bytes",
                "group": "encode-25M",
                "fullname": "bench/bench_mask.py::test_encode_fedcompress_cpp_bytes",
                "params": None,
                "stats": {"median": 0.05},
                "extra_info": {"input_GB": 0.1, "payload_bytes": 10_000_000},
            },
            {
                "name": "test_encode_naive_torch_rand",
                "group": "encode-25M",
                "fullname": "bench/bench_mask.py::test_encode_naive_torch_rand",
                "params": None,
                "stats": {"median": 0.2},
                "extra_info": {"input_GB": 0.1, "GB/s (median)": 0.5},
            },
            {
                "name": "test_hypergradient[engine]",
                "group": None,
                "fullname": "bench/bench_synth.py::test_hypergradient[engine]",
                "params": {"provider": "engine"},
                "stats": {"median": 9.0},
                "extra_info": {"times_s": [1.0, 3.0, 2.0]},
            },
            {
                "name": "test_hypergradient[torchopt]",
                "group": None,
                "fullname": "bench/bench_synth.py::test_hypergradient[torchopt]",
                "params": {"provider": "torchopt"},
                "stats": {"median": 9.0},
                "extra_info": {"times_s": [8.0, 8.0]},
            },
            {
                "name": "test_table",
                "group": None,
                "fullname": "bench/bench_synth.py::test_table",
                "params": None,
                "stats": {"median": 0.0},
                "extra_info": {},
            },
        ]
    }
    rows = B.bench_rows(data)
    assert len(rows) == 4
    cpp, naive, eng, topt = rows
    assert cpp["provider"] == "fedcompress_cpp_bytes" and cpp["op"] == "encode-25M"
    assert cpp["MB/s"] == pytest.approx(100e6 / 1e6 / 0.05)  # 2000 MB/s from size / median
    assert cpp["ratio"] == pytest.approx(10.0)
    assert naive["MB/s"] == pytest.approx(500.0)  # the bench's own GB/s wins
    assert naive["vs_peers"] == {}
    assert cpp["ratio_vs_peers"] == {}  # the naive peer records no ratio
    assert cpp["vs_peers"] == {"naive_torch_rand": pytest.approx(4.0)}
    assert eng["median_s"] == 2.0 and eng["op"] == "synth:hypergradient"
    assert eng["vs_peers"] == {"torchopt": pytest.approx(4.0)}
    table = B.bench_table(rows)
    assert (
        "| encode-25M | fedcompress_cpp_bytes | 100.0 MB | 0.0500 | 2000.0 | 10.00 | naive_torch_rand 4.00x |"
        in table
    )


def test_bench_cli_missing_dir(tmp_path, capsys):
    rc = cli.main(["bench", "--bench-dir", str(tmp_path / "nope")])
    assert rc == cli.EXIT_BAD_INPUT
    assert "no bench/ folder" in capsys.readouterr().err


def test_find_bench_dir_in_checkout():
    d = B.find_bench_dir()
    assert d is not None and os.path.exists(os.path.join(d, "bench_mask.py"))


def test_results_cli_bad_rows(capsys):
    assert cli.main(["results", "--quick", "--rows", "none,zip"]) == cli.EXIT_BAD_INPUT
    assert "rows" in capsys.readouterr().err


def test_bench_rows_peers_only_on_same_params():
    def b(provider, array, median, ratio):
        return {
            "name": f"test_encode[{array}-0.01-{provider}]",
            "group": None,
            "fullname": f"bench/bench_sz.py::test_encode[{array}-0.01-{provider}]",
            "params": {"name": array, "rel": 0.01, "provider": provider},
            "stats": {"median": median},
            "extra_info": {"nbytes": 4_000_000, "ratio": ratio},
        }

    rows = B.bench_rows(
        {
            "benchmarks": [
                b("fc-cpp", "update", 0.1, 24.0),
                b("pysz-default", "update", 0.2, 12.0),
                b("pysz-default", "kaiming", 0.01, 2.0),
            ]
        }
    )
    fc_row = rows[0]
    assert fc_row["op"] == "sz:encode name=update,rel=0.01"
    assert fc_row["vs_peers"] == {"pysz-default": pytest.approx(2.0)}  # not the kaiming row
    assert fc_row["ratio_vs_peers"] == {"pysz-default": pytest.approx(2.0)}
    assert fc_row["MB/s"] == pytest.approx(40.0)


def test_compare_without_compressors_writes_the_report(tmp_path, capsys):
    # `fedcompress compare` (no --compressors) is the papers' tables; reuses the cache it just filled
    from fedcompress import cli

    args = ["compare", "--quick", "--runs", str(tmp_path / "runs"), "--report-dir", str(tmp_path / "docs"),
            "--rows", "none,mask", "--parts", "quick", "--no-progress"]
    assert cli.main(args) == 0
    text = open(tmp_path / "docs" / "results.md").read()
    assert text.startswith("# Results") and "| mask (unbiased) |" in text
    assert "fedcompress compare --quick" in text
    res = json.loads(open(tmp_path / "docs" / "results.json").read())
    assert {r["row"] for r in res["runs"]} == {"none", "mask"}
    assert res["plan"]["settings"]["quick"]["rounds"] == 2
    # the tables' settings are fixed: --rounds belongs to --compressors
    assert cli.main(args + ["--rounds", "3"]) == cli.EXIT_BAD_INPUT
    assert "--rounds" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Issue 16.2: compare writes into docs/ only when asked; 16.8: the machine as measured;
# issue 13.4: seeds (mean ± sample std, checked against numpy), runs cached per seed


def test_compare_default_report_goes_under_runs_not_docs(tmp_path, monkeypatch, capsys):
    from fedcompress import cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "results.md").write_text("committed\n")
    assert cli.main(["compare", "--quick", "--rows", "none", "--parts", "quick", "--no-progress"]) == 0
    assert (tmp_path / "docs" / "results.md").read_text() == "committed\n"
    assert sorted(p.name for p in (tmp_path / "docs").iterdir()) == ["results.md"]
    text = (tmp_path / "runs" / "results-quick" / "results.md").read_text()
    assert text.startswith("# Results")
    assert "[results] wrote runs/results-quick/results.md" in capsys.readouterr().err


def test_machine_line_is_measured():
    import torch

    info = R.machine_info()
    assert info["cpus"] == os.cpu_count() and info["torch_threads"] == torch.get_num_threads()
    assert (info["gpu"] is None) == (not torch.cuda.is_available())
    line = R.machine_line(dict(info, cpus=2, cpus_usable=2, cpu_model="Some CPU", torch_threads=1, gpu=None,
                               load_average_1min=5.5))  # fmt: skip
    assert line == "2 CPUs (Some CPU), 1 torch thread, no GPU, load average 5.5"
    assert "GPU H200" in R.machine_line(dict(info, gpu="H200"))


def test_report_prints_the_machine(tmp_path):
    plan = R.Plan(budgets=(16,), parts=("mnist5k-10",), rows=("none",))
    text = R.report(plan, [_fake("mnist5k-10", "none", 1, 0.9, 1.0)], str(tmp_path), "fedcompress compare", 1.0)
    assert f"machine (as measured): {R.machine_line()}".split(", load")[0] in text
    assert "2-core CPU shared" not in text


@pytest.mark.parametrize("values", [[0.9], [0.91, 0.93, 0.905], [1.0, 2.0, 4.0, 8.0]])
def test_mean_std_against_numpy(values):
    m, s = R.mean_std(values)
    assert m == pytest.approx(np.mean(values), rel=1e-12)
    assert s == pytest.approx(np.std(values, ddof=1) if len(values) > 1 else 0.0, abs=1e-12)


def test_merge_seeds_and_report_mean_std(tmp_path):
    plan = R.Plan(budgets=(16,), parts=("mnist5k-10",), rows=("none", "sz"), seeds=(0, 1, 2))
    accs = {"none": [0.90, 0.92, 0.91], "sz": [0.89, 0.90, 0.88]}
    ratios = [16.0, 16.5, 17.5]
    runs = []
    for i, seed in enumerate(plan.seeds):
        for row in ("none", "sz"):
            t, ratio = (1, 1.0) if row == "none" else (16, ratios[i])
            runs.append(_fake("mnist5k-10", row, t, accs[row][i], ratio, seed=seed))
    merged = {r.row: r for r in R.merge_seeds(runs)}
    sz = merged["sz"].summary
    assert sz["final_accuracy"] == pytest.approx(np.mean(accs["sz"]))
    assert sz["final_accuracy_std"] == pytest.approx(np.std(accs["sz"], ddof=1))
    assert sz["compression_ratio"] == pytest.approx(np.mean(ratios))
    assert sz["seeds"] == [0, 1, 2]
    hist = [np.mean([r.summary["history"][k]["accuracy"] for r in runs if r.row == "sz"]) for k in range(2)]
    assert [h["accuracy"] for h in sz["history"]] == pytest.approx(hist)
    text = R.report(plan, runs, str(tmp_path), "fedcompress compare --seeds 0,1,2", 1.0)
    d = (np.mean(accs["sz"]) - np.mean(accs["none"])) * 100
    acc_sz, std_sz = np.mean(accs["sz"]) * 100, np.std(accs["sz"], ddof=1) * 100
    cell = f"| {acc_sz:.2f} ± {std_sz:.2f} ({np.mean(ratios):.1f}x) |"
    assert cell in text, text
    assert d < -0.5 and "none of these" in text  # the mean is what the iso column judges
    assert "seeds 0, 1, 2" in text and "goals judged on the mean" in text
    # the time table counts runs, not merged cells: 2 rows x 3 seeds
    assert "| mnist5k-10 | 6 |" in text.split("## Time per part")[1]
    res = json.loads((tmp_path / "results.json").read_text())
    assert sorted(r["seed"] for r in res["runs"]) == [0, 0, 1, 1, 2, 2]
    assert {r["row"]: r["final_accuracy"] for r in res["mean_over_seeds"]}["sz"] == pytest.approx(np.mean(accs["sz"]))


def _with_history(run, accs):
    run.summary["history"] = [{"round": i + 1, "accuracy": a, "upstream_bytes": 1000 * (i + 1)}
                              for i, a in enumerate(accs)]  # fmt: skip
    run.summary["final_accuracy"] = accs[-1]
    return run


def test_last_rounds_table_reads_each_runs_last_five_rounds(tmp_path):
    # a row that ends on a high round but swings below none over its last 5: the first table's iso
    # column takes it, the last-5 table's does not; means and stds against numpy, per seed first
    plan = R.Plan(budgets=(16,), parts=("mnist5k-10",), rows=("none", "fp16", "sz"), seeds=(0, 1))
    hist = {
        ("none", 0): [0.5, 0.88, 0.90, 0.90, 0.91, 0.90, 0.90],
        ("none", 1): [0.5, 0.89, 0.90, 0.91, 0.90, 0.91, 0.90],
        ("sz", 0): [0.5, 0.80, 0.86, 0.84, 0.87, 0.85, 0.90],
        ("sz", 1): [0.5, 0.82, 0.85, 0.83, 0.88, 0.86, 0.899],
        ("fp16", 0): [0.5, 0.88, 0.90, 0.90, 0.91, 0.90, 0.90],
        ("fp16", 1): [0.5, 0.88, 0.90, 0.90, 0.91, 0.90, 0.90],
    }
    runs = [_with_history(_fake("mnist5k-10", row, {"none": 1, "fp16": 2}.get(row, 16), 0.0,
                                {"none": 1.0, "fp16": 2.0}.get(row, 16.0), seed=seed), h)
            for (row, seed), h in hist.items()]  # fmt: skip
    assert R.last_rounds_accuracy(runs[2].summary) == pytest.approx(np.mean(hist[("sz", 0)][-5:]))
    merged = {r.row: r.summary for r in R.merge_seeds(runs)}
    last5 = [np.mean(hist[("sz", s)][-5:]) for s in (0, 1)]
    assert merged["sz"]["last_accuracy"] == pytest.approx(np.mean(last5))
    assert merged["sz"]["last_accuracy_std"] == pytest.approx(np.std(last5, ddof=1))
    text = R.report(plan, runs, str(tmp_path), "fedcompress compare --seeds 0,1", 1.0, with_plots=False)
    first, last = text.split("Mean accuracy over each run's last 5 rounds")
    assert "| sz (bound searched per update) | 89.95 ± 0.07 (16.0x) | 16.0x |" in first
    cell = f"{np.mean(last5) * 100:.2f} ± {np.std(last5, ddof=1) * 100:.2f}"
    assert f"| sz (bound searched per update) | {cell} | none of these (all > 0.5 pt below) |" in last
    none5 = np.mean([np.mean(hist[("none", s)][-5:]) for s in (0, 1)]) * 100
    fp16_5 = np.mean([np.mean(hist[("fp16", s)][-5:]) for s in (0, 1)]) * 100
    assert f"fp16 {fp16_5:.2f} ± 0.00, {fp16_5 - none5:+.2f} pt" in last
    mean_rows = json.loads((tmp_path / "results.json").read_text())["mean_over_seeds"]
    assert {r["row"]: r["last_rounds_accuracy"] for r in mean_rows}["sz"] == pytest.approx(np.mean(last5))


def test_merge_seeds_says_when_a_seed_is_missing(tmp_path):
    a, b = _fake("s", "none", 1, 0.9, 1.0), R.Run("s", "none", 1, "none", note="failed: boom", seed=1)
    (m,) = R.merge_seeds([a, b])
    assert m.summary["seeds"] == [0] and "seed 1: failed: boom" in m.note
    assert _acc_text(m) == "90.00 ± 0.00 [1 of 2 seeds]"


def test_compare_seeds_runs_each_row_per_seed_and_caches(tmp_path, capsys):
    """--compressors with --seeds: same split and init per seed across rows, mean ± std in the
    table (against numpy on the runs' own summaries), one cached folder per seed and spec."""
    import torch

    from fedcompress import cli

    torch.set_num_threads(1)
    out = tmp_path / "c"
    args = ["compare", "--dataset", "digits", "--model", "mlp", "--clients", "3", "--rounds", "1", "--epochs", "1",
            "--no-progress", "--compressors", "none,mask:keep=0.5,unbiased=true", "--seeds", "0,1,2",
            "--out", str(out)]  # fmt: skip
    assert cli.main(args) == 0
    table = capsys.readouterr().out
    for spec, folder in (("none", "none"), ("mask:keep=0.5,unbiased=true", "mask_keep=0.5_unbiased=true")):
        ss = [json.loads((out / f"seed{s}" / folder / "summary.json").read_text()) for s in (0, 1, 2)]
        assert [x["config"]["seed"] for x in ss] == [0, 1, 2]
        accs = [x["final_accuracy"] * 100 for x in ss]
        assert f"| {spec} | {np.mean(accs):.2f} ± {np.std(accs, ddof=1):.2f} |" in table
    for s in (0, 1, 2):  # same init per seed across rows; different seeds, different inits
        a = json.loads((out / f"seed{s}" / "none" / "summary.json").read_text())
        b = json.loads((out / f"seed{s}" / "mask_keep=0.5_unbiased=true" / "summary.json").read_text())
        assert a["initial_accuracy"] == b["initial_accuracy"]
    assert "seeds 0,1,2 (mean ± sample std" in (out / "compare.md").read_text()
    assert cli.main(args) == 0  # second call: every run reused from its seed's folder
    assert capsys.readouterr().err.count("reused") == 6


@pytest.mark.parametrize("bad", ["", "a,b", "0,0", "-1"])
def test_bad_seeds_exit_2(bad, capsys):
    from fedcompress import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["compare", "--compressors", "none", "--seeds", bad])
    assert e.value.code == 2 and "--seeds" in capsys.readouterr().err


def test_bench_without_test_extras_says_what_to_install(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "pytest_benchmark" else real(n, *a))
    assert cli.main(["bench", "--quick"]) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "pytest_benchmark not installed" in err and 'pip install -e ".[test]"' in err


def _schema_bench(provider, median, case="update rel=0.01", peer=False, **extra):
    ex = {"schema": B.BENCH_SCHEMA, "op": "sz encode", "provider": provider, "case": case, "input_bytes": 8_000_000,
          "peer": peer, **extra}  # fmt: skip
    # name and group deliberately misleading: a schema row is read from extra_info alone
    return {"name": "test_zlib_memcpy", "group": "pysz", "fullname": "bench/bench_x.py::test_zlib_memcpy",
            "params": {"provider": "naive"}, "stats": {"median": median}, "extra_info": ex}  # fmt: skip


def test_bench_rows_read_the_extra_info_schema():
    rows = B.bench_rows(
        {
            "benchmarks": [
                _schema_bench("fc-cpp", 0.1, payload_bytes=400_000),
                _schema_bench("pysz", 0.4, peer=True, payload_bytes=800_000),
                _schema_bench("pysz", 0.01, case="kaiming rel=0.01", peer=True),
                _schema_bench("fc-child", 9.0, times_s=[3.0, 1.0, 2.0]),
            ]
        }
    )
    fc_row, peer, other, child = rows
    assert (fc_row["op"], fc_row["provider"], fc_row["is_peer"]) == ("sz encode update rel=0.01", "fc-cpp", False)
    assert fc_row["MB/s"] == pytest.approx(8e6 / 1e6 / 0.1)  # 80 MB/s, input_bytes / median by hand
    assert fc_row["ratio"] == pytest.approx(20.0) and peer["ratio"] == pytest.approx(10.0)
    assert fc_row["vs_peers"] == {"pysz": pytest.approx(4.0)}  # 0.4 s / 0.1 s; not the kaiming case
    assert fc_row["ratio_vs_peers"] == {"pysz": pytest.approx(2.0)}
    assert peer["is_peer"] and peer["vs_peers"] == {} and other["op"] == "sz encode kaiming rel=0.01"
    assert child["median_s"] == 2.0  # the bench's own times win over pytest-benchmark's 9.0
    assert child["is_peer"] is False  # "naive"/"zlib"/"memcpy" in names no longer make a peer


@pytest.mark.parametrize(
    "change,word",
    [({"schema": 99}, "schema"), ({"op": None}, "'op'"), ({"input_bytes": "8MB"}, "input_bytes"),
     ({"peer": 1}, "peer"), ({"provider": None}, "provider")],
)  # fmt: skip
def test_bench_rows_reject_a_broken_schema_row(change, word):
    b = _schema_bench("fc-cpp", 0.1)
    for k, v in change.items():
        if v is None:
            del b["extra_info"][k]
        else:
            b["extra_info"][k] = v
    with pytest.raises(ValueError, match=word):
        B.bench_rows({"benchmarks": [b]})


def test_extra_info_schema_lists_its_keys():
    required = {k for k, (_, req, _) in B.EXTRA_INFO.items() if req}
    assert required == {"schema", "op", "provider", "input_bytes"}
    assert set(B.EXTRA_INFO) >= {"case", "load", "payload_bytes", "peer", "times_s"}
    b = _schema_bench("fc-cpp", 0.1, load="busy")
    assert B.bench_rows({"benchmarks": [b]})[0]["op"] == "sz encode update rel=0.01 load=busy"


def test_not_run_lines_group_budgets_and_reasons():
    from fedcompress.experiments.tables import not_run_lines

    runs = [R.Run("mnist5k-10", "sz", 8, "sz:ratio=8", note="seed 0: failed: boom; seed 1: failed: boom"),
            R.Run("mnist5k-10", "sz", 32, "sz:ratio=32"), _fake("mnist5k-10", "sz", 16, 0.9, 16.1),
            R.Run("mnist5k-10", "sz", 64, "sz:ratio=64"),
            R.Run("sweep", "sz-update", 1e-3, "sz:rel=0.001", note="not available: x"),
            # a reason holding "; " itself (ROW_BUDGETS' res2 reason) stays as written
            R.Run("mnist5k-10", "mask", 8, "mask:ratio=8",
                  note="seed 0: b first; a second; seed 1: b first; a second")]  # fmt: skip
    assert not_run_lines(runs) == [  # budgets with the same reasons share a line, and only those
        "- mnist5k-10, sz (bound searched per update): 8x (failed: boom)",
        "- mnist5k-10, sz (bound searched per update): 32x, 64x (not run yet)",
        "- sweep, sz-update: 0.001 (not available: x)",
        "- mnist5k-10, mask (unbiased): 8x (b first; a second)",
    ]


def test_iso_ratio_ignores_runs_missing_seeds():
    full = _fake("s", "sz", 16, 0.97, 16.1)
    full.summary.update(seeds=[0, 1, 2], seeds_planned=3)
    partial = _fake("s", "sz", 64, 0.97, 64.5)
    partial.summary.update(seeds=[0], seeds_planned=3)
    assert R.iso_ratio([full, partial], 97.0) is full


def test_diverged_runs_are_marked_in_the_table():
    # one seed diverged (the driver's diverged_round), one from before the driver stopped runs (a
    # NaN test loss in its history), one finite: the cell says which, the mean is still shown
    a = _fake("s", "mask", 256, 0.10, 272.0, rounds=3, seed=0)
    a.summary["diverged_round"] = 2
    b = _fake("s", "mask", 256, 0.10, 272.0, rounds=3, seed=1)
    for i, h in enumerate(b.summary["history"]):
        h["loss"] = float("nan") if i >= 2 else 1.0
    c = _fake("s", "mask", 256, 0.90, 272.0, rounds=3, seed=2)
    from fedcompress.experiments.summary import diverged_round
    from fedcompress.experiments.tables import _cell

    assert diverged_round(a.summary) == 2 and diverged_round(b.summary) == 3
    assert diverged_round(c.summary) is None
    (m,) = R.merge_seeds([a, b, c])
    assert m.summary["diverged_rounds"] == [2, 3, None]
    assert _cell(m).endswith("(272.0x, diverged in 2 of 3 seeds (rounds 2, 3))")
    assert _cell(a).endswith("(272.0x, diverged in round 2)")
    assert _cell(c) == "90.00 (272.0x)"


def test_cache_rejects_a_run_from_another_compressor_revision(tmp_path):
    # a run cached before its compressor's rule changed (Compressor.REVISION bumped) is re-run, not
    # reused: the same spec no longer sends the same thing
    from fedcompress.api import compressor_class
    from fedcompress.experiments.cache import load_cached

    cfg = {"compressor": "fedsynth:ratio=64", "rounds": 2}
    hist = [{"round": 1, "accuracy": 0.5}, {"round": 2, "accuracy": 0.6}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in hist))
    (tmp_path / "summary.json").write_text(json.dumps({"config": cfg, "final_accuracy": 0.6}))
    assert load_cached(str(tmp_path), cfg, 2, revision=0)["final_accuracy"] == 0.6  # no key = 0
    assert load_cached(str(tmp_path), cfg, 2, revision=1) is None
    rev = compressor_class("fedsynth").REVISION
    assert rev >= 1  # the capped inner step of the ratio rule
    summary = {"config": cfg, "final_accuracy": 0.6, "compressor_revision": rev}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert load_cached(str(tmp_path), cfg, 2, revision=rev) is not None


def test_collapsed_runs_are_marked_in_the_table():
    # issue 14's criterion: a round after the third below 60 % of the best of the rounds before it
    from fedcompress.experiments.summary import collapse_round
    from fedcompress.experiments.tables import _cell

    a = _fake("s", "fedsynth-trainable", 16, 0.90, 16.3, rounds=6, seed=0)
    for h, acc in zip(a.summary["history"], [0.3, 0.5, 0.2, 0.8, 0.4, 0.9], strict=True):
        h["accuracy"] = acc  # round 3 (0.2) is early; round 5 (0.4 < 0.6 * 0.8) is a collapse
    b = _fake("s", "fedsynth-trainable", 16, 0.90, 16.3, rounds=6, seed=1)
    for h, acc in zip(b.summary["history"], [0.3, 0.5, 0.6, 0.8, 0.55, 0.9], strict=True):
        h["accuracy"] = acc  # 0.55 >= 0.54: not a collapse
    assert collapse_round(a.summary) == 5 and collapse_round(b.summary) is None
    slow = _fake("s", "real-subset", 64, 0.90, 70.4, rounds=6, seed=2)
    for h, acc in zip(slow.summary["history"], [0.21, 0.33, 0.41, 0.52, 0.68, 0.9], strict=True):
        h["accuracy"] = acc  # still climbing at round 4 (0.52 < 0.6 * 0.9 = the run's best): not a fall
    assert collapse_round(slow.summary) is None
    assert _cell(a).endswith("(16.3x, collapsed in round 5)")
    assert _cell(b) == "90.00 (16.3x)"
    (m,) = R.merge_seeds([a, b])
    assert _cell(m).endswith("(16.3x, collapsed in 1 of 2 seeds (round 5))")


def test_bench_fedsynth_update_ratio_reads_the_median_from_metrics(tmp_path, capsys):
    """bench/fedsynth_update_ratio.py: the median of every client's chosen[].update_ratio from the
    given round on, against numpy's median of the same values (None entries and earlier rounds
    left out)."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "bench", "fedsynth_update_ratio.py")
    spec = importlib.util.spec_from_file_location("fedsynth_update_ratio", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = [(1, [9.0, 8.0]), (2, [0.5, None, 0.2]), (3, [0.4, 0.9])]
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for rnd, ratios in rows:
            f.write(json.dumps({"round": rnd, "chosen": [{"update_ratio": r} for r in ratios]}) + "\n")
    assert mod.update_ratios(str(tmp_path), 2) == [0.5, 0.2, 0.4, 0.9]
    mod.main([str(tmp_path), "--from-round", "2"])
    assert f"| {tmp_path} | 4 | {np.median([0.5, 0.2, 0.4, 0.9]):.3f} |" in capsys.readouterr().out
