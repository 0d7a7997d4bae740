"""Which layers calibration may make sparse before any data is seen, and the N:M patterns it fits.

Kept apart so that the layer filter has one home (``_static_reason``: include/exclude regexes,
dtype, K divisible by M) that the options and ``calibrate`` both read.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from torch import nn

from ..kernels import reference
from ..plan import dtype_name

if TYPE_CHECKING:
    from .options import CalibrationConfig

PATTERNS = ("2:4", "1:2", "4:8")


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
