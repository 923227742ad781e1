"""The FedSynth hypergradient engine: fused ops on every backend, engine vs create_graph unroll."""

import pytest
import torch
import torch.nn.functional as F
from conftest import backend_or_skip
from torch import nn

import fedcompress as fc
from fedcompress.synth import ops

torch.set_num_threads(min(2, torch.get_num_threads()))


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------
# Ops vs independent references (float64 autograd)


@pytest.mark.parametrize("n,C", [(0, 10), (1, 1), (7, 10), (300, 47), (5, 100)])
def test_soft_ce(backend, n, C):
    backend_or_skip("synth_soft_ce", backend)
    g = torch.Generator().manual_seed(n * 131 + C)
    z = torch.randn(n, C, generator=g) * 3
    y = torch.randn(n, C, generator=g)  # arbitrary real "labels" (trainable y is unconstrained)
    scale = 1.0 / max(n, 1)
    loss, p, d = ops.soft_ce(z, y, scale, backend=backend)
    z64 = z.double().requires_grad_(True)
    ref = -(y.double() * torch.log_softmax(z64, -1)).sum() * scale
    (gz,) = torch.autograd.grad(ref, z64)
    ref = ref.detach()
    assert abs(float(loss) - float(ref)) <= 1e-5 * max(1.0, abs(float(ref)))
    torch.testing.assert_close(p, torch.softmax(z.double(), -1).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d, gz.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n,C", [(0, 10), (1, 1), (7, 10), (300, 47)])
def test_soft_ce_jvp(backend, n, C):
    """delta_dot and gy_dot are the directional derivatives (along zdot) of dl/dz and dl/dy."""
    backend_or_skip("synth_soft_ce_jvp", backend)
    g = torch.Generator().manual_seed(7 + n)
    z = torch.randn(n, C, generator=g, dtype=torch.float64)
    y = torch.rand(n, C, generator=g, dtype=torch.float64)
    zd = torch.randn(n, C, generator=g, dtype=torch.float64)
    scale = 0.25

    def loss(zz, yy):
        return -(yy * torch.log_softmax(zz, -1)).sum() * scale

    grads = torch.func.grad(loss, argnums=(0, 1))
    _, (dd_ref, gy_ref) = torch.func.jvp(lambda zz: grads(zz, y), (z,), (zd,))
    p = torch.softmax(z, -1).float()
    dd, gy = ops.soft_ce_jvp(p, y.float(), zd.float(), scale, backend=backend)
    torch.testing.assert_close(dd, dd_ref.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gy, gy_ref.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [0, 1, 7, 2**16 + 3])
def test_sgd_and_reverse_step(backend, n):
    backend_or_skip("synth_sgd_step", backend)
    g = torch.Generator().manual_seed(n)
    w, gr, lam, hv = (torch.randn(n, generator=g) for _ in range(4))
    w1 = w.clone()
    ops.sgd_step(w1, gr, 0.1, backend=backend)
    torch.testing.assert_close(w1, w - 0.1 * gr, rtol=0, atol=1e-6)
    w2, lam2 = w.clone(), lam.clone()
    ops.reverse_step(w2, gr, lam2, hv, 0.1, backend=backend)
    torch.testing.assert_close(w2, w + 0.1 * gr, rtol=0, atol=1e-6)
    torch.testing.assert_close(lam2, lam - 0.1 * hv, rtol=0, atol=1e-6)
    lam3 = lam.clone()
    ops.reverse_step(w.clone(), None, lam3, hv, 0.1, backend=backend)
    torch.testing.assert_close(lam3, lam2)


# Fused conv + relu + max-pool (ConvReluPool): every backend vs plain float64 torch

_CONV_CASES = [  # N, C, H, W, O, k, pool  (O = 33: a partial vector block in the C++ kernel)
    (0, 1, 8, 8, 4, 3, 2),
    (1, 1, 5, 5, 1, 5, 1),
    (2, 1, 28, 28, 32, 5, 2),
    (3, 2, 11, 9, 33, 3, 2),
    (2, 3, 10, 10, 5, 2, 3),
    (17, 1, 12, 12, 16, 3, 2),
]


def _conv_case(N, C, H, W, O, k, seed=0):
    g = torch.Generator().manual_seed(seed + N * 7 + C * 131 + O)
    xs = torch.randn(N, H, W, C, generator=g)
    return xs, torch.randn(O, C, k, k, generator=g), torch.randn(O, generator=g)


def _pool64(xs, w, b, pool):
    z = F.conv2d(xs.double().permute(0, 3, 1, 2), w.double(), b.double())
    return z, F.max_pool2d(z, pool, return_indices=True)


@pytest.mark.parametrize("case", _CONV_CASES)
def test_conv_pool(backend, case):
    backend_or_skip("synth_conv_pool", backend)
    N, C, H, W, O, k, P = case
    xs, w, b = _conv_case(N, C, H, W, O, k)
    out, arg = ops.conv_pool(xs, w, b, P, backend=backend)
    z, (mx, idx) = _pool64(xs, w, b, P)
    torch.testing.assert_close(out.double(), torch.relu(mx), rtol=1e-5, atol=1e-5)
    # arg = window element of the max: picks the same value of z
    rows = torch.arange(mx.shape[2]).view(1, 1, -1, 1) * P + arg.long() // P
    cols = torch.arange(mx.shape[3]).view(1, 1, 1, -1) * P + arg.long() % P
    at = z.flatten(2).gather(2, (rows * z.shape[3] + cols).flatten(2)).view(mx.shape)
    torch.testing.assert_close(at, mx, rtol=1e-5, atol=1e-5)
    assert arg.dtype == torch.uint8 and int(arg.max() if arg.numel() else 0) < P * P


@pytest.mark.parametrize("case", _CONV_CASES)
@pytest.mark.parametrize("two", [False, True])
def test_conv_at_and_bwd(backend, case, two):
    """conv_at = the conv at the arg positions; conv_at_bwd = its float64 autograd gradients."""
    backend_or_skip("synth_conv_at_bwd", backend)
    N, C, H, W, O, k, P = case
    xs, w, b = _conv_case(N, C, H, W, O, k, seed=1)
    _, (_, idx) = _pool64(xs, w, b, P)
    arg = ops.conv_pool_ref(xs, w, b, P)[1]
    g = torch.Generator().manual_seed(3)
    gout, gout2 = (torch.randn(arg.shape, generator=g) for _ in range(2))
    gout[gout < -0.7] = 0  # relu-masked cotangents have zeros
    w2 = torch.randn(w.shape, generator=g)
    x64, w64, b64 = (t.double().requires_grad_(True) for t in (xs, w, b))
    z = ops.conv_at_ref(x64, w64, b64, P, arg)
    torch.testing.assert_close(ops.conv_at(xs, w, b, P, arg, backend=backend).double(), z, rtol=1e-5, atol=1e-5)
    no_bias = ops.conv_at(xs, w, None, P, arg, backend=backend).double()
    torch.testing.assert_close(no_bias, z - b64.view(1, -1, 1, 1), rtol=1e-5, atol=1e-5)
    dw_r, db_r, dx_r = torch.autograd.grad(z, (w64, b64, x64), gout.double())
    if two:
        x2 = xs.double().requires_grad_(True)
        dx_r = dx_r + torch.autograd.grad(ops.conv_at_ref(x2, w2.double(), None, P, arg), x2, gout2.double())[0]
    pair = (gout2, w2) if two else (None, None)
    dw, db, dx = ops.conv_at_bwd(gout, xs, w, P, arg, True, *pair, backend=backend)
    for got, ref in ((dw, dw_r), (db, db_r), (dx, dx_r)):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-4)
    dw2, db2, none = ops.conv_at_bwd(gout, xs, w, P, arg, False, backend=backend)
    assert none is None
    torch.testing.assert_close(dw2, dw)


@pytest.mark.parametrize(
    "n,c,h,w,k,s,p,d",
    [(2, 32, 12, 12, 5, 1, 0, 1), (3, 4, 9, 7, 3, 2, 1, 1), (1, 5, 11, 11, 3, 1, 2, 2), (0, 2, 6, 6, 3, 1, 0, 1)],
)
def test_col2im(backend, n, c, h, w, k, s, p, d):
    """col2im = the input gradient of conv2d (channels_last im2col columns)."""
    backend_or_skip("synth_col2im", backend)
    oh, ow = (h + 2 * p - d * (k - 1) - 1) // s + 1, (w + 2 * p - d * (k - 1) - 1) // s + 1
    g = torch.Generator().manual_seed(n + c)
    wt, dz = torch.randn(6, c, k, k, generator=g), torch.randn(n, 6, oh, ow, generator=g)
    x = torch.zeros(n, c, h, w, dtype=torch.float64, requires_grad=True)
    (ref,) = torch.autograd.grad(F.conv2d(x, wt.double(), None, s, p, d), x, dz.double())
    cols = dz.permute(0, 2, 3, 1).reshape(-1, 6) @ wt.permute(0, 2, 3, 1).reshape(6, -1)
    got = ops.col2im(cols, (n, c, h, w), (k, k), (s, s), (p, p), (d, d), backend=backend)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "n,c,h,w,k,s,d", [(2, 32, 12, 12, 5, 1, 1), (3, 4, 9, 7, 3, 2, 1), (1, 5, 11, 11, 3, 1, 2), (0, 2, 6, 6, 3, 1, 1)]
)
def test_im2col(backend, n, c, h, w, k, s, d):
    """Channels_last columns = F.unfold's, reordered to (kh, kw, c): exactly (a copy)."""
    backend_or_skip("synth_im2col", backend)
    x = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(n + c + 1))
    cols = ops.im2col(x.permute(0, 2, 3, 1).contiguous(), (k, k), (s, s), (d, d), backend=backend)
    u = F.unfold(x, k, dilation=d, stride=s)  # [n, c*k*k, L]
    ref = u.view(n, c, k, k, u.shape[-1]).permute(0, 4, 2, 3, 1).reshape(n * u.shape[-1], k * k * c)
    assert torch.equal(cols, ref)


def test_fused_layer_used_for_fedavg_cnn():
    """The FedAvg CNN's first conv + relu + pool runs as one ConvReluPool; conv2 stays a Conv2d."""
    models = pytest.importorskip("fedcompress.fedavg.models")
    plan = fc.synth.chain_plan(models.FedAvgCNN())
    assert [type(layer).__name__ for layer in plan][:3] == ["ConvReluPool", "Conv2d", "ReluMaxPool2d"]


def test_chain_layers_follow_the_protocol_and_hold_no_call_state():
    """Every traced layer implements layer.Layer; a hypergradient leaves the cached plan's objects
    exactly as it found them (per-call state is passed per call, never stored on the plan)."""
    import copy

    from fedcompress.synth.layer import Layer

    models = pytest.importorskip("fedcompress.fedavg.models")
    model = models.FedAvgCNN((1, 16, 16), 10)
    plan = fc.synth.chain_plan(model)
    assert plan and all(isinstance(layer, Layer) for layer in plan)
    before = [sorted(vars(layer)) for layer in plan]
    snap = [copy.copy(vars(layer)) for layer in plan]
    params, sx, sy, rx, ry = _problem(model, (1, 16, 16), 10, m=2, b=2, n=20)
    fc.synth.hypergradient(model, params, sx, sy, 0.05, rx, ry)
    assert [sorted(vars(layer)) for layer in plan] == before
    for layer, old in zip(plan, snap, strict=True):
        assert all(vars(layer)[k] is v for k, v in old.items())


def test_engine_reentrant_nested_and_threaded(monkeypatch):
    """Two hypergradients on one model (one cached plan) interleaved, a second one nested inside the
    first's reverse pass (between a conv layer's tangent forward and backward, with another dtype and
    backend) and several on two threads, give bit for bit what the calls give one after another."""
    from concurrent.futures import ThreadPoolExecutor

    models = pytest.importorskip("fedcompress.fedavg.models")
    torch.manual_seed(11)
    model = models.FedAvgCNN((1, 16, 16), 10)
    pa = _problem(model, (1, 16, 16), 10, m=3, b=2, n=20, seed=1)
    pb = _problem(model, (1, 16, 16), 10, m=3, b=2, n=20, seed=2, dtype=torch.float64)

    def hg(p, **kw):
        return fc.synth.hypergradient(model, p[0], p[1], p[2], 0.05, p[3], p[4], **kw)

    def same(x, y):
        return all(u.dtype == v.dtype and torch.equal(u, v) for u, v in zip(x, y, strict=True))

    ra, rb = hg(pa), hg(pb, backend="torch")  # sequential: the reference for both
    assert ra[1].dtype == torch.float32 and rb[1].dtype == torch.float64

    real_bound, nested = ops.Bound, {}

    class NestingBound(real_bound):
        """The engine's per-call ops; the outer call's first soft_ce_jvp runs a whole second call."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            jvp = self.soft_ce_jvp

            def soft_ce_jvp(*a, **k):
                if "inner" not in nested:
                    nested["inner"] = None  # set first: the nested call makes a NestingBound too
                    nested["inner"] = hg(pb, backend="torch")
                return jvp(*a, **k)

            self.soft_ce_jvp = soft_ce_jvp

    monkeypatch.setattr(ops, "Bound", NestingBound)
    outer = hg(pa)
    monkeypatch.undo()
    assert same(nested["inner"], rb), "the nested call"
    assert same(outer, ra), "the call that a second one interrupted"

    jobs = [(pa, {}), (pb, {"backend": "torch"})] * 3
    with ThreadPoolExecutor(2) as ex:
        got = list(ex.map(lambda job: hg(job[0], **job[1]), jobs))
    for (p, _), r in zip(jobs, got, strict=True):
        assert same(r, ra if p is pa else rb)


@pytest.mark.parametrize("backend_", ["torch", None])
def test_engine_backends_match(backend_):
    """The whole engine (fused conv layer, col2im, low-rank Linear weights) on the torch references
    and on the automatic choice (C++ for the conv ops when built)."""
    models = pytest.importorskip("fedcompress.fedavg.models")
    torch.manual_seed(8)
    model = models.FedAvgCNN((1, 16, 16), 10)
    params, sx, sy, rx, ry = _problem(model, (1, 16, 16), 10, m=3, b=2, n=20)
    ref = fc.synth.hypergradient_ref(model, params, sx, sy, 0.05, rx, ry)
    _check_equal(fc.synth.hypergradient(model, params, sx, sy, 0.05, rx, ry, backend=backend_), ref)


# ---------------------------------------------------------------------------------------------
# The engine vs the create_graph unroll


class SmallCNN(nn.Module):
    """FedAvg-CNN-shaped (conv, relu, pool, conv, relu, pool, flatten, fc, relu, fc), small."""

    def __init__(self, c=1, classes=10, k1=4, k2=6, hidden=16, padding=0, stride=1, size=9):
        super().__init__()
        self.conv1 = nn.Conv2d(c, k1, 3, padding=padding, stride=stride)
        self.conv2 = nn.Conv2d(k1, k2, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        h = ((size + 2 * padding - 3) // stride + 1) // 2 // 2
        self.fc1 = nn.Linear(k2 * h * h, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.view(x.size(0), -1)
        return self.fc2(F.relu(self.fc1(x)))


class MLP(nn.Module):
    def __init__(self, d=12, classes=5):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(d, 9), nn.ReLU(), nn.Linear(9, classes))

    def forward(self, x):
        return self.net(x)


class Residual(nn.Module):
    """Not a chain (skip connection, tanh, a buffer): exercises the generic engine."""

    def __init__(self, d=12, classes=5):
        super().__init__()
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, classes)
        self.register_buffer("shift", torch.linspace(-0.5, 0.5, d))

    def forward(self, x):
        x = x.flatten(1) + self.shift
        return self.b(torch.tanh(self.a(x)) + x)


def _problem(model, in_shape, classes, m=3, b=2, n=9, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    params = {k: v.detach().to(dtype) for k, v in model.named_parameters()}
    sx = torch.randn((m, b) + in_shape, generator=g, dtype=dtype)
    sy = torch.rand((m, b, classes), generator=g, dtype=dtype) * 2 - 0.5  # soft, not normalised
    rx = torch.randn((n,) + in_shape, generator=g, dtype=dtype)
    ry = torch.randint(0, classes, (n,), generator=g)
    return params, sx, sy, rx, ry


def _check_equal(out, ref, tol=1e-5):
    for a, b in zip(out, ref, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert _rel(a, b) <= tol, _rel(a, b)


CASES = [
    ("cnn", lambda: SmallCNN(), (1, 9, 9), 10),
    ("cnn-pad-stride", lambda: SmallCNN(c=2, padding=1, stride=2, classes=3), (2, 9, 9), 3),
    ("mlp", lambda: MLP(), (3, 4), 5),
    ("residual", lambda: Residual(), (12,), 5),
]


@pytest.mark.parametrize("name,make,shape,C", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("m,b", [(1, 1), (3, 2), (4, 3)])
def test_engine_matches_create_graph_unroll(name, make, shape, C, m, b):
    torch.manual_seed(1)
    model = make()
    if name != "residual":
        assert fc.synth.chain_plan(model) is not None, "expected the fast chain path"
    else:
        assert fc.synth.chain_plan(model) is None
    args = (model, *_problem(model, shape, C, m=m, b=b)[:1])
    params, sx, sy, rx, ry = _problem(model, shape, C, m=m, b=b)
    ref = fc.synth.hypergradient_ref(model, params, sx, sy, 0.3, rx, ry)
    _check_equal(fc.synth.hypergradient(model, params, sx, sy, 0.3, rx, ry, real_chunk=4), ref)
    _check_equal(fc.synth.hypergradient_generic(model, params, sx, sy, 0.3, rx, ry), ref)
    del args


def test_engine_float64_tight():
    """In float64 the engine and the unroll agree to ~1e-12: same math, not an approximation."""
    torch.manual_seed(2)
    model = SmallCNN().double()
    params, sx, sy, rx, ry = _problem(model, (1, 9, 9), 10, m=5, b=2, dtype=torch.float64)
    ref = fc.synth.hypergradient_ref(model, params, sx, sy, 0.5, rx, ry)
    _check_equal(fc.synth.hypergradient(model, params, sx, sy, 0.5, rx, ry), ref, tol=1e-11)


def test_engine_against_finite_differences():
    """Independent of autograd: central differences of the real loss along a random direction."""
    torch.manual_seed(3)
    model = SmallCNN().double()
    params, sx, sy, rx, ry = _problem(model, (1, 9, 9), 10, m=3, b=2, dtype=torch.float64)
    _, gx, gy = fc.synth.hypergradient(model, params, sx, sy, 0.5, rx, ry)
    dx, dy = torch.randn_like(sx), torch.randn_like(sy)
    eps = 1e-5

    def L(x, y):
        w = fc.synth.unroll(model, params, x, y, 0.5)
        return F.cross_entropy(torch.func.functional_call(model, w, (rx,)), ry)

    fd = (L(sx + eps * dx, sy + eps * dy) - L(sx - eps * dx, sy - eps * dy)) / (2 * eps)
    an = (gx * dx).sum() + (gy * dy).sum()
    assert abs(float(fd - an)) <= 1e-6 * max(1.0, abs(float(an)))


@pytest.mark.parametrize("name,make,shape,C", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("real", [True, False], ids=["loss+target", "target-only"])
def test_target_term_matches_create_graph_unroll(name, make, shape, C, real):
    """FedSynth's objective=match/both: L (+)= w ||w_m - t||^2; every path against the autograd unroll."""
    torch.manual_seed(4)
    model = make()
    params, sx, sy, rx, ry = _problem(model, shape, C, m=3, b=2)
    g = torch.Generator().manual_seed(5)
    t = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in params.items()}
    rx, ry = (rx, ry) if real else (None, None)
    ref = fc.synth.hypergradient_ref(model, params, sx, sy, 0.3, rx, ry, target=t, target_weight=2.5)
    # the term is really there: not the plain loss
    w = fc.synth.unroll(model, params, sx, sy, 0.3)
    term = 2.5 * sum(float(((w[k] - t[k]) ** 2).sum()) for k in t)
    plain = 0.0 if not real else float(F.cross_entropy(torch.func.functional_call(model, w, (rx,)), ry))
    assert abs(float(ref[0]) - (plain + term)) <= 1e-5 * (plain + term)
    _check_equal(fc.synth.hypergradient(model, params, sx, sy, 0.3, rx, ry, target=t, target_weight=2.5), ref)
    _check_equal(fc.synth.hypergradient_generic(model, params, sx, sy, 0.3, rx, ry, target=t, target_weight=2.5), ref)


def test_target_term_against_finite_differences():
    torch.manual_seed(6)
    model = SmallCNN().double()
    params, sx, sy, _, _ = _problem(model, (1, 9, 9), 10, m=3, b=2, dtype=torch.float64)
    t = {k: v + 0.01 * torch.randn_like(v) for k, v in params.items()}
    _, gx, gy = fc.synth.hypergradient(model, params, sx, sy, 0.5, None, None, target=t, target_weight=7.0)
    dx, dy = torch.randn_like(sx), torch.randn_like(sy)
    eps = 1e-5

    def L(x, y):
        w = fc.synth.unroll(model, params, x, y, 0.5)
        return 7.0 * sum(float(((w[k] - t[k]) ** 2).sum()) for k in t)

    fd = (L(sx + eps * dx, sy + eps * dy) - L(sx - eps * dx, sy - eps * dy)) / (2 * eps)
    an = float((gx * dx).sum() + (gy * dy).sum())
    assert abs(fd - an) <= 1e-6 * max(1.0, abs(an))


def test_target_bad_arguments():
    model = SmallCNN()
    params, sx, sy, rx, ry = _problem(model, (1, 9, 9), 10)
    H = fc.synth.hypergradient
    t = {k: v.clone() for k, v in params.items()}
    with pytest.raises(ValueError, match="real_x"):
        H(model, params, sx, sy, 0.1, None, None)
    with pytest.raises(ValueError, match="target"):
        H(model, params, sx, sy, 0.1, rx, ry, target={k: v for k, v in list(t.items())[1:]})
    with pytest.raises(ValueError, match="target"):
        H(model, params, sx, sy, 0.1, rx, ry, target={**t, "conv1.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match="target_weight"):
        H(model, params, sx, sy, 0.1, rx, ry, target=t, target_weight=float("nan"))
    with pytest.raises(ValueError, match="target_weight"):
        H(model, params, sx, sy, 0.1, rx, ry, target=t, target_weight=-1.0)


@pytest.mark.parametrize("name,make,shape,C", CASES, ids=[c[0] for c in CASES])
def test_real_loss_matches_functional_call(name, make, shape, C):
    """real_loss runs the chain's own forward (fused conv layer) for chain models: same value."""
    torch.manual_seed(7)
    model = make()
    params, _, _, rx, ry = _problem(model, shape, C, n=37)
    ref = float(F.cross_entropy(torch.func.functional_call(model, params, (rx,)), ry))
    assert abs(fc.synth.real_loss(model, params, rx, ry, chunk=8) - ref) <= 1e-5 * ref


def test_engine_triton_backend_matches():
    """The whole engine with the Triton kernels (interpreter) gives the reference result."""
    backend_or_skip("synth_soft_ce", "triton")
    torch.manual_seed(4)
    model = SmallCNN()
    params, sx, sy, rx, ry = _problem(model, (1, 9, 9), 10, m=2, b=2)
    ref = fc.synth.hypergradient_ref(model, params, sx, sy, 0.3, rx, ry)
    _check_equal(fc.synth.hypergradient(model, params, sx, sy, 0.3, rx, ry, backend="triton"), ref)


def test_fedavg_cnn_full_size():
    """The bench's model (FedAvg CNN, 582,026 parameters) on a short unroll."""
    models = pytest.importorskip("fedcompress.fedavg.models")
    torch.manual_seed(5)
    model = models.FedAvgCNN()
    assert sum(p.numel() for p in model.parameters()) == 582026
    assert fc.synth.chain_plan(model) is not None
    params, sx, sy, rx, ry = _problem(model, (1, 28, 28), 10, m=3, b=2, n=40)
    ref = fc.synth.hypergradient_ref(model, params, sx, sy, 0.05, rx, ry)
    _check_equal(fc.synth.hypergradient(model, params, sx, sy, 0.05, rx, ry, real_chunk=16), ref)


def test_params_not_modified_and_noncontiguous_inputs():
    torch.manual_seed(6)
    model = SmallCNN()
    params, sx, sy, rx, ry = _problem(model, (1, 9, 9), 10, m=2, b=3)
    before = {k: v.clone() for k, v in params.items()}
    sx_nc = sx.transpose(3, 4).contiguous().transpose(3, 4)  # same values, non-contiguous
    assert not sx_nc.is_contiguous()
    ref = fc.synth.hypergradient_ref(model, params, sx, sy, 0.3, rx, ry)
    _check_equal(fc.synth.hypergradient(model, params, sx_nc, sy, 0.3, rx, ry), ref)
    for k in params:
        assert torch.equal(params[k], before[k])


def test_unroll_matches_plain_sgd():
    """unroll (ClientUpdate) = m plain SGD steps with torch.optim on the soft-label loss."""
    torch.manual_seed(7)
    model = SmallCNN()
    params, sx, sy, _, _ = _problem(model, (1, 9, 9), 10, m=4, b=2)
    w = fc.synth.unroll(model, params, sx, sy, 0.2)
    ref = SmallCNN()
    ref.load_state_dict(params)
    opt = torch.optim.SGD(ref.parameters(), lr=0.2)
    for j in range(4):
        opt.zero_grad()
        fc.synth.soft_cross_entropy(ref(sx[j]), sy[j]).backward()
        opt.step()
    for k, v in ref.named_parameters():
        torch.testing.assert_close(w[k], v.detach(), rtol=1e-5, atol=1e-6)


def test_batched_over_clients():
    torch.manual_seed(8)
    model = SmallCNN()
    K = 3
    probs = [_problem(model, (1, 9, 9), 10, m=2, b=2, n=6, seed=s) for s in range(K)]
    params = probs[0][0]
    stack = [torch.stack([p[i] for p in probs]) for i in range(1, 5)]
    loss, gx, gy = fc.synth.hypergradient_batched(model, params, *stack[:2], 0.3, *stack[2:])
    assert loss.shape == (K,)
    for k in range(K):
        ref = fc.synth.hypergradient_ref(
            model, params, stack[0][k], stack[1][k], 0.3, stack[2][k], stack[3][k]
        )
        _check_equal((loss[k], gx[k], gy[k]), ref)


# ---------------------------------------------------------------------------------------------
# Bad arguments: ValueError naming the argument


def test_bad_arguments():
    model = SmallCNN()
    params, sx, sy, rx, ry = _problem(model, (1, 9, 9), 10)
    H = fc.synth.hypergradient
    with pytest.raises(ValueError, match="params"):
        H(model, {k: v for k, v in list(params.items())[1:]}, sx, sy, 0.1, rx, ry)
    with pytest.raises(ValueError, match="params"):
        H(model, {**params, "conv1.weight": torch.zeros(3)}, sx, sy, 0.1, rx, ry)
    with pytest.raises(ValueError, match="syn_x"):
        H(model, params, sx[0, 0, 0], sy, 0.1, rx, ry)
    with pytest.raises(ValueError, match="syn_y"):
        H(model, params, sx, sy[:, :1], 0.1, rx, ry)
    with pytest.raises(ValueError, match="syn_y"):
        H(model, params, sx, sy[..., :7], 0.1, rx, ry)  # model has 10 outputs
    with pytest.raises(ValueError, match="syn_x"):
        H(model, params, torch.randn(3, 2, 2, 9, 9), sy, 0.1, torch.randn(9, 2, 9, 9), ry)  # channels
    with pytest.raises(ValueError, match="inner_lr"):
        H(model, params, sx, sy, float("nan"), rx, ry)
    with pytest.raises(ValueError, match="inner_lr"):
        H(model, params, sx, sy, 0.0, rx, ry)
    with pytest.raises(ValueError, match="real_x"):
        H(model, params, sx, sy, 0.1, rx[:, :, :5], ry)
    with pytest.raises(ValueError, match="real_y"):
        H(model, params, sx, sy, 0.1, rx, ry[:-1])
    with pytest.raises(ValueError, match="real_y"):
        H(model, params, sx, sy, 0.1, rx, ry + 10)
    with pytest.raises(ValueError, match="real_y"):
        H(model, params, sx, sy, 0.1, rx, ry.float())
    with pytest.raises(ValueError, match="real_chunk"):
        H(model, params, sx, sy, 0.1, rx, ry, real_chunk=0)
    with pytest.raises(ValueError, match="model"):
        H(lambda x: x, params, sx, sy, 0.1, rx, ry)


class LinearOn3d(nn.Module):
    """A Linear on a 3-d input and a reduction: not a chain, so the generic path runs."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x).sum(1)


def test_linear_on_3d_input_uses_generic_path():
    torch.manual_seed(9)
    model = LinearOn3d()
    params, sx, sy, rx, ry = _problem(model, (5, 4), 3, m=2, b=2)
    assert fc.synth.chain_plan(model) is None
    ref = fc.synth.hypergradient_ref(model, params, sx, sy, 0.3, rx, ry)
    _check_equal(fc.synth.hypergradient(model, params, sx, sy, 0.3, rx, ry), ref)
    w = fc.synth.unroll(model, params, sx, sy, 0.3)
    assert set(w) == set(params)
