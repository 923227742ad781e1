"""ServerApp: CompressedFedAvg on the FedAvg CNN, central evaluation on mnist5k's held-out split.

With ``out-dir`` set it writes ``metrics.json`` (per round: accuracy, loss, upstream bytes, dense
bytes, ratio, dropped replies) and ``final_weights.fcmp`` (the final global state as a fedcompress
``none`` payload: ``fc.get_compressor("none").decompress(open(p, "rb").read(), fc.RoundContext())``).
"""

from __future__ import annotations

import json
import os
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedcompress.api import RoundContext, get_compressor
from fedcompress.fedavg.driver import evaluate
from fedcompress.flower import CompressedFedAvg
from fedcompress.flower.common import state_from_record

from .task import initial_model, load_test, new_model, read_config, set_threads


def build_server_app(overrides: dict[str, Any] | None = None) -> ServerApp:
    """The ServerApp; ``overrides`` win over the run config (flwr's run_simulation passes none)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = read_config(context.run_config, overrides)
        set_threads(cfg)
        # An unknown spec raises here, before any node is contacted.
        strategy = CompressedFedAvg(
            cfg["compressor"],
            seed=cfg["seed"],
            model=new_model(cfg),  # FedSynth replays the clients' training on it
            fraction_evaluate=0.0,  # central evaluation only
            min_train_nodes=cfg["min-nodes"],
            min_available_nodes=cfg["min-nodes"],
        )
        x_test, y_test = load_test(cfg)
        model = new_model(cfg)

        def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            model.load_state_dict(state_from_record(arrays))
            acc, loss = evaluate(model, x_test, y_test)
            return MetricRecord({"accuracy": acc, "loss": loss})

        init = initial_model(cfg)
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord.from_torch_state_dict(init.state_dict()),
            num_rounds=cfg["num-server-rounds"],
            train_config=ConfigRecord(),
            evaluate_fn=central_evaluate,
        )
        if cfg["out-dir"]:
            write_results(cfg, strategy, result)

    return app


def write_results(cfg: dict[str, Any], strategy: CompressedFedAvg, result) -> None:
    os.makedirs(cfg["out-dir"], exist_ok=True)
    rounds = []
    for row in strategy.history:
        ev = result.evaluate_metrics_serverapp.get(row["round"], {})
        rounds.append({**row, **{k: float(v) for k, v in ev.items()}})
    summary = {
        "compressor": strategy.spec,
        "config": cfg,
        "rounds": rounds,
        "upstream_bytes": sum(r["upstream-bytes"] for r in rounds),
        "dense_upstream_bytes": sum(r["dense-upstream-bytes"] for r in rounds),
        "final_accuracy": rounds[-1].get("accuracy") if rounds else None,
    }
    with open(os.path.join(cfg["out-dir"], "metrics.json"), "w") as f:
        json.dump(summary, f, indent=2)
    state = state_from_record(result.arrays)
    with open(os.path.join(cfg["out-dir"], "final_weights.fcmp"), "wb") as f:
        f.write(get_compressor("none").compress(state, RoundContext()))


app = build_server_app()
