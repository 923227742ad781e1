"""Codecs: tensor codecs (SZ, RandomMask) and the state-dict compressors built on them."""
