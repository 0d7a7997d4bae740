"""A run-time switch that makes every ``rtlynx::sparse_matmul`` compute the exact dense layer.

Diffusion samplers often keep the first or last denoising steps dense. The switch is read inside
the op at run time, so flipping it between steps never recompiles. Graphs that cannot read it
(CUDA graphs, inlined Triton kernels) are handled by the backend: inside the switch it runs the
graph Dynamo captured, eagerly (``backend.dense_switch_blocker``).
"""

from __future__ import annotations

import contextlib
import threading

_state = threading.local()


def active() -> bool:
    return getattr(_state, "depth", 0) > 0


@contextlib.contextmanager
def run_dense(enabled: bool = True):
    """``with run_dense(): model(...)``: every rtlynx op in this thread runs dense (when ``enabled``)."""
    _state.depth = getattr(_state, "depth", 0) + (1 if enabled else 0)
    try:
        yield
    finally:
        _state.depth -= 1 if enabled else 0


class DenseSteps:
    """Keep the first ``first`` and last ``last`` of ``total`` denoising steps dense.

    ``for i, t in enumerate(timesteps): with schedule.step(i): x = model(x, t)``
    """

    def __init__(self, total: int, *, first: int = 0, last: int = 0):
        if total < 1 or first < 0 or last < 0:
            raise ValueError(f"DenseSteps needs total >= 1 and first, last >= 0; got {total}, {first}, {last}")
        self.total, self.first, self.last = total, first, last

    def is_dense(self, step: int) -> bool:
        if not 0 <= step < self.total:
            raise ValueError(f"step {step} is outside the schedule's range(0, {self.total})")
        return step < self.first or step >= self.total - self.last

    def step(self, step: int):
        return run_dense(self.is_dense(step))
