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
