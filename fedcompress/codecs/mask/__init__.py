"""Random masking with seed-only masks: ``fc.RandomMask`` (one tensor) and the ``mask`` compressor.

One duty per module:

- ``spec``: the mask's specification and torch reference (parameters, Philox4x32-10 on int64
  tensors, ``mask_encode_ref`` / ``mask_decode_ref``, the decode_mean weights); C++
  (fedcompress/cpp/mask.py -> csrc/mask.cpp) and Triton (kernels/mask.py) follow it bit for bit.
- ``framing``: the payload's meta header and records on top of fedcompress/wire.py.
- ``codec``: ``RandomMask``, the tensor codec.
- ``compressor``: ``MaskCompressor``, the ``mask`` state-dict compressor with its byte budget.

The names below are the package's surface (``fedcompress.codecs.mask:RandomMask`` and the rest keep
working from before the split).
"""

from ...api import mix_seed
from ...cpp.mask import mask_decode_cpp, mask_encode_cpp
from .codec import RandomMask
from .compressor import BUDGET_SIGMAS, MASK_SALT, MaskCompressor, budget_keep
from .spec import (
    check_keep,
    check_seed,
    keep_threshold,
    mask_decode_ref,
    mask_encode_ref,
    mask_keep_ref,
    mask_words_ref,
    philox4x32_ref,
    unbiased_scale,
)

__all__ = [
    "BUDGET_SIGMAS",
    "MASK_SALT",
    "MaskCompressor",
    "RandomMask",
    "budget_keep",
    "check_keep",
    "check_seed",
    "keep_threshold",
    "mask_decode_cpp",
    "mask_decode_ref",
    "mask_encode_cpp",
    "mask_encode_ref",
    "mask_keep_ref",
    "mask_words_ref",
    "mix_seed",
    "philox4x32_ref",
    "unbiased_scale",
]
