"""FedSynth hypergradient on the next-word LSTM: the engine vs create_graph, `higher`, `torchopt`.

Problem (issue 15): ``NextWordLSTM`` at its defaults (V = 10,000 words, embedding 64, 2 x 128
LSTM, 2,161,424 parameters), synthetic embedding sequences of T = 10, m = 10 inner SGD steps on
b = 4 sequences each, fixed next-word labels, a real batch of 64 sequences (640 tokens); output
(real_loss, dL/d syn_e, dL/d syn_val).

Method as bench/bench_synth.py (whose helpers this file reuses): every provider in its own fresh
process, rounds interleaved, median wall and CPU time of ``--reps`` calls after a warm-up, peak
extra RSS of one call (high-water mark reset after the warm-up), max relative error against the
create_graph unroll.

Run:  python bench/bench_synth_lstm.py [--rounds 3] [--reps 5] [--threads 1]   (markdown table)
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_synth import _rss_kb, markdown  # noqa: E402

PROVIDERS = ("create_graph", "higher", "torchopt", "engine")
M, B, T, N_REAL, LR, V = 10, 4, 10, 64, 0.5, 10_000


def _problem():
    import torch

    from fedcompress.fedavg.models import NextWordLSTM

    torch.manual_seed(0)
    model = NextWordLSTM(V, seq_len=T)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    se = torch.randn(M, B, T, 64, generator=g)
    idx = torch.randint(0, V, (M, B, T, 1), generator=g)
    val = torch.ones(M, B, T, 1)
    rx = torch.randint(0, V, (N_REAL, T), generator=g)
    ry = torch.randint(0, V, (N_REAL, T), generator=g)
    return model, params, se, idx, val, rx, ry


def _provider(name, model, params):
    import torch
    import torch.nn.functional as F

    from fedcompress.synth import lstm as L

    def inner(net_out, idx, val):  # [b, V, T] logits -> the engine's inner loss
        return L._inner_loss(net_out.transpose(1, 2).reshape(-1, V), idx, val)

    if name == "engine":
        return lambda se, idx, val, rx, ry: L.hypergradient_text(model, params, se, idx, val, LR, rx, ry)
    if name == "create_graph":
        return lambda se, idx, val, rx, ry: L.hypergradient_text_ref(model, params, se, idx, val, LR, rx, ry)
    if name == "higher":
        import higher

        def run(se, idx, val, rx, ry):
            net = copy.deepcopy(model)
            net.load_state_dict(params, strict=False)
            net.embedding.weight.requires_grad_(False)  # synthetic data bypass it (as the engine)
            x, v = se.clone().requires_grad_(True), val.clone().requires_grad_(True)
            opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=LR)
            with higher.innerloop_ctx(net, opt, copy_initial_weights=True) as (fnet, diffopt):
                for j in range(M):
                    diffopt.step(inner(fnet(x[j]), idx[j], v[j]))
                loss = F.cross_entropy(fnet(rx), ry)
                gx, gv = torch.autograd.grad(loss, (x, v))
            return loss.detach(), gx, gv

        return run
    if name == "torchopt":
        import torchopt

        def run(se, idx, val, rx, ry):
            net = copy.deepcopy(model)  # MetaSGD differentiates every parameter: E stays trainable
            net.load_state_dict(params, strict=False)  # (its inner gradient is zero: E is unused)
            x, v = se.clone().requires_grad_(True), val.clone().requires_grad_(True)
            opt = torchopt.MetaSGD(net, lr=LR)
            for j in range(M):
                opt.step(inner(net(x[j]), idx[j], v[j]))
            loss = F.cross_entropy(net(rx), ry)
            gx, gv = torch.autograd.grad(loss, (x, v))
            return loss.detach(), gx, gv

        return run
    raise ValueError(f"unknown provider {name!r}; valid: {PROVIDERS}")


def child(name: str, reps: int, out_npy: str | None, threads: int = 0) -> dict:
    import numpy as np
    import torch

    if threads:
        torch.set_num_threads(threads)
    model, params, *args = _problem()
    fn = _provider(name, model, params)
    res = fn(*args)  # warm-up
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
        # what one call reads (w_0, synthetic embeddings and labels, the real batch): benchtable's input_bytes
        "input_bytes": sum(t.numel() * t.element_size() for t in (*params.values(), *args)),
    }


def run_one(name: str, reps: int, out_npy: str | None, threads: int = 0) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--reps", str(reps), "--threads", str(threads)]
    if out_npy:
        cmd += ["--npy", out_npy]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"provider {name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_all(providers=PROVIDERS, rounds: int = 3, reps: int = 5, threads: int = 1) -> dict[str, dict]:
    import numpy as np

    tmp = tempfile.mkdtemp(prefix="bench_synth_lstm_")
    runs: dict[str, list[dict]] = {p: [] for p in providers}
    for r in range(rounds):
        for p in providers:
            runs[p].append(run_one(p, reps, os.path.join(tmp, f"{p}.npy") if r == 0 else None, threads))
    ref = np.load(os.path.join(tmp, "create_graph.npy")) if "create_graph" in providers else None
    table = {}
    for p, rs in runs.items():
        err, parts = float("nan"), {}
        if ref is not None:
            v = np.load(os.path.join(tmp, f"{p}.npy"))
            err = float(np.abs(v - ref).max() / np.abs(ref).max())
            # per output (the loss dominates max|ref|, which hides the gradients' error)
            cuts = np.cumsum([1, M * B * T * 64])
            for name, a, r in zip(("loss", "grad_e", "grad_val"), np.split(v, cuts), np.split(ref, cuts), strict=True):
                parts[name] = float(np.abs(a - r).max() / max(np.abs(r).max(), 1e-30))
        table[p] = {
            "rel_err_by_output": parts,
            "median_s": statistics.median(t for r in rs for t in r["times_s"]),
            "cpu_s": statistics.median(t for r in rs for t in r["cpu_s"]),
            "peak_extra_mb": statistics.median(r["peak_extra_mb"] for r in rs),
            "max_rel_err": err,
            "threads": rs[0]["threads"],
        }
    return table


# pytest-benchmark entry (as bench_synth.py): one benchmark per provider, each call one fresh
# process; the child's own median and memory go to extra_info, and the table prints at the end.
try:
    import pytest

    _RESULTS: dict[str, dict] = {}

    @pytest.mark.parametrize("provider", PROVIDERS)
    def test_hypergradient_lstm(benchmark, provider, tmp_path):
        npy = str(tmp_path / f"{provider}.npy")
        threads = int(os.environ.get("BENCH_SYNTH_THREADS", "1"))
        r = benchmark.pedantic(run_one, args=(provider, 3, npy, threads), rounds=1, iterations=1)
        # schema 1 of fedcompress/benchtable.py (`fedcompress bench`); times_s: the child's own calls
        benchmark.extra_info.update(r, schema=1, op="synth hypergradient", case="lstm",
                                    peer=provider in ("create_graph", "higher", "torchopt"))
        _RESULTS[provider] = dict(r, npy=npy)

    def test_table_lstm(benchmark):
        import numpy as np

        benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # so --benchmark-only keeps it
        if "create_graph" not in _RESULTS:
            pytest.skip("run the provider benchmarks first")
        ref = np.load(_RESULTS["create_graph"]["npy"])
        table = {}
        for p, r in _RESULTS.items():
            v = np.load(r["npy"])
            table[p] = dict(
                r,
                max_rel_err=float(np.abs(v - ref).max() / np.abs(ref).max()),
                cpu_s=statistics.median(r["cpu_s"]),
            )
        print("\n" + markdown(table))
        assert table["engine"]["max_rel_err"] <= 1e-5
except ImportError:  # pragma: no cover
    pass


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", choices=PROVIDERS)
    ap.add_argument("--npy")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each child (0: torch's default)")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.reps, a.npy, a.threads)))
    else:
        t = run_all(a.providers.split(","), a.rounds, a.reps, a.threads)
        print(markdown(t))
        for p, r in t.items():
            errs = ", ".join(f"{k} {v:.1e}" for k, v in r["rel_err_by_output"].items())
            print(f"{p}: max relative error vs create_graph by output: {errs}")
        print(json.dumps(t))
