"""The small fused ops of the hypergradient engine, each a torch reference (the specification).

Backends: the reference runs everywhere; the Triton kernels (``kernels/synth.py``) are declared in
``fedcompress/_ops.py`` and picked for CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1`` when
asked for explicitly). On CPU the references are the fast choice: they are a handful of vectorised
torch calls on tensors of ``b x C`` (a few dozen floats) or one flat parameter buffer.

- ``soft_ce``: soft-label cross-entropy forward + backward in one pass.
  For logits ``z [n, C]`` and soft labels ``y [n, C]`` with row sums ``s = y.sum(-1)``:
  ``loss = scale * sum_i[-sum_c y_ic log_softmax(z_i)_c]``, ``p = softmax(z)``,
  ``delta = dloss/dz = scale * (s_i p_i - y_i)``.  (``scale = 1/n`` gives the mean.)
- ``soft_ce_jvp``: the second-order term the reverse pass needs. For a tangent ``zdot`` of the
  logits (the directional derivative along the parameters' cotangent): with
  ``u = zdot - <p, zdot>``, ``delta_dot = scale * s * p * u`` (the tangent of ``delta``) and
  ``gy_dot = -scale * u`` (the tangent of ``dloss/dy = -scale * log_softmax(z)``).
- ``sgd_step``: ``w -= lr * g`` in place on a flat buffer.
- ``reverse_step``: ``lam -= lr * hv``; ``w += lr * g`` in place (one pass over both flat
  buffers: finishes reverse step j and rebuilds w_{j-1} = w_j + lr g_{j-1}).
- ``conv_pool``: ``relu(max_pool2d(conv2d(x, w, b), P))`` (stride 1, pool window = stride = P) and,
  per output, ``arg`` = the window element ``u * P + v`` that gave the max (uint8). The input comes
  as ``xs`` [N, Hp, Wp, C]: channels last and already zero-padded (the engine prepares it once
  per step and reuses it in four passes).
- ``conv_at``: ``conv2d(x, w, b)`` evaluated at each output's ``arg`` position (no relu): with
  ``arg`` fixed, the layer is this linear map, so its tangent and gradients are those of ``conv_at``.
- ``conv_at_bwd``: the gradients of ``conv_at`` for an output cotangent: (dw, db, dx or None), dx
  with respect to ``xs``; optionally a second (cotangent, weight) pair adds to dx.
- ``im2col``: channels_last columns of a zero-padded input (C++: a memcpy per tap, where torch
  makes a strided gather copy).
- ``col2im``: the input gradient of a convolution run as im2col + GEMM (channels_last columns);
  the engine's small-batch convolutions (C++: a scatter-add per tap, where the reference folds).
These five have a C++ kernel (``csrc/synth.cpp``; adapters in ``fedcompress/cpp/synth.py``): the
[N, O, H, W] map before pooling is never materialised (see there for why). The kernels are
float32-only and ``_ops`` declares them so; the dispatch below passes the dtype that all tensor
arguments share, so another dtype runs on the reference by that declaration, not by a check inside
the kernel's adapter. ``bench/bench_synth.py`` times the engine that uses them.
"""

from __future__ import annotations

import torch

from .. import _ops

# the C++ adapters live in fedcompress/cpp/synth.py (as kernels/synth.py holds the Triton ones)

Tensor = torch.Tensor


def soft_ce_ref(z: Tensor, y: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(loss scalar, p = softmax(z), delta = dloss/dz); see module docstring."""
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    s = y.sum(-1, keepdim=True)
    loss = -(y * logp).sum() * scale
    delta = (p * s - y) * scale
    return loss, p, delta


def soft_ce_jvp_ref(p: Tensor, y: Tensor, zdot: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """(delta_dot, gy_dot) for a logits tangent ``zdot``; see module docstring."""
    u = zdot - (p * zdot).sum(-1, keepdim=True)
    s = y.sum(-1, keepdim=True)
    return p * u * (s * scale), u * (-scale)


def sgd_step_ref(w: Tensor, g: Tensor, lr: float) -> Tensor:
    """In place ``w -= lr * g`` (flat float32 buffers); returns ``w``."""
    return w.sub_(g, alpha=lr)


def reverse_step_ref(w: Tensor, g: Tensor | None, lam: Tensor, hv: Tensor, lr: float) -> None:
    """In place ``lam -= lr * hv`` and, if ``g`` is given, ``w += lr * g``."""
    lam.sub_(hv, alpha=lr)
    if g is not None:
        w.add_(g, alpha=lr)


def _conv_nhwc(xs: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return torch.nn.functional.conv2d(xs.permute(0, 3, 1, 2), w, b)


def conv_pool_ref(xs: Tensor, w: Tensor, b: Tensor | None, pool: int) -> tuple[Tensor, Tensor]:
    """xs [N, Hp, Wp, C] (zero-padded, channels last), w [O, C, kh, kw], b [O] or None ->
    (relu(max_pool2d(conv2d(x, w, b), pool)) [N, O, PH, PW], arg uint8 of the same shape)."""
    z = _conv_nhwc(xs, w, b)
    out, idx = torch.nn.functional.max_pool2d(z, pool, return_indices=True)
    h, v = idx // z.shape[3], idx % z.shape[3]
    arg = ((h % pool) * pool + v % pool).to(torch.uint8)
    return torch.relu(out), arg


def _at_index(arg: Tensor, ow: int, pool: int) -> Tensor:
    """Flat index into the [oh, ow] conv output of each pooled output's arg position."""
    n, o, ph, pw = arg.shape
    a = arg.long()
    rows = torch.arange(ph, device=arg.device).view(1, 1, ph, 1) * pool + a // pool
    cols = torch.arange(pw, device=arg.device).view(1, 1, 1, pw) * pool + a % pool
    return (rows * ow + cols).expand(n, o, ph, pw).reshape(n, o, ph * pw)


def conv_at_ref(xs: Tensor, w: Tensor, b: Tensor | None, pool: int, arg: Tensor) -> Tensor:
    """conv2d(x, w, b) at each output's arg position (no relu), shape of arg."""
    z = _conv_nhwc(xs, w, b)
    return z.flatten(2).gather(2, _at_index(arg, z.shape[3], pool)).view(arg.shape)


def conv_at_bwd_ref(gout, xs, w, pool: int, arg, need_dx: bool, gout2=None, w2=None):
    """(dw, db, dx or None) for the cotangent gout of conv_at_ref(xs, w, b, pool, arg): dw and db
    from gout; dx [N, Hp, Wp, C] = d<gout, conv_at(xs, w)>/dxs (+ d<gout2, conv_at(xs, w2)>/dxs
    when gout2 is given: the reverse pass needs W^T ddot + lam^T delta in one go)."""
    with torch.enable_grad():
        xr = xs.detach().requires_grad_(need_dx)
        wr = w.detach().requires_grad_(True)
        br = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device, requires_grad=True)
        z = conv_at_ref(xr, wr, br, pool, arg)
        if not need_dx:
            dw, db = torch.autograd.grad(z, (wr, br), gout)
            return dw, db, None
        dw, db, dx = torch.autograd.grad(z, (wr, br, xr), gout)
        if gout2 is not None:
            xr2 = xs.detach().requires_grad_(True)
            (dx2,) = torch.autograd.grad(conv_at_ref(xr2, w2.detach(), None, pool, arg), xr2, gout2)
            dx = dx + dx2
    return dw, db, dx


def im2col_ref(xs: Tensor, k, stride, dilation) -> Tensor:
    """xs [N, H, W, C] (channels last, already zero-padded) -> cols [N*OH*OW, kh*kw*C], columns in
    (kh, kw, c) order (the channels_last weight's), so a conv is ``cols @ W.view(O, -1).t()``."""
    n, h, w, c = xs.shape
    (kh, kw), (sh, sw), (dh, dw) = k, stride, dilation
    oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    s = xs.stride()
    cols = xs.as_strided((n, oh, ow, kh, kw, c), (s[0], s[1] * sh, s[2] * sw, s[1] * dh, s[2] * dw, s[3]))
    return cols.reshape(n * oh * ow, kh * kw * c)


def col2im_ref(cols: Tensor, shape, k, stride, padding, dilation) -> Tensor:
    """The input gradient of an im2col convolution: cols [N*OH*OW, kh*kw*C] (columns in (kh, kw, c)
    order, the channels_last weight's) summed back onto an input of ``shape`` = (N, C, H, W)."""
    n, c, h, w = shape
    kh, kw = k
    oh, ow = (
        (s + 2 * p - d * (q - 1) - 1) // st + 1
        for s, p, d, q, st in zip((h, w), padding, dilation, k, stride, strict=True)
    )
    cols = cols.view(n, oh * ow, kh, kw, c).permute(0, 4, 2, 3, 1).reshape(n, c * kh * kw, oh * ow)
    return torch.nn.functional.fold(cols, (h, w), (kh, kw), tuple(dilation), tuple(padding), tuple(stride))


# ---------------------------------------------------------------------------------------------
# Dispatch (one call site per op; FEDCOMPRESS_BACKEND / backend= as for every other op). The dtype
# that governs is the one every tensor argument shares (the C++ kernels read weights and inputs as
# float32 alike), so dispatch by the input's dtype alone cannot send a float64 weight to them.


def _dtype(op: str, **ts: Tensor | None) -> torch.dtype:
    """The one dtype of the tensor arguments, or ValueError naming the ones that differ."""
    given = {k: t.dtype for k, t in ts.items() if t is not None}
    if len(set(given.values())) > 1:
        got = ", ".join(f"{k}={str(d).replace('torch.', '')}" for k, d in given.items())
        raise ValueError(f"{op}: the tensor arguments must share one dtype, got {got}")
    return next(iter(given.values()))


def soft_ce(z: Tensor, y: Tensor, scale: float, backend: str | None = None):
    return _ops.get("synth_soft_ce", z.device, backend, _dtype("soft_ce", z=z, y=y))(z, y, scale)


def soft_ce_jvp(p: Tensor, y: Tensor, zdot: Tensor, scale: float, backend: str | None = None):
    dt = _dtype("soft_ce_jvp", p=p, y=y, zdot=zdot)
    return _ops.get("synth_soft_ce_jvp", p.device, backend, dt)(p, y, zdot, scale)


def sgd_step(w: Tensor, g: Tensor, lr: float, backend: str | None = None) -> Tensor:
    return _ops.get("synth_sgd_step", w.device, backend, _dtype("sgd_step", w=w, g=g))(w, g, lr)


def reverse_step(w: Tensor, g: Tensor | None, lam: Tensor, hv: Tensor, lr: float, backend: str | None = None):
    dt = _dtype("reverse_step", w=w, g=g, lam=lam, hv=hv)
    return _ops.get("synth_reverse_step", w.device, backend, dt)(w, g, lam, hv, lr)


def conv_pool(xs: Tensor, w: Tensor, b: Tensor | None, pool: int, backend: str | None = None):
    dt = _dtype("conv_pool", xs=xs, w=w, b=b)
    return _ops.get("synth_conv_pool", xs.device, backend, dt)(xs, w, b, pool)


def conv_at(xs: Tensor, w: Tensor, b: Tensor | None, pool: int, arg: Tensor, backend: str | None = None):
    dt = _dtype("conv_at", xs=xs, w=w, b=b)
    return _ops.get("synth_conv_at", xs.device, backend, dt)(xs, w, b, pool, arg)


def conv_at_bwd(gout, xs, w, pool: int, arg, need_dx: bool, gout2=None, w2=None, backend: str | None = None):
    dt = _dtype("conv_at_bwd", gout=gout, xs=xs, w=w, gout2=gout2, w2=w2)
    return _ops.get("synth_conv_at_bwd", xs.device, backend, dt)(gout, xs, w, pool, arg, need_dx, gout2, w2)


def im2col(xs: Tensor, k, stride, dilation, backend: str | None = None) -> Tensor:
    return _ops.get("synth_im2col", xs.device, backend, xs.dtype)(xs, k, stride, dilation)


def col2im(cols: Tensor, shape, k, stride, padding, dilation, backend: str | None = None) -> Tensor:
    return _ops.get("synth_col2im", cols.device, backend, cols.dtype)(cols, shape, k, stride, padding, dilation)


class Bound:
    """Every op above resolved once for a device, dtype and backend: the engine makes a few hundred
    op calls per hypergradient, all on buffers of its one dtype (syn_x's: weights, cotangents and
    activations are cast to it), so one dispatch per op and call is enough. A dtype an
    implementation does not declare (the C++ and Triton kernels: float32) runs on the reference.
    The conv/col2im ops have no Triton kernel; under ``backend="triton"`` they take the automatic
    choice."""

    _OPS = {
        "soft_ce": "synth_soft_ce",
        "soft_ce_jvp": "synth_soft_ce_jvp",
        "sgd_step": "synth_sgd_step",
        "reverse_step": "synth_reverse_step",
        "conv_pool": "synth_conv_pool",
        "conv_at": "synth_conv_at",
        "conv_at_bwd": "synth_conv_at_bwd",
        "col2im": "synth_col2im",
        "im2col": "synth_im2col",
    }

    def __init__(self, device, backend: str | None = None, dtype: torch.dtype = torch.float32):
        for attr, op in self._OPS.items():
            b = None if backend == "triton" and attr.startswith(("conv", "col2im", "im2col")) else backend
            setattr(self, attr, _ops.get(op, device, b, dtype))
