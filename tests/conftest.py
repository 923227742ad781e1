"""Shared test setup.

Without a GPU, Triton kernels run only under the interpreter, which must be switched on before any
kernel module is imported: we do it here, first thing, and only without CUDA (on a GPU machine the
kernels run compiled, on CUDA tensors). Interpreter results are correctness only.

Backends and devices: a test that takes ``backend`` runs once per backend (torch, cpp, triton) on
CPU tensors. A test that also takes ``device`` runs once per (backend, device): CPU always, CUDA when
present, and must put its tensors on ``device``. ``backend_or_skip(op, backend)`` reads the device
from the parametrization, so the same line skips cpp on CUDA and Triton on CPU without the
interpreter, each with its reason. A test that takes only ``device`` runs once per device.
"""

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import settings as _hyp_settings  # noqa: E402

# CI runs the property tests derandomized (the same examples every run, so a landing is never decided
# by luck); HYPOTHESIS_PROFILE=explore searches new examples (how the bfloat16 NaN bug was found).
_hyp_settings.register_profile("ci", derandomize=True)
_hyp_settings.register_profile("explore", derandomize=False)
_hyp_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

from fedcompress import _ops  # noqa: E402

BACKENDS = list(_ops.BACKENDS)
DEVICES = ["cpu"] + (["cuda"] if _has_cuda else [])


class Backend(str):
    """A backend name that is the plain string everywhere (``backend == "cpp"``, ``backend=backend``)
    and also carries the device its test runs on."""

    device: str

    def __new__(cls, name: str, device: str = "cpu"):
        self = super().__new__(cls, name)
        self.device = device
        return self


def backend_or_skip(op: str, backend: str, device: str | None = None, dtype=None) -> str:
    """Skip (with the reason) when ``backend`` cannot run ``op`` here; else return it. The device is
    ``device`` if given, else the parametrization's (``backend.device``), else CPU; with ``dtype``, a
    dtype the backend does not serve itself skips too (it would only run the reference)."""
    dev = device or getattr(backend, "device", "cpu")
    ok, why = _ops.available(op, str(backend), dev, dtype)
    if not ok:
        pytest.skip(f"{backend} unavailable for {op} on {dev}: {why}")
    return backend


def _parametrized(metafunc, name: str) -> bool:
    for m in metafunc.definition.iter_markers("parametrize"):
        names = m.args[0] if m.args else m.kwargs.get("argnames", "")
        if name in ([s.strip() for s in names.split(",")] if isinstance(names, str) else list(names)):
            return True
    return False


def pytest_generate_tests(metafunc):
    """``backend`` over BACKENDS (x DEVICES when the test takes ``device``); ``device`` alone over
    DEVICES. A test that parametrizes ``backend`` itself keeps its own values."""
    names = metafunc.fixturenames
    if "backend" in names and not _parametrized(metafunc, "backend"):
        devices = DEVICES if "device" in names else ["cpu"]
        params = [Backend(b, d) for d in devices for b in BACKENDS]
        metafunc.parametrize("backend", params, ids=[b if b.device == "cpu" else f"{b}-{b.device}" for b in params])
    elif "device" in names and "backend" not in names and not _parametrized(metafunc, "device"):
        metafunc.parametrize("device", DEVICES)


@pytest.fixture
def device(request):
    """The device of the test's ``backend`` parametrization (see the module docstring)."""
    backend = request.getfixturevalue("backend")
    return getattr(backend, "device", "cpu")
