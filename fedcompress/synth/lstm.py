"""FedSynth's hypergradient for the next-word LSTM, in the word-embedding space (paper §4.2).

Model: ``fedavg.models.NextWordLSTM`` (embedding E -> stacked LSTM -> linear over the vocabulary).
Synthetic data live after the embedding: ``syn_e`` [m, b, T, d]. Labels are sparse soft labels,
one list of k (vocabulary id, weight) pairs per position: ``syn_idx`` int64 [m, b, T, k] and
``syn_val`` [m, b, T, k] (fixed next-word labels: k = 1, weight 1; dense soft labels over the
vocabulary: k = V, idx = arange(V)). The objective (FedSynth eq. 4):

    w_0 = body params (LSTM + output layer; E is untouched: synthetic inputs bypass it)
    w_{j+1} = w_j - lr * grad_w l(w_j; e_j, idx_j, val_j)
    l       = mean over the b*T positions p of  -sum_k val_pk * log_softmax(z_p)[idx_pk]
    L       = cross_entropy(f_{w_m}(E[real_x]), real_y, ignore_index=-100)  (mean over real tokens)
    returns (L, dL/d syn_e, dL/d syn_val)

Implementations, same results:

- ``hypergradient_text`` (the engine): a hand-written LSTM forward and backward (BPTT) with no
  autograd, and for the reverse pass the same two passes carrying a tangent (forward-over-reverse):
  at step j, with the cotangent lam_{j+1} on w_{j+1} as the tangent of w_j, the tangent of the
  inner gradient is H_j lam (Hessian-vector product), the tangent of the gradient w.r.t. the input
  e_j is the mixed term d<g, lam>/de_j, and the tangent of dl/dval is d<g, lam>/dval. One pass per
  step, no autograd graph; w_j of every step is kept (as the create_graph peers keep it).
- ``hypergradient_text_ref``: the plain create_graph unroll through the model itself
  (``torch.func.functional_call`` on nn.LSTM); the reference the tests compare against.
- ``unroll_text``: w_m (client and server both call it: exact replay).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..api import positive_float

Tensor = torch.Tensor
IGNORE = -100


# ---------------------------------------------------------------------------------------------
# Model structure


def is_text_model(model) -> bool:
    """True for the next-word LSTM (an embedding, a batch-first nn.LSTM, a linear head)."""
    from ..fedavg.models import NextWordLSTM

    return isinstance(model, NextWordLSTM)


def body_names(model) -> list[str]:
    """The parameters the synthetic steps train: every parameter but the embedding."""
    return [k for k, _ in model.named_parameters() if not k.startswith("embedding.")]


def _layers(model) -> int:
    return int(model.lstm.num_layers)


def _check_model(model) -> None:
    if not is_text_model(model):
        raise ValueError(f"model must be a fedcompress NextWordLSTM, got {type(model).__name__}")
    lstm = model.lstm
    if not lstm.batch_first or lstm.bidirectional or lstm.proj_size or not lstm.bias or lstm.dropout:
        raise ValueError("model.lstm must be batch-first, unidirectional, with biases, no projection/dropout")


def check_args(model, params, syn_e, syn_idx, syn_val, inner_lr, real_x=None, real_y=None) -> dict[str, Tensor]:
    """ValueError naming the argument; returns the body parameters (plus the embedding) in order."""
    _check_model(model)
    if not isinstance(params, dict):
        raise ValueError("params must be a dict name -> Tensor (the model's parameters)")
    mp = dict(model.named_parameters())
    for k, p in mp.items():
        v = params.get(k)
        if not isinstance(v, Tensor) or v.shape != p.shape:
            got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"params[{k!r}] has shape {got}, the model's is {tuple(p.shape)}")
    V, d = model.embedding.weight.shape
    if not isinstance(syn_e, Tensor) or not syn_e.is_floating_point() or syn_e.dim() != 4 or syn_e.shape[3] != d:
        got = tuple(syn_e.shape) if isinstance(syn_e, Tensor) else type(syn_e).__name__
        raise ValueError(f"syn_e must be a floating tensor [m, b, T, d={d}] of embeddings, got {got}")
    m, b, T = syn_e.shape[:3]
    if m < 1 or b < 1 or T < 1:
        raise ValueError(f"syn_e must have m, b, T >= 1, got {tuple(syn_e.shape)}")
    if syn_idx is None:  # dense soft labels over the whole vocabulary
        if not isinstance(syn_val, Tensor) or syn_val.shape != (m, b, T, V) or syn_val.dtype != syn_e.dtype:
            got = tuple(syn_val.shape) if isinstance(syn_val, Tensor) else type(syn_val).__name__
            raise ValueError(f"syn_val (dense, syn_idx=None) must be {syn_e.dtype} [{m}, {b}, {T}, {V}], got {got}")
    else:
        if not isinstance(syn_idx, Tensor) or syn_idx.dtype != torch.int64 or syn_idx.dim() != 4:
            raise ValueError("syn_idx must be int64 [m, b, T, k] vocabulary ids (or None with dense syn_val)")
        if syn_idx.shape[:3] != (m, b, T) or not 1 <= syn_idx.shape[3] <= V:
            raise ValueError(f"syn_idx must be [m={m}, b={b}, T={T}, k in 1..{V}], got {tuple(syn_idx.shape)}")
        if syn_idx.numel() and (int(syn_idx.min()) < 0 or int(syn_idx.max()) >= V):
            raise ValueError(f"syn_idx values must lie in [0, {V})")
        if not isinstance(syn_val, Tensor) or syn_val.shape != syn_idx.shape or syn_val.dtype != syn_e.dtype:
            raise ValueError(f"syn_val must be {syn_e.dtype} of syn_idx's shape {tuple(syn_idx.shape)}")
    positive_float(0.0).parse("inner_lr", inner_lr)  # as engine.INNER_LR (engine imports this module)
    if real_x is not None:
        if not isinstance(real_x, Tensor) or real_x.dtype != torch.int64 or real_x.dim() != 2 or real_x.shape[0] < 1:
            raise ValueError("real_x must be int64 token ids [n >= 1, T]")
        if real_x.numel() and (int(real_x.min()) < 0 or int(real_x.max()) >= V):
            raise ValueError(f"real_x ids must lie in [0, {V})")
        if not isinstance(real_y, Tensor) or real_y.dtype != torch.int64 or real_y.shape != real_x.shape:
            raise ValueError(f"real_y must be int64 next-word ids of real_x's shape {tuple(real_x.shape)}")
        ok = (real_y == IGNORE) | ((real_y >= 0) & (real_y < V))
        if not bool(ok.all()):
            raise ValueError(f"real_y values must lie in [0, {V}) or be {IGNORE} (ignored)")
    return {k: params[k] for k in mp}


# ---------------------------------------------------------------------------------------------
# Hand-written LSTM forward / backward, and their tangents (forward-over-reverse)
#
# Per layer: A = X Wi^T + (bi + bh); a_t = A_t + h_{t-1} Wh^T; gates (i, f, g, o) = (s, s, tanh, s)
# of the four slices; c_t = f c_{t-1} + i g; h_t = o tanh(c_t). A name ending in ``d`` is the
# tangent (derivative along the direction lam of the weights). The primal passes keep what the
# tangent passes need, so the reverse sweep never recomputes a primal quantity: the unroll's
# forward and backward of step j are reused when step j's tangent is taken (that saves 3 of the
# 12 [N, h] x [h, V] products per step at V = 10k, the bulk of the work).


class _Layer:
    """One layer's primal forward (act, D = dact/da, C, TC = tanh C, H) and backward (dA, DS, DC)."""

    __slots__ = ("X", "act", "D", "C", "TC", "H", "dA", "DS", "DC", "DH")


def _lstm_layer_fwd(X, Wi, Wh, b):
    B, T, din = X.shape
    h = Wh.shape[1]
    L = _Layer()
    L.X = X
    A = torch.addmm(b, X.reshape(-1, din), Wi.t()).view(B, T, 4 * h)
    L.act = act = torch.empty_like(A)
    L.D = D = torch.empty_like(A)
    L.C = C = X.new_empty(B, T, h)
    L.TC = TC = X.new_empty(B, T, h)
    L.H = H = X.new_empty(B, T, h)
    g = slice(2 * h, 3 * h)
    for t in range(T):
        a = A[:, t] if t == 0 else torch.addmm(A[:, t], H[:, t - 1], Wh.t())
        s = act[:, t]
        torch.sigmoid(a, out=s)
        torch.tanh(a[:, g], out=s[:, g])
        Dt = D[:, t]
        torch.mul(s, 1 - s, out=Dt)
        torch.mul(s[:, g], s[:, g], out=Dt[:, g]).neg_().add_(1)
        i, f, gg, o = s[:, :h], s[:, h : 2 * h], s[:, g], s[:, 3 * h :]
        c = i * gg if t == 0 else torch.addcmul(i * gg, f, C[:, t - 1])
        C[:, t] = c
        torch.tanh(c, out=TC[:, t])
        torch.mul(o, TC[:, t], out=H[:, t])
    return L


def _lstm_layer_bwd(L, Wi, Wh, dH, weight_grads=True):
    """BPTT given dL/dH; keeps dA and the per-step dh, dc on L. Returns (dWi, dWh, db) and dX."""
    B, T, h = L.H.shape
    din = L.X.shape[2]
    L.dA = dA = torch.empty_like(L.act)
    L.DH = DH = torch.empty_like(L.H)
    L.DC = DC = torch.empty_like(L.H)
    g = slice(2 * h, 3 * h)
    L.DS = DS = torch.empty_like(L.act)  # dL/d act
    for t in range(T - 1, -1, -1):
        s, tc = L.act[:, t], L.TC[:, t]
        i, _f, gg, o = s[:, :h], s[:, h : 2 * h], s[:, g], s[:, 3 * h :]
        dh = DH[:, t]
        if t == T - 1:
            dh.copy_(dH[:, t])
        else:
            torch.addmm(dH[:, t], dA[:, t + 1], Wh, out=dh)
        dc, ds = DC[:, t], DS[:, t]
        torch.mul(dh * o, 1 - tc * tc, out=dc)
        if t < T - 1:
            dc.addcmul_(DC[:, t + 1], L.act[:, t + 1, h : 2 * h])
        torch.mul(dc, gg, out=ds[:, :h])
        if t > 0:
            torch.mul(dc, L.C[:, t - 1], out=ds[:, h : 2 * h])
        else:
            ds[:, h : 2 * h].zero_()
        torch.mul(dc, i, out=ds[:, g])
        torch.mul(dh, tc, out=ds[:, 3 * h :])
        torch.mul(ds, L.D[:, t], out=dA[:, t])
    dAf = dA.view(-1, 4 * h)
    dX = (dAf @ Wi).view(B, T, din)
    if not weight_grads:
        return None, dX
    dWi = dAf.t() @ L.X.reshape(-1, din)
    dWh = dA[:, 1:].reshape(-1, 4 * h).t() @ L.H[:, :-1].reshape(-1, h)
    return (dWi, dWh, dAf.sum(0)), dX


def _lstm_layer_tan(L, Wi, Wh, Wid, Whd, bd, Xd, dHd):
    """Tangents of one layer's forward and backward, from the kept primal quantities.

    ``Xd``: tangent of the layer input (None for the synthetic embeddings, which do not move with
    the weights); ``dHd(Hd)``: a callable that, given the tangent of H, returns the tangent of
    dL/dH (the layer above needs Hd first). Returns ((dWi, dWh, db) tangents, dXd)."""
    B, T, din = L.X.shape
    h = Wh.shape[1]
    g = slice(2 * h, 3 * h)
    Xf = L.X.reshape(-1, din)
    Ad = torch.addmm(bd, Xf, Wid.t()).view(B, T, 4 * h)
    if Xd is not None:
        Ad.view(-1, 4 * h).addmm_(Xd.reshape(-1, din), Wi.t())
    actd = torch.empty_like(L.act)
    Cd = L.X.new_empty(B, T, h)
    Hd = L.X.new_empty(B, T, h)
    # forward tangent: a_t' = A_t' + h'_{t-1} Wh^T + h_{t-1} Wh'^T
    HWhd = torch.mm(L.H[:, :-1].reshape(-1, h), Whd.t()).view(B, T - 1, 4 * h) if T > 1 else None
    for t in range(T):
        ad = Ad[:, t]
        if t > 0:
            ad = torch.addmm(ad, Hd[:, t - 1], Wh.t()).add_(HWhd[:, t - 1])
        s = L.act[:, t]
        sd = actd[:, t]
        torch.mul(L.D[:, t], ad, out=sd)
        i, f, gg, o = s[:, :h], s[:, h : 2 * h], s[:, g], s[:, 3 * h :]
        idt, fdt, gdt, odt = sd[:, :h], sd[:, h : 2 * h], sd[:, g], sd[:, 3 * h :]
        cd = torch.addcmul(idt * gg, i, gdt)
        if t > 0:
            cd.addcmul_(fdt, L.C[:, t - 1]).addcmul_(f, Cd[:, t - 1])
        Cd[:, t] = cd
        tc = L.TC[:, t]
        torch.addcmul(odt * tc, o * (1 - tc * tc), cd, out=Hd[:, t])
    dHd = dHd(Hd)
    # backward tangent, t = T-1 .. 0
    dAd = torch.empty_like(L.act)
    dsd = L.X.new_empty(B, 4 * h)
    dcd_next = None
    for t in range(T - 1, -1, -1):
        s, sd, D, tc = L.act[:, t], actd[:, t], L.D[:, t], L.TC[:, t]
        i, f, gg, o = s[:, :h], s[:, h : 2 * h], s[:, g], s[:, 3 * h :]
        idt, fdt, gdt, odt = sd[:, :h], sd[:, h : 2 * h], sd[:, g], sd[:, 3 * h :]
        dh, dc, cd = L.DH[:, t], L.DC[:, t], Cd[:, t]
        # dh' = dHd_t + (dA'_{t+1} Wh + dA_{t+1} Wh')
        dhd = dHd[:, t]
        if t < T - 1:
            dhd = torch.addmm(dhd, dAd[:, t + 1], Wh).addmm_(L.dA[:, t + 1], Whd)
        one_m = 1 - tc * tc
        tcd = one_m * cd
        # dc' = dh' o (1 - tc^2) + dh o' (1 - tc^2) - 2 dh o tc tc' (+ dc'_{t+1} f + dc_{t+1} f')
        dcd = (dhd * o + dh * odt) * one_m - 2 * dh * o * tc * tcd
        if dcd_next is not None:
            dcd += dcd_next
        torch.addcmul(dcd * gg, dc, gdt, out=dsd[:, :h])
        if t > 0:
            torch.addcmul(dcd * L.C[:, t - 1], dc, Cd[:, t - 1], out=dsd[:, h : 2 * h])
        else:
            dsd[:, h : 2 * h].zero_()
        torch.addcmul(dcd * i, dc, idt, out=dsd[:, g])
        torch.addcmul(dhd * tc, dh, tcd, out=dsd[:, 3 * h :])
        # D' : sigmoid s(1-s) -> s'(1-2s); tanh 1-g^2 -> -2 g g'.  dA' = ds' D + ds D'
        Dd = sd * (1 - 2 * s)
        torch.mul(gg, gdt, out=Dd[:, g]).mul_(-2)
        ds = L.DS[:, t]
        dad = dAd[:, t]
        torch.mul(dsd, D, out=dad)
        dad.addcmul_(ds, Dd)
        if t > 0:
            dcd_next = dcd * f
            dcd_next.addcmul_(dc, fdt)
    dAf, dAdf = L.dA.view(-1, 4 * h), dAd.view(-1, 4 * h)
    dWid = dAdf.t() @ Xf
    if Xd is not None:
        dWid.addmm_(dAf.t(), Xd.reshape(-1, din))
    dWhd = dAd[:, 1:].reshape(-1, 4 * h).t() @ L.H[:, :-1].reshape(-1, h)
    dWhd.addmm_(dAf.view(B, T, 4 * h)[:, 1:].reshape(-1, 4 * h).t(), Hd[:, :-1].reshape(-1, h))
    dXd = torch.addmm(dAdf @ Wi, dAf, Wid).view(B, T, din)
    return (dWid, dWhd, dAdf.sum(0)), dXd


def _unpack(P, layers):
    lw = [
        (P[f"lstm.weight_ih_l{k}"], P[f"lstm.weight_hh_l{k}"], P[f"lstm.bias_ih_l{k}"] + P[f"lstm.bias_hh_l{k}"])
        for k in range(layers)
    ]
    return lw, P["fc.weight"], P["fc.bias"]


def _grad_dict(lgrads, dWf, dbf) -> dict[str, Tensor]:
    out = {}
    for k, (dWi, dWh, db) in enumerate(lgrads):
        out[f"lstm.weight_ih_l{k}"] = dWi
        out[f"lstm.weight_hh_l{k}"] = dWh
        out[f"lstm.bias_ih_l{k}"] = db
        out[f"lstm.bias_hh_l{k}"] = db
    out["fc.weight"] = dWf
    out["fc.bias"] = dbf
    return out


class _Step:
    """What one primal pass (forward + backward) keeps for the tangent pass."""

    __slots__ = ("Ls", "Hf", "S", "dz")


def _body_grad(P, layers, e, dz_fn, keep=False):
    """Forward the body on embeddings ``e`` [B, T, d] and backpropagate ``dz_fn(z) -> (dL/dz,
    head_out)``. Returns (grads, head_out, step) where step (if ``keep``) serves ``_body_tangent``."""
    lw, Wf, bf = _unpack(P, layers)
    Ls = []
    X = e
    for k in range(layers):
        L = _lstm_layer_fwd(X, *lw[k])
        Ls.append(L)
        X = L.H
    B, T, h = X.shape
    Hf = X.reshape(-1, h)
    z = torch.addmm(bf, Hf, Wf.t())
    dz, head = dz_fn(z)
    dWf = dz.t() @ Hf
    dbf = dz.sum(0)
    dH = (dz @ Wf).view(B, T, h)
    grads = [None] * layers
    for k in range(layers - 1, -1, -1):
        grads[k], dH = _lstm_layer_bwd(Ls[k], lw[k][0], lw[k][1], dH)
    step = None
    if keep:
        step = _Step()
        step.Ls, step.Hf, step.S, step.dz = Ls, Hf, head, dz
    return _grad_dict(grads, dWf, dbf), head, step


def _body_tangent(P, lam, layers, step, idx, val):
    """Tangents along ``lam`` of the inner gradient (H lam), of dl/de and of dl/dval, from a kept
    primal step (inner loss with sparse soft labels)."""
    lw, Wf, bf = _unpack(P, layers)
    tl, Wfd, bfd = _unpack(lam, layers)
    Ls, Hf, S, dz = step.Ls, step.Hf, step.S, step.dz
    k = val.shape[-1]
    idx2, val2 = (None if idx is None else idx.reshape(-1, k)), val.reshape(-1, k)
    N = val2.shape[0]
    tot = val2.sum(-1, keepdim=True)
    B, T, h = Ls[-1].H.shape
    out = {}

    def top_dHd(Hd):  # the head: z' = H' Wf^T + H Wf'^T + bf'; dz' = tot/N * S * (z' - <S, z'>)
        Hdf = Hd.reshape(-1, h)
        zd = torch.addmm(bfd, Hdf, Wf.t()).addmm_(Hf, Wfd.t())
        Szd = (S * zd).sum(-1, keepdim=True)
        dzd = (zd - Szd).mul_(S).mul_(tot / N)
        zk = zd if idx2 is None else zd.gather(-1, idx2)
        out["dvald"] = (zk - Szd).div_(-N)  # tangent of -log_softmax(z)[idx] / N
        out["dWfd"] = torch.addmm(dzd.t() @ Hf, dz.t(), Hdf)
        out["dbfd"] = dzd.sum(0)
        return torch.addmm(dzd @ Wf, dz, Wfd).view(B, T, h)

    # layer k's dHd needs layer k+1's forward tangent first: recurse from the top down lazily
    tans = [None] * layers

    def run(k, Xd):
        Wi, Wh, _ = lw[k]
        Wid, Whd, bd = tl[k]
        if k == layers - 1:
            dHd_fn = top_dHd
        else:
            def dHd_fn(Hd, k=k):
                return run(k + 1, Hd)
        tans[k], dXd = _lstm_layer_tan(Ls[k], Wi, Wh, Wid, Whd, bd, Xd, dHd_fn)
        return dXd

    ded = run(0, None)
    return _grad_dict(tans, out["dWfd"], out["dbfd"]), ded, out["dvald"]


def _soft_dz(idx, val):
    """dL/dz of the inner loss with sparse soft labels; head_out = softmax(z) (kept for tangents)."""
    k = val.shape[-1]
    val2 = val.reshape(-1, k)
    N = val2.shape[0]

    def fn(z):
        S = torch.softmax(z, -1)
        dz = S * val2.sum(-1, keepdim=True)
        if idx is None:
            dz.sub_(val2)
        else:
            dz.scatter_add_(-1, idx.reshape(-1, k), -val2)
        return dz.div_(N), S

    return fn


def _inner_loss(z, idx, val):
    k = val.shape[-1]
    ls = torch.log_softmax(z, -1)
    lk = ls if idx is None else ls.gather(-1, idx.reshape(-1, k))
    return -(val.reshape(-1, k) * lk).sum() / lk.shape[0]


def _at(idx, j):
    return None if idx is None else idx[j]


def _sgd(P, g, lr):
    return {k: torch.add(v, g[k], alpha=-lr) if k in g else v for k, v in P.items()}  # one pass, no temporary


def _unroll(model, params, syn_e, syn_idx, syn_val, lr, keep):
    layers = _layers(model)
    P = dict(params)
    hist = []
    for j in range(syn_e.shape[0]):
        g, _, step = _body_grad(P, layers, syn_e[j], _soft_dz(_at(syn_idx, j), syn_val[j]), keep)
        if keep:
            hist.append((P, step))
        P = _sgd(P, g, lr)
    return P, hist


def unroll_text(model, params, syn_e, syn_idx, syn_val, inner_lr) -> dict[str, Tensor]:
    """ClientUpdate on embedding-space data: every model parameter after the m SGD steps (the
    embedding unchanged). Client and server both call this: exact replay."""
    params = check_args(model, params, syn_e, syn_idx, syn_val, inner_lr)
    with torch.no_grad():
        P, _ = _unroll(model, params, syn_e.detach(), syn_idx, syn_val.detach(), float(inner_lr), False)
    return P


def _real_dz(y, count):
    yf = y.reshape(-1)
    keep = yf != IGNORE
    ysafe = torch.where(keep, yf, torch.zeros_like(yf))

    def fn(z):
        ls = torch.log_softmax(z, -1)
        loss = -(ls.gather(-1, ysafe[:, None])[:, 0] * keep).sum()
        dz = ls.exp_()
        dz.scatter_add_(-1, ysafe[:, None], -torch.ones_like(dz[:, :1]))
        dz.mul_(keep[:, None].to(dz.dtype) / count)
        return dz, loss

    return fn


def real_loss_text(model, params, real_x, real_y, chunk: int = 256) -> float:
    """Mean cross-entropy over the real (non-ignored) tokens with weights ``params``."""
    bufs = {k: v for k, v in model.named_buffers()}
    count = max(1, int((real_y != IGNORE).sum()))
    total = 0.0
    with torch.no_grad():
        for i in range(0, real_x.shape[0], chunk):
            z = functional_call(model, {**params, **bufs}, (real_x[i : i + chunk],))
            total += float(F.cross_entropy(z, real_y[i : i + chunk], reduction="sum"))
    return total / count


def hypergradient_text(model, params, syn_e, syn_idx, syn_val, inner_lr, real_x, real_y, *, real_chunk: int = 64):
    """(L, dL/d syn_e, dL/d syn_val) by the hand-written forward-over-reverse pass (module docstring)."""
    params = check_args(model, params, syn_e, syn_idx, syn_val, inner_lr, real_x, real_y)
    if not isinstance(real_chunk, int) or real_chunk < 1:
        raise ValueError(f"real_chunk must be an integer >= 1, got {real_chunk!r}")
    lr = float(inner_lr)
    layers = _layers(model)
    with torch.no_grad():
        syn_e, syn_val = syn_e.detach(), syn_val.detach()
        P, hist = _unroll(model, params, syn_e, syn_idx, syn_val, lr, True)
        E = P["embedding.weight"]
        count = max(1, int((real_y != IGNORE).sum()))
        lam = None
        loss = syn_e.new_zeros(())
        for i in range(0, real_x.shape[0], real_chunk):
            e = F.embedding(real_x[i : i + real_chunk], E)
            g, part, _ = _body_grad(P, layers, e, _real_dz(real_y[i : i + real_chunk], count))
            loss += part
            lam = g if lam is None else {k: lam[k] + g[k] for k in g}
        loss /= count
        ge = torch.empty_like(syn_e)
        gv = torch.empty_like(syn_val)
        for j in range(syn_e.shape[0] - 1, -1, -1):
            Pj, step = hist[j]
            hl, ded, dvald = _body_tangent(Pj, lam, layers, step, _at(syn_idx, j), syn_val[j])
            hist[j] = None
            torch.mul(ded, -lr, out=ge[j])
            torch.mul(dvald.view_as(gv[j]), -lr, out=gv[j])
            lam = {k: torch.add(v, hl[k], alpha=-lr) for k, v in lam.items()}
    return loss, ge, gv


def hypergradient_text_ref(model, params, syn_e, syn_idx, syn_val, inner_lr, real_x, real_y):
    """Reference: one create_graph unroll through the model (nn.LSTM), then backward."""
    params = check_args(model, params, syn_e, syn_idx, syn_val, inner_lr, real_x, real_y)
    lr = float(inner_lr)
    names = body_names(model)
    e = syn_e.detach().clone().requires_grad_(True)
    v = syn_val.detach().clone().requires_grad_(True)
    w = {k: params[k].detach().clone().requires_grad_(names.count(k) > 0) for k in params}
    for j in range(e.shape[0]):
        z = functional_call(model, w, (e[j],)).transpose(1, 2).reshape(-1, model.fc.out_features)
        lj = _inner_loss(z, _at(syn_idx, j), v[j])
        g = torch.autograd.grad(lj, [w[k] for k in names], create_graph=True)
        w = {**w, **{k: w[k] - lr * gk for k, gk in zip(names, g, strict=True)}}
    loss = F.cross_entropy(functional_call(model, w, (real_x,)), real_y)
    ge, gv = torch.autograd.grad(loss, (e, v))
    return loss.detach(), ge, gv


def hypergradient_dense(model, params, syn_x, syn_y, inner_lr, real_x, real_y, *, real_chunk: int = 64):
    """``fc.synth.hypergradient``'s signature for the text model: syn_x [m, b, T, d] embeddings,
    syn_y [m, b, T, V] soft labels, real_x / real_y int64 [n, T] (-100: ignored)."""
    return hypergradient_text(model, params, syn_x, None, syn_y, inner_lr, real_x, real_y, real_chunk=real_chunk)


def unroll_dense(model, params, syn_x, syn_y, inner_lr) -> dict[str, Tensor]:
    """``fc.synth.unroll``'s signature for the text model (dense soft labels [m, b, T, V])."""
    return unroll_text(model, params, syn_x, None, syn_y, inner_lr)
