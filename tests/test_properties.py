"""Property tests (hypothesis) for the promises hostile or unlucky inputs test hardest.

- SZ: |x - x̂| <= eb for every finite value over adversarial values (bin edges, subnormals, ±Inf, NaN,
  ±3.4e38, constant and zero-range tensors, single elements), in every float dtype, on every backend;
  non-finite values bit-exact.
- Wire: exact round trips of every dtype and shape.
- RandomMask: identical bytes from every backend.
"""

import numpy as np
import pytest
import torch
from conftest import backend_or_skip
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fedcompress as fc
from fedcompress import wire

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _bits(t: torch.Tensor) -> np.ndarray:
    t = t.contiguous().reshape(-1)
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]).numpy()


@st.composite
def adversarial(draw):
    eb = draw(st.sampled_from([1e-7, 1e-4, 1e-2, 0.5, 3.0]))
    specials = [0.0, -0.0, float("nan"), float("inf"), -float("inf"), 3.4e38, -3.4e38, 1e-45, -1e-45,
                1.17e-38, 5e-324, 65504.0, -65504.0, 6e-8]
    n = draw(st.integers(1, 200))
    kind = draw(st.sampled_from(["mixed", "constant", "edges", "single"]))
    if kind == "constant":
        v = draw(st.floats(allow_nan=False, allow_infinity=False, width=32))
        vals = [v] * n
    elif kind == "single":
        vals = [draw(st.one_of(st.sampled_from(specials), st.floats(width=32)))]
    else:
        k = draw(st.lists(st.integers(-(2**23), 2**23), min_size=n, max_size=n))
        # exactly on the quantization bin edges (k + 1/2) * 2eb, and one ulp either side
        vals = [(ki + 0.5) * 2 * eb for ki in k]
        vals = [float(np.nextafter(np.float32(v), np.float32(draw(st.sampled_from([-np.inf, 0, np.inf])))))
                for v in vals]
        if kind == "mixed":
            for i in draw(st.lists(st.integers(0, n - 1), max_size=n)):
                vals[i] = draw(st.sampled_from(specials))
    return vals, eb


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["abs", "rel"])
def test_sz_bound_on_adversarial_values(backend, device, dtype, mode):
    backend_or_skip("sz_encode", backend)

    @SETTINGS
    @given(case=adversarial())
    def check(case):
        vals, eb = case
        x = torch.tensor(vals, dtype=torch.float64).to(dtype)
        codec = fc.SZ(eb, mode, backend=backend)
        y = codec.decode(codec.encode(x.to(device)), device=device)  # encoded and decoded on the device
        assert y.dtype == dtype and y.shape == x.shape and y.device.type == device
        y = y.cpu()
        fin = torch.isfinite(x)
        if mode == "abs":
            bound = eb
        else:
            xf = x[fin].double()
            bound = eb * (xf.max() - xf.min()).item() if xf.numel() else 0.0
        err = (x[fin].double() - y[fin].double()).abs()
        assert err.numel() == 0 or err.max().item() <= bound, (err.max().item(), bound)
        nf = ~fin
        assert np.array_equal(_bits(x)[nf.numpy()], _bits(y)[nf.numpy()])  # NaN payloads, ±Inf exact
        assert torch.equal(torch.isfinite(y), fin)

    check()


@SETTINGS
@given(
    dtype=st.sampled_from(list(wire.DTYPE_CODES)),
    shape=st.lists(st.integers(0, 5), max_size=4).map(tuple),
    seed=st.integers(0, 2**31 - 1),
    transpose=st.booleans(),
)
def test_wire_round_trip_is_exact(dtype, shape, seed, transpose):
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (int(np.prod(shape)) * wire.itemsize(dtype),), generator=g, dtype=torch.uint8)
    t = raw.view(dtype).reshape(shape) if raw.numel() else torch.empty(shape, dtype=dtype)
    if dtype == torch.bool:
        t = raw.reshape(shape) > 127 if raw.numel() else torch.empty(shape, dtype=torch.bool)
    if transpose and t.dim() >= 2:
        t = t.transpose(0, 1)
    comp = fc.get_compressor("none")
    out = comp.decompress(comp.compress({"t": t}, fc.RoundContext()), fc.RoundContext())["t"]
    assert out.dtype == dtype and out.shape == t.shape
    assert torch.equal(out.contiguous().reshape(-1).view(torch.uint8), t.contiguous().reshape(-1).view(torch.uint8))


def test_mask_bytes_identical_across_backends(backend):
    backend_or_skip("mask_encode", backend)

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(n=st.integers(0, 70000), keep=st.floats(1e-3, 1.0), seed=st.integers(0, 2**64 - 1),
           values=st.sampled_from(["fp32", "fp16"]))
    def check(n, keep, seed, values):
        x = torch.randn(n, generator=torch.Generator().manual_seed(n))
        ref = fc.RandomMask(keep, values=values, backend="torch").encode(x, seed=seed)
        assert fc.RandomMask(keep, values=values, backend=backend).encode(x, seed=seed) == ref

    check()


def test_sz_nan_payload_bits_survive_on_every_backend(backend, device):
    # regression: the reference decoder's bool-index assignment canonicalised bfloat16 NaNs (0xFFFF ->
    # 0x7FC0) from 64 elements up
    backend_or_skip("sz_encode", backend)
    for dtype in FLOAT_DTYPES:
        x = torch.full((110,), 1e-7, dtype=torch.float64).to(dtype)
        bits = x.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])
        bits[0] = -1
        bits[77] = -1
        codec = fc.SZ(1e-7, "rel", backend=backend)
        y = codec.decode(codec.encode(x.to(device)), device=device)
        assert y.device.type == device and np.array_equal(_bits(y.cpu()), _bits(x)), dtype
