"""How close is a compressor's replayed update to the client's real SGD update, at one global model?

FedSynth sends data, not an update: the server replays m SGD steps on it. This script takes the
global model after ``--warm`` rounds of plain FedAvg (mnist5k, 10 clients, E=2, B=20, lr=0.05,
seed 0: the results' mnist5k-10 setting) and, for each spec, has every client build its payload
for the next round and the server replay it. Per client: cosine and relative distance to the
client's own SGD update, and the norm ratio; then the same for the size-weighted average over the
10 clients (what FedAvg applies); and the test accuracy after applying that average once.

    python bench/fedsynth_update_match.py --warm 10 --specs "fedsynth:ratio=16,outer_steps=0;fedsynth:ratio=16"

Used for issue 14's inner-step diagnosis (docs/fedsynth.md, "Inner step per update"); ~10-60 s per
spec and ~30 s per warm round on one thread. Any spec works (e.g. ``mask:ratio=16``); the ``ratio``
column is the dense payload over the mean payload sent.

``mask+sz:keep=P,ratio=R`` (this script only, issue 13 item 7's "sz on top of masking") keeps each
float tensor's values on the mask's own seeded positions with probability P (the positions cost
no bytes: the server regenerates them), sends the kept values through ``sz:ratio=R'`` with R' set
so that the sz payload plus the mask's 14-byte meta fits dense / R, and the server scatters the
decoded values back scaled by 1 / P (unbiased, as ``mask``):

    python bench/fedsynth_update_match.py --warm 10 --specs "sz:ratio=128;mask:ratio=128;mask+sz:keep=0.25,ratio=128"
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import fedcompress as fc
from fedcompress.api import RoundContext, apply_delta, local_sgd, state_delta
from fedcompress.codecs.budget import dense_payload_bytes
from fedcompress.codecs.mask.compressor import MaskCompressor
from fedcompress.codecs.mask.framing import META_LEN
from fedcompress.codecs.mask.spec import keep_threshold, mask_keep_ref, unbiased_scale
from fedcompress.fedavg.data import load_dataset
from fedcompress.fedavg.driver import evaluate, weighted_average
from fedcompress.fedavg.models import build_model


class MaskThenSZ:
    """``mask+sz:keep=P,ratio=R``: the mask's kept values coded by sz under the rest of the budget."""

    def __init__(self, spec: str) -> None:
        kv = dict(item.split("=") for item in spec.split(":", 1)[1].split(","))
        self.keep, self.ratio = float(kv["keep"]), float(kv["ratio"])
        self.thr_m1 = keep_threshold(self.keep)

    def _positions(self, update, ctx):
        mid = MaskCompressor.mask_id(ctx)
        return {k: mask_keep_ref(v.numel(), MaskCompressor.tensor_seed(mid, i), self.thr_m1)
                for i, (k, v) in enumerate(update.items()) if v.is_floating_point()}

    def compress(self, update, ctx) -> bytes:
        pos = self._positions(update, ctx)
        kept = {k: update[k].reshape(-1)[m] for k, m in pos.items()}
        kept.update({k: v for k, v in update.items() if k not in pos})
        room = dense_payload_bytes(update) // self.ratio - META_LEN
        sz = fc.get_compressor(f"sz:ratio={dense_payload_bytes(kept) / room:.6g}")
        return sz.compress(kept, ctx) + bytes(META_LEN)  # the meta's bytes, counted

    def server_update(self, payload: bytes, g, ctx):
        kept = fc.get_compressor("sz").decompress(payload[:-META_LEN], ctx)  # sz decodes any bound
        pos = self._positions(g, ctx)  # regenerated from the seed, as the mask's server does
        scale = unbiased_scale(self.thr_m1)
        out = {}
        for k, v in g.items():
            if k in pos:
                d = torch.zeros(v.numel(), dtype=v.dtype)
                d[pos[k]] = kept[k].to(v.dtype) * scale
                out[k] = d.reshape(v.shape)
            else:
                out[k] = kept[k]
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--warm", type=int, default=10, help="FedAvg rounds before the measured round")
    ap.add_argument("--specs", required=True, help="compressor specs separated by ';'")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ds = load_dataset("mnist5k", 10, "iid", 0.5, 0)
    torch.manual_seed(0)
    model = build_model("cnn", ds.info)
    g = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sizes = [len(p) for p in ds.partitions]

    def ctx(rnd: int, c: int) -> RoundContext:
        return RoundContext(round=rnd, client=c, seed=0, epochs=2, batch_size=20, lr=0.05)

    for rnd in range(1, args.warm + 1):
        ups = [state_delta(local_sgd(model, g, ds.client_data(c), ctx(rnd, c)), g) for c in range(10)]
        g = apply_delta(g, weighted_average(ups, sizes))
    rnd = args.warm + 1
    names = [k for k in g if g[k].is_floating_point()]

    def flat(d):
        return torch.cat([d[k].reshape(-1).double() for k in names])

    def acc(state) -> float:
        model.load_state_dict(state)
        return 100 * evaluate(model, ds.x_test, ds.y_test, 1000)[0]

    real = [state_delta(local_sgd(model, g, ds.client_data(c), ctx(rnd, c)), g) for c in range(10)]
    R = [flat(u) for u in real]
    avg_real = weighted_average(real, sizes)
    AR = flat(avg_real)
    print(f"after {args.warm} rounds: accuracy {acc(g):.1f} %, after one step of the real average "
          f"{acc(apply_delta(g, avg_real)):.1f} %")
    print("| spec | ratio | per client: cosine | distance | norm | average: cosine | distance | norm | accuracy % "
          "| s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for spec in [s.strip() for s in args.specs.split(";") if s.strip()]:
        comp = MaskThenSZ(spec) if spec.startswith("mask+sz:") else fc.get_compressor(spec)
        t0 = time.time()
        deltas, sent = [], []
        for c in range(10):
            if spec.startswith("fedsynth"):  # it trains on the client's data itself
                payload = comp.client_update(model, g, ds.client_data(c), ctx(rnd, c))
            else:
                payload = comp.compress(real[c], ctx(rnd, c))
            sent.append(len(payload))
            deltas.append(comp.server_update(payload, g, ctx(rnd, c)))
        D = [flat(d) for d in deltas]
        avg = weighted_average(deltas, sizes)
        A = flat(avg)
        mean = statistics.fmean
        cos = mean([float(F.cosine_similarity(a, b, dim=0)) for a, b in zip(D, R, strict=True)])
        dist = mean([float((a - b).norm() / b.norm()) for a, b in zip(D, R, strict=True)])
        norm = mean([float(a.norm() / b.norm()) for a, b in zip(D, R, strict=True)])
        ratio = dense_payload_bytes(real[0]) / statistics.fmean(sent)
        print(f"| `{spec}` | {ratio:.1f}x | {cos:.3f} | {dist:.3f} | {norm:.2f} | "
              f"{float(F.cosine_similarity(A, AR, dim=0)):.3f} | "
              f"{float((A - AR).norm() / AR.norm()):.3f} | {float(A.norm() / AR.norm()):.2f} | "
              f"{acc(apply_delta(g, avg)):.1f} | {time.time() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
