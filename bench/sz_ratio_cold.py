"""Encodes per cold ``sz:ratio=R`` search (a fresh compressor per update and budget: the first update
of a run, a Flower node's first round, a one-off compress), on updates the search's prior curve was
not fitted to: docs/sz.md, "The ratio search without history".

    python bench/sz_ratio_cold.py                       # this tree (~1 min, one thread)
    PYTHONPATH=/tmp/old python bench/sz_ratio_cold.py   # another build, e.g. a git worktree

For fashion (CNN), digits (MLP), mnist5k (MLP and CNN): seed 1, round 1, one local epoch, clients 1
and 2, budgets 8x, 16x, 64x and 256x (those the update reaches). Prints each setting's encode
counts, their mean, and a digest of the chosen bounds (equal digests: the same answers).
"""

from __future__ import annotations

import hashlib

import torch

import fedcompress as fc
from fedcompress.api import RoundContext, local_sgd, state_delta
from fedcompress.fedavg.data import load_dataset
from fedcompress.fedavg.models import build_model

SETTINGS = (("fashion", "cnn", 60), ("digits", "mlp", 10), ("mnist5k", "mlp", 10), ("mnist5k", "cnn", 10))


def main() -> None:
    torch.set_num_threads(1)
    for dataset, model_name, clients in SETTINGS:
        data = load_dataset(dataset, clients, "iid", 0.5, 1, None)
        torch.manual_seed(1)
        model = build_model(model_name, data.info)
        glob = {k: v.detach().clone() for k, v in model.state_dict().items()}
        encodes, bounds = [], []
        for cid in (1, 2):
            ctx = RoundContext(round=1, client=cid, seed=1, epochs=1, batch_size=20, lr=0.05)
            update = state_delta(local_sgd(model, glob, data.client_data(cid), ctx), glob)
            for ratio in (8, 16, 64, 256):
                comp = fc.get_compressor(f"sz:ratio={ratio}")
                try:
                    comp.compress(update, ctx)
                except ValueError:  # a budget this update cannot reach
                    continue
                encodes.append(comp.last_choice["encodes"])
                bounds.append(repr(comp.last_choice["rel"]))
        digest = hashlib.sha256(",".join(bounds).encode()).hexdigest()[:12]
        print(f"{dataset} {model_name}: encodes {encodes}, mean {sum(encodes) / len(encodes):.2f}, bounds {digest}")


if __name__ == "__main__":
    main()
