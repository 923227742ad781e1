"""``compress`` and ``server_update`` of a real CNN update right after local training (cold) and
repeated on the same update (warm): where docs/sz.md's "Codec time in FedAvg did not move" comes from.

    python bench/sz_cold.py [--spec sz:rel=1e-2]     # ~1 min, one thread, thread CPU time

For each of the 10 clients of mnist5k-10 (seed 0, round 1, E=2, B=20, lr 0.05, as ``fedcompress
run``): train, time ``compress`` and ``server_update`` once, then 7 more times on the same update
(median); prints each client and the medians over clients.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import fedcompress as fc
from fedcompress.api import RoundContext, local_sgd, state_delta

sys.path.insert(0, str(Path(__file__).parent))
from fl_overhead import cnn_clients  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", default="sz:rel=1e-2")
    args = ap.parse_args()
    clock = time.thread_time
    data, model, glob = cnn_clients()
    comp = fc.get_compressor(args.spec)

    def timed(fn) -> float:
        t = clock()
        fn()
        return 1e3 * (clock() - t)

    rows = []
    for cid in range(10):
        ctx = RoundContext(round=1, client=cid, seed=0, epochs=2, batch_size=20, lr=0.05)
        u = state_delta(local_sgd(model, glob, data.client_data(cid), ctx), glob)
        t = clock()
        payload = comp.compress(u, ctx)  # the first call after training
        ce = 1e3 * (clock() - t)
        cd = timed(lambda p=payload, ctx=ctx: comp.server_update(p, glob, ctx))
        we = statistics.median(timed(lambda u=u, ctx=ctx: comp.compress(u, ctx)) for _ in range(7))
        wd = statistics.median(timed(lambda p=payload, ctx=ctx: comp.server_update(p, glob, ctx)) for _ in range(7))
        rows.append((ce, we, cd, wd))
        print(f"client {cid}: compress cold {ce:.3f} warm {we:.3f} | server_update cold {cd:.3f} warm {wd:.3f} ms")
    ce, we, cd, wd = (statistics.median(r[i] for r in rows) for i in range(4))
    print(f"median: compress cold {ce:.3f} warm {we:.3f} | server_update cold {cd:.3f} warm {wd:.3f} ms")


if __name__ == "__main__":
    main()
