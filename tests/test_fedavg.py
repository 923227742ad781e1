"""FedAvg driver and models: parameter counts, averaging, byte accounting, reproducibility.

Runs are tiny (digits subsets, mlp, 1-2 rounds) so this file stays well under a minute.
"""

import json

import pytest
import torch

import fedcompress as fc
from fedcompress.api import RoundContext, local_sgd
from fedcompress.fedavg import data as D
from fedcompress.fedavg.driver import (
    ExperimentConfig,
    dense_payload_bytes,
    run_experiment,
    sample_clients,
    weighted_average,
)
from fedcompress.fedavg.models import build_model, count_parameters


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from 2 threads, and on a busy 2-core machine the OpenMP workers
    made these runs ~10x slower (0.2 s vs 2-5 s per run, measured); restore afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- models -----------------------------------------------------------------------------------


def _cnn_params(pad, side, classes):
    """Hand count: conv1 (1->32, 5x5), conv2 (32->64, 5x5), fc 512, fc C."""
    for _ in range(2):
        side = (side + 2 * pad - 4) // 2
    return (25 * 32 + 32) + (25 * 32 * 64 + 64) + (64 * side * side * 512 + 512) + (512 * classes + classes)


def test_model_parameter_counts():
    assert count_parameters(build_model("cnn", "mnist5k")) == _cnn_params(0, 28, 10) == 582026
    assert count_parameters(build_model("cnn", "femnist")) == _cnn_params(0, 28, 62)
    assert count_parameters(build_model("cnn", "digits")) == _cnn_params(2, 8, 10)
    assert count_parameters(build_model("mlp", "mnist")) == 784 * 200 + 200 + 200 * 200 + 200 + 2010 == 199210
    info = D.DatasetInfo("x", (1, 28, 28), 47)
    assert build_model("mlp", info)(torch.zeros(3, 1, 28, 28)).shape == (3, 47)
    assert build_model("cnn", {"input_shape": (1, 8, 8), "num_classes": 10})(
        torch.zeros(2, 1, 8, 8)
    ).shape == (2, 10)


def test_model_bad_names():
    with pytest.raises(ValueError, match="cnn, mlp"):
        build_model("resnet", "mnist5k")
    with pytest.raises(ValueError, match="mnist5k"):
        build_model("cnn", "cifar")


# -- pieces -----------------------------------------------------------------------------------


def test_weighted_average_by_hand():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, 8.0]), "n": torch.tensor(6)}
    avg = weighted_average([a, b], [1, 2])
    assert torch.allclose(avg["w"], torch.tensor([3.0, 6.0], dtype=torch.float64))
    assert float(avg["n"]) == 5.0
    with pytest.raises(ValueError):
        weighted_average([a], [1, 2])


def test_sample_clients():
    s = sample_clients(60, 10, seed=1, rnd=3)
    assert s == sorted(set(s)) and len(s) == 10 and all(0 <= c < 60 for c in s)
    assert s == sample_clients(60, 10, seed=1, rnd=3)
    assert s != sample_clients(60, 10, seed=1, rnd=4)
    assert sample_clients(5, 10, 0, 1) == [0, 1, 2, 3, 4]


def test_per_round_defaults():
    assert ExperimentConfig(clients=10).per_round() == 10
    assert ExperimentConfig(clients=60).per_round() == 10
    assert ExperimentConfig(clients=60, fraction=0.5).per_round() == 30
    assert ExperimentConfig(clients=60, clients_per_round=7, fraction=0.5).per_round() == 7


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"dataset": "cifar"}, "mnist5k"),
        ({"model": "vgg"}, "cnn, mlp"),
        ({"partition": "shards"}, "iid"),
        ({"partition": "natural"}, "femnist"),
        ({"rounds": 0}, "rounds"),
        ({"clients_per_round": 11}, "clients_per_round"),
        ({"fraction": 1.5}, "fraction"),
        ({"lr": -1.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"alpha": 0.0}, "alpha"),
        ({"seed": -1}, "seed"),
    ],
)
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        ExperimentConfig(**kw).validate()


# -- runs -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_small():
    """300 digits training samples over 3 iid clients, the full 360-sample test split."""
    ds = D.load_arrays("digits")
    ds.x_train, ds.y_train = ds.x_train[:300], ds.y_train[:300]
    parts = D.make_partitions(ds.y_train, 3, "iid", seed=0)
    return D.FederatedDataset(ds.info, ds.x_train, ds.y_train, ds.x_test, ds.y_test, partitions=parts)


def _cfg(**kw):
    base = dict(dataset="digits", model="mlp", clients=3, rounds=2, epochs=1, batch_size=16, lr=0.1, seed=0)
    base.update(kw)
    return ExperimentConfig(**base)


_TIMES = ("seconds", "encode_seconds", "decode_seconds", "train_seconds", "encode_cpu_seconds",
          "decode_cpu_seconds", "train_cpu_seconds")


def _strip(history):
    return [{k: v for k, v in r.items() if k not in _TIMES} for r in history]


def test_same_seed_same_run(digits_small):
    a = run_experiment(_cfg(), data=digits_small)
    b = run_experiment(_cfg(), data=digits_small)
    assert _strip(a["history"]) == _strip(b["history"])
    c = run_experiment(_cfg(seed=1), data=digits_small)
    assert _strip(c["history"]) != _strip(a["history"])


def test_fedavg_equals_hand_computed_round(digits_small):
    """One round with every client: the driver's model = size-weighted mean of local SGD states."""
    cfg = _cfg(rounds=1)
    torch.manual_seed(fc.api.mix_seed(cfg.seed, 0x30DE1))  # the driver's init seed
    model = build_model("mlp", digits_small.info)
    g0 = {k: v.clone() for k, v in model.state_dict().items()}
    n = digits_small.client_sizes()
    expected = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in g0.items()}
    for cid in range(3):
        ctx = RoundContext(round=1, client=cid, seed=0, epochs=1, batch_size=16, lr=0.1)
        local = local_sgd(model, g0, digits_small.client_data(cid), ctx)
        for k in expected:
            expected[k] += local[k].double() * n[cid] / sum(n)
    seen = []
    s = run_experiment(cfg, data=digits_small, on_round=seen.append)
    assert seen[0]["clients"] == [0, 1, 2]
    # Rebuild the driver's final model from its reported accuracy path: evaluate expected weights.
    model.load_state_dict({k: v.float() for k, v in expected.items()})
    from fedcompress.fedavg.driver import evaluate

    acc, loss = evaluate(model, digits_small.x_test, digits_small.y_test)
    assert acc == pytest.approx(s["final_accuracy"], abs=1e-9)
    assert loss == pytest.approx(s["final_loss"], rel=1e-5)


def test_bytes_accounting(digits_small):
    none = run_experiment(_cfg(), data=digits_small)
    fp16 = run_experiment(_cfg(compressor="fp16"), data=digits_small)
    model = build_model("mlp", digits_small.info)
    state = model.state_dict()
    dense = len(fc.get_compressor("none").compress(dict(state), RoundContext()))
    assert dense_payload_bytes(state) == dense > sum(v.numel() * 4 for v in state.values())
    for s in (none, fp16):
        assert s["dense_upstream_bytes"] == dense * 3 * 2  # 3 clients x 2 rounds
        assert s["download_bytes"] == dense * 3 * 2
        assert s["history"][0]["round_dense_bytes"] == dense * 3
    assert none["upstream_bytes"] == none["dense_upstream_bytes"] and none["compression_ratio"] == 1.0
    # fp16 halves the float data; headers stay: payload = dense - 2 bytes per parameter.
    params = count_parameters(model)
    assert fp16["upstream_bytes"] == (dense - 2 * params) * 6
    assert fp16["compression_ratio"] == pytest.approx(dense / (dense - 2 * params))
    h = fp16["history"]
    assert h[1]["upstream_bytes"] == h[0]["upstream_bytes"] + h[1]["round_upstream_bytes"]


def test_partial_participation_and_learning(digits_small):
    seen = []
    s = run_experiment(_cfg(clients_per_round=2, rounds=2, epochs=2), data=digits_small, on_round=seen.append)
    assert [len(r["clients"]) for r in seen] == [2, 2]
    assert s["initial_accuracy"] < 0.3 < 0.5 < s["final_accuracy"]


class _Counting(fc.Compressor):
    """Sends the raw delta via `none` but records every call (checks the driver's use of the API)."""

    calls: list = []

    def compress(self, update, ctx):
        return fc.get_compressor("none").compress(update, ctx)

    def decompress(self, payload, ctx):
        return fc.get_compressor("none").decompress(payload, ctx)

    def client_update(self, model, global_state, data, ctx):
        type(self).calls.append(
            ("client", ctx.round, ctx.client, ctx.epochs, ctx.batch_size, ctx.lr, len(data[1]))
        )
        return super().client_update(model, global_state, data, ctx)

    def server_update(self, payload, global_state, ctx):
        type(self).calls.append(("server", ctx.round, ctx.client))
        return super().server_update(payload, global_state, ctx)


def test_driver_calls_compressor_api(digits_small):
    fc.register("test-counting")(_Counting)
    _Counting.calls.clear()
    try:
        run_experiment(_cfg(compressor="test-counting", rounds=1, lr=0.2, batch_size=8), data=digits_small)
    finally:
        fc.api._REGISTRY.pop("test-counting", None)  # leave the registry as other tests expect it
    sizes = digits_small.client_sizes()
    assert _Counting.calls == [
        c for cid in range(3) for c in (("client", 1, cid, 1, 8, 0.2, sizes[cid]), ("server", 1, cid))
    ]


def test_outputs_and_bad_spec(digits_small, tmp_path):
    s = run_experiment(_cfg(rounds=2), data=digits_small, out_dir=tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for key in (
        "accuracy",
        "loss",
        "upstream_bytes",
        "round_upstream_bytes",
        "dense_upstream_bytes",
        "ratio",
        "download_bytes",
        "seconds",
    ):
        assert key in rows[0]
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in (
        "final_accuracy",
        "upstream_bytes",
        "dense_upstream_bytes",
        "compression_ratio",
        "rounds",
        "wall_seconds",
        "config",
    ):
        assert key in summary
    assert summary["final_accuracy"] == s["final_accuracy"] == rows[-1]["accuracy"]
    assert (tmp_path / "accuracy_vs_mb.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="valid choices"):
        run_experiment(_cfg(compressor="nope"), data=digits_small)


# -- codec time and byte budgets in the metrics ------------------------------------------------


@pytest.mark.parametrize("spec", ["none", "mask:ratio=8", "sz:ratio=8", "sz:rel=1e-2"])
def test_metrics_times_and_ratios(digits_small, tmp_path, spec):
    s = run_experiment(_cfg(compressor=spec, rounds=2), data=digits_small, out_dir=tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "summary.json").read_text())
    for r in rows:
        for key in ("encode_seconds", "decode_seconds", "train_seconds", "round_ratio"):
            assert key in r, key
        t = (r["encode_seconds"], r["decode_seconds"], r["train_seconds"])
        assert all(x >= 0 for x in t) and r["train_seconds"] > 0
        assert sum(t) <= r["seconds"]  # all three lie inside the round's wall time
        assert r["round_ratio"] == pytest.approx(r["round_dense_bytes"] / r["round_upstream_bytes"])
        if "ratio=" in spec:
            assert r["round_ratio"] >= 8.0
            assert [c["client"] for c in r["chosen"]] == r["clients"]
            for c in r["chosen"]:
                assert c["ratio"] >= 8.0
                assert ("rel" in c and 0 < c["rel"] <= 1) if spec.startswith("sz") else 0 < c["keep"] < 1
        else:
            assert "chosen" not in r
    for key in ("encode_seconds", "decode_seconds", "train_seconds"):
        assert summary[key] == pytest.approx(sum(r[key] for r in rows))
        cpu = key.replace("_seconds", "_cpu_seconds")
        assert summary[cpu] == pytest.approx(sum(r[cpu] for r in rows)) and summary[cpu] >= 0
    e, d, t = summary["encode_seconds"], summary["decode_seconds"], summary["train_seconds"]
    assert summary["codec_overhead"] == pytest.approx((e + d) / (t + e + d))
    ce, cd, ct = (summary[f"{k}_cpu_seconds"] for k in ("encode", "decode", "train"))
    assert summary["codec_overhead_cpu"] == pytest.approx((ce + cd) / (ct + ce + cd))
    assert ct > 0 and 0 <= summary["codec_overhead_cpu"] < 1
    assert 0 <= summary["codec_overhead"] < 1
    assert e + d + t <= summary["wall_seconds"]
    assert s["codec_overhead"] == summary["codec_overhead"]


def test_codec_clock_counts_only_compress(digits_small):
    """A compressor whose compress sleeps 200 ms: encode_seconds sees it, train_seconds does not."""
    import time as _time

    class _Slow(fc.Compressor):
        def compress(self, update, ctx):
            _time.sleep(0.2)
            return fc.get_compressor("none").compress(update, ctx)

        def decompress(self, payload, ctx):
            _time.sleep(0.02)
            return fc.get_compressor("none").decompress(payload, ctx)

    run_experiment(_cfg(rounds=1), data=digits_small)  # warm up: torch's first backward takes ~1 s
    fc.register("test-slow")(_Slow)
    try:
        s = run_experiment(_cfg(compressor="test-slow", rounds=1), data=digits_small)
    finally:
        fc.api._REGISTRY.pop("test-slow", None)
    r = s["history"][0]
    assert 3 * 0.2 <= r["encode_seconds"] < 3 * 0.2 + 0.5
    assert 3 * 0.02 <= r["decode_seconds"] < 3 * 0.02 + 0.5
    # local SGD of 100 digits per client takes a few ms each; the 0.6 s of sleeps are not training
    assert r["train_seconds"] < 3 * 0.2
    # a sleep is wall time, not CPU time: the CPU columns see only the small none codec
    assert r["encode_cpu_seconds"] < 0.2 and r["decode_cpu_seconds"] < 0.2


def test_final_line_names_the_spec_as_typed():
    from fedcompress.fedavg.driver import final_line

    s = {"compressor": "sz:rel=0.01,abs=0.0,min_lossy=1024,target=update,ef=False",
         "config": {"compressor": "sz:rel=1e-2"}, "final_accuracy": 0.907, "rounds": 2,
         "upstream_bytes": 4_165_000, "dense_upstream_bytes": 46_569_000, "compression_ratio": 11.18,
         "wall_seconds": 7.4}
    assert final_line(s).startswith("sz:rel=1e-2: accuracy 90.70% after 2 rounds, 4.165 MB sent up")
    assert final_line({k: v for k, v in s.items() if k != "config"}).startswith("sz:rel=0.01,abs=0.0")


class _PoisonFromRound2(fc.Compressor):
    """`none`, except that from round 2 the server's decoded update is NaN (a diverging run)."""

    def compress(self, update, ctx):
        return fc.get_compressor("none").compress(update, ctx)

    def decompress(self, payload, ctx):
        return fc.get_compressor("none").decompress(payload, ctx)

    def server_update(self, payload, global_state, ctx):
        delta = super().server_update(payload, global_state, ctx)
        if ctx.round >= 2:
            delta = {k: v * float("nan") if v.is_floating_point() else v for k, v in delta.items()}
        return delta


def test_run_stops_in_the_round_its_model_goes_non_finite(digits_small, tmp_path):
    from fedcompress.experiments.cache import load_cached
    from fedcompress.fedavg.driver import final_line

    fc.register("test-poison")(_PoisonFromRound2)
    try:
        cfg = _cfg(compressor="test-poison", rounds=4)
        s = run_experiment(cfg, data=digits_small, out_dir=tmp_path)
    finally:
        fc.api._REGISTRY.pop("test-poison", None)
    assert s["diverged_round"] == 2 and s["rounds_run"] == 2 and s["rounds"] == 4
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert "diverged" not in rows[0] and rows[1]["diverged"] is True
    assert s["final_accuracy"] == rows[1]["accuracy"]
    assert "diverged in round 2 of 4" in final_line(s)
    # the cache takes the stopped run as finished (its rounds end where it diverged); revision=0 is
    # the unregistered test compressor's (load_cached would look it up in the registry otherwise)
    cached = load_cached(str(tmp_path), cfg.to_dict(), cfg.rounds, revision=0)
    assert cached is not None and cached["diverged_round"] == 2
    # a run that stopped early without diverging is not finished
    summary = json.loads((tmp_path / "summary.json").read_text())
    summary["diverged_round"] = None
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert load_cached(str(tmp_path), cfg.to_dict(), cfg.rounds, revision=0) is None


def test_finite_run_has_no_diverged_round(digits_small):
    s = run_experiment(_cfg(rounds=2), data=digits_small)
    assert s["diverged_round"] is None and s["rounds_run"] == 2
    assert not any("diverged" in r for r in s["history"])
