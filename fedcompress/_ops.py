"""One place that declares every op and picks its backend.

Each op has a torch reference (always there, the readable specification and the default for any
device), and may have a C++ implementation (``fedcompress._C``, CPU tensors) and a Triton
implementation (``fedcompress.kernels``, CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1``).

Every implementation declares the devices and dtypes it serves (``Impl``; ``available`` and
``describe`` report them). Choice: ``backend=`` argument, else ``FEDCOMPRESS_BACKEND=torch|cpp|triton``,
else automatic (CPU: cpp if built, else torch; CUDA: triton if importable, else torch). An explicit
choice that cannot run on the device or is not built raises BackendUnavailable saying what to do;
a dtype the chosen implementation does not declare runs on the reference (a declared fallback,
explicit or not). An automatic choice falls back to the reference, and warns once
(ExtensionMissingWarning) when the reason is a missing build: the reference is far slower
(``fedcompress bench --files bench_sz.py`` times fc-torch beside fc-cpp), and the usual cause is
running from a source checkout installed with ``pip install .``, whose fedcompress/ has no _C.
Implementations are named as "module:function" and imported on first use, so ``import
fedcompress`` stays cheap and never fails because an extension is missing.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

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
        f"reference (far slower). Fix: in the source checkout run `pip install -e .` (builds _C in "
        f"place); with `pip install .`, run from outside the checkout, whose fedcompress/ folder has no "
        f"_C. Set FEDCOMPRESS_BACKEND=torch to choose the reference on purpose. [{why}]",
        ExtensionMissingWarning,
        stacklevel=4,
    )


@dataclass(frozen=True)
class Impl:
    """One implementation of an op: where it lives and what it serves.

    ``devices``: the device types it runs on (None: any; the torch reference). Triton also runs on
    CPU tensors when ``TRITON_INTERPRET=1`` (tests). ``dtypes``: the input dtypes it serves (None:
    every dtype the op takes). A request it does not serve by dtype runs on the torch reference (a
    declared fallback, visible in ``available``); one it does not serve by device, or that it cannot
    load for, falls back quietly when automatic and raises when asked for by name."""

    target: str  # "module:function", imported on first use
    devices: tuple[str, ...] | None
    dtypes: tuple[torch.dtype, ...] | None = None

    def serves_device(self, device: str) -> tuple[bool, str | None]:
        if self.devices is not None and device not in self.devices:
            return False, f"it runs on {'/'.join(d.upper() for d in self.devices)} tensors, not {device.upper()}"
        return True, None

    def serves_dtype(self, dtype: torch.dtype | None) -> tuple[bool, str | None]:
        if dtype is not None and self.dtypes is not None and dtype not in self.dtypes:
            return False, f"it serves {_names(self.dtypes)} only, not {_names((dtype,))}"
        return True, None


def _names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _ref(target: str) -> Impl:
    return Impl(target, None)


def _cpp(target: str, dtypes: tuple[torch.dtype, ...] | None = None) -> Impl:
    return Impl(target, ("cpu",), dtypes)


def _triton(target: str, dtypes: tuple[torch.dtype, ...] | None = None) -> Impl:
    return Impl(target, ("cuda",), dtypes)


# op name -> backend -> Impl. Every op has "torch". Dtypes name what the implementation computes
# itself; no implementation hands a dtype to the reference inside the function: the table does.
_TABLE: dict[str, dict[str, Impl]] = {
    # Random mask (fedcompress/codecs/mask/spec.py is the spec; same bytes on every backend). Values
    # travel as float32 (fp16 on the wire is a cast of those), so every float dtype is served. The C++
    # adapters live in fedcompress/cpp/, named as kernels/ is.
    "mask_encode": {
        "torch": _ref("fedcompress.codecs.mask.spec:mask_encode_ref"),
        "cpp": _cpp("fedcompress.cpp.mask:mask_encode_cpp", FLOATS),
        "triton": _triton("fedcompress.kernels.mask:mask_encode_triton", FLOATS),
    },
    "mask_decode": {
        "torch": _ref("fedcompress.codecs.mask.spec:mask_decode_ref"),
        "cpp": _cpp("fedcompress.cpp.mask:mask_decode_cpp", FLOATS),
        "triton": _triton("fedcompress.kernels.mask:mask_decode_triton", FLOATS),
    },
    # SZ blocks section (fedcompress/codecs/sz/codec.py is the spec; same bytes on every backend).
    # Dispatch by the input's device and dtype (encode) or the requested output's (decode). Triton:
    # float32/64/16, the kernels' KIND table; bfloat16 runs on the reference by this declaration.
    "sz_encode": {
        "torch": _ref("fedcompress.codecs.sz.codec:encode_section_ref"),
        "cpp": _cpp("fedcompress.cpp.sz:encode_section_cpp", FLOATS),
        "triton": _triton("fedcompress.kernels.sz:encode_section_triton", FLOATS[:3]),
    },
    "sz_decode": {
        "torch": _ref("fedcompress.codecs.sz.codec:decode_section_ref"),
        "cpp": _cpp("fedcompress.cpp.sz:decode_section_cpp", FLOATS),
        "triton": _triton("fedcompress.kernels.sz:decode_section_triton", FLOATS[:3]),
    },
    # FedSynth hypergradient engine (fedcompress/synth/ops.py, kernels/synth.py): float32 buffers. No
    # C++ for the first four: on CPU they are a few vectorised torch calls on b x C logits or one flat
    # axpy.
    "synth_soft_ce": {
        "torch": _ref("fedcompress.synth.ops:soft_ce_ref"),
        "triton": _triton("fedcompress.kernels.synth:soft_ce_triton", (torch.float32,)),
    },
    "synth_soft_ce_jvp": {
        "torch": _ref("fedcompress.synth.ops:soft_ce_jvp_ref"),
        "triton": _triton("fedcompress.kernels.synth:soft_ce_jvp_triton", (torch.float32,)),
    },
    "synth_sgd_step": {
        "torch": _ref("fedcompress.synth.ops:sgd_step_ref"),
        "triton": _triton("fedcompress.kernels.synth:sgd_step_triton", (torch.float32,)),
    },
    "synth_reverse_step": {
        "torch": _ref("fedcompress.synth.ops:reverse_step_ref"),
        "triton": _triton("fedcompress.kernels.synth:reverse_step_triton", (torch.float32,)),
    },
    # fused small-C_in conv + relu + max-pool, im2col, col2im (csrc/synth.cpp; adapters in
    # fedcompress/cpp/synth.py), float32 on CPU; other dtypes and CUDA run the reference. The dispatch
    # (synth/ops.py) passes the dtype all tensor arguments share, weights included.
    "synth_conv_pool": {
        "torch": _ref("fedcompress.synth.ops:conv_pool_ref"),
        "cpp": _cpp("fedcompress.cpp.synth:conv_pool_cpp", (torch.float32,)),
    },
    "synth_conv_at": {
        "torch": _ref("fedcompress.synth.ops:conv_at_ref"),
        "cpp": _cpp("fedcompress.cpp.synth:conv_at_cpp", (torch.float32,)),
    },
    "synth_conv_at_bwd": {
        "torch": _ref("fedcompress.synth.ops:conv_at_bwd_ref"),
        "cpp": _cpp("fedcompress.cpp.synth:conv_at_bwd_cpp", (torch.float32,)),
    },
    "synth_col2im": {
        "torch": _ref("fedcompress.synth.ops:col2im_ref"),
        "cpp": _cpp("fedcompress.cpp.synth:col2im_cpp", (torch.float32,)),
    },
    "synth_im2col": {
        "torch": _ref("fedcompress.synth.ops:im2col_ref"),
        "cpp": _cpp("fedcompress.cpp.synth:im2col_cpp", (torch.float32,)),
    },
}


def ops() -> list[str]:
    """Every declared op."""
    return sorted(_TABLE)


def implementations(op: str) -> dict[str, Impl]:
    """backend -> Impl for ``op`` (what it declares: target, devices, dtypes)."""
    table = _TABLE.get(op)
    if table is None:
        raise KeyError(f"unknown op {op!r}; declared ops: {sorted(_TABLE)}")
    return dict(table)


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


def _load(op: str, backend: str):
    """Import one implementation; return (fn, None) or (None, reason). Not cached itself: Python's
    module cache makes a repeat cheap, and ``get`` caches the outcome of the whole choice."""
    table = implementations(op)
    impl = table.get(backend)
    if impl is None:
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
    mod, fn = impl.target.split(":")
    try:
        return getattr(importlib.import_module(mod), fn), None
    except (ImportError, AttributeError) as e:
        return None, f"{backend} implementation of {op!r} failed to load: {e}"


def requested_backend(backend: str | None = None) -> str | None:
    b = backend or os.environ.get("FEDCOMPRESS_BACKEND") or None
    if b is not None and b not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {b!r} (FEDCOMPRESS_BACKEND?)")
    return b


def _device_type(device) -> str:
    return device.type if isinstance(device, torch.device) else torch.device(device).type


def _runs_on(backend: str, impl: Impl, dev: str) -> tuple[bool, str | None]:
    """The device rule alone (Triton: CUDA, or CPU under the interpreter)."""
    if backend == "triton" and dev == "cpu" and triton_interpreted():
        return True, None
    ok, why = impl.serves_device(dev)
    if not ok and backend == "triton":
        why += " (or CPU tensors with TRITON_INTERPRET=1, in tests)"
    return ok, why


def available(
    op: str, backend: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> tuple[bool, str | None]:
    """Whether ``backend`` runs ``op`` itself on ``device`` (and ``dtype``, when given) now; if not, why.

    The reason names the declared devices or dtypes, or what failed to load."""
    table = implementations(op)
    impl = table.get(backend)
    if impl is None:
        return False, f"op {op!r} has no {backend} implementation (it has: {sorted(table)})"
    dev = _device_type(device)
    ok, why = _runs_on(backend, impl, dev)
    if not ok:
        return False, f"the {backend} implementation of {op!r}: {why}"
    ok, why = impl.serves_dtype(dtype)
    if not ok:
        return False, f"the {backend} implementation of {op!r}: {why} (those run on the torch reference)"
    fn, why = _load(op, backend)
    return (fn is not None), why


def choose(
    op: str, device: torch.device | str = "cpu", backend: str | None = None, dtype: torch.dtype | None = None
) -> str:
    """The backend that will run ``op`` on ``device`` (and ``dtype``, when given)."""
    table = implementations(op)
    dev = _device_type(device)
    b = requested_backend(backend)
    if b is not None:
        impl = table.get(b)
        if impl is None:
            raise BackendUnavailable(f"backend {b!r} requested for {op!r} but unavailable: "
                                     f"op {op!r} has no {b} implementation (it has: {sorted(table)})")  # fmt: skip
        ok, why = _runs_on(b, impl, dev)
        if ok:
            fn, why = _load(op, b)
            ok = fn is not None
        if not ok:
            raise BackendUnavailable(f"backend {b!r} requested for {op!r} but unavailable: {why}")
        # a dtype the named backend does not serve: the declared fallback to the reference
        return b if impl.serves_dtype(dtype)[0] else "torch"
    fast = "triton" if dev == "cuda" else "cpp" if dev == "cpu" else None
    impl = table.get(fast) if fast else None
    if impl is None or not _runs_on(fast, impl, dev)[0] or not impl.serves_dtype(dtype)[0]:
        return "torch"  # no fast implementation for this device and dtype: declared, so quiet
    fn, why = _load(op, fast)
    if fn is not None:
        return fast
    if fast == "cpp" or "failed to load" in (why or ""):
        # the op has a fast implementation that is not built (or not packaged): say so; a missing
        # triton package on a CUDA machine is a plain optional dependency and stays quiet
        _warn_missing(op, fast, why or "")
    return "torch"


# The one dispatch cache: (op, device type, dtype, backend argument, and the two env vars the choice
# reads) -> the function. The FedSynth engine makes a few hundred op calls per hypergradient, so
# the choice is made once per key, not per call.
_DISPATCH: dict[tuple, object] = {}


def get(op: str, device: torch.device | str = "cpu", backend: str | None = None, dtype: torch.dtype | None = None):
    """The implementation of ``op`` for ``device`` and ``dtype`` (see module docstring for the rules)."""
    dev = _device_type(device)
    env = os.environ.get
    key = (op, dev, dtype, backend, env("FEDCOMPRESS_BACKEND"), env("TRITON_INTERPRET"))
    fn = _DISPATCH.get(key)
    if fn is None:
        fn = _DISPATCH[key] = _load(op, choose(op, dev, backend, dtype))[0]
    return fn


def call(op: str, x: torch.Tensor, *args, backend: str | None = None, **kwargs):
    """Run ``op`` with the backend chosen for ``x``'s device and dtype."""
    return get(op, x.device, backend, x.dtype)(x, *args, **kwargs)


def describe(device: torch.device | str = "cpu") -> list[dict]:
    """The table as rows, for people (``python -m fedcompress.gpucheck``): per op and backend, the
    declared devices and dtypes, whether it runs on ``device`` now and, if not, why."""
    rows = []
    for op in ops():
        for backend, impl in _TABLE[op].items():
            ok, why = available(op, backend, device)
            rows.append({"op": op, "backend": backend, "devices": impl.devices or ("any",),
                         "dtypes": _names(impl.dtypes) if impl.dtypes else "any",
                         "available": ok, "why": why})  # fmt: skip
    return rows
