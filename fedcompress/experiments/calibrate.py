"""Choosing each compressor's parameters for a target ratio, on one real client update."""

from __future__ import annotations

import math
from dataclasses import replace

from .plan import ROW_LABELS, Plan, Run, _config, compressor_available


def first_update(data, cfg) -> tuple[dict, dict]:
    """(global_state, local_state) of client 0's round-1 local SGD from the driver's initial model."""
    import torch

    from ..api import RoundContext, local_sgd, mix_seed
    from ..fedavg.models import build_model

    torch.manual_seed(mix_seed(cfg.seed, 0x30DE1))  # as run_experiment does
    model = build_model(cfg.model, data.info)
    g = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ctx = RoundContext(
        round=1, client=0, seed=cfg.seed, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr
    )
    local = local_sgd(model, g, data.client_data(0), ctx)
    return g, local


def _ratio(spec: str, state: dict, dense: int) -> float:
    from ..api import RoundContext, get_compressor

    return dense / len(get_compressor(spec).compress(state, RoundContext(round=1, client=0, seed=0)))


def calibrate_sz(
    update: dict, dense: int, ratio: float, target: str = "update", iters: int = 10
) -> tuple[str, float]:
    """The ``sz:rel=..`` spec whose payload on ``update`` is nearest ``ratio`` (bisection on log10 eb
    in [1e-7, 0.5]; the ratio grows with the bound). Returns (spec, ratio reached on ``update``)."""

    def spec(eb: float) -> str:
        s = f"sz:rel={eb:.3g}"
        return s + ",target=weights" if target == "weights" else s

    lo, hi = math.log10(1e-7), math.log10(0.5)
    best = (math.inf, spec(1e-2), 0.0)
    for _ in range(iters):
        mid = (lo + hi) / 2
        s = spec(10**mid)
        r = _ratio(s, update, dense)
        best = min(best, (abs(math.log(r / ratio)), s, r))
        if r < ratio:
            lo = mid
        else:
            hi = mid
    return best[1], best[2]


def fedsynth_shape(ratio: float, input_shape, classes: int, dense: int, labels: str, max_batches: int = 20):
    """(batches, batch, ratio) from fedsynth's shape rule (``codecs.fedsynth.shape_for_budget``) for a
    budget of dense/ratio bytes, with at most ``max_batches`` batches (the rule's local step count
    here: this table does not know each client's; ``fedsynth:ratio=R`` applies the rule per client)."""
    from ..codecs.fedsynth import shape_for_budget

    s = shape_for_budget(int(dense // ratio), input_shape, classes, labels=labels, local_steps=max_batches,
                         ratio=ratio, dense=dense)
    return s.batches, s.batch, dense / s.nbytes


def build_runs(plan: Plan, data_by_part: dict, log=print) -> list[Run]:
    """Every run of the plan, with each compressor's parameters chosen for its ratio."""
    from ..fedavg.driver import dense_payload_bytes

    runs: list[Run] = []
    sz_missing = compressor_available("sz")
    for part in plan.parts:
        data = data_by_part["iid" if part == "sweep" else part]
        cfg = _config(plan, part, "none")
        g, local = first_update(data, cfg)
        upd = {k: local[k] - g[k] if v.is_floating_point() else local[k] for k, v in g.items()}
        dense = dense_payload_bytes(g)
        in_shape = tuple(data.x_train.shape[1:])
        C = data.info.num_classes
        if part == "sweep":
            for target in ("update", "weights"):
                for eb in plan.sweep:
                    spec = f"sz:rel={eb:g}" + (",target=weights" if target == "weights" else "")
                    run = Run(part, f"sz-{target}", eb, spec)
                    if sz_missing:
                        run.note = f"sz not available: {sz_missing}"
                    else:
                        run.calibrated_ratio = _ratio(spec, upd if target == "update" else local, dense)
                    runs.append(run)
            continue
        rows = plan.rows if part == "iid" else plan.noniid_rows
        if "none" in rows:
            runs.append(Run(part, "none", 1.0, "none", 1.0))
        for ratio in plan.ratios:
            for row in rows:
                if row == "none":
                    continue
                if row in ("mask", "mask-unbiased"):
                    flag = ",unbiased=true" if row == "mask-unbiased" else ",unbiased=false"
                    spec = f"mask:keep={1 / ratio:.6g}" + flag
                    runs.append(Run(part, row, ratio, spec, _ratio(spec, upd, dense)))
                elif row == "sz":
                    if sz_missing:
                        runs.append(Run(part, row, ratio, "sz", note=f"sz not available: {sz_missing}"))
                        continue
                    spec, r = calibrate_sz(upd, dense, ratio)
                    runs.append(Run(part, row, ratio, spec, r))
                elif row.startswith("fedsynth"):
                    labels = row.split("-", 1)[1]
                    m, b, r = fedsynth_shape(ratio, in_shape, C, dense, labels)
                    spec = (
                        f"fedsynth:batches={m},batch={b},labels={labels},"
                        f"outer_steps={plan.fedsynth_outer_steps}"
                    )
                    runs.append(Run(part, row, ratio, spec, r))
                else:
                    raise ValueError(f"unknown row {row!r}; valid: {', '.join(ROW_LABELS)}")
        log(f"[results] {part}: {sum(r.part == part for r in runs)} runs planned")
    # the same parameters for every seed (calibrated on the first): a row is one spec, many seeds
    return [replace(r, seed=s) for s in plan.seeds for r in runs]
