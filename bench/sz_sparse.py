"""SZ on sparse FL updates (issue 18): fedcompress vs SZ3 (pysz default) where most codes are zero.

Arrays: the real CNN update of bench/bench_sz.py at growing REL bounds (the larger the bound, the more
values quantize to zero), and synthetic updates with 0.1-2% live values, scattered, in clusters, or in
the same columns of every row. Columns: share of zero codes, fedcompress's ratio with its default
block choice (codec.choose_block_size: one block per ~2^21 values when sampled codes are >= 63/64
zero), with the dense default (codec.default_block_size), and pysz's; ratio = float32 bytes / payload.

Run:  python bench/sz_sparse.py        (~1 min; 1 torch thread)
"""

from __future__ import annotations

import numpy as np
import torch

import fedcompress as fc
from fedcompress.codecs.sz import codec as C


def pysz_ratio(x: np.ndarray, rel: float) -> float:
    from pysz import sz, szConfig, szErrorBoundMode

    cfg = szConfig()
    cfg.errorBoundMode = szErrorBoundMode.REL
    cfg.relErrorBound = rel
    return x.nbytes / len(sz.compress(x, cfg)[0])


def synthetic(kind: str, frac: float, n: int = 582_026, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * 1e-4).astype(np.float32)
    if kind == "scattered":
        idx = rng.random(n) < frac
        x[idx] = rng.standard_normal(int(idx.sum())).astype(np.float32) * 0.05
    elif kind == "clustered":  # 5 dense regions
        m = int(frac * n) // 5
        for _ in range(5):
            s = int(rng.integers(0, n - m))
            x[s:s + m] = rng.standard_normal(m).astype(np.float32) * 0.05
    elif kind == "columns":  # the same live input columns in every row of 800
        cols = rng.choice(800, max(1, int(800 * frac)), replace=False)
        for r in range(n // 800):
            x[r * 800 + cols] = rng.standard_normal(cols.size).astype(np.float32) * 0.05
    x[0] = 1.0
    return x


def row(name: str, x: np.ndarray, rel: float) -> str:
    t = torch.from_numpy(x)
    step, _ = C.quant_params(t, rel, "rel")
    zero = float(np.mean(np.abs(x * np.float32(C.inverse_of_step(step))) <= 0.5))
    auto = len(fc.SZ(rel, "rel", backend="cpp").encode(t))
    dense = len(fc.SZ(rel, "rel", backend="cpp", block_size=C.default_block_size(x.size)).encode(t))
    return (f"| {name} | {rel:g} | {zero:.4f} | {x.nbytes / auto:.1f} | {x.nbytes / dense:.1f} "
            f"| {pysz_ratio(x, rel):.1f} |")


def main() -> None:
    import sys
    from pathlib import Path

    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_sz import array

    print("| array | REL | zero codes | fedcompress | fedcompress, dense blocks | pysz default |")
    print("|---|---|---:|---:|---:|---:|")
    u = array("update")
    for rel in (1e-2, 3e-2, 1e-1, 2e-1):
        print(row("CNN update (0.58M)", u, rel))
    for kind in ("scattered", "clustered", "columns"):
        for frac in (0.02, 0.005, 0.001):
            print(row(f"{kind} {frac:g} live", synthetic(kind, frac), 1e-2))


if __name__ == "__main__":
    main()
