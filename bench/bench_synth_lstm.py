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
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_synth import markdown, measure, print_table, run_one  # noqa: E402
from bench_synth import run_all as run_all_providers  # noqa: E402

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
    return measure(name, reps, out_npy, threads, _problem, _provider)


def run_all(providers=PROVIDERS, rounds: int = 3, reps: int = 5, threads: int = 1) -> dict[str, dict]:
    outputs = {"loss": 1, "grad_e": M * B * T * 64, "grad_val": M * B * T}  # grad_val: fixed labels, k = 1
    return run_all_providers(providers, rounds, reps, threads, __file__, outputs)


# pytest-benchmark entry (as bench_synth.py): one benchmark per provider, each call one fresh
# process; the child's own median and memory go to extra_info, and the table prints at the end.
try:
    import pytest

    _RESULTS: dict[str, dict] = {}

    @pytest.mark.parametrize("provider", PROVIDERS)
    def test_hypergradient_lstm(benchmark, provider, tmp_path):
        npy = str(tmp_path / f"{provider}.npy")
        threads = int(os.environ.get("BENCH_SYNTH_THREADS", "1"))
        r = benchmark.pedantic(run_one, args=(provider, 3, npy, threads, __file__), rounds=1, iterations=1)
        # schema 1 of fedcompress/benchtable.py (`fedcompress bench`); times_s: the child's own calls
        benchmark.extra_info.update(r, schema=1, op="synth hypergradient", case="lstm",
                                    peer=provider in ("create_graph", "higher", "torchopt"))
        _RESULTS[provider] = dict(r, npy=npy)

    def test_table_lstm(benchmark):
        benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # so --benchmark-only keeps it
        print_table(_RESULTS)
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
