"""One place that declares every op and picks its backend.

Each op has a torch reference (always there, the readable specification and the default for any
device), and may have a C++ implementation (``fedcompress._C``, CPU tensors) and a Triton
implementation (``fedcompress.kernels``, CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1``).

Choice: ``backend=`` argument, else ``FEDCOMPRESS_BACKEND=torch|cpp|triton``, else automatic
(CPU: cpp if built, else torch; CUDA: triton if importable, else torch). An explicit choice that
cannot be met raises BackendUnavailable saying what to do. An automatic choice falls back to the
reference, and warns once (ExtensionMissingWarning) when the reason is a missing build: the torch
reference is ~100x slower (SZ on 10M floats: seconds instead of ~0.1 s), and the usual cause is
running from a source checkout installed with ``pip install .``, whose fedcompress/ has no _C.
Implementations are named as "module:function" and imported on first use, so ``import
fedcompress`` stays cheap and never fails because an extension is missing.
"""

from __future__ import annotations

import importlib
import os
from functools import cache

import torch

from .errors import BackendUnavailable

BACKENDS = ("torch", "cpp", "triton")


class ExtensionMissingWarning(RuntimeWarning):
    """An automatic backend choice fell back to the torch reference because an extension is missing."""


_warned_missing = False


def _warn_missing(op: str, backend: str, why: str) -> None:
    """Warn once per process (even under ``-W always``): one line naming the fix, not one per op."""
    global _warned_missing
    if _warned_missing:
        return
    _warned_missing = True
    import warnings

    what = "the C++ extension fedcompress._C" if backend == "cpp" else "the Triton kernels fedcompress.kernels"
    warnings.warn(
        f"fedcompress: {what} could not be loaded, so {op!r} and every op like it run on the torch "
        f"reference (~100x slower). Fix: in the source checkout run `pip install -e .` (builds _C in "
        f"place); with `pip install .`, run from outside the checkout, whose fedcompress/ folder has no "
        f"_C. Set FEDCOMPRESS_BACKEND=torch to choose the reference on purpose. [{why}]",
        ExtensionMissingWarning,
        stacklevel=4,
    )


# op name -> backend -> "module:function". Every entry has "torch".
_TABLE: dict[str, dict[str, str]] = {
    "prequantize": {
        "torch": "fedcompress.codecs.sz.quantize:prequantize_ref",
        "cpp": "fedcompress.codecs.sz.quantize:prequantize_cpp",
        "triton": "fedcompress.kernels.sz:prequantize_triton",
    },
    # Random mask (fedcompress/codecs/mask.py is the spec; same bytes on every backend)
    "mask_encode": {
        "torch": "fedcompress.codecs.mask:mask_encode_ref",
        "cpp": "fedcompress.codecs.mask:mask_encode_cpp",
        "triton": "fedcompress.kernels.mask:mask_encode_triton",
    },
    "mask_decode": {
        "torch": "fedcompress.codecs.mask:mask_decode_ref",
        "cpp": "fedcompress.codecs.mask:mask_decode_cpp",
        "triton": "fedcompress.kernels.mask:mask_decode_triton",
    },
    # SZ blocks section (fedcompress/codecs/sz/codec.py is the spec; same bytes on every backend)
    "sz_encode": {
        "torch": "fedcompress.codecs.sz.codec:encode_section_ref",
        "cpp": "fedcompress.codecs.sz.codec:encode_section_cpp",
        "triton": "fedcompress.kernels.sz:encode_section_triton",
    },
    "sz_decode": {
        "torch": "fedcompress.codecs.sz.codec:decode_section_ref",
        "cpp": "fedcompress.codecs.sz.codec:decode_section_cpp",
        "triton": "fedcompress.kernels.sz:decode_section_triton",
    },
    # FedSynth hypergradient engine (fedcompress/synth/ops.py, kernels/synth.py). No C++ for the
    # first four: on CPU they are a few vectorised torch calls on b x C logits or one flat axpy.
    "synth_soft_ce": {
        "torch": "fedcompress.synth.ops:soft_ce_ref",
        "triton": "fedcompress.kernels.synth:soft_ce_triton",
    },
    "synth_soft_ce_jvp": {
        "torch": "fedcompress.synth.ops:soft_ce_jvp_ref",
        "triton": "fedcompress.kernels.synth:soft_ce_jvp_triton",
    },
    "synth_sgd_step": {
        "torch": "fedcompress.synth.ops:sgd_step_ref",
        "triton": "fedcompress.kernels.synth:sgd_step_triton",
    },
    "synth_reverse_step": {
        "torch": "fedcompress.synth.ops:reverse_step_ref",
        "triton": "fedcompress.kernels.synth:reverse_step_triton",
    },
    # fused small-C_in conv + relu + max-pool (csrc/synth.cpp); CUDA runs the reference
    "synth_conv_pool": {
        "torch": "fedcompress.synth.ops:conv_pool_ref",
        "cpp": "fedcompress.synth.ops:conv_pool_cpp",
    },
    "synth_conv_at": {
        "torch": "fedcompress.synth.ops:conv_at_ref",
        "cpp": "fedcompress.synth.ops:conv_at_cpp",
    },
    "synth_conv_at_bwd": {
        "torch": "fedcompress.synth.ops:conv_at_bwd_ref",
        "cpp": "fedcompress.synth.ops:conv_at_bwd_cpp",
    },
    "synth_col2im": {
        "torch": "fedcompress.synth.ops:col2im_ref",
        "cpp": "fedcompress.synth.ops:col2im_cpp",
    },
    "synth_im2col": {
        "torch": "fedcompress.synth.ops:im2col_ref",
        "cpp": "fedcompress.synth.ops:im2col_cpp",
    },
}


def native():
    """The compiled extension module, or BackendUnavailable explaining how to build it."""
    try:
        from . import _C
    except ImportError as e:
        raise BackendUnavailable(
            "the C++ extension fedcompress._C is not built; reinstall with `pip install -e .` "
            f"(needs a C++17 compiler with OpenMP) [{e}]"
        ) from e
    return _C


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@cache
def _load(op: str, backend: str):
    """Import one implementation; return (fn, None) or (None, reason)."""
    table = _TABLE.get(op)
    if table is None:
        raise KeyError(f"unknown op {op!r}; declared ops: {sorted(_TABLE)}")
    target = table.get(backend)
    if target is None:
        return None, f"op {op!r} has no {backend} implementation (it has: {sorted(table)})"
    if backend == "cpp":
        try:
            native()
        except BackendUnavailable as e:
            return None, str(e)
    if backend == "triton":
        try:
            import triton  # noqa: F401
        except ImportError as e:
            return None, f"triton is not installed (pip install triton) [{e}]"
    mod, fn = target.split(":")
    try:
        return getattr(importlib.import_module(mod), fn), None
    except (ImportError, AttributeError) as e:
        return None, f"{backend} implementation of {op!r} failed to load: {e}"


def requested_backend(backend: str | None = None) -> str | None:
    b = backend or os.environ.get("FEDCOMPRESS_BACKEND") or None
    if b is not None and b not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {b!r} (FEDCOMPRESS_BACKEND?)")
    return b


def available(op: str, backend: str, device: torch.device | str = "cpu") -> tuple[bool, str | None]:
    """Whether ``backend`` can run ``op`` on ``device`` now, and if not, why."""
    fn, why = _load(op, backend)
    if fn is None:
        return False, why
    dev = torch.device(device).type
    if backend == "cpp" and dev != "cpu":
        return False, "the C++ backend runs on CPU tensors only"
    if backend == "triton" and dev != "cuda" and not triton_interpreted():
        return False, "Triton needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors in tests)"
    return True, None


def choose(op: str, device: torch.device | str = "cpu", backend: str | None = None) -> str:
    """The backend that will run ``op`` on ``device``."""
    b = requested_backend(backend)
    if b is not None:
        ok, why = available(op, b, device)
        if not ok:
            raise BackendUnavailable(f"backend {b!r} requested for {op!r} but unavailable: {why}")
        return b
    dev = torch.device(device).type
    fast = "triton" if dev == "cuda" else "cpp"
    ok, why = available(op, fast, device)
    if ok:
        return fast
    if fast in _TABLE[op] and (fast == "cpp" or "failed to load" in (why or "")):
        # the op has a fast implementation that is not built (or not packaged): say so; a missing
        # triton package on a CUDA machine is a plain optional dependency and stays quiet
        _warn_missing(op, fast, why or "")
    return "torch"


_GET: dict[tuple, object] = {}


def get(op: str, device: torch.device | str = "cpu", backend: str | None = None):
    """The implementation of ``op`` for ``device`` (see module docstring for the rules).

    Memoised on everything the choice depends on (the env vars included): ``choose`` costs ~30 us,
    and the FedSynth engine makes ~200 op calls per hypergradient (6 ms of 0.2 s)."""
    dev = device.type if isinstance(device, torch.device) else torch.device(device).type
    env = os.environ.get
    key = (op, dev, backend, env("FEDCOMPRESS_BACKEND"), env("TRITON_INTERPRET"))
    fn = _GET.get(key)
    if fn is None:
        fn = _GET[key] = _load(op, choose(op, device, backend))[0]
    return fn


def call(op: str, x: torch.Tensor, *args, backend: str | None = None, **kwargs):
    """Run ``op`` with the backend chosen for ``x``'s device."""
    return get(op, x.device, backend)(x, *args, **kwargs)
