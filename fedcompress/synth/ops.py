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
- ``im2col``: channels_last columns of a zero-padded input (C++: a memcpy per tap; 0.02 ms vs
  0.19 ms for torch's strided copy, conv2's input on 2 images).
- ``col2im``: the input gradient of a convolution run as im2col + GEMM (channels_last columns);
  the engine's small-batch convolutions (C++: 0.01 ms vs 0.22 ms for conv_transpose2d, conv2 of
  the FedAvg CNN on 2 images, after its GEMM).
These five have a C++ kernel (``csrc/synth.cpp``, float32 CPU tensors): the [N, O, H, W] map
before pooling is never materialised (see there for why).
"""

from __future__ import annotations

import torch

from .. import _ops

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


def _cpp_ok(*ts) -> bool:
    return all(t is None or (t.dtype == torch.float32 and t.device.type == "cpu") for t in ts)


def _np(t: Tensor):
    return t.contiguous().numpy()


def _ohwc(w: Tensor):
    return _np(w.permute(0, 2, 3, 1))  # a view of the engine's flat buffer (its conv layout)


def _bias(b: Tensor | None):
    return _np(b) if b is not None else _EMPTY


_EMPTY = torch.empty(0).numpy()


def _pooled(xs: Tensor, w: Tensor, pool: int, dtype) -> Tensor:
    ph, pw = (xs.shape[1] - w.shape[2] + 1) // pool, (xs.shape[2] - w.shape[3] + 1) // pool
    return torch.empty((xs.shape[0], ph, pw, w.shape[0]), dtype=dtype)  # NHWC; returned as NCHW views


def _arg_nhwc(arg: Tensor):
    return _np(arg.permute(0, 2, 3, 1))


def conv_pool_cpp(xs: Tensor, w: Tensor, b: Tensor | None, pool: int):
    if not _cpp_ok(xs, w, b):  # the kernel is float32-only
        return conv_pool_ref(xs, w, b, pool)
    out, arg = _pooled(xs, w, pool, torch.float32), _pooled(xs, w, pool, torch.uint8)
    _ops.native().synth_conv_pool(_np(xs), _ohwc(w), _bias(b), pool, out.numpy(), arg.numpy(), torch.get_num_threads())
    return out.permute(0, 3, 1, 2), arg.permute(0, 3, 1, 2)


def conv_at_cpp(xs: Tensor, w: Tensor, b: Tensor | None, pool: int, arg: Tensor) -> Tensor:
    if not _cpp_ok(xs, w, b):
        return conv_at_ref(xs, w, b, pool, arg)
    out = _pooled(xs, w, pool, torch.float32)
    _ops.native().synth_conv_at(_np(xs), _ohwc(w), _bias(b), pool, _arg_nhwc(arg), out.numpy(), torch.get_num_threads())
    return out.permute(0, 3, 1, 2)


def conv_at_bwd_cpp(gout, xs, w, pool: int, arg, need_dx: bool, gout2=None, w2=None):
    if not _cpp_ok(gout, xs, w, gout2, w2):
        return conv_at_bwd_ref(gout, xs, w, pool, arg, need_dx, gout2, w2)
    dw = torch.empty((w.shape[0], w.shape[2], w.shape[3], w.shape[1]), dtype=torch.float32)
    dx = torch.empty_like(xs, memory_format=torch.contiguous_format) if need_dx else None
    two = need_dx and gout2 is not None
    _ops.native().synth_conv_at_bwd(
        _np(gout.permute(0, 2, 3, 1)),
        _np(xs),
        _ohwc(w),
        pool,
        _arg_nhwc(arg),
        dw.numpy(),
        dx.numpy() if need_dx else None,
        _np(gout2.permute(0, 2, 3, 1)) if two else None,
        _ohwc(w2) if two else None,
        torch.get_num_threads(),
    )
    return dw.permute(0, 3, 1, 2), gout.sum((0, 2, 3)), dx


def im2col_ref(xs: Tensor, k, stride, dilation) -> Tensor:
    """xs [N, H, W, C] (channels last, already zero-padded) -> cols [N*OH*OW, kh*kw*C], columns in
    (kh, kw, c) order (the channels_last weight's), so a conv is ``cols @ W.view(O, -1).t()``."""
    n, h, w, c = xs.shape
    (kh, kw), (sh, sw), (dh, dw) = k, stride, dilation
    oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    s = xs.stride()
    cols = xs.as_strided((n, oh, ow, kh, kw, c), (s[0], s[1] * sh, s[2] * sw, s[1] * dh, s[2] * dw, s[3]))
    return cols.reshape(n * oh * ow, kh * kw * c)


def im2col_cpp(xs: Tensor, k, stride, dilation) -> Tensor:
    if not _cpp_ok(xs):
        return im2col_ref(xs, k, stride, dilation)
    n, h, w, c = xs.shape
    (kh, kw), (sh, sw), (dh, dw) = k, stride, dilation
    oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    cols = torch.empty((n * oh * ow, kh * kw * c), dtype=torch.float32)
    _ops.native().synth_im2col(_np(xs), kh, kw, tuple(stride), tuple(dilation), cols.numpy(), torch.get_num_threads())
    return cols


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


def col2im_cpp(cols: Tensor, shape, k, stride, padding, dilation) -> Tensor:
    if not _cpp_ok(cols):
        return col2im_ref(cols, shape, k, stride, padding, dilation)
    n, c, h, w = shape
    dx = torch.empty((n, h, w, c), dtype=torch.float32)
    _ops.native().synth_col2im(
        _np(cols), k[0], k[1], tuple(stride), tuple(padding), tuple(dilation), dx.numpy(), torch.get_num_threads()
    )
    return dx.permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------
# Dispatch (one call site per op; FEDCOMPRESS_BACKEND / backend= as for every other op)


def soft_ce(z: Tensor, y: Tensor, scale: float, backend: str | None = None):
    return _ops.get("synth_soft_ce", z.device, backend)(z, y, scale)


def soft_ce_jvp(p: Tensor, y: Tensor, zdot: Tensor, scale: float, backend: str | None = None):
    return _ops.get("synth_soft_ce_jvp", p.device, backend)(p, y, zdot, scale)


def sgd_step(w: Tensor, g: Tensor, lr: float, backend: str | None = None) -> Tensor:
    return _ops.get("synth_sgd_step", w.device, backend)(w, g, lr)


def reverse_step(w: Tensor, g: Tensor | None, lam: Tensor, hv: Tensor, lr: float, backend: str | None = None):
    return _ops.get("synth_reverse_step", w.device, backend)(w, g, lam, hv, lr)


def conv_pool(xs: Tensor, w: Tensor, b: Tensor | None, pool: int, backend: str | None = None):
    return _ops.get("synth_conv_pool", xs.device, backend)(xs, w, b, pool)


def conv_at(xs: Tensor, w: Tensor, b: Tensor | None, pool: int, arg: Tensor, backend: str | None = None):
    return _ops.get("synth_conv_at", xs.device, backend)(xs, w, b, pool, arg)


def conv_at_bwd(gout, xs, w, pool: int, arg, need_dx: bool, gout2=None, w2=None, backend: str | None = None):
    return _ops.get("synth_conv_at_bwd", xs.device, backend)(gout, xs, w, pool, arg, need_dx, gout2, w2)


def col2im(cols: Tensor, shape, k, stride, padding, dilation, backend: str | None = None) -> Tensor:
    return _ops.get("synth_col2im", cols.device, backend)(cols, shape, k, stride, padding, dilation)


class Bound:
    """Every op above resolved once for a device and backend: the engine makes ~200 op calls per
    hypergradient, and dispatching each one (``_ops.get``, two env lookups) cost ~3 ms of 0.2 s.
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

    def __init__(self, device, backend: str | None = None):
        for attr, op in self._OPS.items():
            b = None if backend == "triton" and attr.startswith(("conv", "col2im", "im2col")) else backend
            setattr(self, attr, _ops.get(op, device, b))


def im2col(xs: Tensor, k, stride, dilation, backend: str | None = None) -> Tensor:
    return _ops.get("synth_im2col", xs.device, backend)(xs, k, stride, dilation)
