"""Measuring errors by running the model: the model-output error of a plan and per-layer errors of
replacement forwards, each layer fed the dense model's own inputs. Calibration scores its fits from
statistics; these measurements check plans on any inputs (held-out data, refined plans, baselines)."""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from ..plan import Plan, planned_forward
from .errors import error_energies, relative, relative_error
from .hooks import forward_hooks, layer_input
from .permutation import _channel_energy
from .runner import _Runner


def _output_error(plan, model, runner, dense_outputs, sparse: set[str], progress, desc) -> float:
    """Model-output relative error with exactly the layers in ``sparse`` on the reference op."""
    if not sparse:
        return 0.0
    with plan.apply_eager(model, only=sparse):
        outputs = runner.run(model, desc, progress)
    return relative_error(outputs, dense_outputs)


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
    hooks = []
    for name, layer_forwards in forwards.items():
        for p, fwd in layer_forwards.items():
            cell = acc.setdefault(name, {}).setdefault(p, [0.0, 0.0])

            def hook(mod, args, kwargs, out, fwd=fwd, cell=cell):
                error, reference = error_energies(fwd(layer_input(args, kwargs)), out)
                cell[0] += error
                cell[1] += reference

            hooks.append((modules[p], hook))
    with forward_hooks(hooks, with_kwargs=True):
        runner.run(model, "measure layer errors", progress)
    return {name: {p: relative(a, b) for p, (a, b) in layers.items()} for name, layers in acc.items()}


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
