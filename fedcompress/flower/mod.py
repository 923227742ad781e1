"""Client side: a Flower Mod that sends the compressed update instead of the local weights."""

from __future__ import annotations

import time
from logging import DEBUG, ERROR

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.constant import ErrorCode
from flwr.supercore import log

from ..api import get_compressor
from .common import (
    CLIENT_KEY,
    ENCODE_CPU_KEY,
    ENCODE_KEY,
    PARTITION_KEY,
    PAYLOAD_KEY,
    SEED_KEY,
    SPEC_KEY,
    TRAIN_CPU_KEY,
    TRAIN_KEY,
    array_view,
    is_payload_record,
    keep_client_state,
    payload_array,
    payload_bytes,
    restore_client_state,
    round_context,
    update_from_records,
)

_INT63 = (1 << 63) - 1


def client_id(ctxt: Context) -> int:
    """The client id of this node: ``partition-id`` from its node config, else its node id.

    The id goes into the RoundContext (mask seeds depend on it) and is sent back with the reply,
    so the server decodes with the same context.
    """
    pid = ctxt.node_config.get(PARTITION_KEY)
    if isinstance(pid, int) and not isinstance(pid, bool) and pid >= 0:
        return pid
    return int(ctxt.node_id) & _INT63


def compression_mod(spec: str) -> Mod:
    """A client Mod compressing every train reply with compressor ``spec`` (e.g. ``"sz:rel=1e-2"``).

    The wrapped ClientApp trains as usual and returns its local weights in one ArrayRecord; the Mod
    replaces that record by ``{"fedcompress": Array(stype="fedcompress.payload")}`` holding
    ``compress(local − received global, RoundContext(server-round, client, seed))`` and adds to the
    reply's MetricRecord the client id and two wall-clock times for :class:`CompressedFedAvg`'s
    ``codec-overhead``: ``fedcompress-train-seconds`` (the wrapped ClientApp, ``call_next``: its
    local training) and ``fedcompress-encode-seconds`` (the Mod's own work: reading the received
    model, the update, ``compress``, wrapping the payload), and both in CPU seconds of the process
    (``fedcompress-train-cpu-seconds``, ``fedcompress-encode-cpu-seconds``). A ClientApp whose
    compressor owns local training (FedSynth: ``compressor.client_update``) may reply with that
    payload record itself; the Mod then only adds the client id and the times (its compression is
    then in train-seconds). Other message types pass through untouched. What the compressor keeps
    for the client between rounds (``Compressor.client_state``: error feedback's residual, the
    ``sz:ratio`` search's start) is restored from and stored in the node's ``Context.state``:
    Flower builds a new ClientApp, and so a new compressor, for every message.
    Pair it with :class:`fedcompress.flower.CompressedFedAvg` on the server (same spec): a train
    message without the server's spec, or with a different one, gets an error reply.
    Raises ValueError at construction for an unknown or invalid spec.
    """
    comp = get_compressor(spec)
    canonical = comp.spec

    def fedcompress_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type.split(".")[0] != MessageType.TRAIN:
            return call_next(msg, ctxt)
        t_start, c_start = time.perf_counter(), time.process_time()
        arrays = list(msg.content.array_records.values())
        configs = list(msg.content.config_records.values())
        if len(arrays) != 1 or len(configs) != 1:
            return _error(
                msg, f"expects one ArrayRecord and one ConfigRecord, got {len(arrays)} and {len(configs)}"
            )
        config: ConfigRecord = configs[0]
        server_spec = config.get(SPEC_KEY)
        if server_spec is None:
            return _error(msg, f"the server sent no {SPEC_KEY!r}: use fedcompress.flower.CompressedFedAvg")
        if server_spec != canonical:
            return _error(msg, f"server compressor {server_spec!r} differs from this client's {canonical!r}")
        seed, rnd = config.get(SEED_KEY, 0), config.get("server-round", 0)
        # views of the received bytes, not copies: the Mod only subtracts them (common.array_view)
        global_views = {k: array_view(v) for k, v in arrays[0].items()}

        t_call, c_call = time.perf_counter(), time.process_time()
        out = call_next(msg, ctxt)
        train_seconds = time.perf_counter() - t_call
        train_cpu = time.process_time() - c_call
        if out.has_error():
            return out
        replies = list(out.content.array_records.items())
        if len(replies) != 1:
            return _error(msg, f"expects the ClientApp to reply with one ArrayRecord, got {len(replies)}")
        key, record = replies[0]
        cid = client_id(ctxt)
        if is_payload_record(record):
            # Already a payload: the compressor ran its own client_update (FedSynth); pass it on.
            payload = payload_bytes(record)
        else:
            try:
                update = update_from_records(record, global_views)
            except ValueError as e:
                return _error(msg, str(e))
            restore_client_state(comp, cid, ctxt.state)
            payload = comp.compress(update, round_context(int(rnd), cid, int(seed)))
            keep_client_state(comp, cid, ctxt.state)
            out.content.array_records[key] = ArrayRecord({PAYLOAD_KEY: payload_array(payload)})
        metrics = list(out.content.metric_records.values())
        if not metrics:
            out.content["metrics"] = MetricRecord()
            metrics = [out.content["metrics"]]
        metrics[0][CLIENT_KEY] = cid
        metrics[0][TRAIN_KEY] = train_seconds
        metrics[0][TRAIN_CPU_KEY] = train_cpu
        # everything the Mod did on this path except call_next (the metric writes are negligible)
        metrics[0][ENCODE_KEY] = time.perf_counter() - t_start - train_seconds
        metrics[0][ENCODE_CPU_KEY] = time.process_time() - c_start - train_cpu
        log(
            DEBUG,
            "fedcompress_mod: round %s client %s sends %d bytes (%s)",
            rnd,
            cid,
            len(payload),
            canonical,
        )
        return out

    return fedcompress_mod


def _error(msg: Message, reason: str) -> Message:
    reason = "fedcompress_mod: " + reason
    log(ERROR, reason)
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)
