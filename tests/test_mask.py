"""Random masking: Philox known answers, same bytes on every backend, payload size, statistics, bad input.

Independent references: the Random123 known-answer vectors (Philox4x32-10), numpy indexing by hand
for encode/decode/decode_mean, and the torch reference (itself checked against the vectors).
"""

import functools
import math
import struct
import zlib

import numpy as np
import pytest
import torch
from conftest import backend_or_skip

import fedcompress as fc
from fedcompress import _ops, wire
from fedcompress.codecs import mask as M

# Random123 kat_vectors, philox4x32 10 rounds: counter (4 words), key (2 words: lo, hi) -> output
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]
SIZES = [0, 1, 7, 2**16 + 3]


def _native():
    try:
        return _ops.native()
    except fc.BackendUnavailable:
        return None


@functools.lru_cache(maxsize=64)
def _mask_by_hand(n: int, seed: int, keep: float) -> np.ndarray:
    """Keep flags from the torch Philox (checked against KAT) and the threshold rule, in numpy."""
    thr = max(math.floor(keep * 2**32), 1) - 1
    m = M.mask_words_ref(0, n, seed).numpy() <= thr
    m.flags.writeable = False  # cached: shared between tests
    return m


# ---------------------------------------------------------------------------------------------
# Philox


@pytest.mark.parametrize("ctr,key,want", KAT)
def test_philox_known_answers_torch(ctr, key, want):
    c = [torch.tensor([v], dtype=torch.int64) for v in ctr]
    got = M.philox4x32_ref(*c, key[0] | (key[1] << 32))
    assert tuple(int(g) for g in got) == want


@pytest.mark.parametrize("ctr,key,want", KAT)
def test_philox_known_answers_cpp(ctr, key, want):
    C = _native()
    if C is None:
        pytest.skip("extension not built")
    assert C.philox4x32(*ctr, key[0] | (key[1] << 32)) == want


def test_element_words_follow_triton_randint4x_convention():
    # element i draws word i % 4 of Philox(counter i // 4): with seed 0, elements 0..3 are the KAT words
    # (tl.randint(0, 0) = 0x6627e8d5, notes/triton-interpreter.md); counter 2^32 + 5 sets c1
    assert tuple(int(w) for w in M.mask_words_ref(0, 4, 0)) == KAT[0][2]
    assert tuple(int(w) for w in M.mask_words_ref(3, 2, 0))[0] == KAT[0][2][3]
    j = (1 << 32) + 5
    c = [torch.tensor([v]) for v in (5, 1, 0, 0)]
    want = [int(w) for w in M.philox4x32_ref(*c, 99)]
    assert [int(w) for w in M.mask_words_ref(4 * j, 4, 99)] == want
    assert int(M.mask_words_ref(4 * j + 2, 1, 99)[0]) == want[2]


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_cpp_simd_levels_agree_with_reference(isa):
    C = _native()
    if C is None:
        pytest.skip("extension not built")
    old = C.mask_isa()
    try:
        C.mask_set_isa(isa)
    except ValueError as e:
        pytest.skip(str(e))
    try:
        for n, seed in [(1, 0), (7, 3), (64 * 5 + 13, 2**64 - 1), (4096 * 3 + 100, 2**40 + 1)]:
            for keep in (0.05, 0.5, 1.0):
                x = torch.randn(n)
                thr = M.keep_threshold(keep)
                vals, counts = M.mask_encode_cpp([x], [seed], thr)
                m = _mask_by_hand(n, seed, keep)
                assert torch.equal(vals, x[torch.from_numpy(m.copy())]), (isa, n, seed, keep)
                dec = M.mask_decode_cpp([vals], [[counts[0]]], [[seed]], [n], [2.0], thr, False)
                want = np.zeros(n, dtype=np.float32)
                want[m] = x.numpy()[m] * 2
                assert torch.equal(dec, torch.from_numpy(want))
                acc = M.mask_decode_cpp(
                    [vals, vals], [[counts[0]]] * 2, [[seed]] * 2, [n], [0.5, 0.25], thr, True
                )
                want2 = np.zeros(n, dtype=np.float32)
                want2[m] = x.numpy()[m] * np.float32(0.5) + x.numpy()[m] * np.float32(0.25)
                assert torch.equal(acc, torch.from_numpy(want2))
    finally:
        C.mask_set_isa(old)


# ---------------------------------------------------------------------------------------------
# Same bytes on every backend, against numpy by hand


def _inputs():
    g = torch.Generator().manual_seed(0)
    out = [(f"n={n}", torch.randn(n, generator=g)) for n in SIZES]
    base = torch.randn(300, 2 * 219 + 1, generator=g)
    out.append(("noncontig", base[:, ::2]))  # 300 x 220, strided
    out.append(("float64", torch.randn(4, 1001, generator=g, dtype=torch.float64)))
    return out


@pytest.mark.parametrize(
    "keep,unbiased,values", [(0.1, False, "fp32"), (0.5, True, "fp16"), (1.0, False, "fp32")]
)
def test_encode_decode_same_bytes_every_backend(backend, keep, unbiased, values):
    backend_or_skip("mask_encode", backend)
    seed = 2**63 + 12345  # high key word set
    rm = M.RandomMask(keep, unbiased=unbiased, values=values, backend=backend)
    vdt = np.float32 if values == "fp32" else np.float16
    for name, x in _inputs():
        blob = rm.encode(x, seed=seed)  # equal to numpy by hand below, so equal across backends
        flat = x.reshape(-1).to(torch.float32).numpy()
        keep_mask = _mask_by_hand(flat.size, seed, keep)
        kept = flat[keep_mask].astype(vdt)
        _, recs = wire.unpack(blob, wire.CODEC_MASK_TENSOR)
        assert bytes(recs[0].data) == kept.tobytes(), name
        out = rm.decode(blob)
        assert out.dtype == x.dtype and out.shape == x.shape
        want = np.zeros(flat.size, dtype=np.float32)
        scale = np.float32(2**32 / (M.keep_threshold(keep) + 1)) if unbiased else np.float32(1)
        want[keep_mask] = kept.astype(np.float32) * scale
        assert torch.equal(out, torch.from_numpy(want).to(x.dtype).reshape(x.shape)), name


def test_decode_any_backend_reads_any_payload(backend):
    backend_or_skip("mask_decode", backend)
    x = torch.randn(2**16 + 3)
    blob = M.RandomMask(0.3, backend="torch").encode(x, seed=5)
    a = M.RandomMask(0.3, backend=backend).decode(blob)
    b = M.RandomMask(0.3, backend="torch").decode(blob)
    assert torch.equal(a, b)


@pytest.mark.parametrize("n", [1, 7, 2**16 + 3])
def test_decode_mean_matches_numpy(backend, n):
    backend_or_skip("mask_decode", backend)
    keep, C = 0.25, 5
    g = torch.Generator().manual_seed(n)
    xs = [torch.randn(n, generator=g) for _ in range(C)]
    seeds = [11 * c + 3 for c in range(C)]
    weights = [1.0, 2.0, 0.5, 3.0, 1.5]
    rm = M.RandomMask(keep, unbiased=True, backend=backend)
    blobs = [
        M.RandomMask(keep, unbiased=True, backend="torch").encode(x, seed=s)
        for x, s in zip(xs, seeds, strict=False)
    ]
    got = rm.decode_mean(blobs, weights=weights)
    scale = 2**32 / (M.keep_threshold(keep) + 1)
    acc = np.zeros(n, dtype=np.float32)
    for x, s, w in zip(xs, seeds, weights, strict=False):
        m = _mask_by_hand(n, s, keep)
        acc[m] = acc[m] + x.numpy()[m] * np.float32(scale * w / sum(weights))
    assert torch.equal(got, torch.from_numpy(acc))
    eq = rm.decode_mean(blobs)  # equal weights
    assert torch.allclose(eq, sum(rm.decode(b) for b in blobs) / C, rtol=1e-5, atol=1e-6)


def test_decode_on_device(backend, device, monkeypatch):
    """decode/decode_mean return on ``device`` and dispatch by it (a CUDA device reaches Triton on
    CUDA tensors); the values equal numpy by hand."""
    backend_or_skip("mask_decode", backend)
    n, keep, seeds = 2**16 + 3, 0.3, [5, 2**63 + 1]
    xs = [torch.randn(n, generator=torch.Generator().manual_seed(s % 1000)) for s in seeds]
    blobs = [M.RandomMask(keep, backend="torch").encode(x, seed=s) for x, s in zip(xs, seeds, strict=True)]
    asked = []
    get = _ops.get
    monkeypatch.setattr(_ops, "get", lambda op, dev="cpu", *a, **k: asked.append((op, dev)) or get(op, dev, *a, **k))
    rm = M.RandomMask(keep, backend=backend)
    scale = np.float32(2**32 / (M.keep_threshold(keep) + 1))
    out = rm.decode(blobs[0], device=device)
    assert out.device.type == device and out.dtype == torch.float32
    m0 = _mask_by_hand(n, seeds[0], keep)
    want = np.zeros(n, dtype=np.float32)
    want[m0] = xs[0].numpy()[m0] * scale
    assert torch.equal(out.cpu(), torch.from_numpy(want))
    mean = rm.decode_mean(blobs, weights=[1.0, 3.0], device=device)
    acc = np.zeros(n, dtype=np.float32)
    for x, s, w in zip(xs, seeds, [0.25, 0.75], strict=True):
        m = _mask_by_hand(n, s, keep)
        acc[m] = acc[m] + x.numpy()[m] * np.float32(scale * w)
    assert mean.device.type == device and torch.equal(mean.cpu(), torch.from_numpy(acc))
    assert [(op, torch.device(d).type) for op, d in asked] == [("mask_decode", device)] * 2


def test_decode_default_device_is_cpu_and_a_bad_device_is_a_value_error():
    blob = M.RandomMask(0.5).encode(torch.randn(100), seed=1)
    assert M.RandomMask(0.5).decode(blob).device.type == "cpu"
    with pytest.raises(ValueError, match="device"):
        M.RandomMask(0.5).decode(blob, device="gpu0")
    with pytest.raises(ValueError, match="device"):
        M.RandomMask(0.5).decode_mean([blob], device=3.5)


def test_cpp_same_bytes_one_and_two_threads():
    C = _native()
    if C is None:
        pytest.skip("extension not built")
    x = torch.randn(3 * 4096 * 7 + 5)
    rm = M.RandomMask(0.2, backend="cpp")
    old = C.thread_override()  # 0 = follow torch; restoring max_threads() instead would pin it
    try:
        outs = []
        for t in (1, 2):
            C.set_threads(t)
            blobs = [rm.encode(x * (i + 1), seed=i) for i in range(3)]
            outs.append((blobs, rm.decode_mean(blobs).numpy().tobytes()))
    finally:
        C.set_threads(old)
    assert outs[0] == outs[1]


# ---------------------------------------------------------------------------------------------
# Statistics and size


def _fast_backend():
    return "cpp" if _ops.available("mask_encode", "cpp")[0] else "torch"


def test_kept_fraction_at_25M():
    b = _fast_backend()
    n = 25_000_000 if b == "cpp" else 1_000_000
    keep = 0.1
    values, counts = _ops.get("mask_encode", "cpu", b)([torch.zeros(n)], [424242], M.keep_threshold(keep))
    assert abs(counts[0] / n - keep) < (5e-4 if n == 25_000_000 else 2e-3)


def test_two_seeds_give_independent_masks():
    b = _fast_backend()
    n, keep = 1_000_000, 0.25
    rm = M.RandomMask(keep, backend=b)
    ones = torch.ones(n)
    masks = [rm.decode(rm.encode(ones, seed=s)) != 0 for s in (7, 8, 2**40 + 7)]
    for i in range(3):
        assert abs(masks[i].float().mean().item() - keep) < 3e-3
        for j in range(i + 1, 3):
            overlap = (masks[i] & masks[j]).float().mean().item()
            assert abs(overlap - keep**2) < 2e-3, (i, j, overlap)


@pytest.mark.parametrize("shape", [(100_000,), (300, 333)])
@pytest.mark.parametrize("values,size", [("fp32", 4), ("fp16", 2)])
def test_payload_is_values_plus_small_header(shape, values, size):
    rm = M.RandomMask(0.125, values=values, backend=_fast_backend())
    blob = rm.encode(torch.randn(shape), seed=1)
    kept = int((rm.decode(rm.encode(torch.ones(shape), seed=1)) != 0).sum())
    assert size * kept < len(blob) <= size * kept + 64


def test_keep_one_keeps_everything_and_tiny_keep_keeps_little():
    x = torch.randn(5000)
    assert torch.equal(M.RandomMask(1.0).decode(M.RandomMask(1.0).encode(x, 3)), x)
    kept = (M.RandomMask(1e-12).decode(M.RandomMask(1e-12).encode(torch.ones(5000), 3)) != 0).sum()
    assert kept <= 1


# ---------------------------------------------------------------------------------------------
# State-dict compressor


def _state(seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.BatchNorm2d(8),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 26 * 26, 10),
    )
    sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
    sd["1.num_batches_tracked"] = torch.tensor(seed + 3)
    sd["half"] = torch.randn(33, dtype=torch.float16)
    return sd


def test_statedict_compressor_same_bytes_and_hand_reference(backend):
    backend_or_skip("mask_encode", backend)
    comp = fc.get_compressor("mask:keep=0.125,unbiased=true")
    comp.backend = backend
    ctx = fc.RoundContext(round=3, client=7, seed=42)
    sd = _state()
    blob = comp.compress(sd, ctx)
    ref = fc.get_compressor("mask:keep=0.125,unbiased=true")
    ref.backend = "torch"
    assert blob == ref.compress(sd, ctx)
    out = comp.decompress(blob, ctx)
    assert list(out) == list(sd)
    mid = ctx.subseed(M.MASK_SALT)
    scale = np.float32(8.0)
    for i, (k, v) in enumerate(sd.items()):
        assert out[k].dtype == v.dtype and out[k].shape == v.shape
        if not v.is_floating_point():
            assert torch.equal(out[k], v)
            continue
        m = _mask_by_hand(v.numel(), M.mix_seed(mid, i), 0.125)
        want = np.zeros(v.numel(), dtype=np.float32)
        want[m] = v.reshape(-1).float().numpy()[m] * scale
        assert torch.equal(out[k], torch.from_numpy(want).to(v.dtype).reshape(v.shape)), k


def test_statedict_server_mean_matches_per_client_decode(backend):
    backend_or_skip("mask_decode", backend)
    comp = fc.get_compressor("mask:keep=0.25,values=fp16")
    comp.backend = _fast_backend()  # clients encode on the fast backend; the server under test
    ctxs = [fc.RoundContext(round=1, client=c, seed=9) for c in range(4)]
    states = [_state(c) for c in range(4)]
    blobs = [comp.compress(s, cx) for s, cx in zip(states, ctxs, strict=False)]
    dec = [comp.decompress(b, cx) for b, cx in zip(blobs, ctxs, strict=False)]
    comp.backend = backend
    weights = [10, 20, 30, 40]
    mean = comp.server_mean(blobs, ctxs, weights)
    for k, v in states[0].items():
        if v.is_floating_point():
            acc = torch.zeros(v.numel(), dtype=torch.float32)
            for d, w in zip(dec, weights, strict=False):
                acc = acc + d[k].reshape(-1).float() * np.float32(w / 100)
            assert torch.equal(mean[k], acc.to(v.dtype).reshape(v.shape)), k
        else:
            want = round(sum(int(s[k]) * w for s, w in zip(states, weights, strict=False)) / 100)
            assert int(mean[k]) == want
    with pytest.raises(fc.FormatError):
        comp.server_mean(blobs, ctxs[::-1], weights)


def test_statedict_decodes_on_the_global_states_device(backend, device):
    """server_update returns the delta on the global state's device, decoded there; decompress takes
    ``device=`` (default CPU). Same values as the CPU decode, lossless tensors exact."""
    backend_or_skip("mask_decode", backend)
    comp = fc.get_compressor("mask:keep=0.25")
    comp.backend = backend
    ctx = fc.RoundContext(round=2, client=5, seed=1)
    sd = _state()
    blob = comp.compress(sd, ctx)
    ref = fc.get_compressor("mask:keep=0.25")
    ref.backend = "torch"
    want = ref.decompress(blob, ctx)
    assert all(v.device.type == "cpu" for v in comp.decompress(blob, ctx).values())
    global_state = {k: torch.zeros_like(v).to(device) for k, v in sd.items()}
    for got in (comp.server_update(blob, global_state, ctx), comp.decompress(blob, ctx, device=device)):
        assert list(got) == list(sd)
        for k, v in got.items():
            assert v.device.type == device and v.dtype == sd[k].dtype, k
            assert torch.equal(v.cpu(), want[k]), k
    mean = comp.server_mean([blob, blob], [ctx, ctx], device=device)
    assert all(v.device.type == device for v in mean.values())
    torch.testing.assert_close(mean["3.weight"].cpu(), want["3.weight"], rtol=1e-6, atol=0)


def test_statedict_wrong_context_is_format_error():
    comp = fc.get_compressor("mask:keep=0.5")
    blob = comp.compress(_state(), fc.RoundContext(round=1, client=2, seed=3))
    with pytest.raises(fc.FormatError):
        comp.decompress(blob, fc.RoundContext(round=1, client=3, seed=3))


def test_statedict_payload_overhead():
    comp = fc.get_compressor("mask:keep=0.125")
    sd = {"w": torch.randn(1000, 100), "b": torch.randn(100)}
    blob = comp.compress(sd, fc.RoundContext())
    kept = sum(int((d != 0).sum()) for d in comp.decompress(blob, fc.RoundContext()).values())
    assert len(blob) <= 4 * kept + 64 * len(sd)


# ---------------------------------------------------------------------------------------------
# Unbiased by default; biased payloads keep decoding raw


def test_unbiased_is_the_default():
    assert fc.RandomMask(0.25).unbiased is True
    assert fc.get_compressor("mask:keep=0.25").params["unbiased"] is True
    x = torch.randn(5000)
    out = fc.RandomMask(0.25).decode(fc.RandomMask(0.25).encode(x, seed=3))
    m = torch.from_numpy(_mask_by_hand(5000, 3, 0.25).copy())
    scale = torch.tensor(np.float32(2**32 / (M.keep_threshold(0.25) + 1)))
    assert torch.equal(out[m], x[m] * scale) and not out[~m].any()


def test_biased_payloads_still_decode_raw():
    """A payload with the unbiased flag clear (as every mask payload was before unbiased became the
    default) decodes to the raw kept values with today's default decoder."""
    import struct

    n, seed, keep = 3000, 4, 0.25
    x = torch.randn(n)
    m = torch.from_numpy(_mask_by_hand(n, seed, keep).copy())
    thr_m1 = M.keep_threshold(keep)
    # built by hand from the documented layout: meta <QIBB = seed, thr_m1, flags 0, values float32
    old = wire.pack(
        wire.CODEC_MASK_TENSOR,
        [wire.Record("", torch.float32, (n,), x[m].numpy().tobytes())],
        struct.pack("<QIBB", seed, thr_m1, 0, wire.DTYPE_CODES[torch.float32]),
    )
    assert old == M.RandomMask(keep, unbiased=False).encode(x, seed=seed)
    out = fc.RandomMask(keep).decode(old)
    assert torch.equal(out[m], x[m]) and not out[~m].any()
    # the state-dict compressor: a biased payload decodes raw with the default compressor too
    sd, ctx = _state(), fc.RoundContext(round=1, client=2, seed=3)
    payload = fc.get_compressor("mask:keep=0.25,unbiased=false").compress(sd, ctx)
    dec = fc.get_compressor("mask:keep=0.25").decompress(payload, ctx)
    k = "3.weight"
    tensor_seed = M.mix_seed(ctx.subseed(M.MASK_SALT), list(sd).index(k))
    mk = torch.from_numpy(_mask_by_hand(sd[k].numel(), tensor_seed, keep).copy())
    assert torch.equal(dec[k].reshape(-1)[mk], sd[k].reshape(-1)[mk]) and not dec[k].reshape(-1)[~mk].any()


@pytest.mark.parametrize("unbiased", [True, False])
def test_mean_of_decodes_approaches_the_input(unbiased):
    """Mean over 400 seeds of decode(encode(x)): the least-squares slope of that mean against x is
    1 for the unbiased decoder (its standard error here is ~0.004: sqrt((1-p)/(p S)) *
    sqrt(sum x^4) / sum x^2) and keep = 0.25 for the biased one, which the same bound rejects."""
    n, keep, S = 2000, 0.25, 400
    x = torch.randn(n, generator=torch.Generator().manual_seed(11), dtype=torch.float32)
    rm = M.RandomMask(keep, unbiased=unbiased, backend=_fast_backend())
    acc = np.zeros(n)
    for s in range(S):
        acc += rm.decode(rm.encode(x, seed=1000 + s)).numpy()
    mean, xs = acc / S, x.double().numpy()
    slope = float(mean @ xs / (xs @ xs))
    rel = float(np.linalg.norm(mean - xs) / np.linalg.norm(xs))
    unbiased_ok = abs(slope - 1.0) < 0.03 and rel < 0.15  # rel ~ sqrt((1-p)/(p S)) = 0.087 when unbiased
    assert unbiased_ok == unbiased, (slope, rel)
    if not unbiased:
        assert abs(slope - keep) < 0.03


# ---------------------------------------------------------------------------------------------
# Bad arguments and bad bytes


@pytest.mark.parametrize("keep", [0, -0.1, 1.5, float("nan"), float("inf"), "abc", None])
def test_bad_keep_is_value_error(keep):
    with pytest.raises(ValueError, match="keep"):
        fc.RandomMask(keep)


@pytest.mark.parametrize("spec", ["mask:keep=0", "mask:keep=1.01", "mask:values=bf16", "mask:unbiased=maybe"])
def test_bad_spec_is_value_error(spec):
    with pytest.raises(ValueError):
        fc.get_compressor(spec)


def test_bad_seed_and_input():
    with pytest.raises(ValueError, match="seed"):
        fc.RandomMask(0.5).encode(torch.ones(3), seed=-1)
    with pytest.raises(ValueError, match="seed"):
        fc.RandomMask(0.5).encode(torch.ones(3), seed=2**64)
    with pytest.raises(ValueError):
        fc.RandomMask(0.5).encode(torch.arange(3), seed=1)


def _repack(blob, meta=None, data=None, shape=None, codec=wire.CODEC_MASK_TENSOR):
    m, recs = wire.unpack(blob, codec)
    r = recs[0]
    rec = wire.Record(r.name, r.dtype, shape or r.shape, r.data if data is None else data)
    return wire.pack(codec, [rec], bytes(m) if meta is None else meta)


def test_truncated_and_altered_bytes_are_format_errors(backend):
    backend_or_skip("mask_decode", backend)
    rm = M.RandomMask(0.3, backend=backend)
    blob = M.RandomMask(0.3).encode(torch.randn(20000), seed=77)
    for cut in [0, 1, 4, 8, 20, len(blob) // 2, len(blob) - 5, len(blob) - 1]:
        with pytest.raises(fc.FormatError):
            rm.decode(blob[:cut])
    for pos in [0, 5, 9, 14, 30, len(blob) // 2, len(blob) - 1]:
        bad = bytearray(blob)
        bad[pos] ^= 0x40
        with pytest.raises(fc.FormatError):
            rm.decode(bytes(bad))
    # valid frame and checksum, but the content lies
    m = bytearray(wire.unpack(blob, wire.CODEC_MASK_TENSOR)[0])
    _, recs = wire.unpack(blob, wire.CODEC_MASK_TENSOR)
    data = bytes(recs[0].data)
    cases = [
        _repack(blob, data=data[:-4]),  # one value short
        _repack(blob, data=data + data[:4]),  # one value too many
        _repack(blob, data=data[:-1]),  # not whole values
        _repack(blob, meta=struct.pack("<QIBB", 78, *struct.unpack("<QIBB", m)[1:])),  # other seed
        _repack(blob, meta=struct.pack("<QIBB", 77, 2**31, 0, 1)),  # other keep
        _repack(blob, meta=bytes(m) + b"\0"),  # header length
        _repack(blob, meta=struct.pack("<QIBB", 77, 2**31, 6, 1)),  # unknown flags
        _repack(blob, meta=struct.pack("<QIBB", 77, 2**31, 0, 5)),  # values dtype int64
        _repack(blob, shape=(10**15,)),  # hostile size
    ]
    for _i, bad in enumerate(cases):
        with pytest.raises(fc.FormatError):
            rm.decode(bad)
        with pytest.raises(fc.FormatError):
            rm.decode_mean([blob, bad])
    with pytest.raises(fc.FormatError):
        rm.decode(wire.pack(wire.CODEC_MASK, []))
    with pytest.raises(fc.FormatError):
        rm.decode(torch.ones(3))


def test_statedict_altered_counts_are_format_errors():
    comp = fc.get_compressor("mask:keep=0.25")
    ctx = fc.RoundContext(client=1)
    blob = comp.compress({"a": torch.randn(5000), "b": torch.randn(7000)}, ctx)
    meta, recs = wire.unpack(blob, wire.CODEC_MASK)
    # move one value from tensor a to tensor b: total right, per-tensor counts wrong
    a, b = bytes(recs[0].data), bytes(recs[1].data)
    moved = [
        wire.Record("a", recs[0].dtype, recs[0].shape, a[:-4]),
        wire.Record("b", recs[1].dtype, recs[1].shape, a[-4:] + b),
    ]
    with pytest.raises(fc.FormatError):
        comp.decompress(wire.pack(wire.CODEC_MASK, moved, bytes(meta)), ctx)
    body = bytearray(blob)
    body[-20] ^= 1
    with pytest.raises(fc.FormatError):
        comp.decompress(bytes(body), ctx)
    crc_fixed = bytes(body[:-4]) + struct.pack("<I", zlib.crc32(bytes(body[:-4])))
    comp.decompress(crc_fixed, ctx)  # a flipped value bit with a valid checksum decodes (lossy data)


# ---------------------------------------------------------------------------------------------
# Golden bytes: payloads written by the code before the mask package split (commit b46a02e,
# FEDCOMPRESS_BACKEND=torch; cpp wrote the same), checked into the test as hex. The wire format is a
# promise: a change here breaks every stored or in-flight payload.

_GOLDEN_X = "46434d50010011000e0000000700000000000080ffffff7f010101000000000001012800000000000000600000000000000000" \
    "0020c0000010c00000d0bf0000c0bf0000b0bf000080bf000060bf000040bf000000bf0000c0be000000be000000000000c03e000000" \
    "3f0000203f0000403f0000603f0000903f0000a03f0000b03f0000c03f0000d03f0000f03f00000840579b6933"
_GOLDEN_FP16 = "46434d50010011000e0000000300000000000000ffffff3f0003010000000000020205000000000000000800000000000000" \
    "1400000000000000c0c000bf00bc00bb0030803c003d003e803e803f5a039648"
_GOLDEN_SD = "46434d50010004000e0000005e98f031fb8a6245ffffff7f0101030000000100770102040000000000000006000000000000" \
    "001c00000000000000000030c00000e0bf0000a0bf000040bf000000bf000080be0000803f01006e05000800000000000000050000" \
    "0000000000010062030102000000000000000000000000000000859ebfc9"


def _golden_inputs():
    x = (torch.arange(40, dtype=torch.float32) - 20) / 8
    sd = {
        "w": (torch.arange(24, dtype=torch.float32).reshape(4, 6) - 12) / 4,
        "n": torch.tensor(5),
        "b": torch.tensor([0.5, -1.5], dtype=torch.float16),
    }
    return x, sd


def test_golden_bytes(backend, device):
    backend_or_skip("mask_encode", backend)
    x, sd = _golden_inputs()
    rm = M.RandomMask(0.5, backend=backend)
    assert rm.encode(x.to(device), seed=2**63 + 7).hex() == _GOLDEN_X
    rm16 = M.RandomMask(0.25, unbiased=False, values="fp16", backend=backend)
    assert rm16.encode(x.reshape(5, 8).double().to(device), seed=3).hex() == _GOLDEN_FP16
    comp = fc.get_compressor("mask:keep=0.5")
    comp.backend = backend
    ctx = fc.RoundContext(round=2, client=3, seed=1)
    assert comp.compress({k: v.to(device) for k, v in sd.items()}, ctx).hex() == _GOLDEN_SD
    # and they decode to the hand-built answer (kept values x scale, zeros elsewhere)
    m = torch.from_numpy(_mask_by_hand(40, 2**63 + 7, 0.5).copy())
    assert torch.equal(rm.decode(bytes.fromhex(_GOLDEN_X)), torch.where(m, x * 2, torch.zeros(())))
    out = comp.decompress(bytes.fromhex(_GOLDEN_SD), ctx)
    assert int(out["n"]) == 5 and out["b"].dtype == torch.float16 and out["w"].shape == (4, 6)


# ---------------------------------------------------------------------------------------------
# Properties (hypothesis)

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 3000),
    keep=st.floats(1e-3, 1.0),
    seed=st.integers(0, 2**64 - 1),
    values=st.sampled_from(["fp32", "fp16"]),
)
def test_round_trip_keeps_exact_values(n, keep, seed, values):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    rm = M.RandomMask(keep, unbiased=False, values=values, backend=_fast_backend())
    out = rm.decode(rm.encode(x, seed=seed))
    m = torch.from_numpy(_mask_by_hand(n, seed, keep).copy())
    sent = x.half().float() if values == "fp16" else x
    assert torch.equal(out[m], sent[m]) and not out[~m].any()


@settings(max_examples=60, deadline=None)
@given(blob=st.binary(max_size=200), cut=st.integers(0, 200), flip=st.integers(0, 10**6))
def test_garbage_and_mutations_raise_format_error(blob, cut, flip):
    rm = M.RandomMask(0.5)
    with pytest.raises(fc.FormatError):
        rm.decode(blob)
    good = rm.encode(torch.randn(50), seed=1)
    bad = bytearray(good[: max(cut, 1)] if cut < len(good) else good)
    if len(bad) == len(good):
        bad[flip % len(bad)] ^= 1 + flip % 255
    with pytest.raises(fc.FormatError):
        rm.decode(bytes(bad))


def test_forged_huge_shape_is_refused_before_regenerating():
    # 1,500 values claiming 2^24 elements at keep=0.3: implausible count, refused without O(n) work.
    import struct
    import time
    import zlib

    from fedcompress import wire

    rm = fc.RandomMask(keep=0.3, backend="torch")
    blob = bytearray(rm.encode(torch.randn(5000), seed=9))
    meta, (rec,) = wire.unpack(bytes(blob), wire.CODEC_MASK_TENSOR)
    forged = wire.pack(wire.CODEC_MASK_TENSOR, [wire.Record("", rec.dtype, (1 << 24,), rec.data)], bytes(meta))
    t0 = time.perf_counter()
    with pytest.raises(fc.FormatError, match="implausible"):
        rm.decode(forged)
    assert time.perf_counter() - t0 < 0.5
    assert struct.unpack("<I", forged[-4:])[0] == zlib.crc32(forged[:-4])  # the checksum was valid
