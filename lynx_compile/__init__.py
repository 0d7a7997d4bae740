"""lynx-compile: ``torch.compile(model, backend="rtlynx")`` runs DiT GEMMs with N:M activation sparsity.

Importing the package registers the ``torch.ops.rtlynx.*`` custom ops and the ``rtlynx`` backend;
the backend is also found through the ``torch_dynamo_backends`` entry point without an import.
"""

from .kernels import ops as _ops  # noqa: F401  (registers torch.ops.rtlynx.*)
from .backend import register as _register_backend, rtlynx
from .calibration import calibrate, calibration_inputs_from_loop, refine
from .config import LynxConfig
from .kernels.dense_mode import DenseSteps, run_dense
from .plan import LayerPlan, Plan
from .explain import Explanation, explain
from .transform import transform
from .report import GemmRecord, GraphReport, clear_reports, reports

_register_backend()

__all__ = ["rtlynx", "transform", "explain", "Explanation", "LynxConfig", "calibrate", "calibration_inputs_from_loop", "refine",
           "Plan", "LayerPlan", "DenseSteps", "run_dense", "GemmRecord", "GraphReport", "reports", "clear_reports"]
__version__ = "0.1.0"
