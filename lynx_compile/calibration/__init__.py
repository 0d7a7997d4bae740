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

The package, one module per technique: ``options`` (``CalibrationConfig``), ``layers`` (the static
layer filter), ``runner`` (replaying the calibration inputs), ``hooks`` (forward hooks for one
replay), ``errors`` (the relative error), ``statistics``, ``fitting``, ``permutation``,
``measurement``, ``dense_layers`` (the error-budget search), ``refinement`` and ``api``
(``calibrate``).
"""

from .api import calibrate
from .errors import relative_error
from .fitting import reduced_rank_regression
from .measurement import input_channel_norms, measure_forward_errors, measure_layer_errors, model_output_error
from .options import CalibrationConfig
from .permutation import balanced_permutation
from .refinement import refine
from .runner import calibration_inputs_from_loop

__all__ = [
    "CalibrationConfig",
    "balanced_permutation",
    "calibrate",
    "calibration_inputs_from_loop",
    "input_channel_norms",
    "measure_forward_errors",
    "measure_layer_errors",
    "model_output_error",
    "reduced_rank_regression",
    "refine",
    "relative_error",
]
