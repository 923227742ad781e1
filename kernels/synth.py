"""FedSynth hypergradient kernels in Triton. References: fedcompress/synth/ops.py (same names + _ref).

- ``_soft_ce_kernel``: one program per block of rows; per row the stable log-sum-exp, the soft-label
  loss, p = softmax(z) and delta = scale * (s p - y) in one pass over the logits (C <= BLOCK_C).
- ``_soft_ce_jvp_kernel``: the second-order term of the reverse pass: u = zdot - <p, zdot>,
  delta_dot = scale * s * p * u, gy_dot = -scale * u.
- ``_sgd_step_kernel`` / ``_reverse_step_kernel``: the flat-parameter updates (w -= lr g; and
  lam -= lr hv with w += lr g in one pass).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import BLOCK as FLAT_BLOCK


@triton.jit
def _soft_ce_kernel(
    z_ptr, y_ptr, loss_ptr, p_ptr, d_ptr, n_rows, C, scale, ROWS: tl.constexpr, BLOCK_C: tl.constexpr
):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_C)
    rm = rows < n_rows
    m = rm[:, None] & (cols[None, :] < C)
    offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
    z = tl.load(z_ptr + offs, mask=m, other=-float("inf")).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=m, other=0.0).to(tl.float32)
    zmax = tl.max(z, axis=1)
    zmax = tl.where(rm, zmax, 0.0)
    e = tl.where(m, tl.exp(z - zmax[:, None]), 0.0)
    se = tl.sum(e, axis=1)
    se = tl.where(rm, se, 1.0)
    lse = zmax + tl.log(se)
    logp = tl.where(m, z - lse[:, None], 0.0)
    p = e / se[:, None]
    s = tl.sum(y, axis=1)
    row_loss = -tl.sum(y * logp, axis=1) * scale
    tl.store(loss_ptr + rows, row_loss, mask=rm)
    tl.store(p_ptr + offs, p, mask=m)
    tl.store(d_ptr + offs, (p * s[:, None] - y) * scale, mask=m)


@triton.jit
def _soft_ce_jvp_kernel(
    p_ptr, y_ptr, zd_ptr, dd_ptr, gy_ptr, n_rows, C, scale, ROWS: tl.constexpr, BLOCK_C: tl.constexpr
):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_C)
    m = (rows < n_rows)[:, None] & (cols[None, :] < C)
    offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
    p = tl.load(p_ptr + offs, mask=m, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=m, other=0.0).to(tl.float32)
    zd = tl.load(zd_ptr + offs, mask=m, other=0.0).to(tl.float32)
    u = zd - tl.sum(p * zd, axis=1)[:, None]
    s = tl.sum(y, axis=1)
    tl.store(dd_ptr + offs, p * u * (s[:, None] * scale), mask=m)
    tl.store(gy_ptr + offs, u * (-scale), mask=m)


@triton.jit
def _sgd_step_kernel(w_ptr, g_ptr, n, lr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    w = tl.load(w_ptr + offs, mask=m)
    g = tl.load(g_ptr + offs, mask=m)
    tl.store(w_ptr + offs, w - lr * g, mask=m)


@triton.jit
def _reverse_step_kernel(w_ptr, g_ptr, lam_ptr, hv_ptr, n, lr, HAS_G: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    lam = tl.load(lam_ptr + offs, mask=m)
    hv = tl.load(hv_ptr + offs, mask=m)
    tl.store(lam_ptr + offs, lam - lr * hv, mask=m)
    if HAS_G:
        w = tl.load(w_ptr + offs, mask=m)
        g = tl.load(g_ptr + offs, mask=m)
        tl.store(w_ptr + offs, w + lr * g, mask=m)


# ---------------------------------------------------------------------------------------------
# Launchers (same signatures as the references)


def _rows_cfg(C: int) -> tuple[int, int]:
    block_c = max(16, triton.next_power_of_2(C))
    rows = max(1, min(256, 16384 // block_c))
    return rows, block_c


def _c2(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]).contiguous()


def soft_ce_triton(z: torch.Tensor, y: torch.Tensor, scale: float):
    z2, y2 = _c2(z), _c2(y.to(z.dtype))
    n, C = z2.shape
    p = torch.empty_like(z2)
    d = torch.empty_like(z2)
    rl = torch.empty(n, dtype=z2.dtype, device=z2.device)
    if n and C:
        rows, bc = _rows_cfg(C)
        _soft_ce_kernel[(triton.cdiv(n, rows),)](z2, y2, rl, p, d, n, C, float(scale), ROWS=rows, BLOCK_C=bc)
    return rl.sum(), p.view(z.shape), d.view(z.shape)


def soft_ce_jvp_triton(p: torch.Tensor, y: torch.Tensor, zdot: torch.Tensor, scale: float):
    p2, y2, zd2 = _c2(p), _c2(y.to(p.dtype)), _c2(zdot.to(p.dtype))
    n, C = p2.shape
    dd = torch.empty_like(p2)
    gy = torch.empty_like(p2)
    if n and C:
        rows, bc = _rows_cfg(C)
        _soft_ce_jvp_kernel[(triton.cdiv(n, rows),)](
            p2, y2, zd2, dd, gy, n, C, float(scale), ROWS=rows, BLOCK_C=bc
        )
    return dd.view(p.shape), gy.view(p.shape)


def _flat(t: torch.Tensor, what: str) -> torch.Tensor:
    if not t.is_contiguous():
        raise ValueError(f"{what} must be a contiguous flat buffer")
    return t.view(-1)


def sgd_step_triton(w: torch.Tensor, g: torch.Tensor, lr: float) -> torch.Tensor:
    wf, gf = _flat(w, "w"), _flat(g, "g")
    n = wf.numel()
    if n:
        _sgd_step_kernel[(triton.cdiv(n, FLAT_BLOCK),)](wf, gf, n, float(lr), BLOCK=FLAT_BLOCK)
    return w


def reverse_step_triton(w, g, lam, hv, lr: float) -> None:
    lf, hf = _flat(lam, "lam"), _flat(hv, "hv")
    n = lf.numel()
    has_g = g is not None
    wf = _flat(w, "w")
    gf = _flat(g, "g") if has_g else wf
    if n:
        _reverse_step_kernel[(triton.cdiv(n, FLAT_BLOCK),)](
            wf, gf, lf, hf, n, float(lr), HAS_G=has_g, BLOCK=FLAT_BLOCK
        )
