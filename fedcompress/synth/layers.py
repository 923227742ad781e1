"""The layers of the chain engine (``chain.py``), each implementing ``layer.Layer``'s four passes.

``Conv2d``, ``Linear`` (its weight a ``LowRank``), ``ReLU``, ``MaxPool2d``, ``Flatten``, ``Identity``;
and two fusions ``fuse`` makes after tracing: ``ReluMaxPool2d`` (relu then pool, computed as pool then
relu) and ``ConvReluPool`` (a small-C_in conv + relu + pool on the C++ ops). A layer object holds
configuration only; per-call state is passed per call (``saved``, ``K``: see ``layer.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layer import Unsupported, pair

Tensor = torch.Tensor
_conv_bwd = torch.ops.aten.convolution_backward.default
_CL = torch.channels_last
CL_MIN_BATCH = 16  # batches at least this big run channels_last (mkldnn; see Conv2d)
_threshold_bwd = torch.ops.aten.threshold_backward.default
_pool_bwd = torch.ops.aten.max_pool2d_with_indices_backward.default


class Conv2d:
    """Two routes. Big (real) batches: mkldnn, channels_last. Small (synthetic, b-image) batches:
    im2col + GEMM, because mkldnn re-lays out the weight on every call, which dominates at that
    size (``bench/bench_synth.py`` times the engine built this way). The columns are ordered
    (kh, kw, c) like the channels_last weight in the flat buffer, so the weight is a [O, kh*kw*C]
    matrix view and the GEMM output [N*OH*OW, O] is the channels_last activation; the columns of a
    synthetic input live until the step's backward (410 KB per step for the FedAvg CNN's conv2) and
    are rebuilt in the reverse pass."""

    has_params = True

    def __init__(self, mod: nn.Conv2d, prefix: str):
        if mod.groups != 1 or mod.padding_mode != "zeros" or isinstance(mod.padding, str):
            raise Unsupported("Conv2d with groups, padding modes or string padding")
        self.w = prefix + "weight"
        self.b = prefix + "bias" if mod.bias is not None else None
        self.stride, self.padding, self.dilation = pair(mod.stride), pair(mod.padding), pair(mod.dilation)
        self.k = pair(mod.kernel_size)
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
    def _im2col(self, a, K):
        a = a.permute(0, 2, 3, 1)
        ph, pw = self.padding
        if ph or pw:
            a = F.pad(a, (0, 0, pw, pw, ph, ph))
        n, h, w, _ = a.shape
        (kh, kw), (sh, sw), (dh, dw) = self.k, self.stride, self.dilation
        oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
        if oh < 1 or ow < 1:  # what F.conv2d would raise (the engine turns it into a ValueError)
            raise RuntimeError(f"conv input {tuple(a.shape)} (NHWC, padded) smaller than the kernel")
        return K.im2col(a.contiguous(), self.k, self.stride, self.dilation), (n, oh, ow)

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

    def _col2im(self, dcols, a, K):
        return K.col2im(dcols, a.shape, self.k, self.stride, self.padding, self.dilation)

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

    def forward(self, a, P, K):
        b = P[self.b] if self.b else None
        if a.shape[0] >= CL_MIN_BATCH:
            return self._conv(a, P[self.w], b), (a, None, None)
        cols, (n, oh, ow) = self._im2col(a, K)
        z = self._gemm(cols, P[self.w], b).view(n, oh, ow, -1).permute(0, 3, 1, 2)
        # [input, its columns, output shape, the tangent pass's columns (set by tangent_forward)]
        return z, [a, cols, (n, oh, ow), None]

    # The columns are dropped after the step's backward and rebuilt in the reverse pass (one C++
    # im2col, a memcpy per tap): keeping m x 410 KB costs fresh pages (page faults) every call.
    def _cols(self, saved, K):
        cols = saved[1]
        return cols if cols is not None else self._im2col(saved[0], K)[0]

    def backward(self, d, saved, P, K, need_input, sink):
        a, cols, shape = saved[:3]
        if shape is not None:
            saved[1] = None
        if cols is None:
            gi, gw, gb = self._bwd(d, a, P[self.w], (need_input, True, self.b is not None))
        else:
            rows = self._rows(d)
            gw = self._wgemm(rows.t(), cols, sink, P)
            gb = rows.sum(0) if self.b else None
            gi = self._col2im(rows @ self._wmat(P[self.w]), a, K) if need_input else None
        if gw is not None:
            sink.dense(self.w, gw)
        if self.b:
            sink.dense(self.b, gb)
        return gi

    def tangent_forward(self, adot, saved, P, L, K):
        a, _, shape = saved[:3]
        lb = L[self.b] if self.b else None
        if shape is None:
            zd = self._conv(a, L[self.w], lb)
            return zd if adot is None else zd + self._conv(adot, P[self.w], None)
        cols = self._cols(saved, K)
        z2 = self._gemm(cols, L[self.w], lb)
        # tangent_backward of the same step needs the same columns: kept in this step's record
        step = saved[3] = (cols, adot, None if adot is None else self._im2col(adot, K)[0])
        if adot is not None:
            z2.addmm_(step[2], self._wmat(P[self.w]).t())
        return z2.view(*shape, -1).permute(0, 3, 1, 2)

    def tangent_backward(self, dd, d, saved, adot, P, L, K, need_input, sink):
        # H lam = ddot (x) a + delta (x) adot;  input part: W^T ddot + lam^T delta
        a, _, shape = saved[:3]
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
            step, saved[3] = saved[3], None
            if step is not None and step[1] is adot:
                cols, cols_adot = step[0], step[2]
            else:
                cols, cols_adot = self._cols(saved, K), None if adot is None else self._im2col(adot, K)[0]
            more = None if adot is None else (rd.t(), cols_adot)
            hw, hb = self._wgemm(rdd.t(), cols, sink, P, more), rdd.sum(0) if self.b else None
            gi = None
            if need_input:  # one GEMM pair (in place: addmm would copy [N*OH*OW, K] first) + col2im
                gi = self._col2im((rdd @ self._wmat(P[self.w])).addmm_(rd, self._wmat(L[self.w])), a, K)
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

    def forward(self, a, P, K):
        if a.dim() != 2:
            raise Unsupported("Linear on a non-2-d input")
        return _linear(a, P[self.w], P[self.b] if self.b else None), a

    def backward(self, d, a, P, K, need_input, sink):
        gi = _rmm(d, P[self.w]) if need_input else None
        sink.lowrank(self.w, d, a)
        if self.b:
            sink.dense(self.b, d.sum(0))
        return gi

    def tangent_forward(self, adot, a, P, L, K):
        zd = _linear(a, L[self.w], L[self.b] if self.b else None)
        if adot is not None:
            zd = zd + _linear(adot, P[self.w])
        return zd

    def tangent_backward(self, dd, d, a, adot, P, L, K, need_input, sink):
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
    def forward(self, a, P, K):
        r = F.relu(a)
        return r, r

    def backward(self, d, r, P, K, need_input, sink):
        return _threshold_bwd(d, r, 0)

    def tangent_forward(self, adot, r, P, L, K):
        return None if adot is None else _threshold_bwd(adot, r, 0)

    def tangent_backward(self, dd, d, r, adot, P, L, K, need_input, sink):
        return _threshold_bwd(dd, r, 0)


class MaxPool2d:
    has_params = False
    dense: list[str] = []
    lowrank: list[str] = []

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
        self.k = pair(kernel_size)
        self.s = pair(stride) if stride is not None and stride != [] else self.k
        self.p, self.d, self.ceil = pair(padding), pair(dilation), bool(ceil_mode)

    # CPU: max_pool2d_with_indices is vectorised over channels on channels_last input (NCHW walks
    # each plane), so the chain runs 4-d activations channels_last.
    def forward(self, a, P, K):
        a = a.contiguous(memory_format=_CL)  # even with the copy, cheaper than pooling NCHW
        out, idx = F.max_pool2d(a, self.k, self.s, self.p, self.d, self.ceil, return_indices=True)
        return out, (idx, a)

    def _bwd(self, d, saved):
        idx, a = saved
        return _pool_bwd(d, a, self.k, self.s, self.p, self.d, self.ceil, idx)

    def backward(self, d, saved, P, K, need_input, sink):
        return self._bwd(d, saved)

    def tangent_forward(self, adot, saved, P, L, K):
        if adot is None:
            return None
        idx = saved[0]
        n, c = idx.shape[:2]
        return adot.reshape(n, c, -1).gather(2, idx.reshape(n, c, -1)).view(idx.shape)

    def tangent_backward(self, dd, d, saved, adot, P, L, K, need_input, sink):
        return self._bwd(dd, saved)


class ReluMaxPool2d(MaxPool2d):
    """relu then max-pool, computed as max-pool then relu: the same values, and the same gradient
    (the window's argmax of z is the argmax of relu(z) whenever the max is > 0; otherwise the relu
    mask is 0 either way), but the relu and its mask run on the pooled tensor, 4x smaller for
    2x2 pooling: on the real batch that removes two passes over [256, 32, 24, 24]."""

    def forward(self, a, P, K):
        a = a.contiguous(memory_format=_CL)
        pooled, idx = F.max_pool2d(a, self.k, self.s, self.p, self.d, self.ceil, return_indices=True)
        out = F.relu(pooled)
        return out, (idx, a, out)

    def _bwd(self, d, saved):
        idx, a, out = saved
        return _pool_bwd(_threshold_bwd(d, out, 0), a, self.k, self.s, self.p, self.d, self.ceil, idx)

    def tangent_forward(self, adot, saved, P, L, K):
        if adot is None:
            return None
        return _threshold_bwd(super().tangent_forward(adot, saved, P, L, K), saved[2], 0)


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

    def forward(self, a, P, K):
        xs = self._prepare(a)
        b = P[self.b] if self.b else None
        out, arg = K.conv_pool(xs, P[self.w], b, self.pool)
        return out, (a, xs, out, arg)

    def backward(self, d, saved, P, K, need_input, sink):
        a, xs, out, arg = saved
        g = _threshold_bwd(d, out, 0)
        gw, gb, gi = K.conv_at_bwd(g, xs, P[self.w], self.pool, arg, need_input)
        sink.dense(self.w, gw)
        if self.b:
            sink.dense(self.b, gb)
        return self._crop(gi, a) if need_input else None

    def tangent_forward(self, adot, saved, P, L, K):
        a, xs, out, arg = saved
        zd = K.conv_at(xs, L[self.w], L[self.b] if self.b else None, self.pool, arg)
        if adot is not None:
            zd = zd + K.conv_at(self._prepare(adot), P[self.w], None, self.pool, arg)
        return _threshold_bwd(zd, out, 0)

    def tangent_backward(self, dd, d, saved, adot, P, L, K, need_input, sink):
        a, xs, out, arg = saved
        # H lam = ddot (x) a + delta (x) adot;  input part: W^T ddot + lam^T delta (one call)
        gdd, gd = _threshold_bwd(dd, out, 0), _threshold_bwd(d, out, 0)
        hw, hb, gi = K.conv_at_bwd(
            gdd, xs, P[self.w], self.pool, arg, need_input, gd if need_input else None, L[self.w]
        )
        if adot is not None:
            xd = self._prepare(adot)
            hw = hw + K.conv_at_bwd(gd, xd, L[self.w], self.pool, arg, False)[0]
        sink.dense(self.w, hw)
        if self.b:
            sink.dense(self.b, hb)
        return self._crop(gi, a) if need_input else None


def fuse(layers: list) -> list:
    """relu + max-pool -> ReluMaxPool2d; then conv (few input channels) + that -> ConvReluPool."""
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

    def forward(self, a, P, K):
        return a.reshape(a.shape[0], -1), a.shape

    def backward(self, d, shape, P, K, need_input, sink):
        return d.reshape(shape)

    def tangent_forward(self, adot, shape, P, L, K):
        return None if adot is None else adot.reshape(adot.shape[0], -1)

    def tangent_backward(self, dd, d, shape, adot, P, L, K, need_input, sink):
        return dd.reshape(shape)


class Identity(Flatten):
    """nn.Identity, Dropout(p=0): the activation passes through."""

    def forward(self, a, P, K):
        return a, None

    def backward(self, d, s, P, K, need_input, sink):
        return d

    def tangent_forward(self, adot, s, P, L, K):
        return adot

    def tangent_backward(self, dd, d, s, adot, P, L, K, need_input, sink):
        return dd
