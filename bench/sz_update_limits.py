"""How far can an error-bounded codec go on real FedAvg updates at REL 1e-2? (issue 3's 20x goal)

Runs plain FedAvg as `fedcompress run --dataset mnist5k` does by default (10 clients, E=2, B=20,
lr=0.05, seed 0, no compression) and, at a few rounds, takes client 0's update and reports for the
lossy tensors (>= 1024 values; the rest is < 0.2% of the bytes):

  * H0: zeroth-order entropy of the codes round(x / 2eb), eb = 1e-2 * (max - min) per tensor;
  * H|ctx: conditional entropies of the codes given a context a coder could use: the magnitude
    class of the previous code, of the two previous codes, of the largest of the 8 previous codes
    (an upper bound on what context modelling gains; the model cost itself is not counted);
  * fedcompress sz: the ratio `sz:rel=1e-2` reaches on the whole update (every byte it sends).

Every ratio is 32 bits / (bits per value). Run:  python bench/sz_update_limits.py  (~2 min)
"""

from __future__ import annotations

import numpy as np
import torch

import fedcompress as fc
from fedcompress.api import RoundContext, local_sgd
from fedcompress.fedavg.data import load_dataset
from fedcompress.fedavg.models import FedAvgCNN

ROUNDS = (0, 4, 9)


def entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def cond_entropy(sym: np.ndarray, ctx: np.ndarray) -> float:
    total = 0.0
    for c in np.unique(ctx):
        s = sym[ctx == c]
        total += s.size * entropy(np.unique(s, return_counts=True)[1])
    return total / sym.size


def magnitude_class(a: np.ndarray) -> np.ndarray:
    a = np.abs(a)
    return np.minimum(np.where(a == 0, 0, np.floor(np.log2(np.maximum(a, 1))) + 1), 6).astype(np.int64)


def shifted(q: np.ndarray, k: int) -> np.ndarray:
    return np.concatenate([np.zeros(k, np.int64), q[:-k]])


def limits(update: dict[str, torch.Tensor], rel: float = 1e-2) -> dict[str, float]:
    bits = {"H0": 0.0, "H|prev": 0.0, "H|prev2": 0.0, "H|max8": 0.0}
    raw_bits, n = 0, 0
    for v in update.values():
        if not v.is_floating_point():
            continue
        if v.numel() < 1024:
            raw_bits += 32 * v.numel()
            n += v.numel()
            continue
        x = v.double().numpy().ravel()
        q = np.round(x / (2 * rel * (x.max() - x.min()))).astype(np.int64)
        prev = magnitude_class(shifted(q, 1))
        bits["H0"] += x.size * entropy(np.unique(q, return_counts=True)[1])
        bits["H|prev"] += x.size * cond_entropy(q, prev)
        bits["H|prev2"] += x.size * cond_entropy(q, np.minimum(prev + magnitude_class(shifted(q, 2)), 8))
        max8 = np.max([np.abs(shifted(q, k)) for k in range(1, 9)], 0)
        bits["H|max8"] += x.size * cond_entropy(q, magnitude_class(max8))
        n += x.size
    return {k: 32 * n / (b + raw_bits) for k, b in bits.items()}


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ds = load_dataset("mnist5k", clients=10, seed=0)
    model = FedAvgCNN()
    glob = {k: v.clone() for k, v in model.state_dict().items()}
    sz = fc.get_compressor("sz:rel=1e-2")
    print("| round | H0 limit | H given prev | H given 2 prev | H given max of 8 prev | fedcompress sz:rel=1e-2 |")
    print("|---:|---:|---:|---:|---:|---:|")
    for rnd in range(max(ROUNDS) + 1):
        updates = []
        for c in range(10):
            ctx = RoundContext(round=rnd, client=c, seed=0, epochs=2, batch_size=20, lr=0.05)
            local = local_sgd(model, glob, (ds.x_train[ds.partitions[c]], ds.y_train[ds.partitions[c]]), ctx)
            updates.append({k: local[k] - glob[k] for k in glob})
        if rnd in ROUNDS:
            u = {k: v for k, v in updates[0].items() if v.is_floating_point()}
            lim = limits(u)
            dense = sum(v.numel() * v.element_size() for v in u.values())
            sent = len(sz.compress(u, RoundContext(round=rnd, client=0, seed=0)))
            print(f"| {rnd} | {lim['H0']:.1f}x | {lim['H|prev']:.1f}x | {lim['H|prev2']:.1f}x | {lim['H|max8']:.1f}x "
                  f"| {dense / sent:.1f}x |")
        glob = {k: glob[k] + sum(u[k] for u in updates) / len(updates) if glob[k].is_floating_point() else glob[k]
                for k in glob}


if __name__ == "__main__":
    main()
