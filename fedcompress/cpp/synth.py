"""C++ adapters of the FedSynth engine's conv ops: numpy views of CPU tensors in, ``fedcompress._C``
(csrc/synth.cpp) out.

Named as kernels/synth.py is for Triton: ``conv_pool_cpp``, ``conv_at_cpp``, ``conv_at_bwd_cpp``,
``im2col_cpp`` and ``col2im_cpp`` implement the ops ``synth_conv_pool`` ... ``synth_im2col`` whose
references and specification are in fedcompress/synth/ops.py. The kernels are float32-only and
``fedcompress._ops`` declares them so (CPU tensors, float32): the dispatch in synth/ops.py passes the
dtype every argument shares, so another dtype runs on the reference by declaration. Called directly
with anything else, an adapter raises ValueError instead of answering from the reference.
"""

from __future__ import annotations

import torch

from .. import _ops

Tensor = torch.Tensor


def _check(op: str, **ts: Tensor | None) -> None:
    """The kernel reads float32 CPU memory: say which argument is not that (never a quiet fallback)."""
    for name, t in ts.items():
        if t is not None and (t.dtype != torch.float32 or t.device.type != "cpu"):
            raise ValueError(
                f"the C++ {op} serves float32 CPU tensors only (declared in fedcompress._ops); "
                f"{name} is {str(t.dtype).replace('torch.', '')} on {t.device.type}"
            )


def _np(t: Tensor):
    return t.contiguous().numpy()


def _ohwc(w: Tensor):
    return _np(w.permute(0, 2, 3, 1))  # a view of the engine's flat buffer (its conv layout)


_EMPTY = torch.empty(0).numpy()


def _bias(b: Tensor | None):
    return _np(b) if b is not None else _EMPTY


def _pooled(xs: Tensor, w: Tensor, pool: int, dtype) -> Tensor:
    ph, pw = (xs.shape[1] - w.shape[2] + 1) // pool, (xs.shape[2] - w.shape[3] + 1) // pool
    return torch.empty((xs.shape[0], ph, pw, w.shape[0]), dtype=dtype)  # NHWC; returned as NCHW views


def _arg_nhwc(arg: Tensor):
    return _np(arg.permute(0, 2, 3, 1))


def conv_pool_cpp(xs: Tensor, w: Tensor, b: Tensor | None, pool: int):
    _check("synth_conv_pool", xs=xs, w=w, b=b)
    out, arg = _pooled(xs, w, pool, torch.float32), _pooled(xs, w, pool, torch.uint8)
    _ops.native().synth_conv_pool(_np(xs), _ohwc(w), _bias(b), pool, out.numpy(), arg.numpy(), torch.get_num_threads())
    return out.permute(0, 3, 1, 2), arg.permute(0, 3, 1, 2)


def conv_at_cpp(xs: Tensor, w: Tensor, b: Tensor | None, pool: int, arg: Tensor) -> Tensor:
    _check("synth_conv_at", xs=xs, w=w, b=b)
    out = _pooled(xs, w, pool, torch.float32)
    _ops.native().synth_conv_at(_np(xs), _ohwc(w), _bias(b), pool, _arg_nhwc(arg), out.numpy(), torch.get_num_threads())
    return out.permute(0, 3, 1, 2)


def conv_at_bwd_cpp(gout, xs, w, pool: int, arg, need_dx: bool, gout2=None, w2=None):
    two = need_dx and gout2 is not None
    _check("synth_conv_at_bwd", gout=gout, xs=xs, w=w, gout2=gout2 if two else None, w2=w2 if two else None)
    dw = torch.empty((w.shape[0], w.shape[2], w.shape[3], w.shape[1]), dtype=torch.float32)
    dx = torch.empty_like(xs, memory_format=torch.contiguous_format) if need_dx else None
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


def im2col_cpp(xs: Tensor, k, stride, dilation) -> Tensor:
    _check("synth_im2col", xs=xs)
    n, h, w, c = xs.shape
    (kh, kw), (sh, sw), (dh, dw) = k, stride, dilation
    oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    cols = torch.empty((n * oh * ow, kh * kw * c), dtype=torch.float32)
    _ops.native().synth_im2col(_np(xs), kh, kw, tuple(stride), tuple(dilation), cols.numpy(), torch.get_num_threads())
    return cols


def col2im_cpp(cols: Tensor, shape, k, stride, padding, dilation) -> Tensor:
    _check("synth_col2im", cols=cols)
    n, c, h, w = shape
    dx = torch.empty((n, h, w, c), dtype=torch.float32)
    _ops.native().synth_col2im(
        _np(cols), k[0], k[1], tuple(stride), tuple(padding), tuple(dilation), dx.numpy(), torch.get_num_threads()
    )
    return dx.permute(0, 3, 1, 2)
