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
