"""Fast path of the hypergradient engine for chain networks (Conv2d/Linear/ReLU/MaxPool2d/flatten).

``trace.compile_chain(model)`` traces the model with torch.fx; when its forward is a plain chain of
the supported layers it returns a list of layer objects (``layers.py``), each with the four
hand-written passes of the protocol ``layer.Layer``:

    forward(a)                       z = layer(a; W)
    backward(delta)                  delta_in = dz/da^T delta, dW = delta (x) a
    tangent_forward(adot; lam)       zdot = layer(adot; W) + layer(a; lam)        (d/d eps along lam)
    tangent_backward(ddot, delta)    ddot_in = W^T ddot + lam^T delta,
                                     H lam = ddot (x) a + delta (x) adot

The reverse pass of one SGD step ``w' = w - lr grad_w l(w; x, y)`` with cotangent ``lam`` needs
``H lam``, ``d/dx <grad_w l, lam>`` and ``d/dy <grad_w l, lam>``: all three are the directional
derivative of the full gradient (grad_w, grad_x, grad_y) along ``lam``, so one tangent-forward +
tangent-backward sweep over b synthetic samples gives them (forward-over-reverse, by hand). Cost per
step: a few convolutions on b images and rank-2b updates of the big matrices; nothing builds an
autograd graph.

Memory: the small weights are updated in place and rebuilt in the reverse pass (``w_j = w_{j+1} +
lr g_j``); only their per-step gradients are kept. A Linear layer's per-step gradient has rank <= b
(``dW = delta^T a``), so Linear weights and their cotangents are ``LowRank``: a base matrix plus the
factors, never written per step. Conv + relu + max-pool with few input channels is one layer on C++
kernels (``ConvReluPool``); small-batch convolutions run as im2col + GEMM. The real batch runs in
chunks.

Reentrant: the layer list is cached per model and shared, so nothing of a call is stored on it. A
call's state (the ops resolved for its device, dtype and backend, the flat buffers, each step's
``saved`` records and sinks) is created by the call and passed to the layers' passes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import ops
from .layer import Layer, Unsupported
from .layers import CL_MIN_BATCH, LowRank
from .trace import compile_chain

__all__ = [
    "Layer",
    "Unsupported",
    "compile_chain",
    "check_logits",
    "unroll_chain",
    "hypergradient_chain",
    "real_loss_chain",
]

Tensor = torch.Tensor
_CL = torch.channels_last


class Layout:
    """Dense parameters live in one flat buffer (views per name); Linear weights are separate."""

    def __init__(self, layers, params: dict[str, Tensor]):
        self.dense = [n for layer in layers for n in layer.dense]
        self.lowrank = [n for layer in layers for n in layer.lowrank]
        self.shapes = {n: tuple(params[n].shape) for n in self.dense + self.lowrank}
        self.offsets = {}
        off = 0
        for n in self.dense:
            k = math.prod(self.shapes[n])
            self.offsets[n] = (off, off + k)
            off += k
        self.numel = off

    def views(self, flat: Tensor) -> dict[str, Tensor]:
        return {n: self._view(flat[a:b], self.shapes[n]) for n, (a, b) in self.offsets.items()}

    @staticmethod
    def _view(seg: Tensor, shape) -> Tensor:
        # conv weights are stored channels_last (O, kh, kw, I): the convolutions want that layout,
        # and re-laying out [64, 32, 5, 5] would cost a copy per call (4 calls per step). The flat
        # buffers (w, grads, lam, hv) all share the layout, so the flat ops are unaffected.
        if len(shape) == 4:
            o, i, kh, kw = shape
            return seg.view(o, kh, kw, i).permute(0, 3, 1, 2)
        return seg.view(shape)


class _StepSink:
    """Forward step: dense grads into one row of the gradient history; Linear factors kept."""

    def __init__(self, views):
        self.views = views
        self.factors: list[tuple[str, Tensor, Tensor]] = []

    def dense(self, name, g):
        self.views[name].copy_(g)

    def target(self, name):  # where dense(name, g) would copy g: a layer may write there itself
        return self.views[name]

    def lowrank(self, name, d, a):
        self.factors.append((name, d, a))


class _RealSink:
    """Real batch: accumulate dL/dw_m into the cotangent buffers."""

    def __init__(self, L, fresh=()):
        self.L, self.fresh = L, set(fresh)

    def dense(self, name, g):
        self.L[name].add_(g)

    def target(self, name):  # accumulates: no buffer to write into
        return None

    def lowrank(self, name, d, a):
        base = self.L[name].base
        if name in self.fresh:  # first chunk: write, so the 2 MB buffer needs no zero-fill
            self.fresh.discard(name)
            torch.mm(d.t(), a, out=base)
        else:
            base.addmm_(d.t(), a)


class _HvSink:
    """Reverse step: dense H lam into a flat buffer; Linear weights' cotangent gets rank-2b factors."""

    def __init__(self, views, L, lr):
        self.views, self.L, self.lr = views, L, lr

    def dense(self, name, h):
        self.views[name].copy_(h)

    def target(self, name):
        return self.views[name]

    def lowrank_hv(self, name, left, right):
        self.L[name].append(left, right, -self.lr)


# ---------------------------------------------------------------------------------------------
# The engine


def _forward(layers, P, x, K):
    saved = []
    a = x.contiguous(memory_format=_CL) if x.dim() == 4 and x.shape[0] >= CL_MIN_BATCH else x
    for layer in layers:
        a, s = layer.forward(a, P, K)
        saved.append(s)
    return a, saved


def _backward(layers, P, saved, delta, sink, need_input0, K):
    """Back through the layers; returns the delta at each parametric layer's output (by index)."""
    deltas = {}
    d = delta
    for i in range(len(layers) - 1, -1, -1):
        layer = layers[i]
        if layer.has_params:
            deltas[i] = d
        if i == 0 and not need_input0:
            layer.backward(d, saved[i], P, K, False, sink)
            break
        d = layer.backward(d, saved[i], P, K, True, sink)
    return deltas


def check_logits(z: Tensor, y: Tensor) -> None:
    if z.dim() != 2 or z.shape != y.shape:
        raise ValueError(
            f"syn_y has shape {tuple(y.shape)} per batch but the model gives logits of shape "
            f"{tuple(z.shape)}; "
            "syn_y must be [m, b, C] with C the model's number of outputs"
        )


def unroll_chain(layers, params: dict[str, Tensor], syn_x, syn_y, lr, keep: bool, backend=None):
    """m SGD steps from ``params``; returns (layout, P, wd, history). Weights updated in place."""
    m, b = syn_x.shape[:2]
    K = ops.Bound(syn_x.device, backend, syn_x.dtype)  # this call's ops, passed to every layer pass
    lay = Layout(layers, params)
    dt, dev = syn_x.dtype, syn_x.device
    wd = torch.empty(lay.numel, dtype=dt, device=dev)
    P = lay.views(wd)
    for n in lay.dense:
        P[n].copy_(params[n])
    for n in lay.lowrank:  # read only: the steps add factors (LowRank)
        P[n] = LowRank(params[n].detach().to(dtype=dt, device=dev).contiguous(), m * b)
    g_hist = torch.empty((m if keep else 1, lay.numel), dtype=dt, device=dev)
    caches = []
    scale = 1.0 / b
    for j in range(m):
        x, y = syn_x[j], syn_y[j]
        z, saved = _forward(layers, P, x, K)
        if j == 0:
            check_logits(z, y)
        _, p, delta = K.soft_ce(z, y, scale)
        row = g_hist[j if keep else 0]
        sink = _StepSink(lay.views(row))
        deltas = _backward(layers, P, saved, delta, sink, False, K)
        K.sgd_step(wd, row, lr)
        for name, d, a in sink.factors:
            P[name].append(d, a, -lr)
        if keep:
            caches.append((saved, deltas, p, sink.factors))
    if not keep:  # the caller wants w_m itself
        for n in lay.lowrank:
            P[n] = P[n].dense()
    return lay, P, wd, (g_hist, caches, K)


def real_loss_chain(layers, params: dict[str, Tensor], real_x, real_y, chunk=256, backend=None) -> float:
    """Mean cross-entropy on a real batch with the chain's own forward (the fused conv layer: the
    FedSynth client measures its final set on all its data with this, not functional_call)."""
    dt, dev = real_x.dtype, real_x.device
    K = ops.Bound(dev, backend, dt)
    lay = Layout(layers, params)
    P = lay.views(torch.empty(lay.numel, dtype=dt, device=dev))
    for n in lay.dense:
        P[n].copy_(params[n])
    for n in lay.lowrank:
        P[n] = params[n].detach().to(dtype=dt, device=dev)
    total = 0.0
    for i in range(0, real_x.shape[0], chunk):
        z, _ = _forward(layers, P, real_x[i : i + chunk], K)
        total += float(F.cross_entropy(z, real_y[i : i + chunk], reduction="sum"))
    return total / max(1, real_x.shape[0])


def hypergradient_chain(
    layers, params, syn_x, syn_y, lr, real_x, real_y, real_chunk=64, backend=None, target=None, target_weight=1.0
):
    m, b = syn_x.shape[:2]
    lay, P, wd, (g_hist, caches, K) = unroll_chain(layers, params, syn_x, syn_y, lr, keep=True, backend=backend)
    dt, dev = syn_x.dtype, syn_x.device
    C = syn_y.shape[-1]

    # real batch at w_m: L = mean CE; dL/dw_m accumulated chunk by chunk into lam
    lam_d = torch.zeros(lay.numel, dtype=dt, device=dev)
    L = lay.views(lam_d)
    for n in lay.lowrank:
        L[n] = LowRank(torch.empty(P[n].base.shape, dtype=dt, device=dev), 2 * m * b)
    P_m = {**P, **{n: P[n].dense() for n in lay.lowrank}}  # the real batch's big GEMMs want W_m
    loss = torch.zeros((), dtype=dt, device=dev)
    fresh = lay.lowrank
    if target is not None:  # target_weight ||w_m - t||^2: lam = 2 target_weight (w_m - t), written first
        for n in lay.dense + lay.lowrank:
            diff = P_m[n] - target[n].to(dtype=dt, device=dev)
            loss += target_weight * diff.pow(2).sum()
            (L[n].base if n in lay.lowrank else L[n]).copy_(diff).mul_(2 * target_weight)
        fresh = ()
    n_real = 0 if real_x is None else real_x.shape[0]
    sink = _RealSink(L, fresh=fresh)  # the first chunk writes the Linear weights' buffers (no target)
    for i in range(0, n_real, real_chunk):
        xr = real_x[i : i + real_chunk]
        yr = F.one_hot(real_y[i : i + real_chunk], C).to(dt)
        z, saved = _forward(layers, P_m, xr, K)
        lc, _, delta = K.soft_ce(z, yr, 1.0 / n_real)
        loss += lc
        _backward(layers, P_m, saved, delta, sink, False, K)
        del saved, z, delta
    del P_m

    # reverse pass
    gx = torch.empty_like(syn_x)
    gy = torch.empty_like(syn_y)
    hv = torch.empty(lay.numel, dtype=dt, device=dev)
    hsink = _HvSink(lay.views(hv), L, lr)
    # rebuild w_{m-1}
    K.sgd_step(wd, g_hist[m - 1], -lr)
    for name, d, _ in caches[m - 1][3]:
        P[name].pop(d.shape[0])
    scale = 1.0 / b
    for j in range(m - 1, -1, -1):
        saved, deltas, p, _ = caches[j]
        # tangent forward along lam
        adots = []
        ad = None
        for i, layer in enumerate(layers):
            adots.append(ad)
            ad = layer.tangent_forward(ad, saved[i], P, L, K)
        dd, gyd = K.soft_ce_jvp(p, syn_y[j], ad, scale)
        for i in range(len(layers) - 1, -1, -1):
            dd = layers[i].tangent_backward(dd, deltas.get(i), saved[i], adots[i], P, L, K, True, hsink)
        torch.mul(dd, -lr, out=gx[j])
        torch.mul(gyd, -lr, out=gy[j])
        caches[j] = None
        K.reverse_step(wd, g_hist[j - 1] if j else None, lam_d, hv, lr)
        if j:
            for name, d, _ in caches[j - 1][3]:
                P[name].pop(d.shape[0])
    return loss, gx, gy
