"""One SZ call timed on two builds of fedcompress, side by side: the A/B behind docs/sz.md's kernel
figures ("The last speed cells").

    git worktree add /tmp/old <commit> && (cd /tmp/old && python setup.py build_ext --inplace -q)
    python bench/sz_build_ab.py /tmp/old . --array update --rel 1e-2 --op encode

Each build runs in its own process (``PYTHONPATH`` = its tree), one thread, 30 warm-up calls then the
median of 300; the two builds alternate for ``--reps`` processes each, and the median over processes
is printed with their ratio. bench_sz's arrays (``--array``: minilm, update, kaiming).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = """
import statistics, sys, time
sys.path.insert(0, {bench!r})
import torch
torch.set_num_threads(1)
import fedcompress as fc
fc.set_num_threads(1)
from bench_sz import array, codec
enc, dec = codec("fc-cpp", array({array!r}), {rel!r})
blob = enc()
f = enc if {op!r} == "encode" else (lambda: dec(blob))
for _ in range(30):
    f()
ts = []
for _ in range(300):
    t0 = time.perf_counter()
    f()
    ts.append(time.perf_counter() - t0)
print(1e3 * statistics.median(ts), fc.__file__)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("old", help="the first build's source tree (with its _C built in place)")
    ap.add_argument("new", help="the second build's source tree")
    ap.add_argument("--array", default="update")
    ap.add_argument("--rel", type=float, default=1e-2)
    ap.add_argument("--op", choices=("encode", "decode"), default="encode")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    code = CHILD.format(bench=str(Path(__file__).parent), array=args.array, rel=args.rel, op=args.op)
    ms: dict[str, list[float]] = {"old": [], "new": []}
    for _ in range(args.reps):
        for tag in ms:
            tree = os.path.abspath(getattr(args, tag))
            out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": tree},
                                 capture_output=True, text=True, cwd="/", check=True).stdout.split()
            if not out[1].startswith(tree):
                raise SystemExit(f"{tag}: imported {out[1]}, not the tree {tree} (is fedcompress installed over it?)")
            ms[tag].append(float(out[0]))
    old, new = statistics.median(ms["old"]), statistics.median(ms["new"])
    print(f"{args.array} REL {args.rel:g} {args.op}: old {old:.3f} ms, new {new:.3f} ms, new / old {new / old:.3f}")


if __name__ == "__main__":
    main()
