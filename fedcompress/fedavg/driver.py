"""FedAvg with a pluggable upstream compressor.

One round: sample K clients; each runs ``comp.client_update(model, global_state, (x, y), ctx)``
(local SGD + compression, owned by the compressor) and sends the payload; the server decodes each
with ``comp.server_update``, averages the deltas weighted by client sample counts, applies the
average, and evaluates on the held-out test split.

Bytes: ``upstream`` is ``len(payload)`` of every payload actually sent; ``dense`` is, per sampled
client, the length of the ``none`` payload of the same update (headers + raw tensors in their own
dtypes; it depends only on names, dtypes and shapes, so we compute it once per run, with the same
function, codecs/budget.py, that ``ratio=R`` budgets use); ``download`` is the dense global model
(the same ``none`` size) sent to each sampled client.

Time, per round and summed in the summary: ``encode_seconds`` (inside ``comp.compress`` during
client updates: the codec, and a ``ratio`` search), ``train_seconds`` (the rest of
``client_update``: local SGD, or FedSynth's optimisation), ``decode_seconds`` (``server_update``:
decoding, or FedSynth's replay). ``codec_overhead`` = (encode + decode) / (train + encode +
decode) over the run. The same three in CPU seconds of the process (``time.process_time``: every
thread, the native pool's helpers included) are ``encode_cpu_seconds``, ``decode_cpu_seconds`` and
``train_cpu_seconds``, with ``codec_overhead_cpu`` from them: on a shared machine the wall clock
also counts the time the process waits for a core, the CPU share only the work. Each round also
records ``round_ratio`` (dense / sent bytes of that round) and, when the compressor exposes
``last_choice`` (a ``ratio`` budget), ``chosen``: one entry per client, e.g. ``{"client": 3,
"rel": 0.06, "encodes": 4, "ratio": 16.2}`` for sz.

Reproducible: the model init, the split, the client sampling and every ``RoundContext`` derive
from ``config.seed``, so the same config gives the same metrics (bit for bit on one machine).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..api import RoundContext, StateDict, all_finite, apply_delta, get_compressor, mix_seed
from ..codecs import budget
from .data import DATASETS, PARTITIONS, FederatedDataset, load_dataset
from .models import MODELS, build_model, count_parameters

# Defaults tuned so that `fedcompress run --dataset mnist5k --clients 10 --rounds 10 --compressor
# none` reaches >= 93% test accuracy (see docs/fedavg.md for the measured figure and time).
DEFAULT_EPOCHS = 2
DEFAULT_BATCH_SIZE = 20
DEFAULT_LR = 0.05
DEFAULT_MAX_CLIENTS_PER_ROUND = 10


@dataclass
class ExperimentConfig:
    """Everything that defines a run. ``clients_per_round`` wins over ``fraction``; with neither,
    min(clients, 10) clients train per round."""

    dataset: str = "mnist5k"
    clients: int = 10
    rounds: int = 10
    compressor: str = "none"
    partition: str = "iid"
    alpha: float = 0.5
    model: str = "cnn"
    clients_per_round: int | None = None
    fraction: float | None = None
    epochs: int = DEFAULT_EPOCHS
    batch_size: int = DEFAULT_BATCH_SIZE
    lr: float = DEFAULT_LR
    seed: int = 0
    data_dir: str | None = None
    device: str = "cpu"
    eval_batch_size: int = 1000

    def validate(self) -> None:
        """Raise ValueError naming the first bad field and its valid range."""
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; valid choices: {', '.join(DATASETS)}")
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; valid choices: {', '.join(MODELS)}")
        if self.partition not in PARTITIONS:
            raise ValueError(f"unknown partition {self.partition!r}; valid choices: {', '.join(PARTITIONS)}")
        if self.partition == "natural" and self.dataset not in ("femnist", "fortunes", "reddit"):
            raise ValueError("partition 'natural' (by writer) is only available for femnist, fortunes, reddit")
        for name in ("clients", "rounds", "epochs", "batch_size", "eval_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.clients_per_round is not None and not (1 <= self.clients_per_round <= self.clients):
            raise ValueError(
                f"clients_per_round must be in [1, clients={self.clients}], got {self.clients_per_round!r}"
            )
        if self.fraction is not None and not (0 < self.fraction <= 1):
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be a finite number > 0, got {self.alpha!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")

    def per_round(self) -> int:
        if self.clients_per_round is not None:
            return self.clients_per_round
        if self.fraction is not None:
            return max(1, min(self.clients, round(self.fraction * self.clients)))
        return min(self.clients, DEFAULT_MAX_CLIENTS_PER_ROUND)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Pieces (reused by the Flower integration and the results tooling)


def sample_clients(n_clients: int, k: int, seed: int, rnd: int) -> list[int]:
    """The k clients of round ``rnd`` (sorted), a pure function of (seed, rnd)."""
    if k >= n_clients:
        return list(range(n_clients))
    g = torch.Generator().manual_seed(mix_seed(seed, rnd, 0x5A3F))
    return sorted(torch.randperm(n_clients, generator=g)[:k].tolist())


def weighted_average(deltas: list[StateDict], weights: list[float]) -> StateDict:
    """sum_k w_k * delta_k / sum_k w_k per tensor (float64 accumulation, in the given order)."""
    if not deltas or len(deltas) != len(weights):
        raise ValueError("weighted_average needs one weight per delta and at least one delta")
    total = float(sum(weights))
    if not total > 0:
        raise ValueError("weights must sum to > 0")
    out: StateDict = {}
    for k in deltas[0]:
        acc = torch.zeros(deltas[0][k].shape, dtype=torch.float64)
        for d, w in zip(deltas, weights, strict=True):
            acc += d[k].to("cpu", torch.float64) * (w / total)
        out[k] = acc
    return out


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000
) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` on (x, y)."""
    model.eval()
    correct, loss, n = 0, 0.0, int(y.shape[0])
    # text: [N, T] next-word labels, -100 (cross_entropy's ignore_index) marks what does not count
    count = int((y != -100).sum()) if y.dim() > 1 else n
    for i in range(0, n, batch_size):
        out = model(x[i : i + batch_size])
        loss += float(torch.nn.functional.cross_entropy(out, y[i : i + batch_size], reduction="sum"))
        correct += int((out.argmax(1) == y[i : i + batch_size]).sum())
    return (correct / count, loss / count) if count else (float("nan"), float("nan"))


def dense_payload_bytes(state: StateDict) -> int:
    """Length of the ``none`` payload of a state (or update) with these names, dtypes and shapes
    (computed from them, not by packing; the one definition ``ratio=R`` budgets use too)."""
    return budget.dense_payload_bytes(state)


class CodecClock:
    """Seconds spent inside ``comp.compress`` (wrapped on this instance) while the clock is installed:
    ``seconds`` wall clock, ``cpu_seconds`` the process's CPU time.

    ``client_update`` calls ``self.compress`` after its local work, so timing the whole call and
    this wrapper separates local work from encoding without each compressor timing itself.
    """

    def __init__(self, comp) -> None:
        self.comp = comp
        self.seconds = 0.0
        self.cpu_seconds = 0.0
        self._inner = comp.compress
        self._depth = 0

        def timed(*args, **kwargs):
            if self._depth:  # a compress calling compress: count the outer call once
                return self._inner(*args, **kwargs)
            self._depth += 1
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return self._inner(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
                self.cpu_seconds += time.process_time() - c0
                self._depth -= 1

        comp.compress = timed

    def remove(self) -> None:
        self.comp.__dict__.pop("compress", None)


# ---------------------------------------------------------------------------------------------
# The experiment


def run_experiment(
    config: ExperimentConfig,
    out_dir: str | os.PathLike | None = None,
    progress: bool = False,
    data: FederatedDataset | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run FedAvg as ``config`` says; return the summary dict (``history`` holds the per-round rows).

    With ``out_dir``: writes ``metrics.jsonl`` (one JSON line per round, flushed as it goes),
    ``summary.json`` (the summary without ``history``) and ``accuracy_vs_mb.png``.
    ``data`` lets a caller reuse an already loaded/partitioned dataset (``compare`` does).
    ``progress``: a tqdm bar per round on stderr.
    """
    config.validate()
    comp = get_compressor(config.compressor)  # validates the spec before any training
    t_start = time.perf_counter()
    if data is None:
        data = load_dataset(
            config.dataset, config.clients, config.partition, config.alpha, config.seed, config.data_dir
        )
    if len(data.partitions) != config.clients:
        raise ValueError(
            f"data has {len(data.partitions)} client partitions, config.clients={config.clients}"
        )
    dev = torch.device(config.device)
    x_test, y_test = data.x_test.to(dev), data.y_test.to(dev)
    torch.manual_seed(mix_seed(config.seed, 0x30DE1))
    model = build_model(config.model, data.info).to(dev)
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dense_per_client = dense_payload_bytes(global_state)
    acc0, loss0 = evaluate(model, x_test, y_test, config.eval_batch_size)

    k = config.per_round()
    sizes = data.client_sizes()
    history: list[dict[str, Any]] = []
    up_total = dense_total = down_total = 0
    enc_total = dec_total = train_total = 0.0
    cpu_total = {"encode": 0.0, "decode": 0.0, "train": 0.0}
    clock = CodecClock(comp)
    metrics_file = None
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        metrics_file = open(os.path.join(out_dir, "metrics.jsonl"), "w")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=config.rounds, desc=config.compressor, unit="round", file=sys.stderr, leave=True)
    diverged_round = None
    try:
        for rnd in range(1, config.rounds + 1):
            t0 = time.perf_counter()
            chosen = sample_clients(config.clients, k, config.seed, rnd)
            deltas, weights, up = [], [], 0
            enc = dec = train = 0.0
            cpu = {"encode": 0.0, "decode": 0.0, "train": 0.0}
            choices = []
            for cid in chosen:
                ctx = RoundContext(
                    round=rnd,
                    client=cid,
                    seed=config.seed,
                    epochs=config.epochs,
                    batch_size=config.batch_size,
                    lr=config.lr,
                    device=config.device,
                )
                x, y = data.client_data(cid)
                xd, yd = x.to(dev), y.to(dev)
                before, cpu_before = clock.seconds, clock.cpu_seconds
                t1, c1 = time.perf_counter(), time.process_time()
                payload = comp.client_update(model, global_state, (xd, yd), ctx)
                t2, c2 = time.perf_counter(), time.process_time()
                enc += clock.seconds - before
                train += (t2 - t1) - (clock.seconds - before)
                cpu["encode"] += clock.cpu_seconds - cpu_before
                cpu["train"] += (c2 - c1) - (clock.cpu_seconds - cpu_before)
                choice = getattr(comp, "last_choice", None)
                if choice is not None:
                    choices.append({"client": cid, **choice})
                up += len(payload)
                t3, c3 = time.perf_counter(), time.process_time()
                deltas.append(comp.server_update(payload, global_state, ctx))
                dec += time.perf_counter() - t3
                cpu["decode"] += time.process_time() - c3
                weights.append(sizes[cid])
            global_state = apply_delta(global_state, weighted_average(deltas, weights))
            model.load_state_dict(global_state)
            acc, loss = evaluate(model, x_test, y_test, config.eval_batch_size)
            finite = all_finite(global_state)
            dense = dense_per_client * len(chosen)
            down = dense_per_client * len(chosen)
            up_total += up
            dense_total += dense
            down_total += down
            enc_total += enc
            dec_total += dec
            train_total += train
            for key in cpu:
                cpu_total[key] += cpu[key]
            row = {
                "round": rnd,
                "accuracy": acc,
                "loss": loss,
                "upstream_bytes": up_total,
                "round_upstream_bytes": up,
                "dense_upstream_bytes": dense_total,
                "round_dense_bytes": dense,
                "ratio": dense_total / up_total if up_total else float("inf"),
                "download_bytes": down_total,
                "round_download_bytes": down,
                "round_ratio": dense / up if up else float("inf"),
                "encode_seconds": enc,
                "decode_seconds": dec,
                "train_seconds": train,
                **{f"{key}_cpu_seconds": v for key, v in cpu.items()},
                "seconds": time.perf_counter() - t0,
                "clients": chosen,
            }
            if choices:
                row["chosen"] = choices
            if not finite:
                row["diverged"] = True
            history.append(row)
            if metrics_file is not None:
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
            if bar is not None:
                bar.set_postfix(acc=f"{acc:.4f}", up_MB=f"{up_total / 1e6:.2f}", ratio=f"{row['ratio']:.1f}")
                bar.update(1)
            if on_round is not None:
                on_round(row)
            if not finite:  # every later round would train and average NaNs: the run has ended
                diverged_round = rnd
                break
    finally:
        clock.remove()
        if bar is not None:
            bar.close()
        if metrics_file is not None:
            metrics_file.close()

    last = history[-1]
    summary: dict[str, Any] = {
        "final_accuracy": last["accuracy"],
        "final_loss": last["loss"],
        "best_accuracy": max(r["accuracy"] for r in history),
        "initial_accuracy": acc0,
        "initial_loss": loss0,
        "upstream_bytes": up_total,
        "dense_upstream_bytes": dense_total,
        "compression_ratio": dense_total / up_total if up_total else float("inf"),
        "download_bytes": down_total,
        "dense_bytes_per_client": dense_per_client,
        "rounds": config.rounds,
        "rounds_run": len(history),
        # the first round whose averaged model held a non-finite value; the run stopped there
        "diverged_round": diverged_round,
        "clients_per_round": k,
        "wall_seconds": time.perf_counter() - t_start,
        "encode_seconds": enc_total,
        "decode_seconds": dec_total,
        "train_seconds": train_total,
        "codec_overhead": (enc_total + dec_total) / (train_total + enc_total + dec_total)
        if train_total + enc_total + dec_total > 0
        else 0.0,
        **{f"{key}_cpu_seconds": v for key, v in cpu_total.items()},
        "codec_overhead_cpu": (cpu_total["encode"] + cpu_total["decode"]) / sum(cpu_total.values())
        if sum(cpu_total.values()) > 0
        else 0.0,
        "model_parameters": count_parameters(model),
        "train_samples": int(data.y_train.numel()),
        "test_samples": int(data.y_test.numel()),
        "compressor": comp.spec,
        "compressor_revision": type(comp).REVISION,
        "config": config.to_dict(),
        "torch_threads": torch.get_num_threads(),
        "history": history,
    }
    if out_dir is not None:
        write_outputs(summary, out_dir)
    return summary


def write_outputs(summary: dict[str, Any], out_dir: str | os.PathLike) -> None:
    """summary.json (without history) and accuracy_vs_mb.png."""
    from .plots import plot_accuracy_vs_mb

    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump({k: v for k, v in summary.items() if k != "history"}, f, indent=2)
        f.write("\n")
    plot_accuracy_vs_mb({summary["compressor"]: summary}, os.path.join(out_dir, "accuracy_vs_mb.png"))


def final_line(summary: dict[str, Any]) -> str:
    """The one-line result the CLI prints: accuracy, MB sent up, ratio."""
    s = summary
    rounds = f"after {s['rounds']} rounds"
    if s.get("diverged_round"):
        rounds = f"diverged in round {s['diverged_round']} of {s['rounds']} (the model went non-finite; run stopped)"
    return (
        # the spec as typed (config) rather than the expanded one with every default spelled out
        f"{s.get('config', {}).get('compressor') or s['compressor']}: accuracy {s['final_accuracy'] * 100:.2f}% "
        f"{rounds}, "
        f"{s['upstream_bytes'] / 1e6:.3f} MB sent up (dense {s['dense_upstream_bytes'] / 1e6:.3f} MB), "
        f"ratio {s['compression_ratio']:.2f}x, {s['wall_seconds']:.1f} s"
    )
