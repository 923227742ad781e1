"""The layer protocol of the chain engine (``chain.py``): what every layer of ``layers.py`` provides.

A chain network is a list of layers; the engine calls four hand-written passes on each (see
``chain.py`` for the maths). Every pass takes what it works on as arguments and keeps nothing on
the layer: a layer object holds only its configuration (parameter names, kernel size, ...), because
the traced chain is cached per model and shared by every call, including concurrent or nested
ones. Per-call state travels in two places the engine creates per call: ``saved`` (what the forward
of one step recorded for that step's other passes; a layer may add to it) and ``K`` (the ops
resolved for this call's device, dtype and backend, ``ops.Bound``).

Arguments common to the passes:

- ``P``: name -> weight for the current step (flat-buffer views; a Linear weight is a ``LowRank``).
- ``L``: name -> cotangent ``lam`` of the weights (same kinds as ``P``).
- ``sink``: where a pass puts its weight gradients (``Sink``); which kind depends on the pass.
- ``need_input``: whether the gradient with respect to the layer's input is wanted (not for the
  first layer, whose input is the synthetic data only in the reverse pass).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from . import ops

Tensor = torch.Tensor


class Unsupported(Exception):
    """The model is not a chain of supported layers (the generic engine is used instead)."""


class Sink(Protocol):
    """Receives weight gradients by parameter name (``chain.py`` has three: a forward step's, the real
    batch's, a reverse step's). ``lowrank`` (forward, real batch) and ``lowrank_hv`` (reverse) take
    the factors of a Linear weight's rank-b gradient; each sink has the one its pass needs."""

    def dense(self, name: str, g: Tensor) -> None: ...

    def target(self, name: str) -> Tensor | None:
        """The buffer ``dense(name, g)`` would copy into, for a layer to write there itself; None
        when the sink accumulates."""
        ...


@runtime_checkable
class Layer(Protocol):
    """One step of a chain. ``dense`` / ``lowrank``: the parameter names it owns (dense ones live in
    the engine's flat buffer; low-rank ones are Linear weights kept as ``LowRank``)."""

    has_params: bool
    dense: list[str]
    lowrank: list[str]

    def forward(self, a: Tensor, P: dict, K: ops.Bound) -> tuple[Tensor, Any]:
        """z = layer(a; W) and ``saved``, the per-step record its other passes read."""
        ...

    def backward(self, d: Tensor, saved: Any, P: dict, K: ops.Bound, need_input: bool, sink: Sink) -> Tensor | None:
        """delta_in = dz/da^T delta (when ``need_input``); dW = delta (x) a into ``sink``."""
        ...

    def tangent_forward(self, adot: Tensor | None, saved: Any, P: dict, L: dict, K: ops.Bound) -> Tensor | None:
        """zdot = layer(adot; W) + layer(a; lam): the derivative along ``lam`` (``adot`` None: zero)."""
        ...

    def tangent_backward(
        self, dd: Tensor, d: Tensor | None, saved: Any, adot: Tensor | None, P: dict, L: dict, K: ops.Bound,
        need_input: bool, sink: Sink,
    ) -> Tensor | None:  # fmt: skip
        """ddot_in = W^T ddot + lam^T delta (when ``need_input``); H lam = ddot (x) a + delta (x) adot
        into ``sink``."""
        ...


def pair(v) -> tuple[int, int]:
    """A 2-d layer argument (kernel size, stride, ...) as two ints."""
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(t) for t in v)
    if len(v) == 1:
        return (v[0], v[0])
    if len(v) != 2:
        raise Unsupported(f"2-d parameter expected, got {v}")
    return v
