"""``calibrate``: the entry point that runs the stages in order (layer filter, channel permutation,
statistics, fits, model-output error, dense-layer search) and assembles the ``Plan``."""

from __future__ import annotations

import warnings
from typing import Any, Mapping

from torch import nn

from ..kernels.contract import dtype_name
from ..plan import LayerPlan, Plan
from .dense_layers import _choose_dense_layers
from .fitting import _fit_layer
from .layers import _static_reason
from .measurement import _output_error
from .options import CalibrationConfig
from .permutation import _channel_energy, balanced_permutation
from .runner import _Runner, _tensors_of
from .statistics import _collect_stats

_RANDOM_IN_TRAINING = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)


def calibrate(model: nn.Module, calibration_inputs, options: Mapping[str, Any] | CalibrationConfig | None = None,
              *, progress: bool = True) -> Plan:
    """Fit compensation for every ``nn.Linear`` of ``model`` from data and return a ``Plan``.

    ``calibration_inputs`` is an iterable of ``(args, kwargs)`` pairs (each is one ``model(*args,
    **kwargs)`` call; a bare Tensor means ``((t,), {})``), or a callable ``run(model)`` that drives
    the model itself and returns the output to compare (a sampling loop over timesteps: see
    ``calibration_inputs_from_loop``). It is replayed several times, so it must be deterministic.
    Put the model in ``eval()`` first. See the ``lynx_compile.calibration`` package docstring for what
    is fitted and measured.
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
