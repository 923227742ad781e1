"""Flower (flwr 1.41 Message API) integration: compress the upstream update in two lines.

Client::

    from fedcompress.flower import compression_mod
    app = ClientApp(mods=[compression_mod("sz:rel=1e-2")])   # your @app.train returns local weights

Server::

    from fedcompress.flower import CompressedFedAvg
    strategy = CompressedFedAvg("sz:rel=1e-2", fraction_evaluate=0.0)   # any FedAvg keyword
    result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=3)

The Mod turns the train reply's ArrayRecord (the local weights) into one fedcompress payload of the
update (local − received global); the Strategy decodes every reply with ``server_update``, drops
undecodable ones (logged, counted in the round's metrics), and averages the rest as FedAvg does.
Needs the ``flower`` extra (``pip install "fedcompress[flower]"``).
"""

try:
    import flwr  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "fedcompress.flower needs Flower: pip install 'fedcompress[flower]' (flwr==1.41.0)"
    ) from e

from .common import (  # noqa: E402
    CLIENT_KEY,
    PAYLOAD_KEY,
    PAYLOAD_STYPE,
    SEED_KEY,
    SPEC_KEY,
    payload_array,
    payload_bytes,
)
from .mod import compression_mod  # noqa: E402
from .strategy import CompressedFedAvg  # noqa: E402

__all__ = [
    "compression_mod",
    "CompressedFedAvg",
    "payload_array",
    "payload_bytes",
    "PAYLOAD_KEY",
    "PAYLOAD_STYPE",
    "SPEC_KEY",
    "SEED_KEY",
    "CLIENT_KEY",
]
