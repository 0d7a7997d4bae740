"""The options of ``calibrate`` (``CalibrationConfig``), checked once so every stage can trust them."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

from ..config import as_bool, as_regex_tuple, build_options, one_of
from ..kernels.contract import PATTERN_NAMES, parse_pattern


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
        return parse_pattern(self.pattern)

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
        return one_of(key, value, PATTERN_NAMES)
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
