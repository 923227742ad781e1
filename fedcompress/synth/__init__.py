"""FedSynth's hypergradient engine: ``hypergradient(model, params, syn_x, syn_y, inner_lr, real_x, real_y)``.

See ``engine.py`` for the objective and the three implementations (engine, generic, reference),
``chain.py`` for the fast hand-written pass, ``ops.py`` for the fused ops (Triton in kernels/synth.py).
"""

from .engine import (
    chain_plan,
    hypergradient,
    hypergradient_batched,
    hypergradient_generic,
    hypergradient_ref,
    real_loss,
    soft_cross_entropy,
    unroll,
)

__all__ = [
    "hypergradient",
    "hypergradient_ref",
    "hypergradient_generic",
    "hypergradient_batched",
    "unroll",
    "real_loss",
    "soft_cross_entropy",
    "chain_plan",
]
