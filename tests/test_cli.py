"""The `fedcompress` command line: run, compare, and exit code 2 with the valid choices on bad input.

In-process calls of ``cli.main`` (fast); one subprocess checks the installed console script.
"""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from fedcompress import cli

TINY = [
    "--dataset",
    "digits",
    "--model",
    "mlp",
    "--clients",
    "3",
    "--rounds",
    "2",
    "--epochs",
    "1",
    "--no-progress",
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny runs: one torch thread is as fast idle and far faster on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_run_writes_outputs(tmp_path, capsys):
    out = tmp_path / "r"
    assert cli.main(["run", *TINY, "--compressor", "fp16", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    s = json.loads((out / "summary.json").read_text())
    assert s["rounds"] == 2 and s["config"]["dataset"] == "digits" and s["config"]["compressor"] == "fp16"
    assert s["upstream_bytes"] == rows[-1]["upstream_bytes"] == sum(r["round_upstream_bytes"] for r in rows)
    assert 1.9 < s["compression_ratio"] < 2.0
    assert (out / "accuracy_vs_mb.png").read_bytes()[:4] == b"\x89PNG"
    # Final line: accuracy, MB sent up, ratio.
    assert f"{s['final_accuracy'] * 100:.2f}%" in stdout
    assert f"{s['upstream_bytes'] / 1e6:.3f} MB sent up" in stdout
    assert f"ratio {s['compression_ratio']:.2f}x" in stdout


def test_run_progress_bar_on_stderr(tmp_path, capsys):
    args = [a for a in TINY if a != "--no-progress"]
    assert cli.main(["run", *args, "--rounds", "1", "--out", str(tmp_path)]) == 0
    cap = capsys.readouterr()
    assert "1/1" in cap.err and "round" in cap.err
    assert "1/1" not in cap.out


def test_compare_table_and_plot(tmp_path, capsys):
    out = tmp_path / "c"
    assert cli.main(["compare", *TINY, "--compressors", "none,fp16", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    lines = [x for x in stdout.splitlines() if x.startswith("|")]
    assert len(lines) == 4 and lines[2].startswith("| none |") and lines[3].startswith("| fp16 |")
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert "| fp16 |" in (out / "compare.md").read_text()
    none = json.loads((out / "none" / "summary.json").read_text())
    fp16 = json.loads((out / "fp16" / "summary.json").read_text())
    # Same seed, split and init: same dense bytes, same sampled clients; fp16 sends half the floats.
    assert none["dense_upstream_bytes"] == fp16["dense_upstream_bytes"]
    assert none["initial_accuracy"] == fp16["initial_accuracy"]
    assert abs(none["final_accuracy"] - fp16["final_accuracy"]) < 0.05
    # "last 5": the mean accuracy of the last 5 rounds of metrics.jsonl (all rounds if fewer)
    rounds = [json.loads(x) for x in (out / "none" / "metrics.jsonl").read_text().splitlines()]
    want = sum(r["accuracy"] for r in rounds[-5:]) / len(rounds[-5:])
    assert lines[0].split("|")[3].strip() == "last 5 (%)"
    assert lines[2].split("|")[3].strip() == f"{want * 100:.2f}"


@pytest.mark.parametrize(
    "args,expect",
    [
        (["run", "--dataset", "cifar"], ["mnist5k", "digits", "femnist"]),
        (["run", "--model", "resnet"], ["cnn", "mlp"]),
        (["run", "--partition", "shards"], ["iid", "dirichlet", "natural"]),
        (["run", "--compressor", "zip9"], ["none", "fp16"]),
        (["run", "--compressor", "fp16:level=3"], ["valid keys"]),
        (["compare", "--compressors", "none,bogus"], ["none", "fp16"]),
        (["run", "--clients", "0"], ["clients"]),
        (["run", "--lr", "nan"], ["lr"]),
        (["run", "--fraction", "2"], ["fraction"]),
        (["run", "--partition", "natural"], ["femnist"]),
        (["run", "--clients", "5", "--clients-per-round", "6"], ["clients_per_round"]),
        (["run", "--dataset", "mnist"], ["train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]),
        (["run", "--dataset", "femnist", "--data-dir", "/nonexistent/leaf"], ["train/*.json"]),
        (["frobnicate"], ["run", "compare"]),
    ],
)
def test_bad_input_exit_2(args, expect, capsys):
    try:
        code = cli.main(args)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    for word in expect:
        assert word in err, (word, err)


def test_missing_idx_file_named(tmp_path, capsys):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"")
    assert cli.main(["run", "--dataset", "mnist", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "train-labels-idx1-ubyte" in err and "lacks" in err


def test_split_specs():
    assert cli.split_specs("none,fp16") == ["none", "fp16"]
    assert cli.split_specs("sz:rel=1e-2,mode=abs,mask:keep=0.1,none") == [
        "sz:rel=1e-2,mode=abs",
        "mask:keep=0.1",
        "none",
    ]
    assert cli.split_specs(" , ") == []


def test_subcommand_registry(capsys):
    called = {}

    def add_hello(sub):
        p = sub.add_parser("hello")
        p.add_argument("--n", type=int, default=1)
        p.set_defaults(handler=lambda a: called.setdefault("n", a.n) and 0)

    cli.register_subcommand("hello", add_hello)
    cli.register_subcommand("broken", "fedcompress.no_such_module:add")
    try:
        assert cli.main(["hello", "--n", "3"]) == 0 and called["n"] == 3
        assert cli.main(["broken"]) == 2
        assert "unavailable" in capsys.readouterr().err
    finally:
        cli.SUBCOMMANDS.pop("hello", None)
        cli.SUBCOMMANDS.pop("broken", None)


@pytest.mark.skipif(
    shutil.which("fedcompress") is None, reason="console script not installed (pip install -e .)"
)
def test_console_script():
    r = subprocess.run(
        ["fedcompress", "run", "--dataset", "nope"], capture_output=True, text=True, timeout=120, check=False
    )
    assert r.returncode == 2 and "mnist5k" in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "fedcompress.cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and "compare" in r.stdout


def test_run_local_folders(tmp_path, capsys):
    """End to end on tiny local folders written here: MNIST IDX (cnn) and LEAF FEMNIST (natural)."""
    import numpy as np

    rng = np.random.default_rng(0)
    idx = tmp_path / "idx"
    idx.mkdir()
    for name, shape in [("train-images-idx3-ubyte", (12, 28, 28)), ("t10k-images-idx3-ubyte", (5, 28, 28))]:
        a = rng.integers(0, 256, shape).astype(np.uint8)
        (idx / name).write_bytes(
            bytes([0, 0, 8, 3]) + b"".join(s.to_bytes(4, "big") for s in shape) + a.tobytes()
        )
    for name, n in [("train-labels-idx1-ubyte", 12), ("t10k-labels-idx1-ubyte", 5)]:
        (idx / name).write_bytes(
            bytes([0, 0, 8, 1]) + n.to_bytes(4, "big") + rng.integers(0, 10, n).astype(np.uint8).tobytes()
        )
    out = tmp_path / "o1"
    args = ["--rounds", "1", "--epochs", "1", "--no-progress", "--out", str(out)]
    assert cli.main(["run", "--dataset", "mnist", "--data-dir", str(idx), "--clients", "2", *args]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["model_parameters"] == 582026 and s["train_samples"] == 12 and s["test_samples"] == 5

    leaf = tmp_path / "leaf"
    for split, users in [("train", {"w1": 3, "w2": 2, "w3": 4}), ("test", {"w1": 2, "w3": 1})]:
        (leaf / split).mkdir(parents=True)
        doc = {
            "users": list(users),
            "num_samples": list(users.values()),
            "user_data": {
                u: {"x": rng.random((n, 784)).tolist(), "y": rng.integers(0, 62, n).tolist()}
                for u, n in users.items()
            },
        }
        (leaf / split / "data.json").write_text(json.dumps(doc))
    out = tmp_path / "o2"
    args[-1] = str(out)
    base = [
        "run",
        "--dataset",
        "femnist",
        "--data-dir",
        str(leaf),
        "--partition",
        "natural",
        "--model",
        "mlp",
    ]
    assert cli.main([*base, "--clients", "3", *args]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["train_samples"] == 9 and s["test_samples"] == 3 and s["clients_per_round"] == 3
    assert s["model_parameters"] == 784 * 200 + 200 + 200 * 200 + 200 + 200 * 62 + 62
    assert cli.main([*base, "--clients", "4", *args]) == 2
    assert "only 3 writers" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Issue 16.7 / 16.8: specs as typed in tables, legends and folders; the splitting rule in --help;
# run's plot has a title


def test_compare_labels_and_folders_use_the_spec_as_typed(tmp_path, capsys, monkeypatch):
    from fedcompress.fedavg import plots

    seen = {}
    real = plots.plot_accuracy_vs_mb
    monkeypatch.setattr(plots, "plot_accuracy_vs_mb", lambda s, path, title=None: seen.update(
        labels=list(s), title=title) or real(s, path, title))  # fmt: skip
    out = tmp_path / "c"
    spec = "mask:keep=0.5,unbiased=true"
    assert cli.main(["compare", *TINY, "--rounds", "1", "--compressors", f"none,{spec}", "--out", str(out)]) == 0
    assert f"| {spec} |" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["mask_keep=0.5_unbiased=true", "none"]
    assert seen["labels"] == ["none", spec] and "digits" in seen["title"]


def test_compare_reuses_runs_of_a_compressor_with_a_revision(tmp_path, capsys):
    """A second compare reuses finished runs for every compressor, fedsynth (REVISION 2) included:
    it used to check revision 0 against the run's 2, re-run it and overwrite its files."""
    from fedcompress.api import get_compressor

    specs = "none,fedsynth:batches=1,batch=2,outer_steps=1"
    assert get_compressor("fedsynth").REVISION > 0
    out = tmp_path / "c"
    args = ["compare", *TINY, "--rounds", "1", "--compressors", specs, "--out", str(out)]
    assert cli.main(args) == 0
    capsys.readouterr()
    metrics = out / "fedsynth_batches=1_batch=2_outer_steps=1" / "metrics.jsonl"
    before = metrics.stat().st_mtime_ns
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert err.count("reused ") == 2, err
    assert metrics.stat().st_mtime_ns == before


def test_compressors_help_explains_the_comma_rule(capsys):
    with pytest.raises(SystemExit):
        cli.main(["compare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "a comma starts a new spec unless the piece after it is key=value without a colon" in text
    assert "is 3 specs" in text and "as typed" in text
    assert cli.split_specs("none,sz:rel=1e-2,target=weights,mask:keep=0.1,unbiased=true") == [
        "none", "sz:rel=1e-2,target=weights", "mask:keep=0.1,unbiased=true"]  # the help's own example


def test_run_plot_has_a_title(tmp_path, monkeypatch):
    from fedcompress.fedavg import plots

    titles = []
    real = plots.plot_accuracy_vs_mb
    monkeypatch.setattr(plots, "plot_accuracy_vs_mb", lambda s, path, title=None: titles.append(title) or real(
        s, path, title))  # fmt: skip
    assert cli.main(["run", *TINY, "--rounds", "1", "--compressor", "fp16", "--out", str(tmp_path)]) == 0
    assert titles[-1] == "fp16: digits, 3 clients, 1 rounds, seed 0"
    assert (tmp_path / "accuracy_vs_mb.png").read_bytes()[:4] == b"\x89PNG"


def test_pipelines_do_not_import_the_command_line():
    """BadInput lives in fedcompress.errors: the results and bench pipelines raise it without importing
    cli.py, and cli.py imports them only inside handlers (no cli <-> results cycle)."""
    code = (
        "import sys, fedcompress.experiments, fedcompress.benchtable, fedcompress.errors as e\n"
        "print('fedcompress.cli' in sys.modules)\n"
        "import fedcompress.cli as c\n"
        "print(c.BadInput is e.BadInput, 'fedcompress.experiments.report' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "True", "True"]


def test_bench_cli_prints_the_schema_table(tmp_path, capsys):
    """`fedcompress bench` end to end on a two-benchmark folder written here, following the extra_info
    schema: the table's op, provider, size, ratio and peer speed come from extra_info."""
    pytest.importorskip("pytest_benchmark")
    d = tmp_path / "bench"
    d.mkdir()
    (d / "bench_copy.py").write_text(
        "import time\n"
        "def _run(benchmark, provider, peer, secs):\n"
        "    benchmark.pedantic(time.sleep, args=(secs,), rounds=3, iterations=1)\n"
        "    benchmark.extra_info.update(schema=1, op='copy', provider=provider, input_bytes=2_000_000,\n"
        "                                payload_bytes=500_000, peer=peer)\n"
        "def test_fast(benchmark):\n"
        "    _run(benchmark, 'fc-fast', False, 0.01)\n"
        "def test_slow(benchmark):\n"
        "    _run(benchmark, 'other-lib', True, 0.04)\n"
    )
    rc = cli.main(["bench", "--bench-dir", str(d)])
    out = capsys.readouterr().out
    assert rc == 0, out
    fast = next(line for line in out.splitlines() if "| fc-fast |" in line)
    assert fast.startswith("| copy | fc-fast | 2.0 MB |") and "| 4.00 |" in fast  # ratio 2e6 / 5e5
    speed = float(fast.split("other-lib ")[1].split("x")[0])
    assert 2.0 < speed < 6.0  # 40 ms vs 10 ms sleeps, measured
    assert "| copy | other-lib | 2.0 MB |" in out and "(peer)" in out
