"""Calibration: fit RT-Lynx's error compensation from data and choose the dense layers.

``calibrate(model, calibration_inputs, options)`` runs the model eagerly (``torch.no_grad()``) with a
forward hook on every ``nn.Linear``. Per layer it streams float64 sufficient statistics of the input
X (tokens x K) and of what the N:M sparsification drops, ``D = X - s*S(X)``:

    tokens, sum(X), X^T X, sum(D), X^T D,  ||Y||^2, ||D0 W^T||^2, ||D W^T||^2

(``D0 = X - S(X)`` is the selection without norm compensation). Activations are never stored;
each layer of a pass holds two K x K float64 matrices (three with ``permutation``), so for large
models ``layers_per_pass`` splits the layers over several replays of the calibration inputs.
From these it fits, without training:

* **bias correction** ``bias_delta = mean(D) W^T``: the mean of the dropped output, folded into b;
* **low-rank compensation** by reduced-rank regression of the dropped output ``T = D W^T`` on X:
  ``C* = (X^T X + lam I)^-1 X^T T``; ``V_R`` = top-R eigenvectors of ``C*^T X^T X C*`` (the
  covariance of the fitted values); ``lr_down = C* V_R`` (K x R), ``lr_up = V_R^T`` (R x N). With
  bias correction both are fitted jointly (on centred statistics, then
  ``bias_delta = mean(T) - mean(X) C``), which is the least-squares optimum of the pair;
* **channel permutation** (``permutation=True``): a permutation of K that deals channels, sorted by
  calibrated RMS, round-robin into the groups of M, so every group mixes large and small channels and
  the top-n of each group keeps the large ones. Its statistics are gathered in the permuted order;
  a layer keeps its permutation only where it lowers the layer's error.

Every relative error ``||Y_plan - Y_dense||_F / ||Y_dense||_F`` in the plan is computed exactly from
the statistics, for these stages (``LayerPlan.errors``):

    plain       top-n of m, no norm compensation, no compensation
    norm        with norm compensation
    bias        the configured selection (norm_comp option) + bias correction
    lowrank     ... + low-rank (+ bias correction if on)
    plain_perm  plain selection on permuted channels          (permutation=True)
    perm        the full configured chain on permuted channels (permutation=True)
    final       what the plan applies

With ``error_budget``, the layers with the largest ``final`` error are made dense, as few as a
binary search over that ranking needs to bring the model-output error (measured with the eager
reference-op model, ``Plan.apply_eager``) within the budget.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from .config import as_bool, as_regex_tuple, build_options, one_of
from .kernels import reference
from .plan import DTYPES, LayerPlan, Plan, dtype_name, planned_forward
from .progress import Progress

PATTERNS = ("2:4", "1:2", "4:8")
_RANDOM_IN_TRAINING = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)
_ROW_CHUNK = 4096  # rows per float64 statistics update: bounds the temporaries, not the result


# ---- options ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CalibrationConfig:
    """Options of ``calibrate``. Unknown keys and bad values raise ``ValueError`` with the choices."""

    pattern: str = "2:4"
    norm_comp: bool = True
    rank: int = 64                      # R of the low-rank branch, capped per layer at min(K, N)
    low_rank: bool = True
    bias_correction: bool = True
    permutation: bool = False
    error_budget: float | None = None   # tolerated relative model-output error; None: no dense search
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    min_tokens: int = 0                 # layers whose calls never reach this many rows stay dense
    ridge: float = 1e-4                 # lam = ridge * trace(X^T X) / K in the low-rank fit
    layers_per_pass: int | None = None  # bound statistics memory: calibrate this many layers per pass

    @property
    def nm(self) -> tuple[int, int]:
        n, m = self.pattern.split(":")
        return int(n), int(m)

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | "CalibrationConfig" | None = None) -> "CalibrationConfig":
        if isinstance(options, CalibrationConfig):
            return options
        return build_options(cls, dict(options or {}), _normalise)

    def summary(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["include"], out["exclude"] = list(self.include), list(self.exclude)
        return out


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _normalise(key: str, value: Any) -> Any:
    if key == "pattern":
        return one_of(key, value, PATTERNS)
    if key in ("norm_comp", "low_rank", "bias_correction", "permutation"):
        return as_bool(key, value)
    if key == "rank":
        if not _is_int(value) or value < 1:
            raise ValueError(f"option 'rank' must be an integer >= 1, got {value!r}")
        return value
    if key == "min_tokens":
        if not _is_int(value) or value < 0:
            raise ValueError(f"option 'min_tokens' must be an integer >= 0, got {value!r}")
        return value
    if key == "layers_per_pass":
        if value is not None and (not _is_int(value) or value < 1):
            raise ValueError(f"option 'layers_per_pass' must be an integer >= 1 or None, got {value!r}")
        return value
    if key in ("error_budget", "ridge"):
        ok = (value is None and key == "error_budget") or (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0)
        if not ok:
            extra = " or None" if key == "error_budget" else ""
            raise ValueError(f"option {key!r} must be a finite number >= 0{extra}, got {value!r}")
        return None if value is None else float(value)
    if key in ("include", "exclude"):
        return as_regex_tuple(key, value)
    raise AssertionError(key)


# ---- calibration inputs and progress -------------------------------------------------------------
def calibration_inputs_from_loop(sample: Callable[[nn.Module, Any], Any], cases: Iterable[Any] = (None,),
                                 *, seed: int | None = 0) -> Callable[[nn.Module], list]:
    """Turn a sampling loop into the callable form of ``calibration_inputs``.

    ``sample(model, case)`` runs one whole sampling loop (all denoising timesteps) for one case (a
    prompt embedding, a latent shape, ...) and returns its result. Calibration calls the returned
    ``run(model)`` several times (statistics, error measurements), so each case is seeded with
    ``seed + i`` inside a forked RNG: every run sees the same noise and the caller's RNG is untouched.
    """
    cases = list(cases)

    def run(model: nn.Module) -> list:
        outputs = []
        with torch.random.fork_rng():
            for i, case in enumerate(cases):
                if seed is not None:
                    torch.manual_seed(seed + i)
                outputs.append(sample(model, case))
        return outputs

    return run


class _Runner:
    """Replays the calibration inputs; each replay returns the model output(s) to compare."""

    def __init__(self, calibration_inputs):
        self.calls_per_run: int | None = None
        if callable(calibration_inputs) and not isinstance(calibration_inputs, nn.Module):
            self.fn, self.items = calibration_inputs, None
            return
        self.fn, self.items = None, []
        for i, item in enumerate(calibration_inputs):
            if isinstance(item, Tensor):
                item = ((item,), {})
            if (not isinstance(item, (tuple, list)) or len(item) != 2 or not isinstance(item[0], (tuple, list))
                    or not isinstance(item[1], Mapping)):
                raise TypeError(f"calibration input {i} must be an (args, kwargs) pair or a Tensor, got "
                                f"{type(item).__name__}; pass a callable run(model) to drive the model yourself")
            self.items.append((tuple(item[0]), dict(item[1])))
        if not self.items:
            raise ValueError("calibration_inputs is empty")
        self.calls_per_run = len(self.items)

    def run(self, model: nn.Module, desc: str, progress: bool) -> list:
        """One replay under no_grad, counting model calls on a progress bar."""
        bar = Progress(desc, self.calls_per_run, progress)
        handle = model.register_forward_hook(lambda *_: bar.update())
        try:
            with torch.no_grad():
                if self.fn is not None:
                    outputs = [self.fn(model)]
                else:
                    outputs = [model(*args, **kwargs) for args, kwargs in self.items]
        finally:
            handle.remove()
            bar.close()
        if self.calls_per_run is None:
            self.calls_per_run = bar.count
        return outputs


def _tensors_of(output: Any) -> list[Tensor]:
    return [t for t in tree_leaves(output) if isinstance(t, Tensor)]


def relative_error(outputs: list, reference_outputs: list) -> float:
    """``||out - ref||_F / ||ref||_F`` over every tensor of two lists of model outputs (float64)."""
    num = den = 0.0
    for got, want in zip(outputs, reference_outputs, strict=True):
        for a, b in zip(_tensors_of(got), _tensors_of(want), strict=True):
            num += float((a.double() - b.double()).square().sum())
            den += float(b.double().square().sum())
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


# ---- statistics ---------------------------------------------------------------------------------
def _flat_input(args: tuple, kwargs: dict) -> Tensor:
    x = args[0] if args else kwargs["input"]
    return x.reshape(-1, x.shape[-1])


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
    rel = lambda e: math.sqrt(e / yy) if yy > 0 else math.sqrt(e)  # noqa: E731
    n_tok = v.tokens
    mean_t = v.weight @ v.sum_d / n_tok
    errors, tensors = {}, {}
    delta = c = None
    if cfg.bias_correction:
        delta = mean_t.float()
        errors["bias"] = rel(v.residual_energy(None, delta.double()))
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
        errors["lowrank"] = rel(v.residual_energy(c, None if delta is None else delta.double()))
        tensors.update(lr_down=lr_down.cpu(), lr_up=lr_up.cpu())
    if delta is not None:
        tensors["bias_delta"] = delta.cpu()
    final = errors.get("lowrank", errors.get("bias", rel(v.tt)))
    return errors, tensors, final


def balanced_permutation(channel_energy: Tensor, m: int) -> Tensor:
    """A permutation of K that gives every group of ``m`` a mix of large and small channels.

    Channels sorted by calibrated energy (sum of x^2) are dealt round-robin into the K/m groups:
    group g gets ranks g, g+G, g+2G, ... (one channel from each magnitude band), so the top-n of a
    group drops its small channels instead of competing large ones. Inside a group the channels keep
    ascending index order. Returns int64 ``perm`` with ``x[..., perm]`` the permuted input.
    """
    k = channel_energy.numel()
    groups = k // m
    order = torch.argsort(channel_energy.double().cpu(), descending=True, stable=True)
    members = order.reshape(m, groups).T            # row g: ranks g, g+G, ...
    return members.sort(dim=1).values.reshape(-1).to(torch.int64).contiguous()


# ---- layer selection ----------------------------------------------------------------------------
def _static_reason(path: str, layer: nn.Linear, cfg: CalibrationConfig) -> str:
    """Why a layer stays dense before any data is seen ("" when it is a candidate)."""
    if cfg.include and not any(re.search(p, path) for p in cfg.include):
        return "not matched by the include filters"
    if any(re.search(p, path) for p in cfg.exclude):
        return "excluded by the exclude filters"
    if layer.weight.dtype not in reference.SUPPORTED_DTYPES:
        return f"unsupported dtype {dtype_name(layer.weight.dtype)}"
    _, m = cfg.nm
    if layer.in_features % m:
        return f"K={layer.in_features} is not divisible by M={m}"
    return ""


def _collect_stats(model, runner, layers, cfg, perms, want_outputs, progress, label):
    """Pass(es) over the calibration data with stats hooks; groups bound the statistics memory."""
    n, m = cfg.nm
    paths = list(layers)
    size = cfg.layers_per_pass or max(len(paths), 1)
    groups = [paths[i:i + size] for i in range(0, len(paths), size)] or [[]]
    stats, outputs = {}, None
    for gi, group in enumerate(groups):
        handles = []
        for p in group:
            st = stats[p] = _LayerStats(layers[p], n, m, cfg.norm_comp, perms.get(p))
            handles.append(layers[p].register_forward_hook(
                lambda mod, args, kwargs, out, st=st: st.update(_flat_input(args, kwargs)), with_kwargs=True))
        desc = f"{label} statistics" + (f" (layers {gi + 1}/{len(groups)})" if len(groups) > 1 else "")
        try:
            out = runner.run(model, desc, progress)
        finally:
            for h in handles:
                h.remove()
        if outputs is None and want_outputs:
            outputs = out
    return stats, outputs


def _channel_energy(model, runner, layers, progress, label):
    """A first, cheap pass for the permutation: per-channel sum of x^2 of each layer, and outputs."""
    energy = {p: torch.zeros(lin.in_features, dtype=torch.float64, device=lin.weight.device)
              for p, lin in layers.items()}

    def hook(mod, args, kwargs, out, p):
        energy[p] += _flat_input(args, kwargs).double().square().sum(0)

    handles = [lin.register_forward_hook(lambda *a, p=p: hook(*a, p), with_kwargs=True) for p, lin in layers.items()]
    try:
        outputs = runner.run(model, f"{label} channel magnitudes", progress)
    finally:
        for h in handles:
            h.remove()
    return energy, outputs


def _fit_layer(lp: LayerPlan, st: _LayerStats, cfg: CalibrationConfig, dtype: torch.dtype) -> None:
    """Fill a candidate layer's errors and tensors from its statistics (perm kept only if it helps)."""
    rank = min(cfg.rank, lp.in_features, lp.out_features) if cfg.low_rank else 0
    rel = lambda e: math.sqrt(e / st.yy) if st.yy > 0 else math.sqrt(e)  # noqa: E731
    lp.errors = {"plain": rel(st.tt_plain), "norm": rel(st.tt_norm)}
    errors, tensors, final = _fit_chain(st.variant(False), cfg, rank, dtype, st.yy)
    lp.errors.update(errors)
    perm = None
    if st.perm is not None:
        errors_p, tensors_p, final_p = _fit_chain(st.variant(True), cfg, rank, dtype, st.yy)
        lp.errors["plain_perm"] = rel(st.tt_plain_p)
        lp.errors["perm"] = final_p
        if final_p < final:
            tensors, final, perm = tensors_p, final_p, st.perm.cpu()
    lp.errors["final"] = final
    lp.rank = rank
    lp.lr_down, lp.lr_up = tensors.get("lr_down"), tensors.get("lr_up")
    lp.bias_delta, lp.perm = tensors.get("bias_delta"), perm


# ---- automatic dense layers ---------------------------------------------------------------------
def _output_error(plan, model, runner, dense_outputs, sparse: set[str], progress, desc) -> float:
    """Model-output relative error with exactly the layers in ``sparse`` on the reference op."""
    if not sparse:
        return 0.0
    with plan.apply_eager(model, only=sparse):
        outputs = runner.run(model, desc, progress)
    return relative_error(outputs, dense_outputs)


def _choose_dense_layers(plan, model, runner, dense_outputs, budget, progress) -> None:
    """Make the worst layers dense until the model-output error meets ``budget``.

    Candidates are ranked by their compensated error (``final``). ``e(k)`` is the output error with
    the k worst dense; ``e(0)`` is measured, ``e(L) = 0`` (the dense model). A binary search finds
    the smallest k with ``e(k) <= budget`` given ``e(k-1) > budget``: 1 + ceil(log2 L) model
    evaluations instead of L. Each dense layer records its error, rank and the output error measured
    with it still sparse (the largest evaluated k below its rank) and at the end.
    """
    order = sorted(plan.sparse_layers(), key=lambda p: plan.layers[p].errors["final"], reverse=True)
    total = len(order)
    evals = {0: plan.output_error["all_sparse"], total: 0.0}
    lo, hi = 0, total
    if evals[0] <= budget:
        hi = 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        evals[mid] = _output_error(plan, model, runner, dense_outputs, set(order[mid:]), progress,
                                   f"budget search: {mid}/{total} layers dense")
        lo, hi = (lo, mid) if evals[mid] <= budget else (mid, hi)
    for rank, p in enumerate(order[:hi], 1):
        before_k = max(k for k in evals if k < rank)
        lp = plan.layers[p]
        lp.sparse = False
        lp.auto_dense = {"rank": rank, "candidates": total, "layer_error": lp.errors["final"],
                         "output_error_with_it_sparse": evals[before_k], "dense_layers_then": before_k,
                         "output_error_after": evals[hi]}
        lp.reason = (f"error budget {budget:g}: layer error {lp.errors['final']:.3g} is the #{rank} largest of "
                     f"{total}; model output error {evals[before_k]:.3g} with it sparse ({before_k} dense), "
                     f"{evals[hi]:.3g} after ({hi} dense)")
        lp.lr_down = lp.lr_up = lp.bias_delta = lp.perm = None
    plan.output_error.update(budget=budget, final=evals[hi], dense_layers=hi,
                             evaluations={str(k): v for k, v in sorted(evals.items())})


# ---- the entry point ----------------------------------------------------------------------------
def calibrate(model: nn.Module, calibration_inputs, options: Mapping[str, Any] | CalibrationConfig | None = None,
              *, progress: bool = True) -> Plan:
    """Fit compensation for every ``nn.Linear`` of ``model`` from data and return a ``Plan``.

    ``calibration_inputs`` is an iterable of ``(args, kwargs)`` pairs (each is one ``model(*args,
    **kwargs)`` call; a bare Tensor means ``((t,), {})``), or a callable ``run(model)`` that drives
    the model itself and returns the output to compare (a sampling loop over timesteps: see
    ``calibration_inputs_from_loop``). It is replayed several times, so it must be deterministic.
    Put the model in ``eval()`` first. See the module docstring for what is fitted and measured.
    """
    cfg = CalibrationConfig.from_options(options)
    n, m = cfg.nm
    if any(mod.training and isinstance(mod, _RANDOM_IN_TRAINING) for mod in model.modules()):
        warnings.warn("calibrate() runs dropout/batch-norm layers in training mode; call model.eval() so that "
                      "every pass over the calibration inputs computes the same thing")
    runner = _Runner(calibration_inputs)
    plan = Plan(pattern=cfg.pattern, norm_comp=cfg.norm_comp, min_tokens=cfg.min_tokens, options=cfg.summary())
    candidates: dict[str, nn.Linear] = {}
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear):
            lp = LayerPlan(path, module.in_features, module.out_features, dtype_name(module.weight.dtype), sparse=True)
            lp.reason = _static_reason(path, module, cfg)
            lp.sparse = not lp.reason
            plan.layers[path] = lp
            if lp.sparse:
                candidates[path] = module

    dense_outputs, perms = None, {}
    if cfg.permutation:
        energy, dense_outputs = _channel_energy(model, runner, candidates, progress, "calibrate 1/3:")
        perms = {p: balanced_permutation(e, m) for p, e in energy.items()}
    label = "calibrate 2/3:" if cfg.permutation else "calibrate 1/2:"
    stats, outputs = _collect_stats(model, runner, candidates, cfg, perms, dense_outputs is None, progress, label)
    dense_outputs = dense_outputs if dense_outputs is not None else outputs

    for path, st in stats.items():
        lp = plan.layers[path]
        lp.tokens, lp.max_rows = st.tokens, st.max_rows
        if st.tokens == 0:
            lp.sparse, lp.reason = False, "not called on the calibration inputs"
        elif st.max_rows < cfg.min_tokens:
            lp.sparse, lp.reason = False, f"M={st.max_rows} tokens < min_tokens={cfg.min_tokens}"
        elif not st.finite():
            lp.sparse, lp.reason = False, "non-finite (NaN/Inf) activations on the calibration inputs"
        else:
            _fit_layer(lp, st, cfg, candidates[path].weight.dtype)
    del stats

    has_outputs = all(_tensors_of(o) for o in dense_outputs)
    if not has_outputs:
        if cfg.error_budget is not None:
            raise ValueError("option 'error_budget' needs the model output: the calibration callable returned "
                             "no tensors; make run(model) return the sampled result")
        return plan
    label = "calibrate 3/3:" if cfg.permutation else "calibrate 2/2:"
    plan.output_error = {"all_sparse": _output_error(plan, model, runner, dense_outputs, set(plan.sparse_layers()),
                                                     progress, f"{label} model output error")}
    if cfg.error_budget is not None:
        _choose_dense_layers(plan, model, runner, dense_outputs, cfg.error_budget, progress)
    return plan


# ---- measuring a plan ---------------------------------------------------------------------------
def model_output_error(plan: Plan, model: nn.Module, calibration_inputs, *, progress: bool = False) -> float:
    """Relative model-output error of ``plan`` (eager reference ops) against the dense model."""
    runner = _Runner(calibration_inputs)
    dense = runner.run(model, "dense outputs", progress)
    return _output_error(plan, model, runner, dense, set(plan.sparse_layers()), progress, "planned outputs")


def _layer_errors(forwards: dict[str, dict[str, Callable]], model: nn.Module, runner: _Runner,
                  progress: bool) -> dict[str, dict[str, float]]:
    """Per-layer relative errors of several sets of replacement forwards in one dense pass: each
    layer sees the dense model's inputs, and ``forwards[name][path](x)`` is compared with its output."""
    modules = dict(model.named_modules())
    acc: dict[str, dict[str, list[float]]] = {}
    handles = []
    for name, layer_forwards in forwards.items():
        for p, fwd in layer_forwards.items():
            cell = acc.setdefault(name, {}).setdefault(p, [0.0, 0.0])

            def hook(mod, args, kwargs, out, fwd=fwd, cell=cell):
                x = args[0] if args else kwargs["input"]
                cell[0] += float((fwd(x).double() - out.double()).square().sum())
                cell[1] += float(out.double().square().sum())

            handles.append(modules[p].register_forward_hook(hook, with_kwargs=True))
    try:
        runner.run(model, "measure layer errors", progress)
    finally:
        for h in handles:
            h.remove()
    return {name: {p: math.sqrt(a / b) if b > 0 else math.sqrt(a) for p, (a, b) in layers.items()}
            for name, layers in acc.items()}


def _measure(plans: dict[str, Plan], model: nn.Module, runner: _Runner, progress: bool) -> dict[str, dict[str, float]]:
    """Per-layer relative errors of several plans in one dense pass."""
    modules = dict(model.named_modules())
    forwards = {}
    for name, plan in plans.items():
        plan.validate(model)
        n, m = plan.nm
        forwards[name] = {p: planned_forward(modules[p], plan.layers[p], n, m, plan.norm_comp, plan.min_tokens)
                          for p in plan.sparse_layers()}
    return _layer_errors(forwards, model, runner, progress)


def measure_forward_errors(model: nn.Module, calibration_inputs, forwards: dict[str, Callable], *,
                           progress: bool = False) -> dict[str, float]:
    """Per-layer ``||f(x) - layer(x)|| / ||layer(x)||`` for any replacement forwards keyed by module path
    (a weight-pruned layer, a planned one, ...), each fed the dense model's own inputs."""
    return _layer_errors({"forwards": forwards}, model, _Runner(calibration_inputs), progress).get("forwards", {})


def input_channel_norms(model: nn.Module, calibration_inputs, layers: dict[str, nn.Linear], *,
                        progress: bool = False) -> dict[str, Tensor]:
    """Each layer's input-channel L2 norms over the calibration inputs (float64; Wanda's ``||X_j||``)."""
    energy, _ = _channel_energy(model, _Runner(calibration_inputs), layers, progress, "channel norms:")
    return {p: e.sqrt() for p, e in energy.items()}


def measure_layer_errors(plan: Plan, model: nn.Module, calibration_inputs, *,
                         progress: bool = False) -> dict[str, float]:
    """Measured per-layer ``||Y_plan - Y_dense|| / ||Y_dense||`` on any inputs (e.g. held-out data)."""
    return _measure({"plan": plan}, model, _Runner(calibration_inputs), progress).get("plan", {})


# ---- gradient refinement ------------------------------------------------------------------------
class _Trainer:
    """Adam on one layer's (lr_down, lr_up) against the dense output; the backbone stays frozen."""

    def __init__(self, layer: nn.Linear, lp: LayerPlan, rank: int, lr: float, n: int, m: int, norm_comp: bool):
        k, n_out = lp.in_features, lp.out_features
        if lp.lr_down is None:  # LoRA-style start: a random down-projection, a zero up-projection
            gen = torch.Generator().manual_seed(0)
            down = torch.randn(k, rank, generator=gen) / math.sqrt(k)
            up = torch.zeros(rank, n_out)
        else:
            down, up = lp.lr_down.float(), lp.lr_up.float()
        dev = layer.weight.device
        self.down = down.to(dev).clone().requires_grad_(True)
        self.up = up.to(dev).clone().requires_grad_(True)
        self.opt = torch.optim.Adam([self.down, self.up], lr=lr)
        self.layer, self.lp, self.n, self.m, self.norm_comp = layer, lp, n, m, norm_comp
        self.steps = 0
        probe = lp.copy()
        probe.lr_down = probe.lr_up = None
        self.op = probe.op_inputs(layer.weight, layer.bias)  # perm, permuted W^T, folded bias

    def train(self, x: Tensor, out: Tensor, steps: int) -> None:
        x2 = x.reshape(-1, x.shape[-1])
        xp = x2 if self.op.perm is None else x2.index_select(1, self.op.perm)
        base = reference.sparse_matmul(xp, self.op.other, self.op.bias, n=self.n, m=self.m, norm_comp=self.norm_comp)
        target = (out.reshape(-1, out.shape[-1]).float() - base.float()).detach()
        xf = xp.float().detach()
        with torch.enable_grad():
            for _ in range(steps):
                loss = (xf @ self.down @ self.up - target).square().mean()
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
                self.steps += 1


def refine(plan: Plan, model: nn.Module, calibration_inputs, *, steps: int = 100, lr: float = 1e-3,
           steps_per_batch: int = 4, progress: bool = True) -> Plan:
    """Train each sparse layer's low-rank branch further with MSE against its dense output.

    Streams: a forward hook takes ``steps_per_batch`` Adam steps on each call's rows and drops them,
    and the calibration inputs are replayed until every layer has taken ``steps`` steps. Layers
    without a low-rank branch start from a LoRA-style init of rank ``min(options rank, K, N)``. A
    final pass measures every layer before and after; a layer keeps its refined tensors only where
    they lower its calibration error (``errors["refined"]``). Returns a new plan.
    """
    if steps < 1 or steps_per_batch < 1 or not lr > 0:
        raise ValueError(f"refine needs steps >= 1, steps_per_batch >= 1 and lr > 0, got {steps}, "
                         f"{steps_per_batch}, {lr}")
    plan.validate(model)
    runner = _Runner(calibration_inputs)
    n, m = plan.nm
    modules = dict(model.named_modules())
    trainers, handles = {}, []
    for p in plan.sparse_layers():
        lp = plan.layers[p]
        rank = lp.rank or min(int(plan.options.get("rank", 64)), lp.in_features, lp.out_features)
        trainers[p] = t = _Trainer(modules[p], lp, rank, lr, n, m, plan.norm_comp)

        def hook(mod, args, kwargs, out, t=t):
            x = args[0] if args else kwargs["input"]
            if t.steps < steps and x.reshape(-1, x.shape[-1]).shape[0] >= plan.min_tokens:
                t.train(x, out, min(steps_per_batch, steps - t.steps))

        handles.append(modules[p].register_forward_hook(hook, with_kwargs=True))
    try:
        for i in range(steps):  # each replay trains every called layer at least once
            if all(t.steps >= steps for t in trainers.values()):
                break
            before = sum(t.steps for t in trainers.values())
            runner.run(model, f"refine pass {i + 1}", progress)
            if sum(t.steps for t in trainers.values()) == before:
                break  # nothing trainable was called (all below min_tokens)
    finally:
        for h in handles:
            h.remove()

    refined = plan.copy()
    for p, t in trainers.items():
        lp = refined.layers[p]
        lp.lr_down = t.down.detach().to(torch.device("cpu"), _dtype_of(lp))
        lp.lr_up = t.up.detach().to(torch.device("cpu"), _dtype_of(lp))
        lp.rank = lp.lr_down.shape[1]
    measured = _measure({"old": plan, "new": refined}, model, runner, progress)
    out = plan.copy()
    for p in trainers:
        old, new = measured.get("old", {}).get(p), measured.get("new", {}).get(p)
        if new is not None and (old is None or new < old):
            out.layers[p] = refined.layers[p]
        if new is not None and old is not None:
            out.layers[p].errors.update(refined=new, before_refine=old)
    return out


def _dtype_of(lp: LayerPlan) -> torch.dtype:
    return DTYPES.get(lp.dtype, torch.float32)
