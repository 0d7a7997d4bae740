"""The one relative error of calibration, ``||a - b||_F / ||b||_F``, from float64 squared norms.

Every error calibration reports (per-layer errors from statistics, measured per-layer errors, the
model-output error the dense-layer search compares with its budget) goes through ``relative`` so
that they are all the same quantity, with the same rule for a zero reference.
"""

from __future__ import annotations

import math

from torch import Tensor

from .runner import _tensors_of


def relative(error_energy: float, reference_energy: float) -> float:
    """``sqrt(||a - b||^2 / ||b||^2)`` from the two squared norms; ``||a - b||`` when ``b`` is zero."""
    return math.sqrt(error_energy / reference_energy) if reference_energy > 0 else math.sqrt(error_energy)


def error_energies(got: Tensor, want: Tensor) -> tuple[float, float]:
    """``(||got - want||^2, ||want||^2)`` accumulated in float64."""
    return float((got.double() - want.double()).square().sum()), float(want.double().square().sum())


def relative_error(outputs: list, reference_outputs: list) -> float:
    """``||out - ref||_F / ||ref||_F`` over every tensor of two lists of model outputs (float64)."""
    num = den = 0.0
    for got, want in zip(outputs, reference_outputs, strict=True):
        for a, b in zip(_tensors_of(got), _tensors_of(want), strict=True):
            e, r = error_energies(a, b)
            num += e
            den += r
    return relative(num, den)
