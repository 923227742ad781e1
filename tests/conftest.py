"""Shared test setup.

Without a GPU, Triton kernels run only under the interpreter, which must be switched on before any
kernel module is imported: we do it here, first thing. Interpreter results are correctness only.
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


def backend_or_skip(op: str, backend: str, device: str = "cpu") -> str:
    """Skip (with the reason) when ``backend`` cannot run ``op`` here; else return it."""
    ok, why = _ops.available(op, backend, device)
    if not ok:
        pytest.skip(f"{backend} unavailable for {op}: {why}")
    return backend


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Parametrize a test over every backend; the test calls backend_or_skip(op, backend)."""
    return request.param
