"""SZ's tables and limits are written three times (Python spec, C++ in csrc/sz.cpp, Triton in
kernels/sz.py): read the C++ and Triton sources as text and check every shared value equals the
Python one, so a change in one place that is not made in the others fails here, not in a payload."""

import math
import re
from pathlib import Path

import pytest
import torch

from fedcompress import wire
from fedcompress.codecs.sz import codec, entropy, predict, quantize

ROOT = Path(__file__).resolve().parents[1]
SZ_CPP = ROOT / "csrc" / "sz.cpp"
SZ_TRITON = ROOT / "kernels" / "sz.py"


def _source(path: Path) -> str:
    if not path.exists():
        pytest.skip(f"{path.relative_to(ROOT)} not present (not a source checkout)")
    return path.read_text()


def _cpp_int(expr: str) -> int:
    """A C++ integer constant expression of the kinds csrc/sz.cpp uses: literals, 1u << 15, 65535 - k."""
    expr = expr.strip()
    if expr == "INT32_MIN":
        return -(2**31)
    m = re.fullmatch(r"(\d+)u? << (\d+)", expr)
    if m:
        return int(m[1]) << int(m[2])
    return int(expr.rstrip("u").rstrip("f"))


def cpp_constants() -> dict[str, str]:
    """name -> right-hand side of every namespace-level ``constexpr <type> kName = value;``, also where
    one line declares several (``kA = 0, kB = 1``)."""
    out = {}
    for line in _source(SZ_CPP).splitlines():
        m = re.match(r"\s*(?:static )?constexpr [\w:]+ (k\w+ = .*?);", line)
        if m:
            for part in m[1].split(", "):
                name, value = part.split(" = ", 1)
                out[name] = value
    return out


def test_cpp_sz_limits_and_tables_equal_python():
    c = cpp_constants()
    # escape tokens and their base; run-mode tokens
    zig = c["kMaxZigzag"]  # "65535 - kTokenBase"
    assert zig.replace("kTokenBase", str(entropy.TOKEN_BASE)).replace(" ", "") == f"65535-{entropy.TOKEN_BASE}"
    assert 65535 - entropy.TOKEN_BASE == entropy.MAX_ZIGZAG
    pairs = {
        "kUnquantized": quantize.UNQUANTIZED,
        "kLanes": entropy.LANES,
        "kRansL": entropy.RANS_L,
        "kMinPb": entropy.MIN_PB,
        "kMaxPb": entropy.MAX_PB,
        "kMaxSymbols": entropy.MAX_SYMBOLS,
        "kTokens": entropy.N_TOKENS,
        "kEscVal": entropy.ESC_VAL,
        "kEscWide": entropy.ESC_WIDE,
        "kRunA": entropy.RUN_A,
        "kRunB": entropy.RUN_B,
        "kTokenBase": entropy.TOKEN_BASE,
        "kBlkLorenzo": codec.BLK_LORENZO,
        "kBlkRun": codec.BLK_RUN,
        "kBlkRaw": codec.BLK_RAW,
        "kEstStride": predict.EST_STRIDE,
        "kRunConsider": entropy.RUN_CONSIDER,
    }
    got = {k: _cpp_int(c[k]) for k in pairs}
    assert got == pairs
    assert float(c["kMaxQuant"].rstrip("f")) == quantize.MAX_QUANT


def test_cpp_dtype_codes_and_smallest_normals_equal_python():
    src = _source(SZ_CPP)
    kinds = {"F32": torch.float32, "F64": torch.float64, "F16": torch.float16, "BF16": torch.bfloat16}
    # the encoder's dispatch on the wire's dtype code
    codes = {int(a): kinds[b] for a, b in re.findall(r"code == (\d)\) (?:s = )?sz::encode_section<sz::(\w+)>", src)}
    assert codes, "no dtype dispatch found in csrc/sz.cpp"
    assert all(wire.DTYPE_CODES[dt] == code for code, dt in codes.items()), codes
    # tiny (smallest normal) per value type: the subnormal rule must agree with torch.finfo
    tiny = dict(re.findall(r"struct (\w+) \{\s*using T = \w+;\s*static constexpr double tiny = ([0-9.e+-]+);", src))
    assert set(tiny) == set(kinds)
    for name, dt in kinds.items():
        assert float(tiny[name]) == torch.finfo(dt).tiny, name


def test_triton_sz_limits_equal_python():
    src = _source(SZ_TRITON)
    m = re.search(r"^UNQUANTIZED = (.+)$", src, re.M)
    assert m and eval(m[1], {}) == quantize.UNQUANTIZED  # a literal such as -(2**31)
    # inside @triton.jit kernels a module global is not readable, so they spell it out
    spelled = {int(v) for v in re.findall(r"(-\d{6,})\b", src)}
    assert spelled == {quantize.UNQUANTIZED}, spelled
    limits = {float(v) for v in re.findall(r"tl\.abs\(y\) < ([0-9.]+)", src)}
    assert limits == {quantize.MAX_QUANT}, "every Triton quantizer must stop at quantize.MAX_QUANT"
    # round half to even by adding 1.5 * 2^23: exact only while |y| < 2^22 = MAX_QUANT
    magic = {float(v) for v in re.findall(r"\+ ([0-9.]+)\) - \1", src)}
    assert magic == {1.5 * 2**23} and math.log2(quantize.MAX_QUANT) == 22
