"""Benchmarks quiet and under load, from one command.

``--busy K`` (or FEDCOMPRESS_BENCH_BUSY=K) runs every benchmark twice, side by side: ``quiet`` and
``busyK`` (K background processes spinning, bench/busy.py, started before and stopped after that one
test). The load is recorded as ``extra_info["load"]`` and in the test id, so each file's table shows
both. Without the option only ``quiet`` runs, as before.
"""

from __future__ import annotations

import pytest
from busy import busy, busy_count


def pytest_addoption(parser):
    parser.addoption("--busy", type=int, default=None, metavar="K",
                     help="also run every benchmark with K background busy processes (0: quiet only)")


def loads(config) -> list[str]:
    k = busy_count(config)
    return ["quiet"] + ([f"busy{k}"] if k else [])


def pytest_generate_tests(metafunc):
    if "load" in metafunc.fixturenames:
        metafunc.parametrize("load", loads(metafunc.config), indirect=True, scope="function")


@pytest.fixture(autouse=True)
def load(request):
    """The background load of this test: "quiet" or "busyK"."""
    name = getattr(request, "param", "quiet")
    k = int(name[4:]) if name.startswith("busy") else 0
    if "benchmark" in request.fixturenames:
        request.getfixturevalue("benchmark").extra_info["load"] = name
    with busy(k, max_seconds=600, pin=getattr(request.module, "BUSY_PIN", False)):  # busy.py: when to pin
        yield name
