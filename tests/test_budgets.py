"""Byte budgets (``ratio=R``): payload <= floor(dense / R) for every update, counting every byte.

References: the dense size is checked against the length of an actual ``none`` payload; the sz
search's answer is checked by compressing with ``sz:rel=<that bound>`` and with the next smaller
grid bound directly; mask's keep by the decoded scale. Updates: random state dicts with odd layouts
and a real one (a CNN trained for one epoch on 400 mnist5k digits).
"""

import math

import pytest
import torch

import fedcompress as fc
from fedcompress.api import RoundContext, local_sgd, state_delta
from fedcompress.codecs import budget as B
from fedcompress.codecs import mask as M
from fedcompress.codecs.sz import statedict as SZS
from fedcompress.fedavg import data as D
from fedcompress.fedavg.driver import dense_payload_bytes as driver_dense
from fedcompress.fedavg.models import build_model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _random_update(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(16, 1, 5, 5, generator=g) * 0.05,
        "conv.bias": torch.randn(16, generator=g) * 0.01,
        "bn.running_mean": torch.randn(16, generator=g),
        "bn.num_batches_tracked": torch.tensor(7),
        "fc.weight": torch.randn(200, 500, generator=g) * 0.02,
        "fc.bias": torch.randn(200, generator=g) * 0.01,
        "head.wéight": (torch.randn(10, 200, generator=g) * 0.1).to(torch.float16),
        "ids": torch.arange(300, dtype=torch.int32),
    }


@pytest.fixture(scope="module")
def cnn_update():
    ds = D.load_arrays("mnist5k")
    torch.manual_seed(0)
    model = build_model("cnn", ds.info)
    g0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ctx = RoundContext(round=1, client=0, seed=0, epochs=1, batch_size=20, lr=0.05)
    local = local_sgd(model, g0, (ds.x_train[:400], ds.y_train[:400]), ctx)
    return state_delta(local, g0)


@pytest.fixture(params=["random", "cnn"])
def update(request, cnn_update):
    return _random_update() if request.param == "random" else cnn_update


# -- dense bytes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "state",
    [
        {},
        {"a": torch.zeros(0)},
        {"s": torch.tensor(1.5, dtype=torch.float64), "b": torch.ones(3, dtype=torch.bool)},
        _random_update(1),
    ],
)
def test_dense_bytes_is_the_none_payload(state):
    none = len(fc.get_compressor("none").compress(state, RoundContext()))
    assert B.dense_payload_bytes(state) == none == driver_dense(state)


# -- every lossy compressor fits its budget ----------------------------------------------------

SPECS = [
    "mask:ratio={R}",
    "mask:ratio={R},values=fp16",
    "mask:ratio={R},unbiased=false",
    "sz:ratio={R}",
    "sz:ratio={R},ef=1",
    "sz:ratio={R},min_lossy=1",
    "sz:ratio={R},target=weights",
]


def _sz_fixed_bytes(update, min_lossy=1024):
    """What an sz payload holds besides its SZ streams: framing, kind bytes, raw small tensors."""
    raw = sum(
        v.numel() * v.element_size()
        for v in update.values()
        if not (v.is_floating_point() and v.numel() >= min_lossy)
    )
    return B.payload_overhead(update) + len(update) + raw


@pytest.mark.parametrize("R", [2, 8, 32, 64, 256])
@pytest.mark.parametrize("spec", SPECS)
def test_payload_fits_budget(update, spec, R):
    comp = fc.get_compressor(spec.format(R=R))
    limit = math.floor(B.dense_payload_bytes(update) / R)
    if spec.startswith("sz"):
        ml = 1 if "min_lossy=1" in spec else 1024
        loosest = fc.get_compressor(f"sz:rel=1,min_lossy={ml}").compress(update, RoundContext())
        if len(loosest) > limit:
            # the random update at 256x: its small tensors and headers alone exceed the budget, so
            # sz must refuse, saying so (and what the loosest bound reaches)
            with pytest.raises(ValueError, match=f"cannot be met.*rel=1 gives {len(loosest)} bytes.*take "
                               f"{_sz_fixed_bytes(update, ml)}"):
                comp.compress(update, RoundContext())
            assert R == 256 and update["fc.weight"].numel() == 100_000  # only there
            return
    for client in range(3):  # three clients (three masks; ef keeps a residual per client)
        ctx = RoundContext(round=2, client=client, seed=1)
        payload = comp.compress(update, ctx)
        assert len(payload) <= limit, (client, len(payload), limit)
        assert comp.last_choice["ratio"] == pytest.approx(B.dense_payload_bytes(update) / len(payload))
        if spec.startswith("mask"):  # not trivially small: the margin is a few sigma of the count
            assert len(payload) >= 0.8 * limit
        out = comp.decompress(payload, ctx)
        assert list(out) == list(update)
        for k, v in update.items():
            assert out[k].dtype == v.dtype and out[k].shape == v.shape


def test_fp16_budget(cnn_update):
    comp = fc.get_compressor("fp16:ratio=1.9")
    payload = comp.compress(cnn_update, RoundContext())
    assert len(payload) <= B.dense_payload_bytes(cnn_update) / 1.9
    ints = {"w": torch.randn(1000), "ids": torch.arange(1000)}  # int64 ids do not shrink: ~1.3x
    with pytest.raises(ValueError, match=r"ratio=1\.9 cannot be met; it reaches 1\.[0-9]+x"):
        comp.compress(ints, RoundContext())


@pytest.mark.parametrize("spec", ["none:ratio=2", "none:ratio=1.01", "fp16:ratio=2", "fp16:ratio=8"])
def test_baselines_refuse_what_they_cannot_reach(spec):
    with pytest.raises(ValueError, match="ratio=.* cannot be met.*(1x|2x)"):
        fc.get_compressor(spec)


@pytest.mark.parametrize("name", ["mask", "sz", "fp16", "none"])
@pytest.mark.parametrize("bad", ["0", "1", "-2", "0.5", "nan", "inf", "-inf", "abc", ""])
def test_bad_ratio_names_key_and_range(name, bad):
    with pytest.raises(ValueError, match=r"ratio.*finite number > 1"):
        fc.get_compressor(f"{name}:ratio={bad}")


@pytest.mark.parametrize("spec", ["mask:keep=0.1,ratio=8", "sz:rel=1e-2,ratio=8", "sz:abs=1e-3,ratio=8"])
def test_ratio_and_native_knob_are_exclusive(spec):
    with pytest.raises(ValueError, match="not both"):
        fc.get_compressor(spec)


@pytest.mark.parametrize("spec", ["sz:bound=abs", "sz:rel=1e-2,bound=abs", "sz:abs=1e-3,bound=abs"])
def test_sz_bound_abs_needs_a_ratio(spec):
    with pytest.raises(ValueError, match="bound=abs chooses what ratio=R searches"):
        fc.get_compressor(spec)


@pytest.mark.parametrize("spec", ["mask:ratio=16", "mask:ratio=16,values=fp16", "sz:ratio=16,ef=1", "fp16:ratio=1.5",
                                  "sz:ratio=16,bound=abs"])
def test_spec_round_trips(spec):
    comp = fc.get_compressor(spec)
    assert "None" not in comp.spec and "keep" not in comp.spec and "rel" not in comp.spec
    assert ("bound=abs" in comp.spec) == ("bound=abs" in spec)
    assert fc.get_compressor(comp.spec).spec == comp.spec


def test_unreachable_budgets_say_what_they_reach(cnn_update):
    with pytest.raises(ValueError, match=r"sz: ratio=1e\+06 cannot be met.*rel=1 gives .* reaches [0-9.]+x"):
        fc.get_compressor("sz:ratio=1e6").compress(cnn_update, RoundContext())
    with pytest.raises(ValueError, match=r"sz: ratio=1e\+06 cannot be met.*abs=[0-9.e-]+ gives .* reaches [0-9.]+x"):
        fc.get_compressor("sz:ratio=1e6,bound=abs").compress(cnn_update, RoundContext())
    with pytest.raises(ValueError, match=r"mask: ratio=1e\+06 cannot be met.*reaches at most [0-9.]+x"):
        fc.get_compressor("mask:ratio=1e6").compress(cnn_update, RoundContext())


# -- mask: keep from the layout ----------------------------------------------------------------


def test_mask_keep_is_the_decoded_scale(cnn_update):
    comp = fc.get_compressor("mask:ratio=16")
    ctx = RoundContext(round=1, client=3)
    out = comp.decompress(comp.compress(cnn_update, ctx), ctx)
    keep = comp.last_choice["keep"]
    assert 1 / 16 * 0.9 < keep < 1 / 16  # below 1/16: the framing and the 3-sigma margin
    names = list(cnn_update)
    i = names.index("fc1.weight")
    w, o = cnn_update["fc1.weight"].reshape(-1), out["fc1.weight"].reshape(-1)
    thr_m1 = round(keep * 2**32) - 1
    kept = M.mask_keep_ref(w.numel(), M.mix_seed(comp.mask_id(ctx), i), thr_m1)  # the mask by spec
    assert abs(kept.float().mean().item() - keep) < 0.005
    assert not o[~kept].any()
    torch.testing.assert_close(o[kept], w[kept] * (1 / keep), rtol=1e-6, atol=0)


def test_mask_over_budget_falls_back_to_a_lower_threshold(monkeypatch):
    """With no margin about half the clients draw more than the budget's count at first; each must
    still fit (a lower threshold for that update), and the rest keep the layout's threshold."""
    monkeypatch.setattr("fedcompress.codecs.mask.compressor.BUDGET_SIGMAS", 0.0)  # where compress reads it
    u = _random_update(3)
    comp = fc.get_compressor("mask:ratio=32")
    limit = B.budget_bytes(u, 32)
    keeps = []
    for client in range(20):
        ctx = RoundContext(client=client)
        payload = comp.compress(u, ctx)
        assert len(payload) <= limit
        keeps.append(comp.last_choice["keep"])
        comp.decompress(payload, ctx)
    base = max(keeps)
    assert 3 <= sum(k < base for k in keeps) <= 17  # both paths taken
    again = fc.get_compressor("mask:ratio=32")
    for c in range(3):  # deterministic, fallback included
        assert again.compress(u, RoundContext(client=c)) == comp.compress(u, RoundContext(client=c))


# -- sz: the search ----------------------------------------------------------------------------


def test_sz_search_finds_the_smallest_grid_bound(update):
    for R in (4, 16, 64):
        comp = fc.get_compressor(f"sz:ratio={R}")
        payload = comp.compress(update, RoundContext())
        limit = B.budget_bytes(update, R)
        rel, encodes = comp.last_choice["rel"], comp.last_choice["encodes"]
        assert encodes <= SZS.MAX_ENCODES
        k = math.log2(rel) * SZS.GRID
        assert k == round(k)  # on the grid
        # the same bytes as asking for that bound directly
        assert payload == fc.get_compressor(f"sz:rel={rel!r}").compress(update, RoundContext())
        if encodes < SZS.MAX_ENCODES:  # converged: one grid step tighter does not fit
            tighter = 2.0 ** ((round(k) - 1) / SZS.GRID)
            assert len(fc.get_compressor(f"sz:rel={tighter!r}").compress(update, RoundContext())) > limit


def _widest_range(update):
    """Reference for bound=abs's unit: max - min of the finite values, widest over the lossy tensors."""
    out = 0.0
    for v in update.values():
        if v.is_floating_point() and v.numel() >= 1024:
            f = v.double()[torch.isfinite(v)]
            out = max(out, float(f.max() - f.min()))
    return out


def test_sz_abs_search_finds_the_smallest_grid_bound(update):
    width = _widest_range(update)
    for R in (4, 16, 64):
        comp = fc.get_compressor(f"sz:ratio={R},bound=abs")
        ctx = RoundContext()
        payload = comp.compress(update, ctx)
        limit = B.budget_bytes(update, R)
        assert len(payload) <= limit
        eb = comp.last_choice["abs"]
        k = math.log2(eb / width) * SZS.GRID
        assert abs(k - round(k)) < 1e-6  # on the grid, in units of the widest range
        # the same bytes as asking for that ABS bound directly, and every lossy value within it
        assert payload == fc.get_compressor(f"sz:abs={eb!r}").compress(update, ctx)
        out = comp.decompress(payload, ctx)
        for name, v in update.items():
            err = (out[name].double() - v.double()).abs().max().item()
            assert err <= eb if v.is_floating_point() and v.numel() >= 1024 else err == 0, name
        if comp.last_choice["encodes"] < SZS.MAX_ENCODES:  # converged: one grid step tighter does not fit
            tighter = 2.0 ** ((round(k) - 1) / SZS.GRID) * width
            assert len(fc.get_compressor(f"sz:abs={tighter!r}").compress(update, ctx)) > limit


def test_sz_abs_bound_keeps_less_squared_error_than_rel_per_tensor(cnn_update):
    """At one budget, one ABS bound over the update against a REL bound per tensor: the same error for
    every value is what minimises the total squared error for the bytes (docs/sz.md, "Byte
    budgets"), so ABS must come out lower on a real update, whose layers' ranges differ."""
    ctx = RoundContext()
    energy = sum(float(v.double().pow(2).sum()) for v in cnn_update.values())
    for R in (16, 64):
        err = {}
        for bound in ("rel", "abs"):
            comp = fc.get_compressor(f"sz:ratio={R},bound={bound}")
            out = comp.decompress(comp.compress(cnn_update, ctx), ctx)
            err[bound] = sum(float((out[k].double() - v.double()).pow(2).sum()) for k, v in cnn_update.items())
        assert err["abs"] < 0.95 * err["rel"], (R, err["abs"] / energy, err["rel"] / energy)


def test_sz_search_deterministic_monotone_and_bounded(cnn_update, monkeypatch):
    # every encode counted, whether a probe goes through encode_stream per tensor or through the
    # C++ records call for all lossy tensors at once
    calls = []
    real, real_native, per_tensor = SZS.encode_stream, SZS._native, [False]

    def counting(x, eb, mode, **kw):
        calls.append(eb)
        return real(x, eb, mode, **kw)

    def native(op, attr, tensors):
        fn = None if per_tensor[0] else real_native(op, attr, tensors)
        if fn is None or attr != "encode_records":
            return fn

        def counting_records(ts, lossy, eb, mode, *rest):
            calls.extend(eb for keep in lossy if keep)
            return fn(ts, lossy, eb, mode, *rest)

        return counting_records

    monkeypatch.setattr(SZS, "encode_stream", counting)
    monkeypatch.setattr(SZS, "_native", native)
    n_lossy = sum(1 for v in cnn_update.values() if v.numel() >= 1024)
    rels, sizes = [], []
    for R in (2, 4, 8, 16, 32, 64, 128, 256):
        calls.clear()
        a = fc.get_compressor(f"sz:ratio={R}")
        pa = a.compress(cnn_update, RoundContext())
        assert len(calls) == a.last_choice["encodes"] * n_lossy <= SZS.MAX_ENCODES * n_lossy  # terminates
        b = fc.get_compressor(f"sz:ratio={R}")
        per_tensor[0] = True  # the second search per tensor: the same bound and bytes either way
        assert b.compress(cnn_update, RoundContext(client=5, round=9)) == pa  # same update, same bytes
        per_tensor[0] = False
        assert b.last_choice == a.last_choice
        rels.append(a.last_choice["rel"])
        sizes.append(len(pa))
    assert rels == sorted(rels) and len(set(rels)) == len(rels)  # larger ratio -> larger bound
    assert sizes == sorted(sizes, reverse=True)


def test_sz_ratio_with_error_feedback_carries_the_residual(cnn_update):
    comp = fc.get_compressor("sz:ratio=32,ef=1")
    ctx = RoundContext(client=1)
    out = comp.decompress(comp.compress(cnn_update, ctx), ctx)
    res = comp._residual[1]
    for k in res:  # residual = what the bound threw away, exactly
        torch.testing.assert_close(res[k], cnn_update[k] - out[k], rtol=0, atol=0)


@pytest.mark.parametrize("bound", ["rel", "abs"])
def test_sz_search_starts_from_the_previous_answer(cnn_update, bound):
    # A second update of another shape (scaled, plus noise): the compressor that just searched starts
    # from its previous answer and finds the same bound and bytes as a fresh one.
    g = torch.Generator().manual_seed(1)
    similar = {
        k: v * 1.05 + torch.randn(v.shape, generator=g) * float(v.std()) * 0.1
        if v.is_floating_point() and v.numel() > 1 else v
        for k, v in cnn_update.items()
    }  # fmt: skip
    for R in (4, 16, 64, 256):
        fresh = fc.get_compressor(f"sz:ratio={R},bound={bound}")
        want = fresh.compress(similar, RoundContext())
        warm = fc.get_compressor(f"sz:ratio={R},bound={bound}")
        warm.compress(cnn_update, RoundContext())
        assert warm.compress(similar, RoundContext()) == want
        assert warm.last_choice[bound] == fresh.last_choice[bound]


@pytest.fixture(scope="module")
def client_updates():
    """Six clients' updates of one round, as ``fedcompress run --dataset mnist5k --clients 10``
    makes them (the iid split, each client's 400 images, one epoch here)."""
    ds = D.load_dataset("mnist5k", 10, "iid", 0.5, 0)
    torch.manual_seed(0)
    model = build_model("cnn", ds.info)
    g0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = []
    for c in range(6):
        ctx = RoundContext(round=1, client=c, seed=0, epochs=1, batch_size=20, lr=0.05)
        out.append(state_delta(local_sgd(model, g0, ds.client_data(c), ctx), g0))
    return out


def _smallest_fitting_k(update, R, start):
    """Reference: walk the grid from ``start`` (plain ``sz:rel=`` payloads) to the smallest index
    whose payload fits dense / R, where the next one down does not."""
    limit = B.budget_bytes(update, R)

    def size(k):
        return len(fc.get_compressor(f"sz:rel={2.0 ** (k / SZS.GRID)!r}").compress(update, RoundContext()))

    k = start
    while size(k) > limit:
        k += 1
    while size(k - 1) <= limit:
        k -= 1
    return k


def test_sz_search_without_history_starts_on_the_prior(client_updates):
    # A fresh compressor (no previous update: the first of a run, a Flower node's first round, a
    # one-off compress) starts on statedict._PRIOR's curve and extrapolates along it, so most cold
    # searches take 2-4 encodes; from 1e-2 with one bit per value per halving they took 5-8 on these
    # updates. The answers are the grid walk's either way (the test above and
    # test_sz_search_finds_the_smallest_grid_bound).
    encodes = []
    for u in client_updates:
        for R in (8, 16, 64, 256):
            comp = fc.get_compressor(f"sz:ratio={R}")
            comp.compress(u, RoundContext())
            encodes.append(comp.last_choice["encodes"])
    assert max(encodes) <= 4 and sum(encodes) <= 3.5 * len(encodes), encodes


def test_sz_search_first_probe_follows_the_spread(client_updates):
    # One compressor over several clients' updates, as in a round: each answer is the smallest grid
    # bound that fits (walked to by the reference, and what a fresh compressor finds), with the same
    # bytes; after the first update the search starts where the spread predicts, so most searches
    # take the minimum of two encodes (the answer, and one step tighter that does not fit). The old
    # start (the previous answer) took 3 or more on most of these.
    for R in (16, 64):
        warm = fc.get_compressor(f"sz:ratio={R}")
        encodes = []
        for u in client_updates:
            payload = warm.compress(u, RoundContext())
            fresh = fc.get_compressor(f"sz:ratio={R}")
            assert fresh.compress(u, RoundContext()) == payload
            assert fresh.last_choice["rel"] == warm.last_choice["rel"]
            k = round(math.log2(warm.last_choice["rel"]) * SZS.GRID)
            assert _smallest_fitting_k(u, R, k + 2) == k
            assert len(payload) <= B.budget_bytes(u, R)
            encodes.append(warm.last_choice["encodes"])
        later = encodes[1:]
        assert sum(e == 2 for e in later) >= len(later) // 2 + 1, encodes
        assert sum(later) <= 2.5 * len(later), encodes
