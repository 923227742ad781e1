"""FedSynth's hypergradient engine: ``hypergradient(model, params, syn_x, syn_y, inner_lr, real_x, real_y)``.

See ``engine.py`` for the objective and the three implementations (engine, generic, reference);
the fast hand-written pass for chain networks: ``trace.py`` (model -> layers), ``layer.py`` (the
layer protocol), ``layers.py`` (the layers), ``chain.py`` (the engine running them); ``ops.py`` for
the fused ops (Triton in kernels/synth.py, C++ adapters in fedcompress/cpp/synth.py); ``lstm.py``
for the next-word LSTM.
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
