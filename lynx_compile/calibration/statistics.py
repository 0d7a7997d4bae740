"""Per-layer statistics: one streaming pass gathers all that the fits and error scores need.

Hooks on the candidate layers accumulate float64 sufficient statistics of the input X and of what
the N:M selection drops, so activations are never stored; ``layers_per_pass`` splits the layers over
several replays to bound the K x K matrices held at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..kernels import reference
from .hooks import _flat_input, forward_hooks

_ROW_CHUNK = 4096  # rows per float64 statistics update: bounds the temporaries, not the result


class _LayerStats:
    """Streaming float64 sufficient statistics of one ``nn.Linear``; activations are never kept."""

    def __init__(self, layer: nn.Linear, n: int, m: int, norm_comp: bool, perm: Tensor | None):
        k, dev = layer.in_features, layer.weight.device
        f64 = dict(dtype=torch.float64, device=dev)
        self.n, self.m, self.norm_comp, self.perm = n, m, norm_comp, perm
        self.weight = layer.weight.detach().double()
        self.bias = None if layer.bias is None else layer.bias.detach().double()
        self.tokens = self.calls = self.max_rows = 0
        self.sum_x, self.xx = torch.zeros(k, **f64), torch.zeros(k, k, **f64)
        self.yy = self.tt_plain = self.tt_norm = 0.0
        self.sum_d, self.xd = torch.zeros(k, **f64), torch.zeros(k, k, **f64)
        if perm is not None:
            self.perm = perm.to(dev)
            self.weight_p = self.weight.index_select(1, self.perm)
            self.sum_dp, self.xdp = torch.zeros(k, **f64), torch.zeros(k, k, **f64)
            self.tt_plain_p = self.tt_p = 0.0

    def _dropped(self, x: Tensor, weight: Tensor):
        """(||D0 W^T||^2, ||Ds W^T||^2, D, x W^T) for rows x, with D0 = x - S(x), Ds = x - s*S(x) and
        D the one the options select (Ds with norm_comp, else D0)."""
        values, indices, scale = reference.compress(x, self.n, self.m, True)
        kept = reference.decompress(values, indices, self.n, self.m).double()
        x64 = x.double()
        full, part = x64 @ weight.T, kept @ weight.T
        s = scale.double().unsqueeze(-1)
        tt_plain = float((full - part).square().sum())
        tt_norm = float((full - s * part).square().sum())
        d = x64 - (s * kept if self.norm_comp else kept)
        return tt_plain, tt_norm, d, full

    def update(self, x2d: Tensor) -> None:
        """Add one call's rows (M, K), in chunks so the float64 temporaries stay small."""
        self.calls += 1
        self.max_rows = max(self.max_rows, x2d.shape[0])
        for x in x2d.split(_ROW_CHUNK):
            self.tokens += x.shape[0]
            x64 = x.double()
            tt_plain, tt_norm, d, full = self._dropped(x, self.weight)
            y = full if self.bias is None else full + self.bias
            self.yy += float(y.square().sum())
            self.tt_plain += tt_plain
            self.tt_norm += tt_norm
            self.sum_x += x64.sum(0)
            self.xx += x64.T @ x64
            self.sum_d += d.sum(0)
            self.xd += x64.T @ d
            if self.perm is not None:
                xp = x.index_select(1, self.perm)
                tt_plain_p, tt_norm_p, dp, _ = self._dropped(xp, self.weight_p)
                self.tt_plain_p += tt_plain_p
                self.tt_p += tt_norm_p if self.norm_comp else tt_plain_p
                self.sum_dp += dp.sum(0)
                self.xdp += xp.double().T @ dp

    def finite(self) -> bool:
        """NaN/Inf activations would poison every fit (and the plan JSON): such layers stay dense."""
        scalars = [self.yy, self.tt_plain, self.tt_norm] + ([self.tt_p] if self.perm is not None else [])
        mats = [self.xx, self.xd] + ([self.xdp] if self.perm is not None else [])
        return all(math.isfinite(v) for v in scalars) and all(bool(torch.isfinite(t).all()) for t in mats)

    def variant(self, permuted: bool) -> "_Variant":
        """The statistics of one channel order (X, D, W all in that order)."""
        if not permuted:
            tt = self.tt_norm if self.norm_comp else self.tt_plain
            return _Variant(self.tokens, self.sum_x, self.xx, self.sum_d, self.xd, tt, self.weight)
        p = self.perm
        return _Variant(self.tokens, self.sum_x[p], self.xx[p][:, p], self.sum_dp, self.xdp, self.tt_p, self.weight_p)


@dataclass
class _Variant:
    """Sufficient statistics for fitting and scoring compensation in one channel order."""

    tokens: int
    sum_x: Tensor   # (K,)
    xx: Tensor      # (K, K)  X^T X
    sum_d: Tensor   # (K,)
    xd: Tensor      # (K, K)  X^T D
    tt: float       # ||D W^T||^2
    weight: Tensor  # (N, K) float64

    def residual_energy(self, c: Tensor | None, delta: Tensor | None) -> float:
        """``||D W^T - X C - 1 delta^T||^2`` exactly, from the statistics alone."""
        e = self.tt
        if c is not None:
            xt = self.xd @ self.weight.T
            e += -2.0 * float((c * xt).sum()) + float(((self.xx @ c) * c).sum())
        if delta is not None:
            r = self.weight @ self.sum_d
            if c is not None:
                r = r - c.T @ self.sum_x
            e += -2.0 * float(delta @ r) + self.tokens * float(delta @ delta)
        return max(e, 0.0)


def _collect_stats(model, runner, layers, cfg, perms, want_outputs, progress, label):
    """Pass(es) over the calibration data with stats hooks; groups bound the statistics memory."""
    n, m = cfg.nm
    paths = list(layers)
    size = cfg.layers_per_pass or max(len(paths), 1)
    groups = [paths[i:i + size] for i in range(0, len(paths), size)] or [[]]
    stats, outputs = {}, None
    for gi, group in enumerate(groups):
        hooks = []
        for p in group:
            st = stats[p] = _LayerStats(layers[p], n, m, cfg.norm_comp, perms.get(p))
            hooks.append((layers[p], lambda mod, args, kwargs, out, st=st: st.update(_flat_input(args, kwargs))))
        desc = f"{label} statistics" + (f" (layers {gi + 1}/{len(groups)})" if len(groups) > 1 else "")
        with forward_hooks(hooks, with_kwargs=True):
            out = runner.run(model, desc, progress)
        if outputs is None and want_outputs:
            outputs = out
    return stats, outputs
