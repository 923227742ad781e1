"""C++ adapters of the random mask: numpy views of CPU tensors in, ``fedcompress._C`` (csrc/mask.cpp) out.

Named as kernels/mask.py is for Triton: ``mask_encode_cpp`` / ``mask_decode_cpp`` implement the ops
``mask_encode`` / ``mask_decode`` whose reference and specification are in
fedcompress/codecs/mask/spec.py; ``fedcompress._ops`` declares them (CPU tensors, float dtypes).
"""

from __future__ import annotations

import numpy as np
import torch

from .. import _ops
from ..errors import FormatError
from ..wire import U64_MASK


def _seeds_u64(seeds) -> np.ndarray:
    return np.asarray([int(s) & U64_MASK for s in seeds], dtype=np.uint64)


def _np_f32(x: torch.Tensor) -> np.ndarray:
    return x.detach().reshape(-1).to(torch.float32).contiguous().cpu().numpy()


def mask_encode_cpp(xs, seeds, thr_m1: int):
    """C++ encode: zero-copy on contiguous float32 CPU tensors; one call for every tensor."""
    values, counts = _ops.native().mask_encode([_np_f32(x) for x in xs], _seeds_u64(seeds), int(thr_m1))
    return torch.from_numpy(values), counts.tolist()


def mask_decode_cpp(vals, expected, seeds, lens, weights, thr_m1: int, accumulate: bool):
    C = len(vals)
    out = torch.empty(int(sum(lens)), dtype=torch.float32).numpy()  # torch owns it: see wire.tensor_from_bytes
    exp = np.asarray(expected, dtype=np.int64).reshape(C * len(lens))
    sd = _seeds_u64([s for row in seeds for s in row])
    bad, got = _ops.native().mask_decode(
        [_np_f32(v) for v in vals],
        exp,
        sd,
        np.asarray(lens, dtype=np.int64),
        np.asarray(weights, dtype=np.float32),
        int(thr_m1),
        bool(accumulate),
        out,
    )
    if bad >= 0:
        # imported here: fedcompress.codecs.mask re-exports these adapters, so a module-level import
        # of its spec would be circular when this module is imported first (as _ops does)
        from ..codecs.mask.spec import count_message

        S = max(len(lens), 1)
        raise FormatError(count_message(bad // S, bad % S, int(exp[bad]) if exp.size else 0, got))
    return torch.from_numpy(out)
