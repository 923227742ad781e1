"""fedcompress results / bench tooling: the quick plan end to end, calibration, report, bench table."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from fedcompress import cli
from fedcompress import results as R
from fedcompress.api import RoundContext, get_compressor

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
    mask_dir = os.path.join(runs_dir, "iid", "mask_keep=0.0625")
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
    rows = R.bench_rows(data)
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
    table = R.bench_table(rows)
    assert (
        "| encode-25M | fedcompress_cpp_bytes | 100.0 MB | 0.0500 | 2000.0 | 10.00 | naive_torch_rand 4.00x |"
        in table
    )


def test_bench_cli_missing_dir(tmp_path, capsys):
    rc = cli.main(["bench", "--bench-dir", str(tmp_path / "nope")])
    assert rc == cli.EXIT_BAD_INPUT
    assert "no bench/ folder" in capsys.readouterr().err


def test_find_bench_dir_in_checkout():
    d = R.find_bench_dir()
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

    rows = R.bench_rows(
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
    assert text.startswith("# Results") and "| mask (keep=1/ratio) |" in text
    assert "fedcompress compare --quick" in text
    res = json.loads(open(tmp_path / "docs" / "results.json").read())
    assert {r["row"] for r in res["runs"]} == {"none", "mask"}
    assert res["plan"]["rounds"] == R.Plan.quick().rounds  # compare's own --rounds default does not leak in
