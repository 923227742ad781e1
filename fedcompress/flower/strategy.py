"""Server side: FedAvg that decodes fedcompress payloads before the weighted average."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from ..api import StateDict, apply_delta, get_compressor
from ..errors import FormatError
from ..fedavg.driver import dense_payload_bytes, weighted_average
from .common import (
    CLIENT_KEY,
    ENCODE_CPU_KEY,
    ENCODE_KEY,
    SEED_KEY,
    SPEC_KEY,
    TRAIN_CPU_KEY,
    TRAIN_KEY,
    payload_bytes,
    round_context,
    state_from_record,
)


@dataclass
class _Decoded:
    client: int
    node: int
    weight: float
    delta: StateDict
    content: RecordDict


class CompressedFedAvg(FedAvg):
    """FedAvg over compressed updates sent by :func:`fedcompress.flower.compression_mod`.

    Each round it announces ``spec`` and ``seed`` in the train config, decodes every reply with
    ``compressor.server_update(payload, global, RoundContext(round, client, seed))``, averages the
    decoded deltas weighted by ``weighted_by_key`` (default ``num-examples``) in client-id order
    (float64 accumulation, as the in-process driver does) and applies the average to the global
    model. A reply whose payload does not decode (``fc.FormatError``: corrupt bytes, wrong codec,
    wrong names or shapes, missing client id or weight) is dropped from that round with a logged
    reason; the round goes on with the others. The round's MetricRecord adds ``upstream-bytes``,
    ``dense-upstream-bytes`` (the ``none`` payload of the same replies), ``compression-ratio``,
    ``replies-accepted``, ``replies-dropped`` and ``replies-failed`` (error replies) to FedAvg's
    averaged client metrics; ``self.history`` keeps the same per round as dicts.

    Codec time, as the in-process driver reports it (wall seconds summed over the round's replies):
    ``encode-seconds`` and ``train-seconds`` from what each client's Mod measured
    (``fedcompress-encode-seconds``: the Mod's own work; ``fedcompress-train-seconds``: the wrapped
    ClientApp), ``decode-seconds`` spent here unpacking and decoding replies (``server_update``),
    and ``codec-overhead`` = (encode + decode) / (train + encode + decode) for the round;
    :attr:`codec_overhead` gives it over every round so far. The same in CPU seconds (each
    client's process, and this one's: ``time.process_time``): ``encode-cpu-seconds``,
    ``decode-cpu-seconds``, ``train-cpu-seconds``, ``codec-overhead-cpu``; with several clients
    per machine the wall clock mostly measures waits for a core. Replies without valid times (a
    client without the Mod's timing) add nothing to encode or train.

    ``model``: a torch module with the global model's architecture, for compressors that replay
    training on the server (FedSynth: ``compressor.set_model``); required for those, ignored by the
    others. ``spec`` is checked at construction (ValueError naming the valid choices), before any
    client is contacted. Other keyword arguments go to :class:`flwr.serverapp.strategy.FedAvg`.
    """

    def __init__(
        self, spec: str, seed: int = 0, model: torch.nn.Module | None = None, **fedavg_kwargs: Any
    ) -> None:
        self.compressor = get_compressor(spec)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
        if hasattr(self.compressor, "set_model"):
            if not isinstance(model, torch.nn.Module):
                raise ValueError(
                    f"model must be a torch.nn.Module with the global model's architecture: compressor "
                    f"{self.compressor.name!r} replays client training on the server"
                )
            self.compressor.set_model(model)
        super().__init__(**fedavg_kwargs)
        self.spec = self.compressor.spec
        self.seed = seed
        self.history: list[dict[str, Any]] = []
        self._global: StateDict | None = None
        self._dense_bytes: int | None = None

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t└──> fedcompress: compressor %s, seed %d", self.spec, self.seed)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        # Keep the global model of this round: decoding (and FedSynth's replay) starts from it.
        self._global = state_from_record(arrays)
        if self._dense_bytes is None:
            self._dense_bytes = dense_payload_bytes(self._global)
        config[SPEC_KEY] = self.spec
        config[SEED_KEY] = self.seed
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._global is None:
            raise RuntimeError("aggregate_train called before configure_train")
        glob = self._global
        accepted: list[_Decoded] = []
        failed = dropped = upstream = carried = 0
        encode = train = decode = 0.0
        cpu = {"encode": 0.0, "decode": 0.0, "train": 0.0}
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            if msg.has_error():
                failed += 1
                log(
                    WARNING,
                    "fedcompress: round %d, node %d replied with an error: %s",
                    server_round,
                    node,
                    msg.error.reason,
                )
                continue
            enc, tr, cpu_enc, cpu_tr = _client_seconds(msg.content)
            encode += enc
            train += tr
            cpu["encode"] += cpu_enc
            cpu["train"] += cpu_tr
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                payload, client, weight = self._unpack(msg.content)
            except FormatError as e:
                decode += time.perf_counter() - t0
                cpu["decode"] += time.process_time() - c0
                dropped += 1
                log(WARNING, "fedcompress: round %d, dropped reply of node %d: %s", server_round, node, e)
                continue
            upstream += len(payload)
            carried += 1
            try:
                delta = self.compressor.server_update(
                    payload, glob, round_context(server_round, client, self.seed)
                )
                _check_delta(delta, glob)
            except FormatError as e:
                decode += time.perf_counter() - t0
                cpu["decode"] += time.process_time() - c0
                dropped += 1
                log(
                    WARNING,
                    "fedcompress: round %d, dropped reply of node %d (client %d): payload does not "
                    "decode: %s",
                    server_round,
                    node,
                    client,
                    e,
                )
                continue
            decode += time.perf_counter() - t0
            cpu["decode"] += time.process_time() - c0
            accepted.append(_Decoded(client, node, weight, delta, msg.content))

        # Client-id order: the in-process driver sums its sorted clients in this order, so both
        # give the same floats.
        accepted.sort(key=lambda d: (d.client, d.node))
        arrays = None
        metrics = MetricRecord()
        if accepted:
            avg = weighted_average([d.delta for d in accepted], [d.weight for d in accepted])
            new_state = apply_delta(glob, avg)
            arrays = ArrayRecord({k: _array(v) for k, v in new_state.items()})
            metrics = self._client_metrics([d.content for d in accepted])
        dense = (self._dense_bytes or 0) * carried
        row = {
            "round": server_round,
            "upstream-bytes": upstream,
            "dense-upstream-bytes": dense,
            "compression-ratio": dense / upstream if upstream else 0.0,
            "replies-accepted": len(accepted),
            "replies-dropped": dropped,
            "replies-failed": failed,
            "encode-seconds": encode,
            "decode-seconds": decode,
            "train-seconds": train,
            "codec-overhead": _overhead(encode, decode, train),
            **{f"{k}-cpu-seconds": v for k, v in cpu.items()},
            "codec-overhead-cpu": _overhead(cpu["encode"], cpu["decode"], cpu["train"]),
        }
        self.history.append(row)
        for k, v in row.items():
            if k != "round":
                metrics[k] = v
        log(
            INFO,
            "fedcompress: round %d, %d bytes up (dense %d, ratio %.2f), %d accepted, %d dropped, %d failed, "
            "codec overhead %.2f %%",
            server_round,
            upstream,
            dense,
            row["compression-ratio"],
            len(accepted),
            dropped,
            failed,
            100 * row["codec-overhead"],
        )
        return arrays, metrics

    def _unpack(self, content: RecordDict) -> tuple[bytes, int, float]:
        """(payload, client id, weight) of one reply; FormatError says what is missing."""
        arrays = list(content.array_records.values())
        mrecs = list(content.metric_records.values())
        if len(arrays) != 1 or len(mrecs) != 1:
            raise FormatError(
                f"expected one ArrayRecord and one MetricRecord, got {len(arrays)} and {len(mrecs)}"
            )
        payload = payload_bytes(arrays[0])
        client = mrecs[0].get(CLIENT_KEY)
        if isinstance(client, bool) or not isinstance(client, int) or client < 0:
            raise FormatError(f"metric {CLIENT_KEY!r} must be an int >= 0, got {client!r}")
        weight = mrecs[0].get(self.weighted_by_key)
        if (
            isinstance(weight, bool)
            or not isinstance(weight, (int, float))
            or not (math.isfinite(weight) and weight > 0)
        ):
            raise FormatError(f"metric {self.weighted_by_key!r} must be a finite number > 0, got {weight!r}")
        return payload, client, float(weight)

    def _client_metrics(self, contents: list[RecordDict]) -> MetricRecord:
        """FedAvg's weighted average of the clients' own metrics (without our client-id key)."""
        try:
            out = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        except Exception as e:  # inconsistent client metrics must not cost the round's model
            log(WARNING, "fedcompress: could not aggregate client metrics: %s", e)
            return MetricRecord()
        # ours: summed in the round's row instead
        for key in (CLIENT_KEY, ENCODE_KEY, TRAIN_KEY, ENCODE_CPU_KEY, TRAIN_CPU_KEY):
            if key in out:
                del out[key]
        return out

    @property
    def codec_overhead(self) -> float:
        """(encode + decode) / (train + encode + decode) over every round so far (0.0 before any)."""
        keys = ("encode-seconds", "decode-seconds", "train-seconds")
        return _overhead(*(sum(r[k] for r in self.history) for k in keys))

    @property
    def codec_overhead_cpu(self) -> float:
        """:attr:`codec_overhead` from CPU seconds."""
        keys = ("encode-cpu-seconds", "decode-cpu-seconds", "train-cpu-seconds")
        return _overhead(*(sum(r[k] for r in self.history) for k in keys))


def _overhead(encode: float, decode: float, train: float) -> float:
    total = encode + decode + train
    return (encode + decode) / total if total > 0 else 0.0


def _client_seconds(content: RecordDict) -> tuple[float, float, float, float]:
    """(encode, train, encode CPU, train CPU) seconds a client's Mod reported; 0 where missing or
    not a finite number >= 0 (a timing is not worth dropping a reply for)."""
    out = []
    for key in (ENCODE_KEY, TRAIN_KEY, ENCODE_CPU_KEY, TRAIN_CPU_KEY):
        v = next((m[key] for m in content.metric_records.values() if key in m), None)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
        out.append(float(v) if ok else 0.0)
    return out[0], out[1], out[2], out[3]


def _check_delta(delta: StateDict, glob: StateDict) -> None:
    if not isinstance(delta, dict) or set(delta) != set(glob):
        got = sorted(delta)[:5] if isinstance(delta, dict) else type(delta).__name__
        raise FormatError(f"decoded update names {got} do not match the global model's")
    for k, v in glob.items():
        d = delta[k]
        if not isinstance(d, torch.Tensor) or d.shape != v.shape:
            shape = tuple(d.shape) if isinstance(d, torch.Tensor) else type(d).__name__
            raise FormatError(f"decoded update {k!r} is {shape}, expected shape {tuple(v.shape)}")


def _array(t: torch.Tensor) -> Array:
    return Array(t.detach().cpu().contiguous().numpy())
