"""Which layers calibration may make sparse before any data is seen.

The rules are the backend's own: the same include/exclude filter (``LayerFilter``) and the same dtype
and reduction-dim rules (``kernels/contract.py``), so that a plan and a compile agree on a layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from ..kernels.contract import gemm_dtype_reason, reduction_dim_reason
from ..layer_filter import LayerFilter

if TYPE_CHECKING:
    from .options import CalibrationConfig


def _static_reason(path: str, layer: nn.Linear, cfg: CalibrationConfig) -> str:
    """Why a layer stays dense before any data is seen ("" when it is a candidate)."""
    return (LayerFilter(cfg.include, cfg.exclude).reason(path)
            or gemm_dtype_reason(layer.weight.dtype, layer.weight.dtype)
            or reduction_dim_reason(layer.in_features, cfg.nm[1]))
