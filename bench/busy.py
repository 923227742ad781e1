"""Background load for the benchmarks: K busy processes that each spin one core.

FL clients rarely have the CPU to themselves (a simulation runs many clients per machine; a device
trains and compresses at once), so every bench can run a second time with K spinning processes beside
it (``--busy K`` or ``FEDCOMPRESS_BENCH_BUSY=K``; bench/conftest.py). ``busy(k)`` starts them and always
stops them (context manager: on error too, and at interpreter exit); each also exits on its own after
``max_seconds`` or as soon as its parent is gone, so an interrupted run never leaves a spinner behind.

With ``pin=True`` spinner i is pinned to the i-th CPU the bench may use (round robin), so every core
runs a spinner for the whole test. Peer comparisons that time each library in a block of its own
(bench_sz: fedcompress's rounds, then pysz's) need that: left to the scheduler, two spinners on 2
cores sometimes shared one core and left the other to the bench for one block and not the next (one
run: pysz 1.05x slower busy than quiet, fedcompress 3.8x, in the same cell). Benchmarks that
interleave the calls they compare (bench_threads: 1 thread and default in random order, pair by
pair) leave placement to the scheduler: pinned, a call of a few ms beside a spinner either fits in
its time slice or waits out the spinner's, and the medians of such pairs flipped either way
(0.35x to 3.8x between runs).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import subprocess
import sys
import time

# The child: spin until the deadline or until the parent dies (checked every ~20 ms of spinning).
_SPIN = """
import os, sys, time
parent, end = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
if len(sys.argv) > 3 and int(sys.argv[3]) >= 0:
    os.sched_setaffinity(0, {int(sys.argv[3])})
print("ready", flush=True)
while time.monotonic() < end and os.getppid() == parent:
    for _ in range(200_000):
        pass
"""

_live: set[subprocess.Popen] = set()


def _stop(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + 2.0
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        _live.discard(p)


@atexit.register
def _stop_all() -> None:
    _stop(list(_live))


@contextlib.contextmanager
def busy(k: int, max_seconds: float = 900.0, pin: bool = False):
    """Run the body with ``k`` busy processes beside it; yields their Popen objects (k = 0: none).
    ``pin``: spinner i on the i-th CPU this process may use (round robin)."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if not max_seconds > 0:
        raise ValueError(f"max_seconds must be > 0, got {max_seconds}")
    procs = []
    cpus = sorted(os.sched_getaffinity(0)) if pin and hasattr(os, "sched_getaffinity") else []
    try:
        for i in range(k):
            cpu = cpus[i % len(cpus)] if cpus else -1
            p = subprocess.Popen([sys.executable, "-c", _SPIN, str(os.getpid()), str(max_seconds), str(cpu)],
                                 stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
            procs.append(p)
            _live.add(p)
        for p in procs:  # spinning before the body starts
            p.stdout.readline()
        yield procs
    finally:
        _stop(procs)
        for p in procs:
            p.stdout.close()


def busy_count(config=None) -> int:
    """K from ``--busy`` (when a pytest config is given) or FEDCOMPRESS_BENCH_BUSY; 0 when neither."""
    k = config.getoption("busy", None) if config is not None else None
    if k is None:
        k = int(os.environ.get("FEDCOMPRESS_BENCH_BUSY", "0") or 0)
    if k < 0:
        raise ValueError(f"--busy / FEDCOMPRESS_BENCH_BUSY must be >= 0, got {k}")
    return k
