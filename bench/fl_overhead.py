"""Codec overhead when several clients train at once (issue 18 item 5): a Flower simulation.

Runs the example's ServerApp (examples/flower: CompressedFedAvg on the FedAvg CNN, mnist5k) and a
ClientApp made of the example's pieces (local SGD, the compression Mod; ``build_client_app``
below) through ``flwr.simulation.run_simulation``: ``--clients`` virtual clients that all train
in every round, ``--concurrent`` of them at once on ``--cpus`` Ray CPUs (each asks for cpus /
concurrent of a CPU). The default, 10 clients 4 at a time on 2 CPUs, is 2 clients per core, each
doing what a client of ``fedcompress run --clients 10`` on mnist5k does (the same split, 400
images, 2 epochs of batch 20, lr 0.05, the driver's seeds), so the two compare. One simulation per
compressor, each in a child process of its own (Ray's state, a timeout); then one table:

    python bench/fl_overhead.py                      # sz:rel=1e-2, sz:ratio=16, mask:ratio=16; ~3 min
    python bench/fl_overhead.py --specs "none;sz:rel=1e-2" --rounds 2 --clients 10 --concurrent 4 --cpus 2

Columns come from CompressedFedAvg's round metrics (docs/flower.md, "Codec time"): ``train s`` is
the clients' ClientApp time (the Mod's ``call_next``: reading the model and data, local SGD,
replying), ``encode s`` the Mod's own work (reading the received model, the update, ``compress``,
wrapping the payload), ``decode s`` the server's unpacking and decoding, each summed over clients
and rounds, wall clock; ``overhead`` = (encode + decode) / (train + encode + decode), as the driver's
``codec_overhead``, over all rounds and over rounds 2 and later (``rounds 2+``: the steady state;
in round 1 every Ray actor also pays its first message's costs, torch's first backward among
them, inside train, and its first ``compress``'s inside encode); ``CPU overhead`` is the same
share from CPU seconds (``time.process_time`` of each client's and the server's process), which
leaves out the waits for a core that a wall clock counts; the per-reply columns are means.
The data split is written to the example's .npy cache before the first simulation, so no round
times mnist5k's CSV parse. Wall times under contention move with the scheduler: run it twice, or
in a quiet window, before trusting a digit.

    python bench/fl_overhead.py --breakdown          # in-process, one thread, ~20 s

times (thread CPU, median of 30) where one client's codec time goes on a real CNN update (one
client of mnist5k's 10-client split after 2 local epochs, as ``fedcompress run``): the Mod's record
read and update (zero-copy, and the copying path it replaced), ``compress``, the native SZ encode
alone, the server's ``server_update``, each once right after local training (cold caches, as in a
round) and warm.

Flower and Ray state go to a temporary folder (RAY_TMPDIR, FLWR_HOME, HOME, the example's data
cache); FLWR_TELEMETRY_ENABLED=0. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
EXAMPLE = ROOT / "examples" / "flower"
DEFAULT_SPECS = "sz:rel=1e-2;sz:ratio=16;mask:ratio=16"

# The child: one simulation, results written by the example's ServerApp (out-dir/metrics.json).
CHILD = """
import json, sys
from flwr.simulation import run_simulation
from fedcompress_app.server_app import build_server_app
from fl_overhead import build_client_app
overrides, clients, per_client = json.loads(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
run_simulation(
    build_server_app(overrides),
    build_client_app(overrides),
    num_supernodes=clients,
    backend_config={
        "client_resources": {"num_cpus": per_client, "num_gpus": 0.0},
        "init_args": {"num_cpus": float(sys.argv[4]), "include_dashboard": False},
    },
)
"""


def build_client_app(overrides: dict):
    """The example's ClientApp, except that it always replies with its local weights.

    The example hands every compressor that overrides ``client_update`` its own training, sz
    included (sz overrides it for ``target=weights``), so its sz payload is made inside the
    ClientApp and the Mod's encode time would miss the compression. Here local SGD is all the
    ClientApp does (read the model and this node's partition, train, reply); the Mod compresses.
    """
    from fedcompress_app.task import load_partition, new_model, read_config, set_threads, train_context
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from fedcompress.api import local_sgd
    from fedcompress.flower import compression_mod
    from fedcompress.flower.common import state_from_record
    from fedcompress.flower.mod import client_id

    cfg = read_config({}, overrides)
    app = ClientApp(mods=[compression_mod(cfg["compressor"])])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        set_threads(cfg)
        cid = client_id(context)
        x, y = load_partition(cfg, cid, int(context.node_config.get("num-partitions", 2)))
        ctx = train_context(cfg, msg.content["config"]["server-round"], cid)
        local = local_sgd(new_model(cfg), state_from_record(msg.content["arrays"]), (x, y), ctx)
        metrics = MetricRecord({"num-examples": int(y.numel())})
        content = RecordDict({"arrays": ArrayRecord.from_torch_state_dict(local), "metrics": metrics})
        return Message(content=content, reply_to=msg)

    return app


def simulation_env(base: Path) -> dict[str, str]:
    env = dict(os.environ)
    for d in ("home", "flwr", "cache"):
        (base / d).mkdir(parents=True, exist_ok=True)
    env.update(
        HOME=str(base / "home"),
        FLWR_HOME=str(base / "flwr"),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FEDCOMPRESS_EXAMPLE_CACHE=str(base / "cache"),
        # Ray refuses AF_UNIX socket paths over 107 bytes: a short folder of its own
        RAY_TMPDIR=str(base / "ray"),
        # Ray's workers unpickle the apps, so they import fedcompress_app and this module too
        PYTHONPATH=os.pathsep.join(filter(None, [str(EXAMPLE), str(HERE), env.get("PYTHONPATH")])),
    )
    (base / "ray").mkdir(exist_ok=True)
    return env


# Writes every client's partition and the test split to the example's .npy cache once, so a
# simulation's first round does not time mnist5k's CSV parse inside the clients' training.
WARM_CACHE = """
import json, sys
from fedcompress_app.task import load_partition, load_test, read_config
overrides, clients = json.loads(sys.argv[1]), int(sys.argv[2])
cfg = read_config({}, overrides)
for cid in range(clients):
    load_partition(cfg, cid, clients)
load_test(cfg)
"""


def overrides_for(spec: str, args, out: Path) -> dict:
    return {
        "compressor": spec,
        "num-server-rounds": args.rounds,
        "seed": 0,
        "epochs": args.epochs,
        "samples-per-client": args.samples,
        "torch-threads": 1,
        "min-nodes": args.clients,
        "out-dir": str(out),
    }


def run_one(spec: str, args, base: Path) -> dict:
    """One simulation of ``spec``; the ServerApp's metrics.json, or {"error": ...}."""
    out = base / "out"
    overrides = overrides_for(spec, args, out)
    log = base / "simulation.log"
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, json.dumps(overrides), str(args.clients),
             str(args.cpus / args.concurrent), str(args.cpus)],
            env=simulation_env(base), stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        rc = proc.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        rc = None
    finally:  # Ray may leave helpers in the child's process group: stop the whole group
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait(timeout=15)
    seconds = time.perf_counter() - t0
    try:
        result = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        tail = log.read_text(errors="replace")[-3000:]
        why = "timed out" if rc is None else f"exited with {rc}"
        return {"error": f"{spec}: simulation {why}, no metrics.json; log tail:\n{tail}"}
    result["seconds"] = seconds
    return result


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def table_row(spec: str, r: dict) -> str:
    rounds = r["rounds"]

    def totals(rows, cpu=""):
        return [sum(x[f"{k}{cpu}-seconds"] for x in rows) for k in ("encode", "decode", "train")]

    def overhead(enc, dec, tr):
        return (enc + dec) / (tr + enc + dec) if tr + enc + dec > 0 else 0.0

    def pct(rows, cpu=""):
        return f"{100 * overhead(*totals(rows, cpu)):.2f} %" if rows else "-"

    enc, dec, tr = totals(rounds)
    cenc, cdec, ctr = totals(rounds, "-cpu")
    replies = sum(x["replies-accepted"] for x in rounds)
    if not replies:
        return f"| `{spec}` | 0 | no reply accepted: see the log (replies-dropped, replies-failed) |"
    up, dense = sum(x["upstream-bytes"] for x in rounds), sum(x["dense-upstream-bytes"] for x in rounds)
    per_round = " / ".join(f"{100 * x['codec-overhead']:.2f}" for x in rounds)
    return (
        f"| `{spec}` | {replies} | {dense / up:.2f}x | {enc:.3f} | {dec:.3f} | {tr:.1f} | "
        f"{pct(rounds)} | **{pct(rounds[1:])}** | {pct(rounds, '-cpu')} | **{pct(rounds[1:], '-cpu')}** | "
        f"{per_round} | {1e3 * enc / replies:.2f} | {1e3 * dec / replies:.2f} | {tr / replies:.3f} | "
        f"{1e3 * cenc / replies:.2f} | {1e3 * cdec / replies:.2f} | {ctr / replies:.3f} | "
        f"{r.get('final_accuracy', float('nan')):.4f} | {r['seconds']:.0f} |"
    )


HEADER = (
    "| compressor | replies | ratio | encode s | decode s | train s | overhead | rounds 2+ | CPU overhead | "
    "CPU rounds 2+ | per round % | enc ms/reply | dec ms/reply | train s/reply | enc CPU ms/reply | "
    "dec CPU ms/reply | train CPU s/reply | accuracy | run s |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def simulate(args) -> int:
    specs = [s.strip() for s in args.specs.split(";") if s.strip()]
    import fedcompress as fc

    for s in specs:
        fc.get_compressor(s)  # a bad spec fails here, before any simulation starts
    root = Path(tempfile.mkdtemp(prefix="fcfl-", dir="/tmp" if os.path.isdir("/tmp") else None))
    rows, failed = [], 0
    try:
        (root / "0").mkdir()
        subprocess.run(
            [sys.executable, "-c", WARM_CACHE, json.dumps(overrides_for(specs[0], args, root)), str(args.clients)],
            env=simulation_env(root / "0"), check=True, timeout=args.timeout,
        )  # fmt: skip
        for i, spec in enumerate(specs):
            base = root / str(i)
            base.mkdir(exist_ok=True)
            if i:  # one data cache for every run: later runs skip the CSV parse
                (base / "cache").symlink_to(root / "0" / "cache")
            r = run_one(spec, args, base)
            if "error" in r:
                failed += 1
                print(r["error"], file=sys.stderr)
                continue
            rows.append(table_row(spec, r))
            print(f"{spec}: done in {r['seconds']:.0f} s", file=sys.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(
        f"\n{args.clients} clients per round, {args.concurrent} training at once on {args.cpus:g} Ray CPUs "
        f"({args.concurrent / args.cpus:g} per CPU), {args.rounds} rounds, {args.epochs} local epoch(s) of "
        f"{args.samples or 'all'} images, "
        f"torch threads 1 per client; load average before: {os.getloadavg()[0]:.2f}\n"
    )
    print(HEADER)
    for row in rows:
        print(row)
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------
# --breakdown: where one client's codec time goes, in-process


def cnn_clients():
    """One thread; mnist5k's 10-client split (seed 0), the FedAvg CNN and its initial state, as
    ``fedcompress run`` builds them: (data, model, global state). bench/sz_cold.py uses it too."""
    import torch

    from fedcompress.fedavg.data import load_dataset
    from fedcompress.fedavg.models import build_model

    torch.set_num_threads(1)
    data = load_dataset("mnist5k", 10, "iid", 0.5, 0)
    torch.manual_seed(0)
    model = build_model("cnn", data.info)
    return data, model, {k: v.detach().clone() for k, v in model.state_dict().items()}


def breakdown(args) -> int:
    import torch
    from flwr.app import ArrayRecord

    import fedcompress as fc
    from fedcompress import _ops
    from fedcompress.api import RoundContext, local_sgd, state_delta
    from fedcompress.codecs.sz import codec as C
    from fedcompress.flower.common import array_view, state_from_record, update_from_records

    clock = time.thread_time
    data, model, glob = cnn_clients()
    x, y = data.client_data(0)

    def fresh_update(cid: int):
        ctx = RoundContext(round=1, client=cid, seed=0, epochs=2, batch_size=20, lr=0.05)
        return local_sgd(model, glob, (x, y), ctx), ctx

    def med(fn, n=30):
        ts = []
        for _ in range(n):
            t = clock()
            fn()
            ts.append(clock() - t)
        return 1e3 * statistics.median(ts)

    local, ctx = fresh_update(0)
    upd = state_delta(local, glob)
    rg, rl = ArrayRecord.from_torch_state_dict(glob), ArrayRecord.from_torch_state_dict(local)
    gv = {k: array_view(v) for k, v in rg.items()}
    print(f"one CNN update ({sum(v.numel() for v in upd.values()):,} values), thread CPU ms, median of 30:")
    print(f"  Mod, record read + update, zero-copy views : {med(lambda: update_from_records(rl, gv)):.3f}")
    print(f"  Mod, the same through state_from_record    : "
          f"{med(lambda: state_delta(state_from_record(rl), state_from_record(rg))):.3f}")  # fmt: skip
    lossy = [k for k, v in upd.items() if v.numel() >= 1024]
    enc = _ops.get("sz_encode", torch.device("cpu"), None, torch.float32)
    params = {}
    for k in lossy:
        step, bound = C.quant_params(upd[k], 1e-2, "rel")
        params[k] = (step, bound, C.choose_block_size(upd[k], step))
    native = med(lambda: [enc(upd[k], *params[k]) for k in lossy])
    print(f"  native SZ encode alone (rel=1e-2, {len(lossy)} tensors): {native:.3f}")
    print("\n| compressor | compress cold | compress warm | server_update cold | server_update warm | payload B |")
    print("|---|---:|---:|---:|---:|---:|")
    for spec in [s.strip() for s in args.specs.split(";") if s.strip()] + ["none"]:
        comp = fc.get_compressor(spec)
        cold_e, cold_d = [], []
        for cid in range(1, 4):  # right after local training, as in a round
            loc, c = fresh_update(cid)
            u = state_delta(loc, glob)
            t = clock()
            p = comp.compress(u, c)
            cold_e.append(clock() - t)
            t = clock()
            comp.server_update(p, glob, c)
            cold_d.append(clock() - t)
        p = comp.compress(upd, ctx)
        print(
            f"| `{spec}` | {1e3 * statistics.median(cold_e):.3f} | {med(lambda c=comp: c.compress(upd, ctx)):.3f} | "
            f"{1e3 * statistics.median(cold_d):.3f} | "
            f"{med(lambda c=comp, p=p: c.server_update(p, glob, ctx)):.3f} | {len(p):,} |"
        )
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--specs", default=DEFAULT_SPECS, help="compressor specs, ';'-separated (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", type=int, default=10, help="virtual clients, all training every round")
    p.add_argument("--concurrent", type=int, default=4, help="clients training at once (Ray actors)")
    p.add_argument("--cpus", type=float, default=2.0, help="Ray CPUs (each client asks for cpus / clients)")
    p.add_argument("--epochs", type=int, default=2, help="local epochs (the driver's default: 2)")
    p.add_argument("--samples", type=int, default=0,
                   help="training images per client, the first of its partition (default: all of it)")
    p.add_argument("--timeout", type=float, default=240.0, help="seconds per simulation before it is killed")
    p.add_argument("--breakdown", action="store_true", help="in-process per-stage times of one client instead")
    args = p.parse_args(argv)
    for name in ("rounds", "clients", "concurrent", "epochs"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.samples < 0:
        p.error("--samples must be >= 0")
    if not args.cpus > 0:
        p.error("--cpus must be > 0")
    return breakdown(args) if args.breakdown else simulate(args)


if __name__ == "__main__":
    sys.exit(main())
