"""Flower integration: the example app on Flower's own runtimes must match the in-process driver.

(a) deployment: ``flower-superlink --insecure`` and two ``flower-supernode`` processes on
127.0.0.1 (free ports), ``flwr run examples/flower`` for every compressor that exists; the final
global weights must equal ``fedcompress.fedavg.run_experiment``'s on the same seeds, split, client
order and local training, and the upstream bytes per round must equal the driver's (so they shrink by
the compressor's ratio). (b) the same app through ``flwr.simulation.run_simulation`` (Ray).
Plus the Mod and the Strategy alone: corrupt replies are dropped and counted, bad specs raise.

All Flower state lives in tmp dirs (FLWR_HOME, HOME, RAY_TMPDIR); every process started here is
stopped (SIGTERM SuperNodes, then the SuperLink; SIGKILL after a timeout), also on failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.flower
flwr = pytest.importorskip("flwr", reason="flwr is not installed: pip install 'fedcompress[flower]'")

import fedcompress as fc  # noqa: E402
from fedcompress.fedavg import driver as fedavg_driver  # noqa: E402
from fedcompress.fedavg.data import load_dataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "flower"
sys.path.insert(0, str(EXAMPLE))  # the example app and its local_deployment helper
from local_deployment import CONNECTION, Deployment, flower_env, free_port, signal_group  # noqa: E402

ROUNDS = 2
SAMPLES_PER_CLIENT = 100  # 5 local steps of 20: the weights move, the test stays quick
RUN_CONFIG = {
    "num-server-rounds": ROUNDS,
    "seed": 0,
    "dataset": "mnist5k",
    "model": "cnn",
    "partition": "iid",
    "epochs": 1,
    "batch-size": 20,
    "lr": 0.05,
    "samples-per-client": SAMPLES_PER_CLIENT,
    "torch-threads": 1,  # same thread count as the driver run below: same float results
    "min-nodes": 2,
}
# spec -> (smallest, largest) acceptable dense/compressed ratio of the upstream bytes
SPECS = {
    "none": (1.0, 1.0),
    "sz:rel=1e-2": (5.0, 1e9),  # 20.3 measured on this config
    "mask:keep=0.125": (7.0, 9.0),
    # FedSynth sends synthetic data and the server replays training on its model (74 measured).
    "fedsynth:batches=2,batch=5,outer_steps=2": (20.0, 1e9),
}


def _missing(spec: str) -> str | None:
    """None if ``spec`` builds, else why not (its module is missing: the compressor has not landed)."""
    try:
        fc.get_compressor(spec)
    except ImportError as e:
        return f"compressor {spec!r} not available: {e}"
    return None


def _spec_param(spec: str):
    why = _missing(spec)
    return pytest.param(spec, marks=pytest.mark.skip(reason=why)) if why else spec


SPEC_PARAMS = [_spec_param(s) for s in SPECS]


# ---------------------------------------------------------------------------------------------
# Reference: the in-process driver on the same config


_driver_cache: dict[str, tuple[dict, dict, dict]] = {}


def driver_reference(spec: str) -> tuple[dict[str, torch.Tensor], dict, dict[str, torch.Tensor]]:
    """(final global state, summary, initial state) of run_experiment with RUN_CONFIG and ``spec``."""
    if spec in _driver_cache:
        return _driver_cache[spec]
    cfg = fedavg_driver.ExperimentConfig(
        dataset="mnist5k",
        clients=2,
        rounds=ROUNDS,
        compressor=spec,
        model="cnn",
        epochs=1,
        batch_size=20,
        lr=0.05,
        seed=0,
    )
    data = load_dataset("mnist5k", 2, "iid", 0.5, 0)
    data.limit_clients(SAMPLES_PER_CLIENT, 0)
    models = []
    real_build = fedavg_driver.build_model

    def capture(*a, **k):  # the driver's model ends each round loaded with the global state
        m = real_build(*a, **k)
        models.append(m)
        return m

    threads = torch.get_num_threads()
    fedavg_driver.build_model = capture
    torch.set_num_threads(1)
    try:
        summary = fedavg_driver.run_experiment(cfg, data=data)
    finally:
        fedavg_driver.build_model = real_build
        torch.set_num_threads(threads)
    assert len(models) == 1
    torch.manual_seed(fc.api.mix_seed(0, 0x30DE1))
    init = real_build("cnn", data.info).state_dict()
    final = {k: v.detach().clone() for k, v in models[0].state_dict().items()}
    _driver_cache[spec] = (final, summary, init)
    return _driver_cache[spec]


def check_against_driver(spec: str, out_dir: Path) -> dict:
    """Flower's final weights and per-round bytes equal the driver's; returns Flower's metrics."""
    metrics = json.loads((out_dir / "metrics.json").read_text())
    state = fc.get_compressor("none").decompress(
        (out_dir / "final_weights.fcmp").read_bytes(), fc.RoundContext()
    )
    final, summary, init = driver_reference(spec)
    assert list(state) == list(final)
    assert any(not torch.equal(final[k], init[k]) for k in final), "training did not move the weights"
    for k in final:
        torch.testing.assert_close(
            state[k], final[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{spec} {k}: {m}"
        )
    rounds = metrics["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    for r, d in zip(rounds, summary["history"], strict=True):
        assert r["replies-accepted"] == 2 and r["replies-dropped"] == 0 and r["replies-failed"] == 0
        assert r["upstream-bytes"] == d["round_upstream_bytes"]
        assert r["dense-upstream-bytes"] == d["round_dense_bytes"]
        assert r["accuracy"] == pytest.approx(d["accuracy"], abs=1e-3)
    lo, hi = SPECS[spec]
    ratio = metrics["dense_upstream_bytes"] / metrics["upstream_bytes"]
    assert lo <= ratio <= hi, f"{spec}: upstream ratio {ratio:.3f} outside [{lo}, {hi}]"
    assert ratio == pytest.approx(summary["compression_ratio"], rel=1e-9)
    return metrics


# ---------------------------------------------------------------------------------------------
# (a) Deployment runtime: SuperLink + 2 SuperNodes on loopback


class Simulation:
    """``run_simulation`` of the example in a child process (its own process group), with a timeout.

    A child process keeps Ray's signal handlers, threads and log handlers out of pytest, and a hung
    simulation is killed instead of hanging the test run: when ``ray.init`` fails, Flower's
    ServerApp thread waits for nodes forever.
    """

    def __init__(self, base: Path, overrides: dict) -> None:
        self.env = flower_env(base)
        # Ray puts AF_UNIX sockets under RAY_TMPDIR and refuses paths over 107 bytes (pytest's
        # tmp_path is too deep), so a short dir in /tmp.
        self.ray_tmp = tempfile.mkdtemp(prefix="fcray-", dir="/tmp" if os.path.isdir("/tmp") else None)
        self.env["RAY_TMPDIR"] = self.ray_tmp
        # Ray workers unpickle the apps, so they must import fedcompress_app too.
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(EXAMPLE), self.env.get("PYTHONPATH")]))
        self.log = base / "simulation.log"
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", SIMULATION_SCRIPT, json.dumps(overrides)],
                env=self.env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def wait(self, timeout: float) -> str | None:
        """None on success, else what went wrong (with the log's tail)."""
        try:
            rc = self.proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            rc = None
        if rc == 0:
            return None
        tail = self.log.read_text(errors="replace")[-6000:]
        return f"run_simulation {'timed out' if rc is None else f'exited with {rc}'}:\n{tail}"

    def stop(self) -> None:
        signal_group(self.proc, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            signal_group(self.proc, signal.SIGKILL)
            self.proc.wait(timeout=15)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The README's Flower section: its commands are the ones the deployment tests run


def readme_flower_section() -> dict:
    """The README's Flower section: python snippet, SuperLink/SuperNode command lines, config.toml,
    and the `flwr run` line."""
    import re

    text = (ROOT / "README.md").read_text()
    sec = text[text.index("## Running on Flower") :]
    sec = sec[: sec.index("\n## ", 5)]
    bash = "\n".join(re.findall(r"```bash\n(.*?)```", sec, flags=re.S)).splitlines()
    (toml,) = re.findall(r"```toml\n(.*?)```", sec, flags=re.S)
    (python,) = re.findall(r"```python\n(.*?)```", sec, flags=re.S)
    pick = lambda word: [ln.split("#")[0].strip() for ln in bash if ln.startswith(word)]  # noqa: E731
    return {"python": python, "toml": toml, "superlink": pick("flower-superlink"),
            "supernodes": pick("flower-supernode"), "flwr_run": pick("flwr run"), "pip": pick("pip ")}  # fmt: skip


def readme_flower_commands() -> dict:
    """The README's one-machine commands and config.toml with its ports swapped for free ones."""
    import shlex

    sec = readme_flower_section()
    lines = sec["superlink"] + sec["supernodes"]
    ports = sorted({int(p) for ln in lines for p in re.findall(r"(?<=[ :])(\d{4,5})\b", ln)})
    swap = {p: free_port() for p in ports}

    def sub(line: str) -> str:
        return re.sub(r"(?<=[ :])(\d{4,5})\b", lambda m: str(swap[int(m.group(1))]), line)

    (link,) = sec["superlink"]
    port = swap[int(shlex.split(link)[shlex.split(link).index("--port") + 1])]
    nodes = [shlex.split(sub(ln)) for ln in sec["supernodes"]]
    return {
        "superlink": shlex.split(sub(link)),
        "supernodes": nodes,
        "port": port,
        "node_ports": [int(n[n.index("--port") + 1]) for n in nodes],
        "config_toml": sub(sec["toml"]),
    }


SIMULATION_SPEC = "none" if _missing("mask:keep=0.125") else "mask:keep=0.125"


@pytest.fixture(scope="module")
def flower_runs(tmp_path_factory):
    """Run everything at once: the simulation, and the deployment with one run per compressor.

    Concurrent runs overlap Flower's fixed polling waits (~5 s a round) and Ray's start-up, and the
    driver references are computed meanwhile. Yields {"deployment": {spec: (out_dir, error)},
    "simulation": (out_dir, error)}, error None on success; every process is stopped afterwards.
    """
    base = tmp_path_factory.mktemp("flower")
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]
    if shutil.which("flower-superlink", path=path) is None:
        pytest.skip("flower-superlink is not on PATH")
    specs = [s for s in SPECS if _missing(s) is None]
    results: dict = {"deployment": {}, "simulation": (None, "Ray is not installed")}
    sim = dep = None
    try:
        t_end = time.monotonic() + 480
        try:
            import ray  # noqa: F401

            sim_out = base / "sim-out"
            sim = Simulation(base, {**RUN_CONFIG, "compressor": SIMULATION_SPEC, "out-dir": str(sim_out)})
        except ImportError:
            pass
        dep = Deployment(base, commands=readme_flower_commands())  # the README's commands, free ports
        dep.start()
        runs = {}
        for spec in specs:
            out = base / ("out-" + spec.replace(":", "_").replace("=", "_"))
            runs[spec] = (dep.submit({**RUN_CONFIG, "compressor": spec, "out-dir": str(out)}), out)
        bad_run = dep.submit({**RUN_CONFIG, "compressor": "bogus:keep=2"})
        for spec in specs:
            driver_reference(spec)
        for spec, (run_id, out) in runs.items():
            try:
                dep.wait_run(run_id, max(1.0, t_end - time.monotonic()), out / "final_weights.fcmp")
                results["deployment"][spec] = (out, None)
            except (AssertionError, TimeoutError, RuntimeError) as e:
                results["deployment"][spec] = (None, str(e))
        try:
            dep.wait_run(bad_run, max(1.0, t_end - time.monotonic()))
            results["bad-spec"] = None
        except AssertionError as e:
            results["bad-spec"] = str(e)
        if sim is not None:
            err = sim.wait(t_end - time.monotonic())
            results["simulation"] = (None if err else sim_out, err)
        yield results
    finally:
        if dep is not None:
            dep.stop()
        if sim is not None:
            sim.stop()


@pytest.mark.parametrize("spec", SPEC_PARAMS)
def test_deployment_matches_driver(flower_runs, spec):
    out, error = flower_runs["deployment"][spec]
    assert error is None, error
    check_against_driver(spec, out)


def test_deployment_unknown_spec_fails_the_run(flower_runs):
    error = flower_runs["bad-spec"]
    assert error is not None, "a run with an unknown compressor completed"
    assert "finished:failed" in error and "unknown compressor 'bogus'" in error, error


def test_simulation_matches_driver(flower_runs):
    pytest.importorskip("ray", reason="run_simulation needs Ray: pip install 'flwr[simulation]==1.41.0'")
    out, error = flower_runs["simulation"]
    assert error is None, error
    check_against_driver(SIMULATION_SPEC, out)


SIMULATION_SCRIPT = """
import json, sys
from flwr.simulation import run_simulation
from fedcompress_app.client_app import build_client_app
from fedcompress_app.server_app import build_server_app
overrides = json.loads(sys.argv[1])
run_simulation(
    build_server_app(overrides),
    build_client_app(overrides),
    num_supernodes=2,
    backend_config={
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": 2, "include_dashboard": False},
    },
)
"""


# ---------------------------------------------------------------------------------------------
# The Mod and the Strategy alone (no processes): plumbing, bad replies, bad specs

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from fedcompress.flower import CLIENT_KEY, PAYLOAD_KEY, CompressedFedAvg, compression_mod  # noqa: E402

NODES = {11: 0, 12: 1}  # node id -> partition id
EXAMPLES = {0: 30, 1: 90}


@pytest.fixture
def task_identity():
    # Messages need the identity flwr's runtimes set in their processes.
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


class StubGrid:
    def __init__(self):
        self.calls = 0

    def get_node_ids(self):
        self.calls += 1
        return list(NODES)


def small_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "fc1.weight": torch.randn(40, 37, generator=g),
        "fc1.bias": torch.randn(40, generator=g),
        "head.weight": torch.randn(3, 40, generator=g, dtype=torch.float64),
        "steps": torch.tensor([seed], dtype=torch.int64),
    }


def local_of(glob, cid):
    # What "training" produced on client cid: a fixed, client-specific update.
    d = small_state(100 + cid)
    return {k: glob[k] + (d[k] * 0.01).to(glob[k].dtype) if glob[k].is_floating_point() else glob[k] + cid + 1
            for k in glob}  # fmt: skip


def node_context(node: int) -> Context:
    return Context(
        run_id=1, node_id=node, node_config={"partition-id": NODES[node]}, state=RecordDict(), run_config={}
    )


def fake_train(msg: Message, ctxt: Context) -> Message:
    glob = {k: torch.from_numpy(v.numpy().copy()) for k, v in msg.content["arrays"].items()}
    cid = ctxt.node_config["partition-id"]
    arrays = ArrayRecord({k: Array(v.numpy()) for k, v in local_of(glob, cid).items()})
    metrics = MetricRecord({"num-examples": EXAMPLES[cid], "train-loss": float(cid)})
    return Message(content=RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


def one_round(spec: str, seed: int = 5, mod_spec: str | None = None):
    strategy = CompressedFedAvg(spec, seed=seed)
    glob = small_state(0)
    msgs = list(strategy.configure_train(1, ArrayRecord({k: Array(v.numpy()) for k, v in glob.items()}),
                                         ConfigRecord(), StubGrid()))  # fmt: skip
    mod = compression_mod(mod_spec or spec)
    replies = [mod(m, node_context(m.metadata.dst_node_id), fake_train) for m in msgs]
    return strategy, glob, replies


def expected_average(spec: str, glob, seed: int, clients=(0, 1)):
    """glob + sum_i n_i decode(encode(delta_i)) / sum_i n_i, computed here in float64."""
    comp = fc.get_compressor(spec)
    total = sum(EXAMPLES[c] for c in clients)
    out = {}
    decoded = {}
    for c in clients:
        delta = {k: local_of(glob, c)[k] - glob[k] for k in glob}
        decoded[c] = comp.decompress(comp.compress(delta, fc.RoundContext(round=1, client=c, seed=seed)),
                                     fc.RoundContext(round=1, client=c, seed=seed))  # fmt: skip
    for k, v in glob.items():
        avg = sum(decoded[c][k].double() * EXAMPLES[c] for c in clients) / total
        out[k] = (v.double() + avg).to(v.dtype) if v.is_floating_point() else v + torch.round(avg).to(v.dtype)
    return out


def state_of(arrays: ArrayRecord):
    return {k: torch.from_numpy(v.numpy().copy()) for k, v in arrays.items()}


@pytest.mark.parametrize("spec", ["none", "fp16", pytest.param("mask:keep=0.25", marks=pytest.mark.skipif(
    _missing("mask:keep=0.25") is not None, reason=str(_missing("mask:keep=0.25"))))])  # fmt: skip
def test_mod_and_strategy_round(task_identity, spec):
    strategy, glob, replies = one_round(spec)
    for r in replies:
        assert not r.has_error(), r.error
        (rec,) = r.content.array_records.values()
        assert list(rec) == [PAYLOAD_KEY] and rec[PAYLOAD_KEY].stype == "fedcompress.payload"
        with pytest.raises(TypeError):  # a plain FedAvg cannot mistake it for weights
            rec[PAYLOAD_KEY].numpy()
    assert sorted(r.content["metrics"][CLIENT_KEY] for r in replies) == [0, 1]
    arrays, metrics = strategy.aggregate_train(1, list(reversed(replies)))
    got, want = state_of(arrays), expected_average(spec, glob, seed=5)
    assert list(got) == list(glob)
    for k in want:
        assert got[k].dtype == glob[k].dtype
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)
    up = sum(len(r.content.array_records["arrays"][PAYLOAD_KEY].data) for r in replies)
    assert metrics["upstream-bytes"] == up
    assert metrics["dense-upstream-bytes"] == 2 * fedavg_driver.dense_payload_bytes(glob)
    assert metrics["replies-accepted"] == 2 and metrics["replies-dropped"] == 0
    assert metrics["train-loss"] == pytest.approx(90 / 120)  # FedAvg's weighted client metric survives
    assert CLIENT_KEY not in metrics
    if spec == "none":
        assert metrics["compression-ratio"] == 1.0
    assert strategy.history[-1]["upstream-bytes"] == up


@pytest.mark.skipif(_missing("sz") is not None, reason=str(_missing("sz")))
def test_client_state_survives_a_fresh_mod_per_message(task_identity):
    """Flower builds the ClientApp, and so the Mod and its compressor, anew for every message (a fresh
    process in deployment, unpickled per message in simulation). Error feedback's residual and the
    ratio search's start must come back from the node's Context.state: with a new Mod per message
    and one Context per node, every payload of 3 rounds equals one in-process compressor's."""
    spec = "sz:ratio=2,ef=1"
    strategy = CompressedFedAvg(spec, seed=5)
    glob = small_state(0)
    contexts = {n: node_context(n) for n in NODES}
    ref = fc.get_compressor(spec)
    differs = 0
    for rnd in (1, 2, 3):
        msgs = strategy.configure_train(rnd, ArrayRecord({k: Array(v.numpy()) for k, v in glob.items()}),
                                        ConfigRecord(), StubGrid())  # fmt: skip
        for m in msgs:
            node = m.metadata.dst_node_id
            reply = compression_mod(spec)(m, contexts[node], fake_train)
            assert not reply.has_error(), reply.error
            got = bytes(reply.content.array_records["arrays"][PAYLOAD_KEY].data)
            cid = NODES[node]
            delta = {k: local_of(glob, cid)[k] - glob[k] for k in glob}
            ctx = fc.RoundContext(round=rnd, client=cid, seed=5)
            want = ref.compress(delta, ctx)
            assert got == want, (rnd, cid)
            differs += fc.get_compressor(spec).compress(delta, ctx) != want  # what a stateless Mod sends
    assert differs == 4  # rounds 2 and 3 of both clients: the residual is in their payloads


def test_context_reaches_the_decoder(task_identity):
    # The mask depends on (seed, round, client): decoding with another seed must give other values,
    # so equality above proves the server rebuilt each client's RoundContext.
    if _missing("mask:keep=0.25"):
        pytest.skip(_missing("mask:keep=0.25"))
    strategy, glob, replies = one_round("mask:keep=0.25", seed=5)
    arrays, _ = strategy.aggregate_train(1, replies)
    wrong = expected_average("mask:keep=0.25", glob, seed=6)
    assert not torch.allclose(state_of(arrays)["fc1.weight"], wrong["fc1.weight"])


def _corrupt(reply: Message, how: str) -> None:
    rec = reply.content.array_records["arrays"]
    arr = rec[PAYLOAD_KEY]
    data = bytearray(arr.data)
    if how == "flip":
        data[len(data) // 2] ^= 0x40
        rec[PAYLOAD_KEY] = Array(dtype="uint8", shape=(len(data),), stype=arr.stype, data=bytes(data))
    elif how == "truncate":
        rec[PAYLOAD_KEY] = Array(dtype="uint8", shape=(10,), stype=arr.stype, data=bytes(data[:10]))
    elif how == "stype":
        rec[PAYLOAD_KEY] = Array(dtype="uint8", shape=(len(data),), stype="numpy.ndarray", data=bytes(data))
    elif how == "codec":
        other = fc.get_compressor("fp16").compress({"x": torch.ones(3)}, fc.RoundContext())
        rec[PAYLOAD_KEY] = Array(dtype="uint8", shape=(len(other),), stype=arr.stype, data=other)
    elif how == "names":
        other = fc.get_compressor("none").compress({"x": torch.ones(3)}, fc.RoundContext())
        rec[PAYLOAD_KEY] = Array(dtype="uint8", shape=(len(other),), stype=arr.stype, data=other)
    elif how == "client":
        del reply.content["metrics"][CLIENT_KEY]
    elif how == "weight":
        reply.content["metrics"]["num-examples"] = -1
    elif how == "extra-key":
        rec["more"] = Array(torch.ones(2).numpy())


@pytest.mark.parametrize(
    "how", ["flip", "truncate", "stype", "codec", "names", "client", "weight", "extra-key"]
)
def test_bad_reply_is_dropped_and_counted(task_identity, how, caplog):
    strategy, glob, replies = one_round("none")
    bad = next(r for r in replies if r.content["metrics"][CLIENT_KEY] == 1)
    _corrupt(bad, how)
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["replies-dropped"] == 1 and metrics["replies-accepted"] == 1
    got, want = state_of(arrays), expected_average("none", glob, seed=5, clients=(0,))
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)


def test_all_replies_bad_keeps_the_model(task_identity):
    strategy, glob, replies = one_round("none")
    for r in replies:
        _corrupt(r, "flip")
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is None  # Strategy.start keeps the previous global model
    assert metrics["replies-dropped"] == 2 and metrics["replies-accepted"] == 0


def test_error_reply_is_counted(task_identity):
    strategy, glob, replies = one_round("none")
    from flwr.app import Error

    replies[0] = Message(Error(code=2, reason="boom"), reply_to=Message(
        content=RecordDict(), message_type=MessageType.TRAIN, dst_node_id=11))  # fmt: skip
    _, metrics = strategy.aggregate_train(1, replies)
    assert metrics["replies-failed"] == 1 and metrics["replies-accepted"] == 1


def test_mod_refuses_a_server_with_another_spec(task_identity):
    _, _, replies = one_round("none", mod_spec="fp16")
    assert all(r.has_error() and "differs" in r.error.reason for r in replies)


def test_mod_refuses_a_plain_fedavg_server(task_identity):
    msg = Message(content=RecordDict({"arrays": ArrayRecord({"w": Array(torch.ones(2).numpy())}),
                                      "config": ConfigRecord({"server-round": 1})}),
                  message_type=MessageType.TRAIN, dst_node_id=11)  # fmt: skip
    r = compression_mod("none")(msg, node_context(11), fake_train)
    assert r.has_error() and "CompressedFedAvg" in r.error.reason


def test_mod_passes_other_messages_through(task_identity):
    msg = Message(content=RecordDict({"config": ConfigRecord({"x": 1})}), message_type=MessageType.EVALUATE,
                  dst_node_id=11)  # fmt: skip
    sentinel = Message(content=RecordDict({"metrics": MetricRecord({"acc": 0.5})}), reply_to=msg)
    assert compression_mod("none")(msg, node_context(11), lambda m, c: sentinel) is sentinel


@pytest.mark.parametrize("spec, word", [("bogus", "valid choices"), ("none:x=1", "valid keys"),
                                        ("fp16:", "ends with")])  # fmt: skip
def test_bad_spec_fails_at_construction(spec, word):
    with pytest.raises(ValueError, match=word):
        CompressedFedAvg(spec)
    with pytest.raises(ValueError, match=word):
        compression_mod(spec)


def test_replaying_compressor_needs_a_model():
    if _missing("fedsynth"):
        pytest.skip(_missing("fedsynth"))
    with pytest.raises(ValueError, match="model"):
        CompressedFedAvg("fedsynth")
    CompressedFedAvg("fedsynth", model=torch.nn.Linear(2, 2))


def test_bad_seed_fails_at_construction():
    with pytest.raises(ValueError, match="seed"):
        CompressedFedAvg("none", seed=-1)


def test_server_app_with_bad_spec_contacts_no_node(task_identity):
    from fedcompress_app.server_app import build_server_app

    grid = StubGrid()
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={"compressor": "bogus"})
    with pytest.raises(ValueError, match="unknown compressor"):
        build_server_app()(grid, ctx)
    assert grid.calls == 0


# ---------------------------------------------------------------------------------------------
# Issue 16.5: the README's Flower section is copy-paste runnable (no processes here; the deployment
# tests above run its commands)


def test_readme_flower_snippet_runs():
    sec = readme_flower_section()
    ns: dict = {}
    exec(compile(sec["python"], "README.md (Flower)", "exec"), ns)
    assert isinstance(ns["app"], flwr.clientapp.ClientApp)
    assert isinstance(ns["strategy"], CompressedFedAvg)


def test_readme_flower_commands_fit_one_machine():
    """Two SuperNodes on one machine: distinct ports and partition-ids 0..N-1; the config.toml
    connection is the one `flwr run` names and points at the SuperLink's port."""
    import shlex

    import tomllib

    sec = readme_flower_section()
    nodes = [shlex.split(ln) for ln in sec["supernodes"]]
    assert len(nodes) >= 2
    ports = [n[n.index("--port") + 1] for n in nodes]
    assert len(set(ports)) == len(ports)
    cfgs = [dict(kv.split("=") for kv in n[n.index("--node-config") + 1].split()) for n in nodes]
    assert sorted(int(c["partition-id"]) for c in cfgs) == list(range(len(nodes)))
    assert {int(c["num-partitions"]) for c in cfgs} == {len(nodes)}
    link = shlex.split(sec["superlink"][0])
    conf = tomllib.loads(sec["toml"])
    name = conf["superlink"]["default"]
    assert name == CONNECTION  # the name local_deployment's flwr calls use
    assert conf["superlink"][name]["address"].endswith(":" + link[link.index("--port") + 1])
    assert all(n[n.index("--superlink") + 1] == conf["superlink"][name]["address"] for n in nodes)
    assert "--disable-runtime-dependency-installation" in link


def test_readme_flwr_run_line_names_the_app_and_its_config_keys():
    import shlex

    import tomllib

    sec = readme_flower_section()
    (line,) = sec["flwr_run"]
    argv = shlex.split(line)
    assert argv[:4] == ["flwr", "run", "examples/flower", CONNECTION]
    app = tomllib.loads((ROOT / argv[2] / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    overrides = tomllib.loads("\n".join(argv[argv.index("--run-config") + 1].split()))
    assert set(overrides) <= set(app), set(overrides) - set(app)
    fc.get_compressor(overrides["compressor"])  # the spec builds
    # the install line: from the checkout with the flower extra (fedcompress is not on PyPI)
    assert any('pip install -e ".[flower]"' in p for p in sec["pip"])
    assert all("fedcompress[flower]" not in p for p in sec["pip"])


# ---------------------------------------------------------------------------------------------
# Text (issue 15, item 6): a next-word LSTM round on token data goes through the Mod and the
# Strategy unchanged (compressors see only a state dict, whatever the model's input is).


def test_text_round_through_mod_and_strategy(task_identity, tmp_path):
    from fedcompress.api import RoundContext, apply_delta, local_sgd
    from fedcompress.fedavg.models import build_model

    folder = tmp_path / "fortunes"
    folder.mkdir()
    for name, words in {"cats": "the cat sat on the mat", "dogs": "a dog ran to the park"}.items():
        (folder / name).write_text("\n%\n".join(f"{words} {i} times ." for i in range(12)) + "\n%\n")
    ds = load_dataset("fortunes", clients=2, partition="natural", data_dir=str(folder))
    torch.manual_seed(0)
    model = build_model("lstm", ds.info)
    glob = {k: v.detach().clone() for k, v in model.state_dict().items()}
    spec = "mask:keep=0.25" if _missing("mask:keep=0.25") is None else "fp16"
    sizes = ds.client_sizes()

    def local(state, cid):
        ctx = RoundContext(round=1, client=cid, seed=5, epochs=1, batch_size=8, lr=0.5)
        return local_sgd(model, state, ds.client_data(cid), ctx)

    def train(msg: Message, ctxt: Context) -> Message:  # what a text ClientApp does: local SGD
        state = {k: torch.from_numpy(v.numpy().copy()) for k, v in msg.content["arrays"].items()}
        cid = ctxt.node_config["partition-id"]
        arrays = ArrayRecord({k: Array(v.numpy()) for k, v in local(state, cid).items()})
        metrics = MetricRecord({"num-examples": sizes[cid]})
        return Message(content=RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    strategy = CompressedFedAvg(spec, seed=5)
    msgs = list(strategy.configure_train(1, ArrayRecord({k: Array(v.numpy()) for k, v in glob.items()}),
                                         ConfigRecord(), StubGrid()))  # fmt: skip
    mod = compression_mod(spec)
    replies = [mod(m, node_context(m.metadata.dst_node_id), train) for m in msgs]
    assert not any(r.has_error() for r in replies)
    arrays, metrics = strategy.aggregate_train(1, replies)
    # the driver's own pieces: compress, decode, weight by client size, apply
    comp = fc.get_compressor(spec)
    deltas = []
    for cid in (0, 1):
        ctx = fc.RoundContext(round=1, client=cid, seed=5)
        delta = {k: local(glob, cid)[k] - glob[k] for k in glob}
        deltas.append(comp.decompress(comp.compress(delta, ctx), ctx))
    want = apply_delta(glob, fedavg_driver.weighted_average(deltas, sizes))
    got = state_of(arrays)
    assert list(got) == list(glob)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)
    assert metrics["dense-upstream-bytes"] == 2 * fedavg_driver.dense_payload_bytes(glob)
    model.load_state_dict(got)
    acc, loss = fedavg_driver.evaluate(model, ds.x_test, ds.y_test)
    assert 0.0 <= acc <= 1.0 and loss == loss  # top-1 over real tokens, finite


# ---------------------------------------------------------------------------------------------
# Codec time: the Mod times call_next and its own work, the Strategy its decoding

from fedcompress.flower.common import (  # noqa: E402
    ENCODE_CPU_KEY,
    ENCODE_KEY,
    TRAIN_CPU_KEY,
    TRAIN_KEY,
    array_view,
    state_from_record,
    update_from_records,
)

TRAIN_SLEEP, ENCODE_SLEEP, DECODE_SLEEP = 0.3, 0.05, 0.02


class _SlowNone(fc.Compressor):
    """``none`` that sleeps in compress and decompress: where each sleep lands is known exactly."""

    def compress(self, update, ctx):
        time.sleep(ENCODE_SLEEP)
        return fc.get_compressor("none").compress(update, ctx)

    def decompress(self, payload, ctx):
        time.sleep(DECODE_SLEEP)
        return fc.get_compressor("none").decompress(payload, ctx)


def test_round_metrics_carry_codec_time(task_identity):
    def slow_train(msg, ctxt):
        time.sleep(TRAIN_SLEEP)
        return fake_train(msg, ctxt)

    fc.register("test-slow-flower")(_SlowNone)
    try:
        strategy = CompressedFedAvg("test-slow-flower", seed=5)
        glob = small_state(0)
        msgs = list(strategy.configure_train(1, ArrayRecord({k: Array(v.numpy()) for k, v in glob.items()}),
                                             ConfigRecord(), StubGrid()))  # fmt: skip
        mod = compression_mod("test-slow-flower")
        replies = [mod(m, node_context(m.metadata.dst_node_id), slow_train) for m in msgs]
        # an old client's reply without times adds nothing (and is not dropped)
        old = fake_train(msgs[0], node_context(msgs[0].metadata.dst_node_id))
        old.content.array_records["arrays"] = replies[0].content.array_records["arrays"]
        old.content["metrics"][CLIENT_KEY] = replies[0].content["metrics"][CLIENT_KEY]
        arrays, metrics = strategy.aggregate_train(1, replies + [old])
    finally:
        fc.api._REGISTRY.pop("test-slow-flower", None)
    enc = [r.content["metrics"][ENCODE_KEY] for r in replies]
    tr = [r.content["metrics"][TRAIN_KEY] for r in replies]
    for e, t in zip(enc, tr, strict=True):
        assert TRAIN_SLEEP <= t < TRAIN_SLEEP + 0.25  # the ClientApp's sleep, not compress's
        assert ENCODE_SLEEP <= e < TRAIN_SLEEP  # compress's sleep, not the ClientApp's
    assert metrics["replies-accepted"] == 3
    assert metrics["encode-seconds"] == pytest.approx(sum(enc), rel=1e-12)
    assert metrics["train-seconds"] == pytest.approx(sum(tr), rel=1e-12)
    assert 3 * DECODE_SLEEP <= metrics["decode-seconds"] < TRAIN_SLEEP
    e, d, t = metrics["encode-seconds"], metrics["decode-seconds"], metrics["train-seconds"]
    assert metrics["codec-overhead"] == pytest.approx((e + d) / (t + e + d), rel=1e-12)
    assert strategy.codec_overhead == pytest.approx(metrics["codec-overhead"], rel=1e-12)
    for key in (ENCODE_KEY, TRAIN_KEY, ENCODE_CPU_KEY, TRAIN_CPU_KEY):
        assert key not in metrics  # not FedAvg-averaged
    assert strategy.history[-1]["decode-seconds"] == metrics["decode-seconds"]
    # CPU seconds: the same sums and formula; the sleeps are wall time only
    cpu_enc = [r.content["metrics"][ENCODE_CPU_KEY] for r in replies]
    cpu_tr = [r.content["metrics"][TRAIN_CPU_KEY] for r in replies]
    assert all(0 <= v < ENCODE_SLEEP for v in cpu_enc) and all(0 <= v < TRAIN_SLEEP for v in cpu_tr)
    assert metrics["encode-cpu-seconds"] == pytest.approx(sum(cpu_enc), rel=1e-12)
    assert metrics["train-cpu-seconds"] == pytest.approx(sum(cpu_tr), rel=1e-12)
    assert 0 <= metrics["decode-cpu-seconds"] < 3 * DECODE_SLEEP
    e, d, t = (metrics[f"{k}-cpu-seconds"] for k in ("encode", "decode", "train"))
    assert metrics["codec-overhead-cpu"] == pytest.approx((e + d) / (t + e + d) if t + e + d else 0.0)
    assert strategy.codec_overhead_cpu == pytest.approx(metrics["codec-overhead-cpu"])


def _odd_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "w": torch.randn(7, 5, generator=g),
        "h": torch.randn(4, generator=g).half(),
        "d": torch.randn(3, 2, generator=g, dtype=torch.float64),
        "scalar": torch.tensor(1.25),
        "n": torch.tensor([3, -9], dtype=torch.int64),
        "flag": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
    }


def _npy(a: np.ndarray, version=None) -> bytes:
    import io

    f = io.BytesIO()
    np.lib.format.write_array(f, a, version=version, allow_pickle=False)
    return f.getvalue()


@pytest.mark.parametrize(
    "a",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.array(2.5),
        np.zeros((0, 4), np.float64),
        np.array([True, False]),
        np.arange(-3, 3, dtype=np.int8),
        np.arange(6, dtype=np.float16).reshape(1, 6),
        np.arange(4, dtype=">f4").reshape(2, 2),  # big-endian: a view that byte-swaps on read
        np.ones((2, 3), np.uint64),
    ],
    ids=lambda a: f"{a.dtype.str}{a.shape}",
)
def test_array_view_reads_numpys_own_headers_in_place(a):
    # the fast header match against np.load of the same bytes: same dtype, shape and values, and a
    # read-only view of the Array's data rather than a copy
    arr = Array(a)
    got, want = array_view(arr), arr.numpy()
    assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)
    assert not got.flags.writeable and (got.size == 0 or np.shares_memory(got, np.frombuffer(arr.data, np.uint8)))


def test_array_view_leaves_other_headers_to_np_load():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    f_order = Array(np.asfortranarray(a))
    got = array_view(f_order)  # Fortran order: np.load's copy, values in the right places
    assert np.array_equal(got, a) and got.flags.writeable
    v2 = Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=_npy(a, version=(2, 0)))
    assert np.array_equal(array_view(v2), a)  # a version 2.0 header
    good = _npy(a)
    spaced = good.replace(b"'descr': '<f4', ", b"'descr':'<f4',  ")  # valid for np.load, not our form
    assert np.array_equal(array_view(Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=spaced)), a)
    # data longer than the header says: not viewed (np.load reads the header's values, a copy)
    longer = array_view(Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=good + b"\0" * 4))
    assert np.array_equal(longer, a) and longer.flags.writeable
    # a header that promises more values than the data holds: np.load's error, not a short view
    for data in (good[:-4], good.replace(b"(2, 3)", b"(2, 4)"), good.replace(b"(2, 3)", b"(9" + b"9" * 18 + b", 3)")):
        with pytest.raises(ValueError), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # np.load's overflow in the product
            array_view(Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=data))


def test_mod_update_equals_state_delta():
    # the Mod's zero-copy update against api.state_delta on copies of the same records
    glob = _odd_state()
    local = {k: (v + 1 if v.dtype != torch.bool else ~v) if k != "w" else v * 1.5 for k, v in glob.items()}
    rg = ArrayRecord({k: Array(v.numpy()) for k, v in glob.items()})
    arrays = {k: Array(v.numpy()) for k, v in local.items()}
    arrays["w"] = Array(np.asfortranarray(local["w"].numpy()))  # Fortran order: np.load's path
    rl = ArrayRecord(arrays)
    views = {k: array_view(v) for k, v in rg.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when it wraps a read-only numpy array
        got = update_from_records(rl, views)
    want = fc.api.state_delta(state_from_record(rl), state_from_record(rg))
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
        assert torch.equal(got[k], want[k]), k
    for v in rg.values():
        assert np.array_equal(array_view(v), v.numpy())
    with pytest.raises(ValueError, match="shapes"):
        update_from_records(ArrayRecord({**{k: rl[k] for k in rl}, "w": Array(np.zeros((5, 7), np.float32))}),
                            views)  # fmt: skip
    with pytest.raises(ValueError, match="names"):
        update_from_records(ArrayRecord({k: rl[k] for k in list(rl)[1:]}), views)
