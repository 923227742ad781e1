"""fedcompress results / bench tooling (fedcompress.experiments, fedcompress.benchtable): the quick plan end to
end, calibration, report, the bench table and its extra_info schema."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from fedcompress import benchtable as B
from fedcompress import cli
from fedcompress import experiments as R
from fedcompress.api import RoundContext, get_compressor
from fedcompress.experiments.tables import _acc_text

# ---------------------------------------------------------------------------------------------
# calibration lands on the ratio (reference: the payload length measured here by hand)


@pytest.fixture(scope="module")
def update():
    g = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(300, 200, generator=g) * 1e-2, "b": torch.randn(200, generator=g) * 1e-2}
    dense = len(get_compressor("none").compress(state, RoundContext()))
    return state, dense


@pytest.mark.parametrize("ratio", [8, 16, 64])
def test_calibrate_sz_lands_near_ratio(update, ratio):
    if R.compressor_available("sz"):
        pytest.skip("sz state-dict compressor not available")
    state, dense = update
    spec, reached = R.calibrate_sz(state, dense, ratio)
    by_hand = dense / len(get_compressor(spec).compress(state, RoundContext(round=1, client=0, seed=0)))
    assert reached == pytest.approx(by_hand)
    assert spec.startswith("sz:rel=")
    assert abs(math.log(reached / ratio)) < math.log(1.35), (spec, reached)


@pytest.mark.parametrize("labels", ["fixed", "trainable"])
@pytest.mark.parametrize("ratio", [8, 64])
def test_fedsynth_shape_payload_matches(labels, ratio):
    dense = 755_000  # about the digits CNN's dense payload
    m, b, r = R.fedsynth_shape(ratio, (1, 8, 8), 10, dense, labels)
    spec = f"fedsynth:batches={m},batch={b},labels={labels}"
    y = torch.zeros(m, b, 10)
    y[..., 3] = 1
    n = len(get_compressor(spec).compress({"x": torch.randn(m, b, 1, 8, 8), "y": y}, RoundContext()))
    assert r == pytest.approx(dense / n)
    # per sample: 64 fp32 pixels + 1 byte label (fixed) or 10 fp32 (trainable); ratio within ~3%
    assert abs(r / ratio - 1) < 0.03, (m, b, r)


# ---------------------------------------------------------------------------------------------
# report: goals said plainly


def _fake(part, row, target, acc, ratio, rounds=2):
    hist = [{"round": i + 1, "accuracy": acc, "upstream_bytes": 1000 * (i + 1)} for i in range(rounds)]
    s = {
        "final_accuracy": acc,
        "compression_ratio": ratio,
        "initial_accuracy": 0.1,
        "history": hist,
        "wall_seconds": 1,
    }
    return R.Run(part, row, target, f"{row}:x", ratio, summary=s)


def test_report_goals_reached_and_not(tmp_path):
    plan = R.Plan(ratios=(16, 64), parts=("iid", "sweep"), rows=("none", "mask", "sz"), sweep=(1e-1, 1e-2))
    runs = [
        _fake("iid", "none", 1, 0.90, 1.0),
        _fake("iid", "mask", 16, 0.80, 15.9),
        _fake("iid", "sz", 16, 0.897, 16.2),  # -0.3 pt: reached
        _fake("iid", "mask", 64, 0.70, 63.0),
        _fake("iid", "sz", 64, 0.88, 64.5),  # -2 pt: not reached
        _fake("sweep", "sz-update", 1e-1, 0.85, 40.0),  # -5 pt
        _fake("sweep", "sz-update", 1e-2, 0.899, 12.0),  # < 20x
        _fake("sweep", "sz-weights", 1e-2, 0.90, 5.0),
    ]
    text = R.report(plan, runs, str(tmp_path), "fedcompress results", 3.0)
    assert "Goal at 16x" in text and "-0.30 pt" in text and "**reached**" in text
    assert "Goal at 64x" in text and "-2.00 pt" in text and "**NOT reached**" in text
    assert "sz on updates >= 20x" in text and "**NOT reached** by any REL bound" in text
    assert "| sz (update, REL calibrated) | 89.70 % (16.20x, -0.30 pt) | 88.00 % (64.50x, -2.00 pt) |" in text
    for name in ("results_iid_acc_vs_round.png", "results_iid_acc_vs_mb.png"):
        size = os.path.getsize(tmp_path / name)
        assert 0 < size < 200_000
    assert (tmp_path / "results.md").read_text() == text
    assert json.loads((tmp_path / "results.json").read_text())["runs"][2]["row"] == "sz"


# ---------------------------------------------------------------------------------------------
# quick plan, end to end through the FedAvg driver


def test_quick_plan_end_to_end(tmp_path):
    torch.set_num_threads(1)
    plan = R.Plan.quick()
    out, runs_dir = str(tmp_path / "docs"), str(tmp_path / "runs")
    text = R.run_results(plan, out, runs_dir, log=lambda m: None, incremental=False)
    res = json.loads(open(os.path.join(out, "results.json")).read())
    by = {(r["part"], r["row"], r["target"]): r for r in res["runs"]}
    sz_ok = R.compressor_available("sz") is None
    for row in plan.rows:
        if row == "sz" and not sz_ok:
            continue
        r = by[("iid", row, 1.0 if row == "none" else 16)]
        assert r["final_accuracy"] is not None, r
        if row != "none":  # each compressor landed near 16x (mask: keep=1/16 plus headers)
            assert 13 < r["compression_ratio"] < 19.5, r
    # the ratio in the table is the driver's: dense / upstream from the run's own summary.json
    mask_dir = os.path.join(runs_dir, "seed0", "iid", "mask_keep=0.0625_unbiased=false")
    s = json.load(open(os.path.join(mask_dir, "summary.json")))
    assert s["compression_ratio"] == pytest.approx(s["dense_upstream_bytes"] / s["upstream_bytes"])
    assert f"{s['compression_ratio']:.2f}x" in text
    assert "## FedSZ sweep" in text and "Dirichlet alpha=0.3" in text
    # second call reuses every cached run (no training: fast, same numbers)
    logs = []
    text2 = R.run_results(plan, out, runs_dir, log=logs.append, incremental=False)
    assert any("reused" in m for m in logs) and not any("acc " in m for m in logs)
    strip = lambda t: t.split("\n", 3)[3]  # noqa: E731  (drop the dated header)
    assert strip(text2) == strip(text)


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
            "--rows", "none,mask", "--parts", "iid", "--no-progress"]
    assert cli.main(args) == 0
    text = open(tmp_path / "docs" / "results.md").read()
    assert text.startswith("# Results") and "| mask (keep=1/ratio, unbiased=false) |" in text
    assert "fedcompress compare --quick" in text
    res = json.loads(open(tmp_path / "docs" / "results.json").read())
    assert {r["row"] for r in res["runs"]} == {"none", "mask"}
    assert res["plan"]["rounds"] == R.Plan.quick().rounds  # compare's own --rounds default does not leak in


# ---------------------------------------------------------------------------------------------
# Issue 16.2: compare writes into docs/ only when asked; 16.8: the machine as measured;
# issue 13.4: seeds (mean ± sample std, checked against numpy), runs cached per seed


def test_compare_default_report_goes_under_runs_not_docs(tmp_path, monkeypatch, capsys):
    from fedcompress import cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "results.md").write_text("committed\n")
    assert cli.main(["compare", "--quick", "--rows", "none", "--parts", "iid", "--no-progress"]) == 0
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
    plan = R.Plan(ratios=(16,), parts=("iid",), rows=("none",))
    text = R.report(plan, [_fake("iid", "none", 1, 0.9, 1.0)], str(tmp_path), "fedcompress compare", 1.0)
    assert f"machine (as measured): {R.machine_line()}".split(", load")[0] in text
    assert "2-core CPU shared" not in text


@pytest.mark.parametrize("values", [[0.9], [0.91, 0.93, 0.905], [1.0, 2.0, 4.0, 8.0]])
def test_mean_std_against_numpy(values):
    m, s = R.mean_std(values)
    assert m == pytest.approx(np.mean(values), rel=1e-12)
    assert s == pytest.approx(np.std(values, ddof=1) if len(values) > 1 else 0.0, abs=1e-12)


def test_merge_seeds_and_report_mean_std(tmp_path):
    plan = R.Plan(ratios=(16,), parts=("iid",), rows=("none", "sz"), seeds=(0, 1, 2))
    accs = {"none": [0.90, 0.92, 0.91], "sz": [0.89, 0.90, 0.88]}
    ratios = [16.0, 16.5, 17.5]
    runs = []
    for i, seed in enumerate(plan.seeds):
        for row in ("none", "sz"):
            r = _fake("iid", row, 1 if row == "none" else 16, accs[row][i], 1.0 if row == "none" else ratios[i])
            r.seed = seed
            runs.append(r)
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
    cell = f"{acc_sz:.2f} ± {std_sz:.2f} % ({np.mean(ratios):.2f}x, {d:+.2f} pt)"
    assert cell in text, text
    assert "seeds 0, 1, 2" in text and "goals judged on the mean" in text
    res = json.loads((tmp_path / "results.json").read_text())
    assert sorted(r["seed"] for r in res["runs"]) == [0, 0, 1, 1, 2, 2]
    assert {r["row"]: r["final_accuracy"] for r in res["mean_over_seeds"]}["sz"] == pytest.approx(np.mean(accs["sz"]))


def test_merge_seeds_says_when_a_seed_is_missing(tmp_path):
    a, b = _fake("iid", "none", 1, 0.9, 1.0), R.Run("iid", "none", 1, "none", 1.0, note="failed: boom", seed=1)
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
