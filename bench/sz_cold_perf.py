"""Where the codec's time goes right after local training: a ``perf`` profile of only the codec calls.

Trains one client of mnist5k-10 (as ``fedcompress run``: E=2, B=20, lr 0.05, one thread), then
compresses the update and decodes the payload, ``--calls`` times round-robin over the 10 clients.
perf samples only while ``compress`` / ``server_update`` run: the script enables and disables it
through perf's control FIFO around each call, so training never shows in the profile. With
``--warm`` each call is preceded by an untimed one on the same update (caches and predictors warm).

    mkfifo /tmp/ctl.fifo /tmp/ack.fifo
    perf record -F 25000 -e cpu-clock -D -1 --control=fifo:/tmp/ctl.fifo,/tmp/ack.fifo -o cold.data \\
        python bench/sz_cold_perf.py --fifo /tmp/ctl.fifo,/tmp/ack.fifo --calls 120
    perf report -i cold.data --no-children -n --sort dso,symbol     # samples x 40 us / 120 = us per call pair

(~1 min; ``cpu-clock`` is a software event, so it works where hardware counters are not exposed.)
docs/sz.md, "Cold after training", has what it showed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import fedcompress as fc
from fedcompress.api import RoundContext, local_sgd, state_delta

sys.path.insert(0, str(Path(__file__).parent))
from fl_overhead import cnn_clients  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fifo", required=True, help="CTL,ACK: the FIFOs given to perf --control")
    ap.add_argument("--calls", type=int, default=120)
    ap.add_argument("--spec", default="sz:rel=1e-2")
    ap.add_argument("--warm", action="store_true", help="an untimed call on the same update before each")
    args = ap.parse_args()
    ctl_path, ack_path = args.fifo.split(",")
    ctl, ack = os.open(ctl_path, os.O_WRONLY), os.open(ack_path, os.O_RDONLY)

    def perf(cmd: str) -> None:
        os.write(ctl, cmd.encode() + b"\n")
        os.read(ack, 5)  # perf answers "ack\n\0" once the events are switched

    data, model, glob = cnn_clients()  # one torch thread, so one native thread too
    comp = fc.get_compressor(args.spec)
    for i in range(args.calls):
        ctx = RoundContext(round=1, client=i % 10, seed=0, epochs=2, batch_size=20, lr=0.05)
        update = state_delta(local_sgd(model, glob, data.client_data(i % 10), ctx), glob)
        if args.warm:
            comp.server_update(comp.compress(update, ctx), glob, ctx)
        perf("enable")
        payload = comp.compress(update, ctx)
        perf("disable")
        perf("enable")
        comp.server_update(payload, glob, ctx)
        perf("disable")


if __name__ == "__main__":
    main()
