"""At equal bytes, how much update does sz keep: one REL bound per tensor (``sz:ratio=R``'s search)
or one ABS bound for every tensor? (issue 13 item 7's "per-layer budgets")

A single ABS bound gives every value the same error, which for a fixed number of bits is what
minimises the total squared error (reverse water-filling); a REL bound scales each tensor's error
with its own range, so tensors with wide ranges get coarser codes than their share of the error
warrants. This script measures the difference on a real update.

It runs 3 rounds of plain FedAvg on mnist5k (10 clients, E=2, B=20, lr=0.05, seed 0), takes client
0's update of round 4, and for R in 16, 64, 256: encodes it with ``sz:ratio=R``, then bisects one
ABS bound to the same payload size, and prints each one's relative squared error
sum (x_hat - x)^2 / sum x^2 over the whole update. Run:  python bench/sz_abs_vs_rel.py  (~15 s)

``--search``: the two byte-budget searches themselves (``sz:ratio=R`` and ``sz:ratio=R,bound=abs``),
one compressor each across six clients' round-1 updates (mnist5k, 10 clients, E=1), as in a round:
encodes per update and the mean relative squared error (docs/sz.md, "Byte budgets"; ~20 s).
"""

from __future__ import annotations

import math

import torch

import fedcompress as fc
from fedcompress.api import RoundContext, local_sgd
from fedcompress.fedavg.data import load_dataset
from fedcompress.fedavg.models import build_model


def _start():
    """mnist5k with 10 clients (iid, seed 0), the CNN at seed 0's init, and its weights."""
    ds = load_dataset("mnist5k", 10, "iid", 0.5, 0, None)
    torch.manual_seed(0)
    model = build_model("cnn", ds.info)
    return ds, model, {k: v.detach().clone() for k, v in model.state_dict().items()}


def real_update() -> tuple[dict, RoundContext]:
    ds, model, g = _start()
    for rnd in range(1, 4):  # mid-training, not the first round's update
        ups = []
        for c in range(10):
            ctx = RoundContext(round=rnd, client=c, seed=0, epochs=2, batch_size=20, lr=0.05)
            new = local_sgd(model, g, ds.client_data(c), ctx)
            ups.append({k: new[k] - g[k] for k in g})
        g = {k: g[k] + sum(u[k] for u in ups) / 10 for k in g}
    ctx = RoundContext(round=4, client=0, seed=0, epochs=2, batch_size=20, lr=0.05)
    new = local_sgd(model, g, ds.client_data(0), ctx)
    return {k: new[k] - g[k] for k in g}, ctx


def main() -> None:
    torch.set_num_threads(1)
    upd, ctx = real_update()
    dense = sum(v.numel() * v.element_size() for v in upd.values())
    energy = sum(float(v.double().pow(2).sum()) for v in upd.values())

    def measure(spec: str) -> tuple[float, float]:
        comp = fc.get_compressor(spec)
        payload = comp.compress(upd, ctx)
        out = comp.decompress(payload, ctx)
        err = sum(float((out[k].double() - upd[k].double()).pow(2).sum()) for k in upd)
        return dense / len(payload), err / energy

    print("| budget | REL per tensor: ratio, rel. sq. error | one ABS bound: bound, ratio, rel. sq. error |")
    print("|---|---|---|")
    for r in (16, 64, 256):
        ratio, err = measure(f"sz:ratio={r}")
        lo, hi = 1e-9, 1.0  # the ABS bound with at least REL's ratio: the size falls with the bound
        for _ in range(40):
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if measure(f"sz:abs={mid!r}")[0] < ratio else (lo, mid)
        ratio_a, err_a = measure(f"sz:abs={hi!r}")
        print(f"| {r}x | {ratio:.1f}x, {err:.4f} | {hi:.3g}, {ratio_a:.1f}x, {err_a:.4f} |")


def search() -> None:
    torch.set_num_threads(1)
    ds, model, g = _start()
    ups = []
    for c in range(6):
        ctx = RoundContext(round=1, client=c, seed=0, epochs=1, batch_size=20, lr=0.05)
        new = local_sgd(model, g, ds.client_data(c), ctx)
        ups.append({k: new[k] - g[k] for k in g})
    print("| budget | bound | encodes per update | mean relative squared error |")
    print("|---|---|---|---:|")
    for r in (16, 64, 256):
        for bound in ("rel", "abs"):
            comp = fc.get_compressor(f"sz:ratio={r},bound={bound}")
            encodes, errs = [], []
            for u in ups:
                ctx = RoundContext()
                out = comp.decompress(comp.compress(u, ctx), ctx)
                encodes.append(comp.last_choice["encodes"])
                energy = sum(float(v.double().pow(2).sum()) for v in u.values())
                errs.append(sum(float((out[k].double() - v.double()).pow(2).sum()) for k, v in u.items()) / energy)
            print(f"| {r}x | {bound} | {', '.join(map(str, encodes))} | {sum(errs) / len(errs):.4f} |")


if __name__ == "__main__":
    import sys

    search() if "--search" in sys.argv[1:] else main()
