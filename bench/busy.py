"""Background load for the benchmarks: K busy processes that each spin one core.

FL clients rarely have the CPU to themselves (a simulation runs many clients per machine; a device
trains and compresses at once), so every bench can run a second time with K spinning processes beside
it (``--busy K`` or ``FEDCOMPRESS_BENCH_BUSY=K``; bench/conftest.py). ``busy(k)`` starts them and always
stops them (context manager: on error too, and at interpreter exit); each also exits on its own after
``max_seconds`` or as soon as its parent is gone, so an interrupted run never leaves a spinner behind.
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
def busy(k: int, max_seconds: float = 900.0):
    """Run the body with ``k`` busy processes beside it; yields their Popen objects (k = 0: none)."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if not max_seconds > 0:
        raise ValueError(f"max_seconds must be > 0, got {max_seconds}")
    procs = []
    try:
        for _ in range(k):
            p = subprocess.Popen([sys.executable, "-c", _SPIN, str(os.getpid()), str(max_seconds)],
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
