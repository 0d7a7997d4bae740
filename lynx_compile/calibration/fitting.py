"""Fitting compensation without training: bias correction and reduced-rank regression, solved in
closed form from a layer's statistics, and each stage's error scored from the same statistics."""

from __future__ import annotations

import torch
from torch import Tensor

from ..plan import LayerPlan
from .errors import relative
from .options import CalibrationConfig
from .statistics import _LayerStats, _Variant


def reduced_rank_regression(xx: Tensor, xt: Tensor, rank: int, ridge: float) -> tuple[Tensor, Tensor]:
    """Rank-R least squares ``T ~ X A B^T`` from ``X^T X`` (K, K) and ``X^T T`` (K, N) -> (A, B).

    ``C* = (X^T X + lam I)^-1 X^T T`` with ``lam = ridge * trace(X^T X) / K``; B = the top-R
    eigenvectors of the fitted values' covariance ``C*^T X^T X C*`` (found as the right singular
    vectors of ``Lambda^1/2 Q^T C*``, with ``X^T X = Q Lambda Q^T``, so only a K x K eigh and a
    K x N SVD are needed); A = C* B. Directions of X with no energy get no weight.
    """
    k = xx.shape[0]
    evals, q = torch.linalg.eigh(xx)
    evals = evals.clamp_min(0)
    top = float(evals.max()) if k else 0.0
    lam = ridge * float(evals.sum()) / max(k, 1)
    keep = evals > top * k * torch.finfo(torch.float64).eps
    inv = torch.where(keep, 1.0 / (evals + lam).clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    qt_xt = q.T @ xt
    c_star = q @ (inv.unsqueeze(-1) * qt_xt)
    h = (evals.sqrt() * inv).unsqueeze(-1) * qt_xt
    _, _, vh = torch.linalg.svd(h, full_matrices=False)
    b = vh[:rank].T.contiguous()
    return c_star @ b, b


def _fit_chain(v: _Variant, cfg: CalibrationConfig, rank: int, dtype: torch.dtype, yy: float):
    """Fit the configured compensation on one variant -> (errors by stage, tensors)."""
    n_tok = v.tokens
    mean_t = v.weight @ v.sum_d / n_tok
    errors, tensors = {}, {}
    delta = c = None
    if cfg.bias_correction:
        delta = mean_t.float()
        errors["bias"] = relative(v.residual_energy(None, delta.double()), yy)
    if cfg.low_rank:
        xt = v.xd @ v.weight.T
        xx = v.xx
        if cfg.bias_correction:  # joint fit with the bias: regress the centred T on the centred X
            mean_x = v.sum_x / n_tok
            xx = xx - n_tok * torch.outer(mean_x, mean_x)
            xt = xt - n_tok * torch.outer(mean_x, mean_t)
        a, b = reduced_rank_regression(xx, xt, rank, cfg.ridge)
        lr_down, lr_up = a.to(dtype), b.T.contiguous().to(dtype)
        c = lr_down.double() @ lr_up.double()  # score what is stored, after rounding
        if cfg.bias_correction:
            delta = (mean_t - c.T @ (v.sum_x / n_tok)).float()
        errors["lowrank"] = relative(v.residual_energy(c, None if delta is None else delta.double()), yy)
        tensors.update(lr_down=lr_down.cpu(), lr_up=lr_up.cpu())
    if delta is not None:
        tensors["bias_delta"] = delta.cpu()
    final = errors.get("lowrank", errors.get("bias", relative(v.tt, yy)))
    return errors, tensors, final


def _fit_layer(lp: LayerPlan, st: _LayerStats, cfg: CalibrationConfig, dtype: torch.dtype) -> None:
    """Fill a candidate layer's errors and tensors from its statistics (perm kept only if it helps)."""
    rank = min(cfg.rank, lp.in_features, lp.out_features) if cfg.low_rank else 0
    lp.errors = {"plain": relative(st.tt_plain, st.yy), "norm": relative(st.tt_norm, st.yy)}
    errors, tensors, final = _fit_chain(st.variant(False), cfg, rank, dtype, st.yy)
    lp.errors.update(errors)
    perm = None
    if st.perm is not None:
        errors_p, tensors_p, final_p = _fit_chain(st.variant(True), cfg, rank, dtype, st.yy)
        lp.errors["plain_perm"] = relative(st.tt_plain_p, st.yy)
        lp.errors["perm"] = final_p
        if final_p < final:
            tensors, final, perm = tensors_p, final_p, st.perm.cpu()
    lp.errors["final"] = final
    lp.rank = rank
    lp.lr_down, lp.lr_up = tensors.get("lr_down"), tensors.get("lr_up")
    lp.bias_delta, lp.perm = tensors.get("bias_delta"), perm
