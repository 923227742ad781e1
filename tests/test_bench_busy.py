"""The loaded-benchmark harness (bench/busy.py, bench/conftest.py): it starts K busy processes,
always stops them (also when the body fails), each stops by itself after its time limit or when its
parent is gone, and ``--busy K`` runs each benchmark quiet and busy side by side."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _busy():
    spec = importlib.util.spec_from_file_location("fc_bench_busy", BENCH / "busy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _gone(p, timeout=5.0) -> bool:
    try:
        p.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to read CPU time")
def test_busy_starts_spinners_and_stops_them():
    b = _busy()
    with b.busy(2, max_seconds=60) as procs:
        assert len(procs) == 2 and all(p.poll() is None for p in procs)
        t0 = [_cpu_ticks(p.pid) for p in procs]
        time.sleep(0.5)
        assert all(_cpu_ticks(p.pid) > t for p, t in zip(procs, t0, strict=True))  # they burn CPU
    assert all(p.poll() is not None for p in procs)
    assert not b._live


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs CPU affinity")
def test_busy_pins_one_spinner_per_cpu_round_robin():
    """pin=True: spinner i runs on the i-th CPU this process may use (the same load on every core, every run)."""
    b = _busy()
    cpus = sorted(os.sched_getaffinity(0))
    k = len(cpus) + 1  # one more than the CPUs: the last wraps around to the first
    with b.busy(k, max_seconds=60, pin=True) as procs:
        got = [os.sched_getaffinity(p.pid) for p in procs]
    assert got == [{cpus[i % len(cpus)]} for i in range(k)]
    with b.busy(2, max_seconds=60) as procs:  # not pinned: the scheduler places them
        assert all(os.sched_getaffinity(p.pid) == set(cpus) for p in procs)


def test_busy_stops_on_error():
    b = _busy()
    with pytest.raises(RuntimeError, match="boom"):
        with b.busy(1, max_seconds=60) as procs:
            raise RuntimeError("boom")
    assert procs[0].poll() is not None


def test_busy_bounded_in_time():
    """A spinner whose parent never stops it exits by itself after max_seconds."""
    b = _busy()
    p = subprocess.Popen([sys.executable, "-c", b._SPIN, str(os.getpid()), "0.3"], stdout=subprocess.PIPE)
    try:
        assert p.stdout.readline().strip() == b"ready"
        assert _gone(p, timeout=10.0)
    finally:
        if p.poll() is None:
            p.kill()
        p.stdout.close()


def test_busy_exits_when_parent_dies():
    """An orphaned spinner (its bench process was killed) stops within a fraction of a second."""
    b = _busy()
    # the parent: starts a spinner, prints its pid, then exits without stopping it
    code = (
        "import subprocess, sys\n"
        f"p = subprocess.Popen([sys.executable, '-c', {b._SPIN!r}, str(__import__('os').getpid()), '60'],"
        " stdout=subprocess.PIPE)\n"
        "p.stdout.readline(); print(p.pid, flush=True); __import__('os')._exit(0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    pid = int(out.stdout.split()[0])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    pytest.fail("orphaned spinner still running after 10 s")


def test_busy_rejects_bad_arguments():
    b = _busy()
    with pytest.raises(ValueError, match="k must be"):
        with b.busy(-1):
            pass
    with pytest.raises(ValueError, match="max_seconds"):
        with b.busy(1, max_seconds=0):
            pass


def test_busy_option_runs_quiet_and_busy(tmp_path):
    """``--busy 1``: each bench test runs as [quiet] and [busy1]; the busy one sees its spinner."""
    for f in ("busy.py", "conftest.py"):
        shutil.copy(BENCH / f, tmp_path / f)
    (tmp_path / "bench_probe.py").write_text(
        "import os\n"
        "def _children():\n"
        "    me = str(os.getpid()); n = 0\n"
        "    for d in os.listdir('/proc'):\n"
        "        if d.isdigit():\n"
        "            try:\n"
        "                st = open(f'/proc/{d}/stat').read().rsplit(')', 1)[1].split()\n"
        "            except OSError:\n"
        "                continue\n"
        "            n += st[1] == me\n"
        "    return n\n"
        "def test_probe(load):\n"
        "    k = int(load[4:]) if load.startswith('busy') else 0\n"
        "    assert _children() >= k\n"
        "    print('LOAD', load, _children())\n"
    )
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "--busy", "1",
                        "bench_probe.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 passed" in r.stdout
    assert "LOAD quiet" in r.stdout and "LOAD busy1" in r.stdout
