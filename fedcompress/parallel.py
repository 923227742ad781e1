"""Threads of the native (C++) ops.

Every native op (SZ encode/decode, mask encode/decode/decode_mean, the FedSynth kernels) runs on the
extension's own pool (csrc/pool.h), not OpenMP: the calling thread works through the tasks itself and
waits only for tasks a helper has already started, so on a machine whose cores are busy an op runs at
about its single-thread speed instead of waiting for unscheduled workers (issue 18: 8-12x slower with
2 OpenMP threads on 2 busy cores). By default the ops follow ``torch.get_num_threads()``;
``set_num_threads(n)`` overrides that for fedcompress alone (torch's own ops are left as they are).
"""

from __future__ import annotations

from . import _ops


def set_num_threads(n: int | None) -> None:
    """Use at most ``n`` threads in native ops (``n >= 1``); ``None`` follows torch.get_num_threads()."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"n must be an int >= 1 or None (follow torch.get_num_threads()), got {n!r}")
    try:
        C = _ops.native()
    except Exception:  # no extension: nothing native to limit; the torch reference follows torch
        return
    C.set_threads(0 if n is None else n)


def get_num_threads() -> int:
    """Threads a native op may use now (set_num_threads' value, else torch.get_num_threads())."""
    try:
        return int(_ops.native().max_threads())
    except Exception:
        import torch

        return torch.get_num_threads()
