"""Byte budgets (``ratio=R`` on a compressor spec): the one definition of "dense bytes" and the budget.

An update's dense size is the length of the ``none`` payload of the same update: the wire framing
(magic, version, codec id, meta length, record count, CRC), each record's name, dtype, shape and
length fields, and the raw tensor bytes in their own dtype. It depends only on names, dtypes and
shapes, so it is computed here arithmetically (no tensor is copied); the driver counts dense bytes
with the same function. ``ratio=R`` promises ``len(payload) <= floor(dense / R)`` for every update,
counting every payload byte (header, meta, names, CRC).

What a compressor chose to meet its budget is exposed as ``comp.last_choice`` (a small dict, or
None when no ratio is set); the driver writes it to metrics.jsonl per client and round.
"""

from __future__ import annotations

import math

from ..api import Param

# ``ratio`` as every compressor declares it: None (the default) means "no budget".
RATIO_VALID = "a finite number > 1 (dense bytes / sent bytes)"
RATIO_PARAM = Param(float, None, lambda v: math.isfinite(v) and v > 1.0, RATIO_VALID)

# magic 4 + version 2 + codec 2 + meta_len 4 + n_records 4 + crc32 4 (wire.pack)
FRAME_BYTES = 20


def record_overhead(name: str, ndim: int) -> int:
    """Bytes a record costs besides its data: name length u16 + name, dtype u8, ndim u8, shape
    u64 * ndim, data length u64 (wire.pack)."""
    return 2 + len(name.encode("utf-8")) + 1 + 1 + 8 * ndim + 8


def payload_overhead(update, meta_len: int = 0) -> int:
    """Framing bytes of a payload of ``update``'s records (everything but the records' data)."""
    return FRAME_BYTES + meta_len + sum(record_overhead(k, v.dim()) for k, v in update.items())


def dense_payload_bytes(update) -> int:
    """Length of the ``none`` payload of ``update`` (names, dtypes and shapes are all it reads)."""
    return payload_overhead(update) + sum(v.numel() * v.element_size() for v in update.values())


def budget_bytes(update, ratio: float) -> int:
    """The most bytes a payload of ``update`` may have under ``ratio``: floor(dense / ratio)."""
    return int(dense_payload_bytes(update) // ratio)


def check_reachable(what: str, ratio: float, reached: float) -> None:
    """ValueError naming ``ratio`` and what the compressor reaches when it cannot meet the budget."""
    if reached < ratio:
        raise ValueError(
            f"{what}: ratio={ratio:g} cannot be met; it reaches {reached:.4g}x on this update "
            f"(ratio must be {RATIO_VALID} and at most what the compressor reaches)"
        )


def spec_without(comp, drop: set[str]) -> str:
    """A spec string for ``comp`` without the keys in ``drop`` and without unset (None) keys."""
    items = [(k, v) for k, v in comp.params.items() if k not in drop and v is not None]
    if not items:
        return comp.name
    return comp.name + ":" + ",".join(f"{k}={v}" for k, v in items)

