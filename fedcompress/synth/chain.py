"""Fast path of the hypergradient engine for chain networks (Conv2d/Linear/ReLU/MaxPool2d/flatten).

``compile_chain(model)`` traces the model with torch.fx; when its forward is a plain chain of the
supported layers it returns a list of layer objects, each with four hand-written passes:

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
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import nn

from . import ops

Tensor = torch.Tensor
_conv_bwd = torch.ops.aten.convolution_backward.default
_CL = torch.channels_last
_CL_MIN_BATCH = 16  # batches at least this big run channels_last (see Conv2d._fmt)
_threshold_bwd = torch.ops.aten.threshold_backward.default
_pool_bwd = torch.ops.aten.max_pool2d_with_indices_backward.default


class Unsupported(Exception):
    """The model is not a chain of supported layers (the generic engine is used instead)."""


def _pair(v) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(t) for t in v)
    if len(v) == 1:
        return (v[0], v[0])
    if len(v) != 2:
        raise Unsupported(f"2-d parameter expected, got {v}")
    return v


# ---------------------------------------------------------------------------------------------
# Layers


class Conv2d:
    """Two routes. Big (real) batches: mkldnn, channels_last. Small (synthetic, b-image) batches:
    im2col + GEMM, because mkldnn re-lays out the weight on every call, which dominates at that
    size (``bench/bench_synth.py`` times the engine built this way). The columns are ordered
    (kh, kw, c) like the channels_last weight in the flat buffer, so the weight is a [O, kh*kw*C]
    matrix view and the GEMM output [N*OH*OW, O] is the channels_last activation; the columns of a
    synthetic input are kept for the reverse pass (410 KB per step for the FedAvg CNN's conv2)."""

    has_params = True
    kernels: ops.Bound | None = None  # set per call by the engine (im2col, col2im are ops)
    _step = None  # (saved, columns, adot, its columns) from tangent_forward to tangent_backward

    def __init__(self, mod: nn.Conv2d, prefix: str):
        if mod.groups != 1 or mod.padding_mode != "zeros" or isinstance(mod.padding, str):
            raise Unsupported("Conv2d with groups, padding modes or string padding")
        self.w = prefix + "weight"
        self.b = prefix + "bias" if mod.bias is not None else None
        self.stride, self.padding, self.dilation = _pair(mod.stride), _pair(mod.padding), _pair(mod.dilation)
        self.k = _pair(mod.kernel_size)
        self.in_channels = mod.in_channels
        self.bias_sizes = [mod.out_channels] if self.b else None
        self.dense = [n for n in (self.w, self.b) if n]
        self.lowrank: list[str] = []

    # --- big batches: mkldnn. A channels_last weight makes it return channels_last activations (an
    # input with C=1 is ambiguous), which the max-pool after it needs to be fast.
    def _conv(self, a, w, b):
        z = F.conv2d(a, w.contiguous(memory_format=_CL), b, self.stride, self.padding, self.dilation)
        return z.contiguous(memory_format=_CL)  # with C_in = 1 mkldnn still answers NCHW

    def _bwd(self, d, a, w, mask):
        w = w.contiguous(memory_format=_CL)
        bias = self.bias_sizes if mask[2] else None
        return _conv_bwd(d, a, w, bias, self.stride, self.padding, self.dilation, False, [0, 0], 1, list(mask))

    # --- small batches: im2col + GEMM
    def _im2col(self, a):
        a = a.permute(0, 2, 3, 1)
        ph, pw = self.padding
        if ph or pw:
            a = F.pad(a, (0, 0, pw, pw, ph, ph))
        n, h, w, _ = a.shape
        (kh, kw), (sh, sw), (dh, dw) = self.k, self.stride, self.dilation
        oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
        if oh < 1 or ow < 1:  # what F.conv2d would raise (the engine turns it into a ValueError)
            raise RuntimeError(f"conv input {tuple(a.shape)} (NHWC, padded) smaller than the kernel")
        return self.kernels.im2col(a.contiguous(), self.k, self.stride, self.dilation), (n, oh, ow)

    @staticmethod
    def _wmat(w):
        return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)  # a view for the flat buffer's layout

    @staticmethod
    def _rows(d):
        return d.permute(0, 2, 3, 1).reshape(-1, d.shape[1])  # [N*OH*OW, O]; a view if channels_last

    @staticmethod
    def _gemm(cols, w, b):
        w = Conv2d._wmat(w).t()
        return torch.addmm(b, cols, w) if b is not None else cols @ w

    def _col2im(self, dcols, a):
        return self.kernels.col2im(dcols, a.shape, self.k, self.stride, self.padding, self.dilation)

    def _wgemm(self, left, right, sink, P, more=None):
        """Weight gradient left @ right (+ more[0] @ more[1]) as [O, kh*kw*C]: written straight
        into the sink's buffer when it has one (returns None), else returned as a weight tensor
        (saves a copy into the flat buffer, two per step)."""
        dst = sink.target(self.w)
        if dst is not None:
            dst = self._wmat(dst)
            torch.mm(left, right, out=dst)
        g = dst if dst is not None else left @ right
        if more is not None:
            g.addmm_(*more)
        if dst is not None:
            return None
        o, c, kh, kw = P[self.w].shape
        return g.view(o, kh, kw, c).permute(0, 3, 1, 2)

    def forward(self, a, P):
        b = P[self.b] if self.b else None
        if a.shape[0] >= _CL_MIN_BATCH:
            return self._conv(a, P[self.w], b), (a, None, None)
        cols, (n, oh, ow) = self._im2col(a)
        z = self._gemm(cols, P[self.w], b).view(n, oh, ow, -1).permute(0, 3, 1, 2)
        return z, [a, cols, (n, oh, ow)]

    # The columns are dropped after the step's backward and rebuilt in the reverse pass (one C++
    # im2col, a memcpy per tap): keeping m x 410 KB costs fresh pages (page faults) every call.
    def _cols(self, saved):
        cols = saved[1]
        return cols if cols is not None else self._im2col(saved[0])[0]

    def backward(self, d, saved, P, need_input, sink):
        a, cols, shape = saved
        if shape is not None:
            saved[1] = None
        if cols is None:
            gi, gw, gb = self._bwd(d, a, P[self.w], (need_input, True, self.b is not None))
        else:
            rows = self._rows(d)
            gw = self._wgemm(rows.t(), cols, sink, P)
            gb = rows.sum(0) if self.b else None
            gi = self._col2im(rows @ self._wmat(P[self.w]), a) if need_input else None
        if gw is not None:
            sink.dense(self.w, gw)
        if self.b:
            sink.dense(self.b, gb)
        return gi

    def tangent_forward(self, adot, saved, P, L):
        a, _, shape = saved
        lb = L[self.b] if self.b else None
        if shape is None:
            zd = self._conv(a, L[self.w], lb)
            return zd if adot is None else zd + self._conv(adot, P[self.w], None)
        cols = self._cols(saved)
        z2 = self._gemm(cols, L[self.w], lb)
        # tangent_backward of the same step needs the same columns
        self._step = (saved, cols, adot, None if adot is None else self._im2col(adot)[0])
        if adot is not None:
            z2.addmm_(self._step[3], self._wmat(P[self.w]).t())
        return z2.view(*shape, -1).permute(0, 3, 1, 2)

    def tangent_backward(self, dd, d, saved, adot, P, L, need_input, sink):
        # H lam = ddot (x) a + delta (x) adot;  input part: W^T ddot + lam^T delta
        a, _, shape = saved
        if shape is None:
            _, hw, hb = self._bwd(dd, a, P[self.w], (False, True, self.b is not None))
            if adot is not None:
                hw = hw + self._bwd(d, adot, L[self.w], (False, True, False))[1]
            gi = None
            if need_input:
                gi = self._bwd(dd, a, P[self.w], (True, False, False))[0]
                gi = gi + self._bwd(d, a, L[self.w], (True, False, False))[0]
        else:
            rdd, rd = self._rows(dd), self._rows(d)
            step, self._step = self._step, None
            if step is not None and step[0] is saved and step[2] is adot:
                cols, cols_adot = step[1], step[3]
            else:
                cols, cols_adot = self._cols(saved), None if adot is None else self._im2col(adot)[0]
            more = None if adot is None else (rd.t(), cols_adot)
            hw, hb = self._wgemm(rdd.t(), cols, sink, P, more), rdd.sum(0) if self.b else None
            gi = None
            if need_input:  # one GEMM pair (in place: addmm would copy [N*OH*OW, K] first) + col2im
                gi = self._col2im((rdd @ self._wmat(P[self.w])).addmm_(rd, self._wmat(L[self.w])), a)
        if hw is not None:
            sink.dense(self.w, hw)
        if self.b:
            sink.dense(self.b, hb)
        return gi


class LowRank:
    """A Linear weight as ``base + sum_r D[r]^T A[r]`` over the first ``k`` rows of two factor
    buffers (D pre-scaled), never materialised: an SGD step on b samples changes the weight by
    ``-lr delta^T a`` (rank b) and a reverse step changes its cotangent by rank 2b, so
    ``x @ W_j^T = x @ W_0^T + (x @ A^T) @ D`` costs one pass over W_0 (read only, the caller's
    tensor) plus a few [b, k] products. Against updating W (and its cotangent) in place this saves
    a read+write pass of the 2 MB fc1 matrix per forward step and two per reverse step, and
    "rebuilding" w_j in the reverse pass is dropping rows (exact, no re-added rounding)."""

    def __init__(self, base: Tensor, rows: int):
        self.base, self.k = base, 0
        self.D = base.new_empty((rows, base.shape[0]))
        self.A = base.new_empty((rows, base.shape[1]))

    def append(self, d: Tensor, a: Tensor, alpha: float) -> None:
        """M += alpha d^T a"""
        n = d.shape[0]
        torch.mul(d, alpha, out=self.D[self.k : self.k + n])
        self.A[self.k : self.k + n].copy_(a)
        self.k += n

    def pop(self, n: int) -> None:
        self.k -= n

    def linear(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        """x @ M^T (+ bias)"""
        y = F.linear(x, self.base, bias)
        return y.addmm_(x @ self.A[: self.k].t(), self.D[: self.k]) if self.k else y

    def rmm(self, x: Tensor) -> Tensor:
        """x @ M"""
        y = x @ self.base
        return y.addmm_(x @ self.D[: self.k].t(), self.A[: self.k]) if self.k else y

    def dense(self) -> Tensor:
        return torch.addmm(self.base, self.D[: self.k].t(), self.A[: self.k]) if self.k else self.base.clone()


def _linear(x, w, bias=None):
    return w.linear(x, bias) if isinstance(w, LowRank) else F.linear(x, w, bias)


def _rmm(x, w):
    return w.rmm(x) if isinstance(w, LowRank) else x @ w


class Linear:
    has_params = True

    def __init__(self, mod: nn.Linear, prefix: str):
        self.w = prefix + "weight"
        self.b = prefix + "bias" if mod.bias is not None else None
        self.dense = [self.b] if self.b else []
        self.lowrank = [self.w]

    def forward(self, a, P):
        if a.dim() != 2:
            raise Unsupported("Linear on a non-2-d input")
        return _linear(a, P[self.w], P[self.b] if self.b else None), a

    def backward(self, d, a, P, need_input, sink):
        gi = _rmm(d, P[self.w]) if need_input else None
        sink.lowrank(self.w, d, a)
        if self.b:
            sink.dense(self.b, d.sum(0))
        return gi

    def tangent_forward(self, adot, a, P, L):
        zd = _linear(a, L[self.w], L[self.b] if self.b else None)
        if adot is not None:
            zd = zd + _linear(adot, P[self.w])
        return zd

    def tangent_backward(self, dd, d, a, adot, P, L, need_input, sink):
        gi = _rmm(dd, P[self.w]).add_(_rmm(d, L[self.w])) if need_input else None  # before L[w] changes
        if adot is None:
            sink.lowrank_hv(self.w, dd, a)
        else:
            sink.lowrank_hv(self.w, torch.cat([dd, d]), torch.cat([a, adot]))
        if self.b:
            sink.dense(self.b, dd.sum(0))
        return gi


class ReLU:
    has_params = False
    dense: list[str] = []
    lowrank: list[str] = []

    # saved: the output r; threshold_backward(d, r, 0) = d where r > 0 (no bool->float mask copy)
    def forward(self, a, P):
        r = F.relu(a)
        return r, r

    def backward(self, d, r, P, need_input, sink):
        return _threshold_bwd(d, r, 0)

    def tangent_forward(self, adot, r, P, L):
        return None if adot is None else _threshold_bwd(adot, r, 0)

    def tangent_backward(self, dd, d, r, adot, P, L, need_input, sink):
        return _threshold_bwd(dd, r, 0)


class MaxPool2d:
    has_params = False
    dense: list[str] = []
    lowrank: list[str] = []

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
        self.k = _pair(kernel_size)
        self.s = _pair(stride) if stride is not None and stride != [] else self.k
        self.p, self.d, self.ceil = _pair(padding), _pair(dilation), bool(ceil_mode)

    # CPU: max_pool2d_with_indices is vectorised over channels on channels_last input (NCHW walks
    # each plane), so the chain runs 4-d activations channels_last.
    def forward(self, a, P):
        a = a.contiguous(memory_format=_CL)  # even with the copy, cheaper than pooling NCHW
        out, idx = F.max_pool2d(a, self.k, self.s, self.p, self.d, self.ceil, return_indices=True)
        return out, (idx, a)

    def _bwd(self, d, saved):
        idx, a = saved
        return _pool_bwd(d, a, self.k, self.s, self.p, self.d, self.ceil, idx)

    def backward(self, d, saved, P, need_input, sink):
        return self._bwd(d, saved)

    def tangent_forward(self, adot, saved, P, L):
        if adot is None:
            return None
        idx = saved[0]
        n, c = idx.shape[:2]
        return adot.reshape(n, c, -1).gather(2, idx.reshape(n, c, -1)).view(idx.shape)

    def tangent_backward(self, dd, d, saved, adot, P, L, need_input, sink):
        return self._bwd(dd, saved)


class ReluMaxPool2d(MaxPool2d):
    """relu then max-pool, computed as max-pool then relu: the same values, and the same gradient
    (the window's argmax of z is the argmax of relu(z) whenever the max is > 0; otherwise the relu
    mask is 0 either way), but the relu and its mask run on the pooled tensor, 4x smaller for
    2x2 pooling: on the real batch that removes two passes over [256, 32, 24, 24]."""

    def forward(self, a, P):
        a = a.contiguous(memory_format=_CL)
        pooled, idx = F.max_pool2d(a, self.k, self.s, self.p, self.d, self.ceil, return_indices=True)
        out = F.relu(pooled)
        return out, (idx, a, out)

    def _bwd(self, d, saved):
        idx, a, out = saved
        return _pool_bwd(_threshold_bwd(d, out, 0), a, self.k, self.s, self.p, self.d, self.ceil, idx)

    def tangent_forward(self, adot, saved, P, L):
        if adot is None:
            return None
        return _threshold_bwd(super().tangent_forward(adot, saved, P, L), saved[2], 0)


class ConvReluPool:
    """Conv2d (stride 1, few input channels) + ReLU + non-overlapping MaxPool2d as one layer, on the
    fused ops ``synth_conv_pool`` / ``synth_conv_at`` / ``synth_conv_at_bwd`` (ops.py; C++ kernel in
    csrc/synth.cpp). The pre-pool map is never stored: the forward keeps the pooled output and, per
    output, which window element was the max; with that fixed the layer is linear in (x, W, b)
    (``conv_at``) times the relu mask, so the backward, tangent forward and tangent backward are
    ``conv_at`` and its gradients. Unfused, the FedAvg CNN's first layer (1 -> 32, 5x5, pool 2)
    would materialise, zero-fill and scatter [n, 32, 24, 24] per real chunk of n images."""

    has_params = True
    lowrank: list[str] = []
    kernels: ops.Bound | None = None  # set per call by the engine

    def __init__(self, conv: Conv2d, pool: MaxPool2d):
        self.conv, self.pool = conv, pool.k[0]
        self.w, self.b, self.dense = conv.w, conv.b, conv.dense

    @staticmethod
    def fits(conv, pool) -> bool:
        # few input channels only: with C_in * kh * kw in the hundreds (conv2: 800) mkldnn/GEMM win
        return (
            conv.stride == (1, 1)
            and conv.dilation == (1, 1)
            and pool.k[0] == pool.k[1] == pool.s[0] == pool.s[1]
            and 1 <= pool.k[0] <= 15
            and pool.p == (0, 0)
            and pool.d == (1, 1)
            and not pool.ceil
            and conv.in_channels * conv.k[0] * conv.k[1] <= 64
        )

    def _prepare(self, a):
        kh, kw = self.conv.k
        ph, pw = self.conv.padding
        if (
            a.dim() != 4
            or a.shape[1] != self.conv.in_channels
            or (a.shape[2] + 2 * ph - kh + 1) // self.pool < 1
            or (a.shape[3] + 2 * pw - kw + 1) // self.pool < 1
        ):  # what F.conv2d / F.max_pool2d would raise (the engine turns it into a ValueError)
            raise RuntimeError(
                f"input of shape {tuple(a.shape)} does not fit conv {self.conv.in_channels}->? "
                f"{kh}x{kw} padding {self.conv.padding} + max-pool {self.pool}"
            )
        xs = a.permute(0, 2, 3, 1)
        ph, pw = self.conv.padding
        if ph or pw:
            xs = F.pad(xs, (0, 0, pw, pw, ph, ph))
        return xs.contiguous()

    def _crop(self, dxs, a):
        ph, pw = self.conv.padding
        return dxs[:, ph : ph + a.shape[2], pw : pw + a.shape[3]].permute(0, 3, 1, 2)

    def forward(self, a, P):
        xs = self._prepare(a)
        b = P[self.b] if self.b else None
        out, arg = self.kernels.conv_pool(xs, P[self.w], b, self.pool)
        return out, (a, xs, out, arg)

    def backward(self, d, saved, P, need_input, sink):
        a, xs, out, arg = saved
        g = _threshold_bwd(d, out, 0)
        gw, gb, gi = self.kernels.conv_at_bwd(g, xs, P[self.w], self.pool, arg, need_input)
        sink.dense(self.w, gw)
        if self.b:
            sink.dense(self.b, gb)
        return self._crop(gi, a) if need_input else None

    def tangent_forward(self, adot, saved, P, L):
        a, xs, out, arg = saved
        zd = self.kernels.conv_at(xs, L[self.w], L[self.b] if self.b else None, self.pool, arg)
        if adot is not None:
            zd = zd + self.kernels.conv_at(self._prepare(adot), P[self.w], None, self.pool, arg)
        return _threshold_bwd(zd, out, 0)

    def tangent_backward(self, dd, d, saved, adot, P, L, need_input, sink):
        a, xs, out, arg = saved
        # H lam = ddot (x) a + delta (x) adot;  input part: W^T ddot + lam^T delta (one call)
        gdd, gd = _threshold_bwd(dd, out, 0), _threshold_bwd(d, out, 0)
        hw, hb, gi = self.kernels.conv_at_bwd(
            gdd, xs, P[self.w], self.pool, arg, need_input, gd if need_input else None, L[self.w]
        )
        if adot is not None:
            xd = self._prepare(adot)
            hw = hw + self.kernels.conv_at_bwd(gd, xd, L[self.w], self.pool, arg, False)[0]
        sink.dense(self.w, hw)
        if self.b:
            sink.dense(self.b, hb)
        return self._crop(gi, a) if need_input else None


def _fuse(layers: list) -> list:
    out: list = []
    for layer in layers:
        if type(layer) is MaxPool2d and out and type(out[-1]) is ReLU:
            fused = ReluMaxPool2d.__new__(ReluMaxPool2d)
            fused.__dict__.update(layer.__dict__)
            out[-1] = fused
        else:
            out.append(layer)
    fused: list = []
    for layer in out:  # conv (few input channels) + relu-pool -> ConvReluPool
        prev = fused[-1] if fused else None
        if type(layer) is ReluMaxPool2d and type(prev) is Conv2d and ConvReluPool.fits(prev, layer):
            fused[-1] = ConvReluPool(fused[-1], layer)
        else:
            fused.append(layer)
    return fused


class Flatten:
    has_params = False
    dense: list[str] = []
    lowrank: list[str] = []

    def forward(self, a, P):
        return a.reshape(a.shape[0], -1), a.shape

    def backward(self, d, shape, P, need_input, sink):
        return d.reshape(shape)

    def tangent_forward(self, adot, shape, P, L):
        return None if adot is None else adot.reshape(adot.shape[0], -1)

    def tangent_backward(self, dd, d, shape, adot, P, L, need_input, sink):
        return dd.reshape(shape)


# ---------------------------------------------------------------------------------------------
# Tracing a model into a chain


def compile_chain(model: nn.Module) -> list | None:
    """The model as a list of layers, or None when it is not a plain chain of supported layers."""
    try:
        return _compile(model)
    except Unsupported:
        return None
    except Exception:  # tracing failed (data-dependent control flow, ...): generic engine
        return None


def _compile(model: nn.Module) -> list:
    import torch.fx as fx

    if any(True for _ in model.buffers()):
        raise Unsupported("buffers")
    gm = fx.symbolic_trace(model)
    mods = dict(model.named_modules())
    layers: list = []
    prev = None  # the node holding the current activation
    sizes = set()  # nodes that are x.size(0) / x.shape[0] of the current activation
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            if prev is not None:
                raise Unsupported("more than one input")
            prev = n
            continue
        if n.op == "output":
            if n.args[0] is not prev:
                raise Unsupported("output is not the last activation")
            break
        if n.op == "get_attr":
            raise Unsupported("get_attr")
        tensor_args = [a for a in n.args if isinstance(a, fx.Node)]
        if n.op == "call_method" and n.target == "size" and n.args[0] is prev:
            sizes.add(n)
            continue
        if n.op == "call_function" and n.target is getattr and n.args[0] is prev and n.args[1] == "shape":
            sizes.add(n)
            continue
        if n.op == "call_function" and n.target is operator.getitem and n.args[0] in sizes and n.args[1] == 0:
            sizes.add(n)
            continue
        if (
            not tensor_args
            or tensor_args[0] is not prev
            or any(a is not prev and a not in sizes for a in tensor_args)
        ):
            raise Unsupported(f"node {n} is not a chain step")
        layers.append(_layer_for(n, mods, sizes))
        prev = n
    layers = _fuse(layers)
    if not layers or not any(layer.has_params for layer in layers):
        raise Unsupported("no parameter layers")
    names = [p for layer in layers for p in layer.dense + layer.lowrank]
    if len(names) != len(set(names)) or set(names) != {k for k, _ in model.named_parameters()}:
        raise Unsupported("parameters shared or unused")
    return layers


def _layer_for(n, mods, sizes):
    if n.op == "call_module":
        mod = mods[n.target]
        prefix = n.target + "."
        if type(mod) is nn.Conv2d:
            return Conv2d(mod, prefix)
        if type(mod) is nn.Linear:
            return Linear(mod, prefix)
        if type(mod) is nn.ReLU:
            return ReLU()
        if type(mod) is nn.MaxPool2d and not mod.return_indices:
            return MaxPool2d(mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.ceil_mode)
        if type(mod) is nn.Flatten and mod.start_dim == 1 and mod.end_dim == -1:
            return Flatten()
        if type(mod) is nn.Identity or (type(mod) is nn.Dropout and mod.p == 0):
            return _Identity()
        raise Unsupported(f"module {type(mod).__name__}")
    if n.op == "call_function":
        if n.target in (F.relu, torch.relu) and not n.kwargs.get("inplace", False) and len(n.args) == 1:
            return ReLU()
        if n.target in (F.max_pool2d, torch.max_pool2d):
            names = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
            kw = dict(zip(names, n.args, strict=False))
            kw.update(n.kwargs)
            if kw.get("return_indices"):
                raise Unsupported("return_indices")
            kw.pop("input")
            kw.pop("return_indices", None)
            return MaxPool2d(**kw)
        if n.target is torch.flatten and _flatten_args(n.args[1:], n.kwargs):
            return Flatten()
        raise Unsupported(f"function {n.target}")
    if n.op == "call_method":
        if n.target == "relu" and len(n.args) == 1:
            return ReLU()
        if n.target == "flatten" and _flatten_args(n.args[1:], n.kwargs):
            return Flatten()
        if n.target in ("view", "reshape"):
            shape = n.args[1:]
            if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
                shape = tuple(shape[0])
            if len(shape) == 2 and shape[1] == -1 and (shape[0] in sizes or shape[0] == -1):
                return Flatten()
        raise Unsupported(f"method {n.target}")
    raise Unsupported(n.op)


def _flatten_args(args, kwargs) -> bool:
    start = args[0] if args else kwargs.get("start_dim", 0)
    end = args[1] if len(args) > 1 else kwargs.get("end_dim", -1)
    return start == 1 and end == -1


class _Identity(Flatten):
    def forward(self, a, P):
        return a, None

    def backward(self, d, s, P, need_input, sink):
        return d

    def tangent_forward(self, adot, s, P, L):
        return adot

    def tangent_backward(self, dd, d, s, adot, P, L, need_input, sink):
        return dd


# ---------------------------------------------------------------------------------------------
# Flat parameter layout and gradient sinks


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


def _forward(layers, P, x):
    saved = []
    a = x.contiguous(memory_format=_CL) if x.dim() == 4 and x.shape[0] >= _CL_MIN_BATCH else x
    for layer in layers:
        a, s = layer.forward(a, P)
        saved.append(s)
    return a, saved


def _backward(layers, P, saved, delta, sink, need_input0):
    """Back through the layers; returns the delta at each parametric layer's output (by index)."""
    deltas = {}
    d = delta
    for i in range(len(layers) - 1, -1, -1):
        layer = layers[i]
        if layer.has_params:
            deltas[i] = d
        if i == 0 and not need_input0:
            layer.backward(d, saved[i], P, False, sink)
            break
        d = layer.backward(d, saved[i], P, True, sink)
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
    K = ops.Bound(syn_x.device, backend, syn_x.dtype)
    for layer in layers:  # conv layers call ops themselves (the plan is cached per model)
        if hasattr(layer, "kernels"):
            layer.kernels = K
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
        z, saved = _forward(layers, P, x)
        if j == 0:
            check_logits(z, y)
        _, p, delta = K.soft_ce(z, y, scale)
        row = g_hist[j if keep else 0]
        sink = _StepSink(lay.views(row))
        deltas = _backward(layers, P, saved, delta, sink, need_input0=False)
        K.sgd_step(wd, row, lr)
        for name, d, a in sink.factors:
            P[name].append(d, a, -lr)
        if keep:
            caches.append((saved, deltas, p, sink.factors))
    if not keep:  # the caller wants w_m itself
        for n in lay.lowrank:
            P[n] = P[n].dense()
    return lay, P, wd, (g_hist, caches, K)


def hypergradient_chain(layers, params, syn_x, syn_y, lr, real_x, real_y, real_chunk=64, backend=None):
    m, b = syn_x.shape[:2]
    lay, P, wd, (g_hist, caches, K) = unroll_chain(layers, params, syn_x, syn_y, lr, keep=True, backend=backend)
    dt, dev = syn_x.dtype, syn_x.device
    C = syn_y.shape[-1]

    # real batch at w_m: L = mean CE; dL/dw_m accumulated chunk by chunk into lam
    lam_d = torch.zeros(lay.numel, dtype=dt, device=dev)
    L = lay.views(lam_d)
    for n in lay.lowrank:
        L[n] = LowRank(torch.empty(P[n].base.shape, dtype=dt, device=dev), 2 * m * b)
    n_real = real_x.shape[0]
    sink = _RealSink(L, fresh=lay.lowrank)  # the first chunk writes the Linear weights' buffers
    P_m = {**P, **{n: P[n].dense() for n in lay.lowrank}}  # the real batch's big GEMMs want W_m
    loss = torch.zeros((), dtype=dt, device=dev)
    for i in range(0, n_real, real_chunk):
        xr = real_x[i : i + real_chunk]
        yr = F.one_hot(real_y[i : i + real_chunk], C).to(dt)
        z, saved = _forward(layers, P_m, xr)
        lc, _, delta = K.soft_ce(z, yr, 1.0 / n_real)
        loss += lc
        _backward(layers, P_m, saved, delta, sink, need_input0=False)
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
            ad = layer.tangent_forward(ad, saved[i], P, L)
        dd, gyd = K.soft_ce_jvp(p, syn_y[j], ad, scale)
        for i in range(len(layers) - 1, -1, -1):
            dd = layers[i].tangent_backward(dd, deltas.get(i), saved[i], adots[i], P, L, True, hsink)
        torch.mul(dd, -lr, out=gx[j])
        torch.mul(gyd, -lr, out=gy[j])
        caches[j] = None
        K.reverse_step(wd, g_hist[j - 1] if j else None, lam_d, hv, lr)
        if j:
            for name, d, _ in caches[j - 1][3]:
                P[name].pop(d.shape[0])
    return loss, gx, gy
