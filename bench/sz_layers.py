"""Where an ``sz`` update's codec time goes inside FedAvg: native calls against the Python around them.

    python bench/sz_layers.py [--spec sz:rel=1e-2]                      # ~15 s, one thread
    PYTHONPATH=/tmp/old python bench/sz_layers.py                       # an older build (git worktree)

Runs ``fedcompress run``'s experiment (mnist5k, 10 clients, 3 rounds, one thread) with a process-CPU
timer around each layer of the sz path that this build has: the native calls
(``_C.sz_encode_stream`` / ``sz_encode_records``, ``sz_decode`` / ``sz_decode_records``,
``join_crc32``, ``sz_value_stats``), the ``sz:ratio`` search's ``value_range`` and ``_spread``,
``wire.pack`` / ``unpack``, and ``SZCompressor.compress`` / ``decompress`` / ``server_update``;
prints each in ms per client update, after training (each call comes right after
a client's local SGD, as in FL). Nested timers overlap: ``compress`` includes the native encode and
``pack``. docs/sz.md, "One native call per payload", has what it showed.
"""

from __future__ import annotations

import argparse
import time

import fedcompress._C as C
import torch

import fedcompress.codecs.sz.statedict as statedict
import fedcompress.wire as wire
from fedcompress.fedavg.driver import ExperimentConfig, run_experiment


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", default="sz:rel=1e-2")
    args = ap.parse_args()
    spent: dict[str, float] = {}

    def timed(owner, name: str, label: str) -> None:
        fn = getattr(owner, name, None)
        if fn is None:  # not in this build
            return

        def wrapper(*a, **k):
            t = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                spent[label] = spent.get(label, 0.0) + time.process_time() - t

        setattr(owner, name, wrapper)

    for name in ("sz_encode_stream", "sz_encode_records", "sz_decode", "sz_decode_records", "join_crc32",
                 "sz_value_stats"):
        timed(C, name, f"_C.{name}")
    # the sz:ratio search's pass over the update: per-tensor ranges and spread (older builds), or
    # the one native stats call above
    timed(statedict, "value_range", "statedict.value_range")
    timed(statedict, "_spread", "statedict._spread")
    timed(wire, "pack", "wire.pack")
    timed(wire, "unpack", "wire.unpack")
    if hasattr(wire, "_join_crc32"):  # pack looks it up as a module global
        wire._join_crc32 = C.join_crc32
    for name in ("compress", "decompress", "server_update"):
        timed(statedict.SZCompressor, name, f"SZCompressor.{name}")
    torch.set_num_threads(1)
    cfg = ExperimentConfig(dataset="mnist5k", clients=10, rounds=3, compressor=args.spec)
    summary = run_experiment(cfg)
    updates = cfg.rounds * cfg.per_round()
    for label, sec in spent.items():
        print(f"{label:32s} {1e3 * sec / updates:7.3f} ms per update")
    print(f"codec_overhead {100 * summary['codec_overhead']:.3f} % (with these timers)")


if __name__ == "__main__":
    main()
