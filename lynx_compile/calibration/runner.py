"""Replaying the calibration inputs: every stage (statistics, error measurements, refinement) runs the
model over the same deterministic inputs, in whichever of the two forms the caller gave them."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from ..progress import Progress
from .hooks import forward_hooks


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
        try:
            with forward_hooks([(model, lambda *_: bar.update())]), torch.no_grad():
                if self.fn is not None:
                    outputs = [self.fn(model)]
                else:
                    outputs = [model(*args, **kwargs) for args, kwargs in self.items]
        finally:
            bar.close()
        if self.calls_per_run is None:
            self.calls_per_run = bar.count
        return outputs


def _tensors_of(output: Any) -> list[Tensor]:
    return [t for t in tree_leaves(output) if isinstance(t, Tensor)]
