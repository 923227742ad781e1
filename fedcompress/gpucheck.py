"""``python -m fedcompress.gpucheck``: what a machine with a GPU runs first.

Without CUDA it says so and exits 0. With CUDA, in one bounded run (``--budget-s``, default 420 s, so
under 8 minutes with start-up), it:

1. prints the dispatch table for CUDA tensors (``_ops.describe``: which backend serves each op,
   declared devices and dtypes, why not);
2. runs the CUDA-parametrized tests (``pytest tests -k cuda``: every test that takes ``backend`` and
   ``device``, e.g. tests/test_dispatch.py, on CUDA tensors against the same references as on CPU);
3. times, side by side on the GPU: mask encode and decode_mean against plain torch masking; SZ
   encode/decode of CUDA tensors against the CPU path including the transfers; the FedSynth
   hypergradient against torch autograd through the unrolled steps (``hypergradient_ref``); each
   row also checks its answer against the baseline's;
4. prints one table and exits 1 if a test or a check failed.

Timings: median of ``--reps`` calls after one warm-up call (which compiles the Triton kernels),
each call bracketed by ``torch.cuda.synchronize``. The bench functions take the device and sizes
as arguments, so tests/test_gpucheck.py runs them on CPU at small sizes.
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass

import torch

DEFAULT_BUDGET_S = 420.0  # the bound is 8 minutes; this leaves a minute for start-up
TEST_SHARE = 0.55  # of the budget for the tests; the benchmarks get the rest


@dataclass
class Row:
    check: str
    provider: str
    size: str = "—"
    median_ms: float | None = None
    gbs: float | None = None
    vs: str = "—"  # the baseline's time / this time
    result: str = "ok"
    failed: bool = False


# ---------------------------------------------------------------------------------------------
# timing


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], object], device: str, reps: int) -> float:
    """Median wall time of ``fn()`` over ``reps`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _pair(check, size_text, nbytes, device, reps, base_name, base_fn, rows_fn) -> list[Row]:
    """Time the baseline and each (provider, fn, verdict) of ``rows_fn``; speeds against the baseline."""
    tb = median_seconds(base_fn, device, reps)
    out = [Row(check, base_name, size_text, tb * 1e3, nbytes / tb / 1e9 if nbytes else None, "(baseline)")]
    for name, fn, verdict in rows_fn:
        t = median_seconds(fn, device, reps)
        failed = verdict is not None and verdict != "ok"
        gbs = nbytes / t / 1e9 if nbytes else None
        out.append(Row(check, name, size_text, t * 1e3, gbs, f"{tb / t:.2f}x", verdict or "ok", failed))
    return out


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.0f} MB" if nbytes >= 10e6 else f"{nbytes / 1e6:.3g} MB"


def _decode_to(codec, blob, device):
    """``codec.decode(blob, device=...)`` where the decoder takes a device (issue 17.1), else decode
    on CPU and copy: the path a user has today."""
    if "device" in inspect.signature(codec.decode).parameters:
        return codec.decode(blob, device=device)
    return codec.decode(blob).to(device)


# ---------------------------------------------------------------------------------------------
# benchmarks (device and sizes are arguments: tests run them on CPU, small)


def bench_mask(device: str, n: int = 25_000_000, clients: int = 16, n_mean: int = 1_000_000, reps: int = 5):
    """Mask encode (one tensor of n floats) and decode_mean (``clients`` payloads of n_mean floats)
    against plain torch on the same device: ``x[torch.rand(n) < keep]`` and a scatter per client."""
    from .codecs import mask as M

    keep = 0.1
    rm = M.RandomMask(keep)
    x = torch.randn(n, device=device)
    gen = torch.Generator(device=device).manual_seed(0)

    def plain_encode():
        return x[torch.rand(n, device=device, generator=gen) < keep]

    blob = rm.encode(x, seed=7)
    back = _decode_to(rm, blob, device)
    kept = back != 0  # randn values are never exactly 0
    scale = M.unbiased_scale(M.keep_threshold(keep))
    on_device = back.device.type == torch.device(device).type
    ok = on_device and torch.allclose(back[kept], x[kept] * scale, rtol=1e-6, atol=0)
    verdict = "ok" if ok else "decode(encode(x)) is not x / keep on the kept coordinates"
    rows = _pair("mask encode", _mb(n * 4), n * 4, device, reps, "torch x[rand < keep]", plain_encode,
                 [("fc RandomMask.encode", lambda: rm.encode(x, seed=7), verdict)])  # fmt: skip

    xs = [torch.randn(n_mean, device=device) for _ in range(clients)]
    blobs = [rm.encode(v, seed=100 + c) for c, v in enumerate(xs)]
    gens = [torch.Generator(device=device).manual_seed(c) for c in range(clients)]
    vals = [v[torch.rand(n_mean, device=device, generator=g) < keep] for v, g in zip(xs, gens, strict=True)]

    def plain_mean():
        out = torch.zeros(n_mean, device=device)
        for c, g in enumerate(gens):
            g.manual_seed(c)
            out[torch.rand(n_mean, device=device, generator=g) < keep] += vals[c] / keep
        return out / clients

    def fc_mean():
        mean = rm.decode_mean(blobs)
        return mean if mean.device.type == torch.device(device).type else mean.to(device)

    want = torch.stack([_decode_to(rm, b, device) for b in blobs]).mean(0)
    err = float((fc_mean() - want).abs().max()) if n_mean else 0.0
    verdict = "ok" if err <= 1e-5 * max(1.0, float(want.abs().max()) if n_mean else 1.0) else f"max err {err:.3g}"
    rows += _pair("mask decode_mean", f"{clients}x{_mb(n_mean * 4)}", clients * n_mean * 4, device, reps,
                  "torch scatter per client", plain_mean,
                  [("fc RandomMask.decode_mean", fc_mean, verdict)])  # fmt: skip
    return rows


def bench_sz(device: str, n: int = 4_000_000, reps: int = 3):
    """SZ encode and decode of a tensor on ``device`` against the CPU path with its transfers
    (``encode(x.cpu())``, ``decode(blob).to(device)``); both must give the same bytes and values."""
    import fedcompress as fc

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(n, generator=g) * 0.01).to(device)  # an update-like tensor
    codec = fc.SZ(1e-2, "rel")
    cpu = fc.SZ(1e-2, "rel", backend="cpp" if _cpp_ok() else "torch")
    blob_dev, blob_cpu = codec.encode(x), cpu.encode(x.cpu())
    verdict = "ok" if blob_dev == blob_cpu else "bytes differ from the CPU path"
    rows = _pair("sz encode", _mb(n * 4), n * 4, device, reps, "CPU path incl. x.cpu()",
                 lambda: cpu.encode(x.cpu()),
                 [("fc SZ.encode(x on device)", lambda: codec.encode(x), verdict)])  # fmt: skip
    y_dev, y_cpu = _decode_to(codec, blob_cpu, device), cpu.decode(blob_cpu).to(device)
    verdict = "ok" if torch.equal(y_dev, y_cpu) and y_dev.device.type == torch.device(device).type else "differs"
    rows += _pair("sz decode", _mb(n * 4), n * 4, device, reps, "CPU path incl. .to(device)",
                  lambda: cpu.decode(blob_cpu).to(device),
                  [("fc SZ.decode -> device", lambda: _decode_to(codec, blob_cpu, device), verdict)])  # fmt: skip
    return rows


def bench_hypergradient(device: str, m: int = 10, b: int = 10, n_real: int = 256, size: int = 28, reps: int = 3):
    """fc.synth.hypergradient against torch autograd through the m unrolled steps (create_graph)."""
    import fedcompress as fc

    from .fedavg.models import FedAvgCNN

    torch.manual_seed(0)
    model = FedAvgCNN((1, size, size), 10).to(device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    sx = torch.randn(m, b, 1, size, size, device=device)
    sy = torch.rand(m, b, 10, device=device)
    rx = torch.randn(n_real, 1, size, size, device=device)
    ry = torch.randint(0, 10, (n_real,), device=device)
    args = (model, params, sx, sy, 0.05, rx, ry)
    out, ref = fc.synth.hypergradient(*args), fc.synth.hypergradient_ref(*args)
    rel = max(float((a - r).abs().max() / r.abs().max().clamp_min(1e-30)) for a, r in zip(out, ref, strict=True))
    verdict = "ok" if rel <= 1e-4 else f"rel err {rel:.3g} vs autograd"
    # GB/s means nothing here (no single input stream): the row gives times only
    return _pair("hypergradient", f"m={m} b={b} real={n_real}", None, device, reps, "torch autograd (create_graph)",
                 lambda: fc.synth.hypergradient_ref(*args),
                 [("fc.synth.hypergradient", lambda: fc.synth.hypergradient(*args), verdict)])  # fmt: skip


def _cpp_ok() -> bool:
    from . import _ops

    return _ops.available("sz_encode", "cpp", "cpu")[0]


def _n(full: int, scale: float) -> int:
    return max(1000, int(full * scale))


# name -> (device, reps, scale) -> rows; scale 1 is the GPU check's size, tests use ~0.001 on CPU
BENCHES: list[tuple[str, Callable[[str, int, float], list[Row]]]] = [
    ("mask", lambda dev, reps, s: bench_mask(dev, _n(25_000_000, s), 16 if s >= 0.1 else 3, _n(1_000_000, s), reps)),
    ("sz", lambda dev, reps, s: bench_sz(dev, _n(4_000_000, s), reps)),
    ("hypergradient", lambda dev, reps, s: bench_hypergradient(dev, *((10, 10, 256, 28) if s >= 0.1 else (2, 2, 8, 12)),
                                                                reps=reps)),
]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# tests


def find_tests_dir() -> str | None:
    """tests/ of a source checkout (beside the package), or None for an installed package."""
    d = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
    return d if os.path.isfile(os.path.join(d, "conftest.py")) else None


def junit_rows(xml_text: str) -> list[Row]:
    """One row per test file: passed / failed / skipped counts, and the first failures' names."""
    per_file: dict[str, dict[str, list[str]]] = {}
    for case in ET.fromstring(xml_text).iter("testcase"):
        file = case.get("classname", "").split(".")[-1] + ".py"
        kind = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                kind = "failed"
            elif child.tag == "skipped":
                kind = "skipped"
        per_file.setdefault(file, {"passed": [], "failed": [], "skipped": []})[kind].append(case.get("name", "?"))
    rows = []
    for file, k in sorted(per_file.items()):
        text = f"{len(k['passed'])} passed, {len(k['failed'])} failed, {len(k['skipped'])} skipped"
        if k["failed"]:
            text += ": " + ", ".join(k["failed"][:4]) + (" ..." if len(k["failed"]) > 4 else "")
        rows.append(Row(f"tests {file} -k cuda", "pytest", result=text, failed=bool(k["failed"])))
    return rows


def run_tests(tests_dir: str, timeout_s: float, expr: str = "cuda") -> list[Row]:
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "junit.xml")
        cmd = [sys.executable, "-m", "pytest", tests_dir, "-k", expr, "-q", "-p", "no:cacheprovider",
               "-m", "not slow", "--continue-on-collection-errors", f"--junitxml={xml}",
               "--rootdir", os.path.dirname(tests_dir)]  # fmt: skip
        env = dict(os.environ, FEDCOMPRESS_SKIP_SANITIZERS="1")
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return [Row("tests -k cuda", "pytest", result=f"timed out after {timeout_s:.0f} s", failed=True)]
        if not os.path.exists(xml):
            return [Row("tests -k cuda", "pytest", result=f"pytest exit {proc.returncode}: {proc.stdout[-300:]}",
                        failed=True)]  # fmt: skip
        with open(xml) as f:
            rows = junit_rows(f.read())
    if not rows:
        return [Row("tests -k cuda", "pytest", result="no CUDA-parametrized test collected", failed=True)]
    return rows


# ---------------------------------------------------------------------------------------------
# report


def table(rows: list[Row]) -> str:
    def f(v, fmt):
        return "—" if v is None else fmt.format(v)

    lines = ["| check | provider | size | median (ms) | GB/s | speed vs baseline | result |",
             "|---|---|---|---:|---:|---:|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r.check} | {r.provider} | {r.size} | {f(r.median_ms, '{:.3f}')} | {f(r.gbs, '{:.2f}')} "
                     f"| {r.vs} | {('FAILED: ' if r.failed else '') + r.result} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def dispatch_rows(device: str) -> list[Row]:
    from . import _ops

    return [Row(f"dispatch {r['op']}", r["backend"], result=("runs here" if r["available"] else f"no: {r['why']}")
                + f" (devices {'/'.join(r['devices'])}; dtypes {r['dtypes']})")
            for r in _ops.describe(device)]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedcompress.gpucheck", description=__doc__.split("\n\n")[0])
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="wall-clock bound (default %(default)s)")
    p.add_argument("--no-tests", action="store_true", help="skip the CUDA-parametrized tests")
    p.add_argument("--no-bench", action="store_true", help="skip the microbenchmarks")
    p.add_argument("--reps", type=int, default=5, help="timed calls per row after one warm-up (default %(default)s)")
    # for checking the check itself on a machine without a GPU (tests/test_gpucheck.py)
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    p.add_argument("--scale", type=float, default=1.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        why = "this torch has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
        print(f"fedcompress gpucheck: no CUDA ({why}; torch {torch.__version__}): nothing to check on a GPU. "
              "The CPU and interpreted-Triton paths are covered by `pytest tests`.")  # fmt: skip
        return 0
    t0 = time.perf_counter()
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "not installed (Triton rows fall back to the torch reference)"
    name = torch.cuda.get_device_name(0) if device == "cuda" else device
    print(f"fedcompress gpucheck: {name}, torch {torch.__version__} "
          f"(CUDA {torch.version.cuda}), triton {tv}, budget {args.budget_s:.0f} s", flush=True)  # fmt: skip
    rows = dispatch_rows(device)
    if not args.no_tests:
        # "-k cuda" picks the CUDA parametrizations; with --device cpu (checking the check) the same
        # expression runs nothing useful, so tests are for the GPU run
        d = find_tests_dir()
        if d is None:
            rows.append(Row("tests -k cuda", "pytest", result="skipped: no tests/ (not a source checkout)"))
        else:
            print("[gpucheck] running the CUDA-parametrized tests ...", flush=True)
            rows += run_tests(d, args.budget_s * TEST_SHARE)
    if not args.no_bench:
        for name, bench in BENCHES:
            left = args.budget_s - (time.perf_counter() - t0)
            if left < 30:
                rows.append(Row(name, "—", result=f"skipped: {left:.0f} s of the budget left", failed=True))
                continue
            print(f"[gpucheck] bench {name} ...", flush=True)
            try:
                rows += bench(device, args.reps, args.scale)
            except Exception as e:  # one broken bench must not hide the others' rows
                rows.append(Row(name, "—", result=f"{type(e).__name__}: {str(e)[:200]}", failed=True))
            finally:
                if device == "cuda":
                    torch.cuda.empty_cache()
    print(table(rows), end="")
    print(f"[gpucheck] {time.perf_counter() - t0:.0f} s")
    return 1 if any(r.failed for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
