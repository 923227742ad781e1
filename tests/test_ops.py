"""Backend dispatch (fedcompress/_ops.py), proven on the random mask's encode op in all three backends,
and the SZ pre-quantizer's reference (stage 1 of the SZ reference codec) against numpy on every device.

The pre-quantizer is no longer an op of its own: only tests reached the ``prequantize`` op (the SZ
codec on every backend quantizes inside its ``sz_encode`` section op), so the op went from the
table and the reference is tested here directly, as the specification of stage 1."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import backend_or_skip

from fedcompress import _ops
from fedcompress.codecs import mask as M
from fedcompress.codecs.sz.quantize import UNQUANTIZED, inverse_of_step, prequantize_ref
from fedcompress.errors import BackendUnavailable

SIZES = [0, 1, 7, 2**16 + 3]


def _numpy_prequantize(x: np.ndarray, eb: float) -> np.ndarray:
    """Independent reference in numpy (float32 multiply, np.rint is half-to-even)."""
    y = x.astype(np.float32) * np.float32(0.5 / eb)
    with np.errstate(invalid="ignore"):
        ok = np.abs(y) < 2.0**22
    q = np.where(ok, np.rint(np.where(ok, y, 0)), 0).astype(np.int32)
    return np.where(ok, q, np.int32(UNQUANTIZED))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_prequantize_ref_matches_numpy(device, n, dtype):
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n, generator=g) * 30).to(dtype)
    if n >= 7:
        x[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.5, 1.5, 6e4]).to(dtype)
    eb = 0.25  # inv = 2: x=0.5 -> y=1.0; x=0.25 multiples land exactly on .5 boundaries below
    got = prequantize_ref(x.to(device), inverse_of_step(2 * eb))
    want = _numpy_prequantize(x.to(torch.float32).numpy(), eb)
    assert got.dtype == torch.int32 and got.device.type == device
    np.testing.assert_array_equal(got.cpu().numpy(), want)


def test_prequantize_ref_rounds_half_to_even(device):
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 4194303.5, 4194304.0], device=device)
    got = prequantize_ref(x, 1.0).cpu()
    assert got.tolist() == [0, 2, 2, 0, -2, -2, 4194304, UNQUANTIZED]  # 4194303.5 -> even


def test_backends_agree_bit_for_bit_on_non_contiguous_input(backend, device):
    backend_or_skip("mask_encode", backend)
    x = (torch.randn(300, 301, generator=torch.Generator().manual_seed(1)) * 7)[:, ::2]
    thr = M.keep_threshold(0.3)
    got, counts = _ops.get("mask_encode", device, backend)([x.to(device).reshape(-1)], [77], thr)
    keep = M.mask_words_ref(0, x.numel(), 77) <= thr  # the spec, not the reference encoder
    assert counts == [int(keep.sum())] and torch.equal(got.cpu(), x.reshape(-1)[keep])


def test_automatic_choice_prefers_cpp_on_cpu():
    want = "cpp" if _ops.available("mask_encode", "cpp")[0] else "torch"
    assert _ops.choose("mask_encode", "cpu") == want


def test_env_var_forces_backend(monkeypatch):
    monkeypatch.setenv("FEDCOMPRESS_BACKEND", "torch")
    assert _ops.choose("mask_encode") == "torch"
    monkeypatch.setenv("FEDCOMPRESS_BACKEND", "fortran")
    with pytest.raises(ValueError, match="one of"):
        _ops.choose("mask_encode")


def test_explicit_unavailable_backend_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # then Triton takes CUDA tensors only, GPU or not
    with pytest.raises(BackendUnavailable, match="CUDA"):
        _ops.choose("mask_encode", "cpu", backend="triton")
    with pytest.raises(KeyError, match="unknown op"):
        _ops.choose("no-such-op")


def test_import_never_fails_without_the_extension():
    # A fresh interpreter where fedcompress._C cannot be imported: import works, the op falls back to
    # torch, and asking for cpp explicitly names what to build.
    code = (
        "import sys; sys.modules['fedcompress._C'] = None\n"
        "import torch, fedcompress as fc\n"
        "from fedcompress import _ops\n"
        "assert _ops.choose('mask_encode') == 'torch'\n"
        "print(_ops.get('mask_encode')([torch.tensor([1.0, 3.0])], [0], 2**32 - 1)[1])\n"
        "try:\n    _ops.choose('mask_encode', backend='cpp')\n"
        "except fc.BackendUnavailable as e:\n    print('UNAVAILABLE', 'pip install' in str(e))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[2]", "UNAVAILABLE", "True"]  # keep=1: both values kept
