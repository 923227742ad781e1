"""ClientApp: local SGD on this node's partition; the compression Mod sends the compressed update.

With a fixed compressor the whole integration is one line::

    app = ClientApp(mods=[compression_mod("sz:rel=1e-2")])

Here the compressor comes from the run config (``compressor``), so a small Mod builds the
``compression_mod`` for that spec on first use.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedcompress.api import Compressor, get_compressor, local_sgd
from fedcompress.flower import PAYLOAD_KEY, compression_mod, payload_array
from fedcompress.flower.common import keep_client_state, restore_client_state, state_from_record
from fedcompress.flower.mod import client_id

from .task import load_partition, new_model, read_config, set_threads, train_context


def build_client_app(overrides: dict[str, Any] | None = None) -> ClientApp:
    """The ClientApp; ``overrides`` win over the run config (flwr's run_simulation passes none)."""
    mods: dict[str, Any] = {}

    def run_config_compression_mod(msg: Message, context: Context, call_next):
        spec = read_config(context.run_config, overrides)["compressor"]
        if spec not in mods:
            mods[spec] = compression_mod(spec)
        return mods[spec](msg, context, call_next)

    app = ClientApp(mods=[run_config_compression_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg = read_config(context.run_config, overrides)
        set_threads(cfg)
        cid = client_id(context)
        x, y = load_partition(cfg, cid, int(context.node_config.get("num-partitions", 2)))
        global_state = state_from_record(msg.content["arrays"])
        ctx = train_context(cfg, msg.content["config"]["server-round"], cid)
        model = new_model(cfg)
        comp = get_compressor(cfg["compressor"])
        if type(comp).client_update is not Compressor.client_update:
            # The compressor owns local training (FedSynth learns synthetic data): send its payload;
            # the Mod passes a ready payload through.
            # (Flower builds this app anew per message: the compressor's client state, e.g. error
            # feedback's residual, travels in the node's Context.state between rounds)
            restore_client_state(comp, cid, context.state)
            payload = comp.client_update(model, global_state, (x, y), ctx)
            keep_client_state(comp, cid, context.state)
            arrays = ArrayRecord({PAYLOAD_KEY: payload_array(payload)})
        else:
            arrays = ArrayRecord.from_torch_state_dict(local_sgd(model, global_state, (x, y), ctx))
        metrics = MetricRecord({"num-examples": int(y.numel())})
        return Message(content=RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    return app


app = build_client_app()
