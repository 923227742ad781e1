"""The hypergradient of FedSynth (paper eq. 4): real-data loss after m SGD steps on synthetic data.

    w_0 = params;  w_{j+1} = w_j - lr * grad_w l(w_j; x_j, y_j),  j = 0..m-1
    l(w; x, y)  = mean_i[-sum_c y_ic log_softmax(f_w(x_i))_c]          (soft labels, any real y)
    L           = cross_entropy(f_{w_m}(real_x), real_y)                (mean over the real batch)
                  [+ target_weight * ||w_m - target||^2  with ``target=``; real_x may then be None]
    returns (L, dL/d syn_x, dL/d syn_y)

The optional ``target`` term matches the unrolled weights to given ones (FedSynth's
``objective=match``: the client's own SGD weights, so the synthetic steps reproduce its update
instead of only lowering its loss); without real data it costs no pass over the real batch.

Three implementations, same results:

- ``hypergradient`` (the engine): for chain networks (Conv2d/Linear/ReLU/MaxPool2d/flatten, e.g. the
  FedAvg CNN and MLP) the hand-written forward-over-reverse pass of ``chain.py``; for any other
  ``nn.Module`` the generic per-step reverse pass below.
- ``hypergradient_generic``: any module through ``torch.func.functional_call``. Forward: m first-order
  steps, each w_j kept. Reverse: per step one small double-backward (a Hessian-vector product and
  the mixed terms for x_j, y_j) with cotangent lam_{j+1}; the graph of one step lives at a time.
- ``hypergradient_ref``: the plain create_graph unroll (one autograd graph through all m steps). The
  reference the tests compare against.

Buffers (e.g. BatchNorm running statistics) are treated as constants: they are read from the model
and passed unchanged to every call; nothing updates them. The model is called in whatever
train/eval mode it is in (use a deterministic forward: the server replays it).
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..api import positive_float
from . import chain
from . import lstm as _text  # the next-word LSTM: embedding-space synthetic data

Tensor = torch.Tensor
INNER_LR = positive_float(0.0)  # the inner SGD step size: a finite number > 0

# ---------------------------------------------------------------------------------------------
# Argument checks (ValueError naming the argument)


def check_args(model, params, syn_x, syn_y, inner_lr, real_x=None, real_y=None) -> dict[str, Tensor]:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(params, dict):
        raise ValueError("params must be a dict name -> Tensor (e.g. dict(model.named_parameters()))")
    names = [k for k, _ in model.named_parameters()]
    if set(params) != set(names):
        missing, extra = sorted(set(names) - set(params)), sorted(set(params) - set(names))
        raise ValueError(
            f"params must hold exactly the model's parameters; missing {missing}, unexpected {extra}"
        )
    mp = dict(model.named_parameters())
    for k in names:
        v = params[k]
        if not isinstance(v, Tensor) or v.shape != mp[k].shape:
            got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"params[{k!r}] has shape {got}, the model's is {tuple(mp[k].shape)}")
    if not isinstance(syn_x, Tensor) or not syn_x.is_floating_point() or syn_x.dim() < 3:
        raise ValueError("syn_x must be a floating tensor [m, b, *input_shape] (m batches of b inputs)")
    m, b = syn_x.shape[:2]
    if m < 1 or b < 1:
        raise ValueError(f"syn_x must hold m >= 1 batches of b >= 1 inputs, got shape {tuple(syn_x.shape)}")
    if (
        not isinstance(syn_y, Tensor)
        or not syn_y.is_floating_point()
        or syn_y.dim() != 3
        or syn_y.shape[:2] != (m, b)
    ):
        got = tuple(syn_y.shape) if isinstance(syn_y, Tensor) else type(syn_y).__name__
        raise ValueError(f"syn_y must be a floating tensor [m={m}, b={b}, C] of (soft) labels, got {got}")
    if syn_y.shape[2] < 1:
        raise ValueError("syn_y must have C >= 1 classes")
    if syn_y.dtype != syn_x.dtype:
        raise ValueError(f"syn_y dtype {syn_y.dtype} differs from syn_x dtype {syn_x.dtype}")
    INNER_LR.parse("inner_lr", inner_lr)
    if real_x is not None:
        if not isinstance(real_x, Tensor) or real_x.shape[1:] != syn_x.shape[2:] or real_x.shape[0] < 1:
            got = tuple(real_x.shape) if isinstance(real_x, Tensor) else type(real_x).__name__
            raise ValueError(
                f"real_x must be [n >= 1, {', '.join(map(str, syn_x.shape[2:]))}] like syn_x's inputs, "
                f"got {got}"
            )
        if real_x.dtype != syn_x.dtype:
            raise ValueError(f"real_x dtype {real_x.dtype} differs from syn_x dtype {syn_x.dtype}")
        if not isinstance(real_y, Tensor) or real_y.dtype != torch.int64 or real_y.shape != real_x.shape[:1]:
            got = (tuple(real_y.shape), real_y.dtype) if isinstance(real_y, Tensor) else type(real_y).__name__
            raise ValueError(f"real_y must be int64 labels of shape [{real_x.shape[0]}], got {got}")
        if real_y.numel() and (int(real_y.min()) < 0 or int(real_y.max()) >= syn_y.shape[2]):
            raise ValueError(f"real_y values must lie in [0, {syn_y.shape[2]}) (C from syn_y)")
    return {k: params[k] for k in names}


def check_target(params, target, target_weight, real_x) -> dict[str, Tensor] | None:
    """The ``target`` term's arguments (ValueError naming them); returns target restricted to params."""
    if target is None:
        if real_x is None:
            raise ValueError("real_x must be given (it may be None only with a target)")
        return None
    if not isinstance(target, dict) or set(target) < set(params):
        missing = sorted(set(params) - set(target)) if isinstance(target, dict) else "all"
        raise ValueError(f"target must be a dict name -> Tensor holding every parameter; missing {missing}")
    for k, v in params.items():
        if not isinstance(target[k], Tensor) or target[k].shape != v.shape:
            raise ValueError(f"target[{k!r}] must be a tensor of shape {tuple(v.shape)}")
    if not (isinstance(target_weight, (int, float)) and math.isfinite(target_weight) and target_weight >= 0):
        raise ValueError(f"target_weight must be a finite number >= 0, got {target_weight!r}")
    return {k: target[k] for k in params}


def target_term(w: dict[str, Tensor], target: dict[str, Tensor], weight: float) -> Tensor:
    """weight * ||w - target||^2 (autograd form; the references use it)."""
    return weight * sum(((w[k] - target[k].to(w[k].dtype)) ** 2).sum() for k in target)


def _checked_chain(fn, *args):
    """Like _checked_forward, but chain.Unsupported passes through (the caller falls back)."""
    try:
        return fn(*args)
    except chain.Unsupported:
        raise
    except RuntimeError as e:
        raise ValueError(f"syn_x's input shape does not fit the model: {e}") from e


def _checked_forward(fn, *args):
    """Run a first forward; shape errors inside the model become ValueError naming syn_x."""
    try:
        return fn(*args)
    except RuntimeError as e:
        raise ValueError(f"syn_x's input shape does not fit the model: {e}") from e


# ---------------------------------------------------------------------------------------------
# Reference: plain create_graph unroll


def soft_cross_entropy(z: Tensor, y: Tensor) -> Tensor:
    """mean_i[-sum_c y_ic log_softmax(z_i)_c] (autograd form; ops.soft_ce is the fused one)."""
    return -(y * torch.log_softmax(z, dim=-1)).sum(-1).mean()


def _buffers(model):
    return {k: v.detach() for k, v in model.named_buffers()}


def hypergradient_ref(model, params, syn_x, syn_y, inner_lr, real_x, real_y, *, target=None, target_weight=1.0):
    """Reference: one autograd graph through all m steps (create_graph=True), then backward."""
    params = check_args(model, params, syn_x, syn_y, inner_lr, real_x, real_y)
    target = check_target(params, target, target_weight, real_x)
    lr = float(inner_lr)
    bufs = _buffers(model)
    x = syn_x.detach().clone().requires_grad_(True)
    y = syn_y.detach().clone().requires_grad_(True)
    w = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    for j in range(x.shape[0]):
        z = _checked_forward(functional_call, model, {**w, **bufs}, (x[j],))
        chain.check_logits(z, y[j])
        g = torch.autograd.grad(
            soft_cross_entropy(z, y[j]), list(w.values()), create_graph=True, materialize_grads=True
        )
        w = {k: v - lr * gk for (k, v), gk in zip(w.items(), g, strict=True)}
    loss = torch.zeros((), dtype=x.dtype)
    if real_x is not None:
        loss = loss + F.cross_entropy(functional_call(model, {**w, **bufs}, (real_x,)), real_y)
    if target is not None:
        loss = loss + target_term(w, target, target_weight)
    gx, gy = torch.autograd.grad(loss, (x, y), materialize_grads=True)
    return loss.detach(), gx, gy


# ---------------------------------------------------------------------------------------------
# Generic engine: per-step reverse pass for any module


def _step_grad(model, bufs, w, x, y, create_graph):
    z = functional_call(model, {**w, **bufs}, (x,))
    chain.check_logits(z, y)
    return torch.autograd.grad(
        soft_cross_entropy(z, y), list(w.values()), create_graph=create_graph, materialize_grads=True
    )


def unroll_generic(model, params, syn_x, syn_y, lr, keep=False):
    bufs = _buffers(model)
    w = {k: v.detach().clone() for k, v in params.items()}
    hist = []
    for j in range(syn_x.shape[0]):
        if keep:
            hist.append(w)
        wr = {k: v.detach().requires_grad_(True) for k, v in w.items()}
        with torch.enable_grad():
            g = _checked_forward(_step_grad, model, bufs, wr, syn_x[j], syn_y[j], False)
        w = {k: v - lr * gk for (k, v), gk in zip(w.items(), g, strict=True)}
    return w, hist


def hypergradient_generic(model, params, syn_x, syn_y, inner_lr, real_x, real_y, *, target=None, target_weight=1.0):
    """Any nn.Module: store w_j, then one small double-backward per step in reverse order."""
    params = check_args(model, params, syn_x, syn_y, inner_lr, real_x, real_y)
    target = check_target(params, target, target_weight, real_x)
    lr = float(inner_lr)
    bufs = _buffers(model)
    syn_x, syn_y = syn_x.detach(), syn_y.detach()
    w, hist = unroll_generic(model, params, syn_x, syn_y, lr, keep=True)
    with torch.enable_grad():
        wr = {k: v.detach().requires_grad_(True) for k, v in w.items()}
        loss = torch.zeros((), dtype=syn_x.dtype)
        if real_x is not None:
            loss = loss + F.cross_entropy(functional_call(model, {**wr, **bufs}, (real_x,)), real_y)
        if target is not None:
            loss = loss + target_term(wr, target, target_weight)
        lam = list(torch.autograd.grad(loss, list(wr.values()), materialize_grads=True))
    gx = torch.empty_like(syn_x)
    gy = torch.empty_like(syn_y)
    for j in range(syn_x.shape[0] - 1, -1, -1):
        with torch.enable_grad():
            wr = {k: v.detach().requires_grad_(True) for k, v in hist[j].items()}
            x = syn_x[j].clone().requires_grad_(True)
            y = syn_y[j].clone().requires_grad_(True)
            g = _step_grad(model, bufs, wr, x, y, True)
            out = torch.autograd.grad(g, list(wr.values()) + [x, y], grad_outputs=lam, materialize_grads=True)
        hist[j] = None
        n = len(lam)
        torch.mul(out[n], -lr, out=gx[j])
        torch.mul(out[n + 1], -lr, out=gy[j])
        for lk, hk in zip(lam, out[:n], strict=True):
            lk.sub_(hk, alpha=lr)
    return loss.detach(), gx, gy


# ---------------------------------------------------------------------------------------------
# Public entry points

_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def chain_plan(model: nn.Module):
    """The model's chain plan (cached per module object), or None when the generic path is used."""
    if model not in _PLANS:
        _PLANS[model] = chain.compile_chain(model)
    return _PLANS[model]


def hypergradient(
    model,
    params,
    syn_x,
    syn_y,
    inner_lr,
    real_x,
    real_y,
    *,
    real_chunk: int = 64,
    backend: str | None = None,
    target: dict[str, Tensor] | None = None,
    target_weight: float = 1.0,
):
    """(real_loss, grad_syn_x, grad_syn_y) of FedSynth's outer objective (see module docstring).

    model: any nn.Module (called through torch.func.functional_call; buffers are constants).
    params: dict name -> Tensor, the starting weights w_0 (not modified).
    syn_x: [m, b, *input]; syn_y: [m, b, C] soft labels (one-hot for fixed labels).
    inner_lr: the SGD step size of the m inner steps.  real_x: [n, *input]; real_y: int64 [n].
    real_chunk: the real batch is processed in chunks of this many samples (memory; same result).
    target, target_weight: add target_weight * ||w_m - target||^2 to L (target: dict name -> Tensor
    like params); with a target, real_x and real_y may be None (then L is that term alone).
    Nothing here builds an autograd graph through the m steps; gradients of the result are not
    tracked (call it under any grad mode).
    """
    if _text.is_text_model(model):  # syn_x [m, b, T, d], syn_y [m, b, T, V], real [n, T]
        if target is not None:
            raise ValueError("target is not supported for text models")
        return _text.hypergradient_dense(model, params, syn_x, syn_y, inner_lr, real_x, real_y, real_chunk=real_chunk)
    params = check_args(model, params, syn_x, syn_y, inner_lr, real_x, real_y)
    target = check_target(params, target, target_weight, real_x)
    if not isinstance(real_chunk, int) or real_chunk < 1:
        raise ValueError(f"real_chunk must be an integer >= 1, got {real_chunk!r}")
    plan = chain_plan(model)
    if plan is not None:
        try:
            with torch.no_grad():
                return _checked_chain(
                    chain.hypergradient_chain,
                    plan,
                    params,
                    syn_x.detach(),
                    syn_y.detach(),
                    float(inner_lr),
                    None if real_x is None else real_x.detach(),
                    real_y,
                    real_chunk,
                    backend,
                    target,
                    float(target_weight),
                )
        except chain.Unsupported:  # found out only at run time (e.g. Linear on a 3-d input)
            _PLANS[model] = None
    return hypergradient_generic(
        model, params, syn_x, syn_y, inner_lr, real_x, real_y, target=target, target_weight=target_weight
    )


def unroll(model, params, syn_x, syn_y, inner_lr, *, backend: str | None = None) -> dict[str, Tensor]:
    """ClientUpdate (Algorithm 1, lines 16-19): w_m after m SGD steps on the synthetic batches.

    The FedSynth client and the server both call this (same code, same order of operations), so
    the server's replay equals the client's w_syn bit for bit on the same machine and backend.
    """
    if _text.is_text_model(model):
        return _text.unroll_dense(model, params, syn_x, syn_y, inner_lr)
    params = check_args(model, params, syn_x, syn_y, inner_lr)
    plan = chain_plan(model)
    with torch.no_grad():
        if plan is not None:
            try:
                _, P, _, _ = _checked_chain(
                    chain.unroll_chain,
                    plan,
                    params,
                    syn_x.detach(),
                    syn_y.detach(),
                    float(inner_lr),
                    False,
                    backend,
                )
                return {k: P[k].clone() for k in params}
            except chain.Unsupported:
                _PLANS[model] = None
        w, _ = unroll_generic(model, params, syn_x.detach(), syn_y.detach(), float(inner_lr))
        return w


def real_loss(model, params, real_x, real_y, chunk: int = 256) -> float:
    """Mean cross-entropy of ``model`` with weights ``params`` on a real batch."""
    plan = chain_plan(model)
    if plan is not None and real_x.shape[0]:
        try:
            with torch.no_grad():
                return chain.real_loss_chain(plan, params, real_x.detach(), real_y, chunk)
        except chain.Unsupported:
            _PLANS[model] = None
    bufs = _buffers(model)
    total = 0.0
    with torch.no_grad():
        for i in range(0, real_x.shape[0], chunk):
            z = functional_call(model, {**params, **bufs}, (real_x[i : i + chunk],))
            total += float(F.cross_entropy(z, real_y[i : i + chunk], reduction="sum"))
    return total / max(1, real_x.shape[0])


# ---------------------------------------------------------------------------------------------
# Batched over K clients (torch.func): same global weights, K synthetic sets and real batches


def hypergradient_batched(model, params, syn_x, syn_y, inner_lr, real_x, real_y):
    """K clients at once: syn_x [K, m, b, *input], syn_y [K, m, b, C], real_x [K, n, *input],
    real_y [K, n]. Returns (loss [K], grad_syn_x, grad_syn_y) with the leading K axis.

    ``torch.func.vmap`` over a functional create_graph-free unroll (grad of grad): one batched launch
    per op for all clients, which is what a GPU wants; on CPU the per-client engine is faster.
    """
    if not isinstance(syn_x, Tensor) or syn_x.dim() < 4:
        raise ValueError("syn_x must be [K, m, b, *input] for the batched form")
    K = syn_x.shape[0]
    for name, t in (("syn_y", syn_y), ("real_x", real_x), ("real_y", real_y)):
        if not isinstance(t, Tensor) or t.shape[0] != K:
            raise ValueError(f"{name} must have the same leading client axis K={K} as syn_x")
    params = check_args(model, params, syn_x[0], syn_y[0], inner_lr, real_x[0], real_y[0])
    lr = float(inner_lr)
    bufs = _buffers(model)
    w0 = {k: v.detach() for k, v in params.items()}

    def inner(w, x, y):
        return soft_cross_entropy(functional_call(model, {**w, **bufs}, (x,)), y)

    inner_grad = torch.func.grad(inner)

    def outer(x, y, rx, ry):
        w = w0
        for j in range(x.shape[0]):
            g = inner_grad(w, x[j], y[j])
            w = {k: w[k] - lr * g[k] for k in w}
        return F.cross_entropy(functional_call(model, {**w, **bufs}, (rx,)), ry)

    fn = torch.func.grad_and_value(outer, argnums=(0, 1))
    (gx, gy), loss = torch.func.vmap(fn)(syn_x.detach(), syn_y.detach(), real_x.detach(), real_y)
    return loss, gx, gy
