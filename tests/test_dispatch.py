"""The dispatch rules of fedcompress/_ops.py (declared devices and dtypes, one cache), and every op
with a fast implementation run per (backend, device) against its reference: on a CUDA machine these
run the Triton kernels on CUDA tensors (``python -m fedcompress.gpucheck`` runs this file there);
here, Triton runs on CPU tensors under the interpreter."""

import warnings

import pytest
import torch
from conftest import backend_or_skip

from fedcompress import _ops
from fedcompress.codecs import mask as M
from fedcompress.codecs.sz.codec import decode_section_ref, encode_section_ref
from fedcompress.errors import BackendUnavailable
from fedcompress.synth.ops import conv_pool_ref

# ---------------------------------------------------------------------------------------------
# The table


def test_every_implementation_declares_devices_and_dtypes():
    for op in _ops.ops():
        impls = _ops.implementations(op)
        assert impls["torch"].devices is None, f"{op}: the reference serves every device"
        for backend, impl in impls.items():
            assert backend in _ops.BACKENDS
            assert impl.dtypes is None or all(isinstance(d, torch.dtype) for d in impl.dtypes)
            if backend == "cpp":
                assert impl.devices == ("cpu",), op
            if backend == "triton":
                assert impl.devices == ("cuda",), op
    rows = _ops.describe("cpu")
    assert {(r["op"], r["backend"]) for r in rows} == {(op, b) for op in _ops.ops() for b in _ops.implementations(op)}
    assert all(r["available"] == (r["why"] is None) for r in rows)


def test_available_names_the_declared_dtype():
    ok, why = _ops.available("synth_conv_pool", "cpp", "cpu", torch.float64)
    assert not ok and "float32" in why and "float64" in why
    ok, why = _ops.available("sz_encode", "triton", "cuda", torch.bfloat16)
    assert not ok and "bfloat16" in why and "reference" in why


def test_undeclared_dtype_runs_the_reference_quietly():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ExtensionMissingWarning: declared, not missing
        assert _ops.choose("synth_conv_pool", "cpu", dtype=torch.float64) == "torch"
        assert _ops.choose("sz_encode", "cuda", dtype=torch.bfloat16) == "torch"
    if _ops.available("synth_conv_pool", "cpp")[0]:
        # named explicitly: the backend serves the device, so the dtype takes the declared fallback
        assert _ops.choose("synth_conv_pool", "cpu", backend="cpp", dtype=torch.float64) == "torch"
        assert _ops.choose("synth_conv_pool", "cpu", backend="cpp", dtype=torch.float32) == "cpp"
    # call() passes x's dtype along: float64 reaches the reference, whatever is built
    xs = torch.randn(1, 6, 6, 2, dtype=torch.float64)  # [N, Hp, Wp, C] channels last
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    assert _ops.get("synth_conv_pool", "cpu", dtype=torch.float64) is conv_pool_ref
    out, arg = _ops.call("synth_conv_pool", xs, w, None, 2)
    want = torch.relu(torch.nn.functional.max_pool2d(torch.nn.functional.conv2d(xs.permute(0, 3, 1, 2), w), 2))
    assert out.dtype == torch.float64 and torch.allclose(out, want)


def test_synth_dispatch_sees_the_weights_dtype():
    """The C++ conv kernels are float32-only for every tensor argument (declared in _ops): the
    dispatch in synth/ops.py passes the dtype they share, so float64 weights never reach the kernel,
    mixed dtypes are refused by name, and the adapter itself refuses instead of falling back."""
    from fedcompress.synth import ops

    g = torch.Generator().manual_seed(3)
    xs = torch.randn(2, 7, 7, 2, generator=g)  # [N, Hp, Wp, C] channels last
    w = torch.randn(3, 2, 3, 3, generator=g)
    b = torch.randn(3, generator=g)
    want = torch.relu(torch.nn.functional.max_pool2d(torch.nn.functional.conv2d(
        xs.double().permute(0, 3, 1, 2), w.double(), b.double()), 2))  # fmt: skip
    backends = ["torch"] + (["cpp"] if _ops.available("synth_conv_pool", "cpp")[0] else [])
    for backend in backends:
        out, _ = ops.conv_pool(xs.double(), w.double(), b.double(), 2, backend=backend)
        assert out.dtype == torch.float64 and torch.allclose(out, want)  # the reference, by declaration
        out, _ = ops.conv_pool(xs, w, b, 2, backend=backend)
        assert out.dtype == torch.float32 and torch.allclose(out.double(), want, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match=r"share one dtype.*w=float64"):
            ops.conv_pool(xs, w.double(), b, 2, backend=backend)
        _, arg = ops.conv_pool(xs, w, b, 2, backend=backend)
        gout = torch.randn(2, 3, 2, 2, generator=g)
        with pytest.raises(ValueError, match=r"share one dtype.*gout2=float64"):
            ops.conv_at_bwd(gout, xs, w, 2, arg, True, gout.double(), w, backend=backend)
    if "cpp" in backends:
        from fedcompress.cpp.synth import conv_at_bwd_cpp, conv_pool_cpp

        with pytest.raises(ValueError, match=r"float32 CPU tensors only.*w is float64"):
            conv_pool_cpp(xs, w.double(), b, 2)
        _, arg = ops.conv_pool(xs, w, b, 2)
        gout = torch.randn(2, 3, 2, 2, generator=g)
        with pytest.raises(ValueError, match=r"gout2 is float64"):
            conv_at_bwd_cpp(gout, xs, w, 2, arg, True, gout.double(), w)
        # a float64 engine resolves every conv op to its reference; float32 to the kernels
        k64, k32 = ops.Bound("cpu", None, torch.float64), ops.Bound("cpu", None, torch.float32)
        assert k64.conv_pool is conv_pool_ref and k32.conv_pool is conv_pool_cpp


def test_explicit_backend_on_a_device_it_does_not_declare_raises():
    with pytest.raises(BackendUnavailable, match="CPU tensors"):
        _ops.choose("synth_conv_pool", "cuda", backend="cpp")
    with pytest.raises(BackendUnavailable, match="has no cpp implementation"):
        _ops.choose("synth_soft_ce", "cpu", backend="cpp")
    with pytest.raises(KeyError, match="unknown op"):
        _ops.available("no-such-op", "torch")


def test_one_dispatch_cache(monkeypatch):
    assert not hasattr(_ops, "_GET") and not hasattr(_ops._load, "cache_info")
    monkeypatch.delenv("FEDCOMPRESS_BACKEND", raising=False)
    fn = _ops.get("mask_encode", "cpu")
    assert _ops.get("mask_encode", torch.device("cpu")) is fn
    keys = [k for k in _ops._DISPATCH if k[:2] == ("mask_encode", "cpu") and k[2] is None and k[3] is None]
    assert len({k[:4] for k in keys}) == 1
    monkeypatch.setenv("FEDCOMPRESS_BACKEND", "torch")
    assert _ops.get("mask_encode", "cpu") is M.mask_encode_ref  # the env var is part of the key


# ---------------------------------------------------------------------------------------------
# Every fast op, per (backend, device), against the reference on CPU

N = 2**16 + 3  # more than one Triton block; odd tail


def _x(n: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * 3).to(dtype)


def test_mask_encode_decode_on_device(backend, device):
    backend_or_skip("mask_encode", backend)
    thr = M.keep_threshold(0.3)
    xs = [_x(N, seed=1), _x(7, seed=2), _x(0)]
    seeds = [2**63 + 5, 11, 12]
    want_v, want_c = M.mask_encode_ref(xs, seeds, thr)
    got_v, got_c = _ops.get("mask_encode", device, backend)([x.to(device) for x in xs], seeds, thr)
    assert list(got_c) == list(want_c)
    assert got_v.device.type == device and torch.equal(got_v.cpu(), want_v)
    # two clients averaged in one pass, weights 1 and 3
    lens = [x.numel() for x in xs]
    v2, c2 = M.mask_encode_ref([x * 2 for x in xs], [s + 1 for s in seeds], thr)
    args = ([want_c, c2], [seeds, [s + 1 for s in seeds]], lens, [1.0, 3.0], thr, True)
    want = M.mask_decode_ref([want_v, v2], *args)
    got = _ops.get("mask_decode", device, backend)([want_v.to(device), v2.to(device)], *args)
    assert got.device.type == device
    torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_sz_section_on_device_same_bytes(backend, device, dtype):
    backend_or_skip("sz_encode", backend, dtype=dtype)
    x = _x(N, dtype, seed=3)
    x[5] = float("nan")
    step, bound = 2e-2, 1e-2
    want = encode_section_ref(x, step, bound, 1 << 14)
    got = _ops.get("sz_encode", device, backend, dtype)(x.to(device), step, bound, 1 << 14)
    assert bytes(got) == bytes(want)  # same bytes on every backend and device
    y = _ops.get("sz_decode", device, backend, dtype)(want, dtype, N, 1 << 14, step, torch.device(device))
    assert y.device.type == device  # decoded where the caller asked (CUDA: Triton dequantizes there)
    ref = decode_section_ref(want, dtype, N, 1 << 14, step)
    assert torch.equal(y.cpu().view(torch.uint8), ref.view(torch.uint8))
    err = (y.cpu().double() - x.double()).abs()
    assert float(err[torch.isfinite(err)].max()) <= bound * (1 + 1e-6) and torch.isnan(y.cpu()[5])


@pytest.mark.parametrize("n,C", [(1, 1), (300, 47)])
def test_synth_soft_ce_and_steps_on_device(backend, device, n, C):
    backend_or_skip("synth_soft_ce", backend)
    g = torch.Generator().manual_seed(n + C)
    z, y = torch.randn(n, C, generator=g) * 3, torch.rand(n, C, generator=g)
    loss, p, d = _ops.get("synth_soft_ce", device, backend)(z.to(device), y.to(device), 0.5)
    z64 = z.double().requires_grad_(True)
    ref = -(y.double() * torch.log_softmax(z64, -1)).sum() * 0.5
    (gz,) = torch.autograd.grad(ref, z64)
    ref = ref.detach()
    assert abs(float(loss) - float(ref)) <= 1e-5 * max(1.0, abs(float(ref)))
    torch.testing.assert_close(d.cpu(), gz.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p.cpu(), torch.softmax(z.double(), -1).float(), rtol=1e-5, atol=1e-6)
    w, gr = _x(N, seed=4), _x(N, seed=5)
    w1 = w.clone().to(device)  # the step is in place
    _ops.get("synth_sgd_step", device, backend)(w1, gr.to(device), 0.1)
    torch.testing.assert_close(w1.cpu(), (w.double() - 0.1 * gr.double()).float(), rtol=0, atol=1e-6)
