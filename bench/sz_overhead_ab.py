"""A/B of the sz state-dict compressor against an older commit's, on real FedAvg CNN updates.

    python bench/sz_overhead_ab.py                  # against 9c7e2ca (before the one-call encode)
    python bench/sz_overhead_ab.py --rev HEAD~3 --pairs 31

The older commit's ``codecs/sz/codec.py`` and ``codecs/sz/statedict.py`` are read with ``git show``
and loaded beside the current package (their stage modules, wire framing and the compiled extension
are today's: the A/B isolates what those two files do around the native codec). Updates: the 10
clients of ``fedcompress run --dataset mnist5k --clients 10`` after 2 local epochs from the initial
weights (the driver's split, batch and lr). Every payload is checked byte for byte against the old
code's. Times are thread CPU, one torch thread, old and new alternating call by call (the order
flips every pair), median of ``--pairs``; "cold" calls follow a write of 48 MB (more than the L3
cache), as a call right after local training would. The ``sz:ratio=R`` rows run the 10 updates in
order (each search starts from the previous one, as in a round) ``--reps`` times: mean time per
update and encodes per update.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_old(rev: str) -> types.ModuleType:
    """The older statedict module (and its codec), inside fedcompress.codecs.sz under private names."""
    import fedcompress.codecs.sz as pkg

    def src(path: str) -> str:
        return subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout

    mods = {}
    for name, path in (("_ab_old_codec", "fedcompress/codecs/sz/codec.py"),
                       ("_ab_old_statedict", "fedcompress/codecs/sz/statedict.py")):
        text = src(path).replace("from .codec import", "from ._ab_old_codec import")
        text = text.replace('@register("sz")\n', "")  # the registry keeps today's class
        full = f"{pkg.__name__}.{name}"
        spec = importlib.util.spec_from_loader(full, loader=None)
        mod = importlib.util.module_from_spec(spec)
        mod.__package__ = pkg.__name__
        sys.modules[full] = mod
        exec(compile(text, f"{rev}:{path}", "exec"), mod.__dict__)
        mods[name] = mod
    return mods["_ab_old_statedict"]


def client_updates(n: int):
    import torch

    from fedcompress.api import RoundContext, local_sgd, state_delta
    from fedcompress.fedavg.data import load_dataset
    from fedcompress.fedavg.models import build_model

    data = load_dataset("mnist5k", 10, "iid", 0.5, 0)
    torch.manual_seed(0)
    model = build_model("cnn", data.info)
    glob = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = []
    for c in range(n):
        ctx = RoundContext(round=1, client=c, seed=0, epochs=2, batch_size=20, lr=0.05)
        out.append(state_delta(local_sgd(model, glob, data.client_data(c), ctx), glob))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rev", default="9c7e2ca", help="the older commit (default: before the one-call encode)")
    p.add_argument("--pairs", type=int, default=21, help="old/new call pairs per row (median)")
    p.add_argument("--reps", type=int, default=3, help="passes over the 10 updates for the ratio rows")
    p.add_argument("--ratios", default="16,64")
    args = p.parse_args()

    import torch

    import fedcompress as fc
    from fedcompress.api import RoundContext

    torch.set_num_threads(1)
    old_mod = load_old(args.rev)
    ups = client_updates(10)
    ctx = RoundContext()
    clock = time.thread_time
    junk = torch.empty(48 << 18)  # 48 MB of float32

    print(f"sz compressor, {args.rev} (old) vs working tree (new): thread CPU ms, 1 thread, CNN update "
          f"({sum(v.numel() for v in ups[0].values()):,} values)\n")
    print("| call | old ms | new ms | new / old | note |\n|---|---:|---:|---:|---|")

    def ab(label, f_old, f_new, cold):
        t_old, t_new = [], []
        for i in range(args.pairs):
            order = ((f_old, t_old), (f_new, t_new)) if i % 2 == 0 else ((f_new, t_new), (f_old, t_old))
            for f, ts in order:
                if cold:
                    junk.fill_(float(i))
                t = clock()
                f()
                ts.append(clock() - t)
        mo, mn = 1e3 * statistics.median(t_old), 1e3 * statistics.median(t_new)
        print(f"| {label} | {mo:.3f} | {mn:.3f} | {mn / mo:.3f} | median of {args.pairs} |")

    old, new = old_mod.SZCompressor(rel=1e-2), fc.get_compressor("sz:rel=1e-2")
    u = ups[0]
    payloads = [old.compress(x, ctx) for x in ups]
    assert payloads == [new.compress(x, ctx) for x in ups], "payloads differ from the old code's"
    p0 = payloads[0]
    for cold in (False, True):
        tag = ", cold" if cold else ""
        ab(f"`sz:rel=1e-2` compress{tag}", lambda: old.compress(u, ctx), lambda: new.compress(u, ctx), cold)
        ab(f"`sz:rel=1e-2` decompress{tag}", lambda: old.decompress(p0, ctx), lambda: new.decompress(p0, ctx), cold)

    for R in (float(r) for r in args.ratios.split(",")):
        old, new = old_mod.SZCompressor(ratio=R), fc.get_compressor(f"sz:ratio={R:g}")
        t_old, t_new, e_old, e_new = [], [], [], []
        for _ in range(args.reps):
            for i, x in enumerate(ups):
                runs = ((old, t_old, e_old), (new, t_new, e_new))
                outs = []
                for c, ts, es in runs if i % 2 == 0 else runs[::-1]:
                    t = clock()
                    outs.append(c.compress(x, ctx))
                    ts.append(clock() - t)
                    es.append(c.last_choice["encodes"])
                assert outs[0] == outs[1], f"ratio={R:g}: payloads differ from the old code's"
        mo, mn = 1e3 * statistics.mean(t_old), 1e3 * statistics.mean(t_new)
        print(f"| `sz:ratio={R:g}` compress | {mo:.3f} | {mn:.3f} | {mn / mo:.3f} | mean over 10 updates x "
              f"{args.reps}; encodes per update {statistics.mean(e_old):.2f} -> {statistics.mean(e_new):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
