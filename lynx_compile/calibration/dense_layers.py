"""Automatic dense layers: with ``error_budget``, make the layers with the largest error dense, as few
as a binary search over that ranking needs to bring the measured model-output error within budget."""

from __future__ import annotations

from .measurement import _output_error


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
