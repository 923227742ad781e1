"""FedSynth hypergradient: the engine vs a create_graph unroll, `higher` and `torchopt`.

Problem (issue 5): the FedAvg CNN (582,026 parameters) on 28x28x1 inputs, m = 20 inner SGD steps
on b = 2 synthetic images each, soft labels, a real batch of 256 images; output
(real_loss, dL/d syn_x, dL/d syn_y).

Every provider runs in its own fresh process (so one cannot inherit another's freed memory):
  * time: median of ``--reps`` calls after one warm-up call;
  * peak extra resident memory: after the warm-up, ``gc.collect()`` + ``malloc_trim(0)``, the
    RSS is the baseline; the kernel's high-water mark is reset (``/proc/self/clear_refs`` = 5) and
    one more call runs; extra = VmHWM - baseline.
  * CPU time (process_time) too: on a shared machine it is less disturbed than wall time.
  * results are written to .npy and compared (max relative error) with the create_graph unroll.
Rounds of all providers are interleaved (A B C D, A B C D, ...) and medians taken over rounds, as
the 2-core machine is shared.

Run:  python bench/bench_synth.py [--rounds 3] [--reps 7] [--threads N]   (prints a markdown table)
  or: python -m pytest bench/bench_synth.py --benchmark-only -s     (same, through pytest-benchmark)
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

PROVIDERS = ("create_graph", "higher", "torchopt", "generic", "engine")
PEERS = ("create_graph", "higher", "torchopt")
M, B, N_REAL, LR = 20, 2, 256, 0.05


# ---------------------------------------------------------------------------------------------
# Child process: one provider


def _problem():
    import torch

    from fedcompress.fedavg.models import FedAvgCNN

    torch.manual_seed(0)
    model = FedAvgCNN()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    sx = torch.randn(M, B, 1, 28, 28, generator=g)
    sy = torch.softmax(torch.randn(M, B, 10, generator=g), -1)  # soft labels
    rx = torch.randn(N_REAL, 1, 28, 28, generator=g)
    ry = torch.randint(0, 10, (N_REAL,), generator=g)
    return model, params, sx, sy, rx, ry


def _provider(name, model, params):
    import torch
    import torch.nn.functional as F

    import fedcompress as fc

    def soft_ce(z, y):
        return -(y * torch.log_softmax(z, -1)).sum(-1).mean()

    if name == "engine":
        return lambda sx, sy, rx, ry: fc.synth.hypergradient(model, params, sx, sy, LR, rx, ry)
    if name == "generic":
        return lambda sx, sy, rx, ry: fc.synth.hypergradient_generic(model, params, sx, sy, LR, rx, ry)
    if name == "create_graph":
        return lambda sx, sy, rx, ry: fc.synth.hypergradient_ref(model, params, sx, sy, LR, rx, ry)
    if name == "higher":
        import higher

        def run(sx, sy, rx, ry):
            net = model
            net.load_state_dict(params, strict=False)
            x, y = sx.clone().requires_grad_(True), sy.clone().requires_grad_(True)
            opt = torch.optim.SGD(net.parameters(), lr=LR)
            with higher.innerloop_ctx(net, opt, copy_initial_weights=True) as (fnet, diffopt):
                for j in range(M):
                    diffopt.step(soft_ce(fnet(x[j]), y[j]))
                loss = F.cross_entropy(fnet(rx), ry)
                gx, gy = torch.autograd.grad(loss, (x, y))
            return loss.detach(), gx, gy

        return run
    if name == "torchopt":
        import torchopt

        def run(sx, sy, rx, ry):
            net = copy.deepcopy(model)
            net.load_state_dict(params, strict=False)
            x, y = sx.clone().requires_grad_(True), sy.clone().requires_grad_(True)
            opt = torchopt.MetaSGD(net, lr=LR)
            for j in range(M):
                opt.step(soft_ce(net(x[j]), y[j]))
            loss = F.cross_entropy(net(rx), ry)
            gx, gy = torch.autograd.grad(loss, (x, y))
            return loss.detach(), gx, gy

        return run
    raise ValueError(f"unknown provider {name!r}; valid: {PROVIDERS}")


def _rss_kb(field="VmRSS"):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def measure(name: str, reps: int, out_npy: str | None, threads: int, problem, provider) -> dict:
    """One provider in this (fresh) process: ``problem()`` -> (model, params, *args), ``provider(name,
    model, params)`` -> fn(*args) returning (loss, grads...). Shared with bench_synth_lstm.py."""
    import numpy as np
    import torch

    if threads:
        torch.set_num_threads(threads)

    model, params, *args = problem()
    fn = provider(name, model, params)
    res = fn(*args)  # warm-up (lazy init of kernels, thread pools)
    del res
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    base = _rss_kb()
    reset = True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        reset = False
    res = fn(*args)
    peak = _rss_kb("VmHWM")
    times, cpu = [], []
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        fn(*args)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    if out_npy:
        np.save(out_npy, torch.cat([r.detach().reshape(-1).double() for r in res]).numpy())
    return {
        "provider": name,
        "median_s": statistics.median(times),
        "times_s": times,
        "cpu_s": cpu,
        "peak_extra_mb": (peak - base) / 1024 if reset else float("nan"),
        "threads": torch.get_num_threads(),
        # what one call reads (w_0, the synthetic data, the real batch): benchtable's input_bytes
        "input_bytes": sum(t.numel() * t.element_size() for t in (*params.values(), *args)),
    }


def child(name: str, reps: int, out_npy: str | None, threads: int = 0) -> dict:
    return measure(name, reps, out_npy, threads, _problem, _provider)


# ---------------------------------------------------------------------------------------------
# Parent: run every provider in its own process, interleaved rounds


def run_one(name: str, reps: int, out_npy: str | None, threads: int = 0, script: str = __file__) -> dict:
    """``script --child name`` in a fresh process; its JSON result."""
    cmd = [sys.executable, os.path.abspath(script), "--child", name, "--reps", str(reps), "--threads", str(threads)]
    if out_npy:
        cmd += ["--npy", out_npy]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"provider {name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_all(providers=PROVIDERS, rounds: int = 3, reps: int = 7, threads: int = 0, script: str = __file__,
            outputs: dict[str, int] | None = None) -> dict[str, dict]:
    """Every provider of ``script`` in its own process, rounds interleaved; medians over rounds.
    ``outputs`` (name -> number of values, in order) adds the max relative error per output."""
    import numpy as np

    tmp = tempfile.mkdtemp(prefix="bench_synth_")
    runs: dict[str, list[dict]] = {p: [] for p in providers}
    for r in range(rounds):
        for p in providers:
            runs[p].append(run_one(p, reps, os.path.join(tmp, f"{p}.npy") if r == 0 else None, threads, script))
    ref = np.load(os.path.join(tmp, "create_graph.npy")) if "create_graph" in providers else None
    table = {}
    for p, rs in runs.items():
        err, parts = float("nan"), {}
        if ref is not None:
            v = np.load(os.path.join(tmp, f"{p}.npy"))
            err = float(np.abs(v - ref).max() / np.abs(ref).max())
            if outputs:  # the loss dominates max|ref|, which hides the gradients' error
                cuts = np.cumsum(list(outputs.values()))[:-1]
                for name, a, b in zip(outputs, np.split(v, cuts), np.split(ref, cuts), strict=True):
                    parts[name] = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
        table[p] = {
            "median_s": statistics.median(t for r in rs for t in r["times_s"]),
            "cpu_s": statistics.median(t for r in rs for t in r["cpu_s"]),
            "peak_extra_mb": statistics.median(r["peak_extra_mb"] for r in rs),
            "max_rel_err": err,
            "threads": rs[0]["threads"],
        }
        if outputs:
            table[p]["rel_err_by_output"] = parts
    return table


def markdown(table: dict[str, dict]) -> str:
    peers = [p for p in PEERS if p in table]
    fastest = min(table[p]["median_s"] for p in peers) if peers else float("nan")
    leanest = min(table[p]["peak_extra_mb"] for p in peers) if peers else float("nan")
    fastest_cpu = min(table[p]["cpu_s"] for p in peers) if peers else float("nan")
    lines = [
        "| provider | threads | median wall (s) | speed-up vs fastest peer | median CPU (s) | CPU speed-up | "
        "peak extra RSS (MB) | vs leanest peer | max rel. error vs create_graph |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p, r in table.items():
        lines.append(
            f"| {p} | {r['threads']} | {r['median_s']:.3f} | {fastest / r['median_s']:.2f}x | "
            f"{r['cpu_s']:.3f} | {fastest_cpu / r['cpu_s']:.2f}x | {r['peak_extra_mb']:.1f} | "
            f"{r['peak_extra_mb'] / leanest:.2f} | "
            f"{r['max_rel_err']:.1e} |"
        )
    return "\n".join(lines)


def print_table(results: dict[str, dict]) -> None:
    """The pytest entry's closing table (``results``: provider -> run_one's dict plus its ``npy``);
    fails when the engine's result is off create_graph's by more than 1e-5."""
    import numpy as np
    import pytest

    if "create_graph" not in results:
        pytest.skip("run the provider benchmarks first")
    ref = np.load(results["create_graph"]["npy"])
    table = {}
    for p, r in results.items():
        v = np.load(r["npy"])
        table[p] = dict(r, max_rel_err=float(np.abs(v - ref).max() / np.abs(ref).max()),
                        cpu_s=statistics.median(r["cpu_s"]))
    print("\n" + markdown(table))
    assert table["engine"]["max_rel_err"] <= 1e-5


# ---------------------------------------------------------------------------------------------
# pytest-benchmark entry: one benchmark per provider (each call = one fresh process); the child's
# own median and memory go to extra_info, and the table prints at the end.

try:
    import pytest

    _RESULTS: dict[str, dict] = {}

    @pytest.mark.parametrize("provider", PROVIDERS)
    def test_hypergradient(benchmark, provider, tmp_path):
        npy = str(tmp_path / f"{provider}.npy")
        # 1 torch thread by default: on the shared 2-core machine 2 threads made every provider
        # 10-50x slower (OpenMP threads waiting for a core); BENCH_SYNTH_THREADS=2 on an idle one
        threads = int(os.environ.get("BENCH_SYNTH_THREADS", "1"))
        r = benchmark.pedantic(run_one, args=(provider, 5, npy, threads), rounds=1, iterations=1)
        # schema 1 of fedcompress/benchtable.py (`fedcompress bench`); times_s: the child's own calls
        benchmark.extra_info.update(r, schema=1, op="synth hypergradient", case="cnn", peer=provider in PEERS)
        _RESULTS[provider] = dict(r, npy=npy)

    def test_table(benchmark):
        benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # so --benchmark-only keeps it

        print_table(_RESULTS)
except ImportError:  # pragma: no cover
    pass


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", choices=PROVIDERS)
    ap.add_argument("--npy")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--threads", type=int, default=0, help="torch threads in each child (0: torch's default)")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.reps, a.npy, a.threads)))
    else:
        t = run_all(a.providers.split(","), a.rounds, a.reps, a.threads)
        print(markdown(t))
        print(json.dumps(t))
