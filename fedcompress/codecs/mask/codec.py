"""``fc.RandomMask``: the random-mask tensor codec (one tensor per payload; many payloads averaged).

Decoders return on ``device`` (default CPU) and dispatch by it: a CUDA device runs the Triton
decoder on CUDA tensors, CPU runs C++ (or the reference); the payload is parsed on the host either
way, and only the kept values travel to the device.
"""

from __future__ import annotations

import numpy as np
import torch

from ... import _ops, wire
from ...api import check_device
from ...errors import FormatError
from .framing import VALUE_DTYPES, check_alloc_bits, pack_meta, unpack_meta, values_bytes, values_from
from .spec import (
    check_keep,
    check_seed,
    client_weights,
    keep_threshold,
    mask_keep_ref,
    unbiased_scale,
)


class RandomMask:
    """Keep each coordinate with probability ``keep``; send only the kept values and 8 bytes of seed.

    ``encode(t, seed)`` -> bytes; ``decode(blob, device=None)`` -> tensor of t's dtype and shape on
    ``device`` (default CPU), zeros where dropped (x 1/keep where ``unbiased``, the default);
    ``decode_mean(blobs, weights=None, device=None)`` -> weighted mean of many clients' payloads (same
    shape and keep, any seeds), regenerated and scattered in one pass. ``values="fp16"`` halves the
    payload (values rounded to float16). ``backend`` forces torch/cpp/triton (default:
    FEDCOMPRESS_BACKEND, else automatic for the tensor's or the requested device). Payloads are
    self-describing: decode uses the keep/unbiased settings written by the encoder.
    """

    def __init__(
        self, keep: float = 0.1, unbiased: bool = True, values: str = "fp32", backend: str | None = None
    ):
        self.keep = check_keep(keep)
        if not isinstance(unbiased, (bool, np.bool_)):
            raise ValueError(f"unbiased={unbiased!r} must be True or False")
        self.unbiased = bool(unbiased)
        if values not in VALUE_DTYPES:
            raise ValueError(f"values={values!r} must be one of {', '.join(VALUE_DTYPES)}")
        self.values = values
        self.backend = _ops.requested_backend(backend)
        self.thr_m1 = keep_threshold(self.keep)

    def __repr__(self) -> str:
        return f"RandomMask(keep={self.keep}, unbiased={self.unbiased}, values={self.values!r})"

    def mask(self, numel: int, seed: int) -> torch.Tensor:
        """The boolean keep mask for a tensor of ``numel`` elements (reference implementation)."""
        return mask_keep_ref(int(numel), check_seed(seed), self.thr_m1)

    def encode(self, t: torch.Tensor, seed: int = 0) -> bytes:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError("RandomMask.encode takes a floating-point tensor")
        seed = check_seed(seed)
        vdtype = VALUE_DTYPES[self.values]
        fn = _ops.get("mask_encode", t.device, self.backend)
        values, _ = fn([t.detach().reshape(-1)], [seed], self.thr_m1)
        rec = wire.Record("", t.dtype, tuple(t.shape), values_bytes(values, vdtype))
        return wire.pack(wire.CODEC_MASK_TENSOR, [rec], pack_meta(seed, self.thr_m1, self.unbiased, vdtype))

    def _parse(self, blob):
        meta, records = wire.unpack(blob, wire.CODEC_MASK_TENSOR)
        seed, thr_m1, unbiased, vdtype = unpack_meta(meta)
        if len(records) != 1:
            raise FormatError(f"mask-tensor payload has {len(records)} records, expected 1")
        rec = records[0]
        if not rec.dtype.is_floating_point:
            raise FormatError(f"mask-tensor payload: dtype {rec.dtype} is not floating point")
        return seed, thr_m1, unbiased, vdtype, rec

    def decode(self, blob, device=None) -> torch.Tensor:
        dev = check_device(device)
        seed, thr_m1, unbiased, vdtype, rec = self._parse(blob)
        values = values_from(rec, vdtype, thr_m1).to(dev)
        check_alloc_bits(1, rec.numel)
        w = unbiased_scale(thr_m1) if unbiased else 1.0
        fn = _ops.get("mask_decode", dev, self.backend)
        flat = fn([values], [[values.numel()]], [[seed]], [rec.numel], [w], thr_m1, False)
        return flat.to(dev, rec.dtype).reshape(rec.shape)

    def decode_mean(self, blobs, weights=None, device=None) -> torch.Tensor:
        dev = check_device(device)
        blobs = list(blobs)
        if not blobs:
            raise ValueError("decode_mean needs at least one payload")
        parsed = [self._parse(b) for b in blobs]
        _, thr_m1, unbiased, _, rec0 = parsed[0]
        for _, t, u, _, r in parsed[1:]:
            if (t, u, r.dtype, r.shape) != (thr_m1, unbiased, rec0.dtype, rec0.shape):
                raise FormatError("decode_mean payloads differ in keep, unbiased, dtype or shape")
        ws = client_weights(weights, len(blobs), unbiased_scale(thr_m1) if unbiased else 1.0)
        check_alloc_bits(len(blobs), rec0.numel)
        vals = [values_from(r, vd, thr_m1).to(dev) for _, _, _, vd, r in parsed]
        fn = _ops.get("mask_decode", dev, self.backend)
        flat = fn(vals, [[v.numel()] for v in vals], [[p[0]] for p in parsed], [rec0.numel], ws, thr_m1, True)
        return flat.to(dev, rec0.dtype).reshape(rec0.shape)
