"""Measured kernel selection: time dense and each sparse kernel for one GEMM problem, on the device the
model runs on, when the graph is compiled, and keep the times on disk so that a problem is timed once.

Like Inductor's max-autotune, the measurement decides and the cost model only predicts: a published
2:4 speed-up (about 1.2x for cuSPARSELt on an H100 at 8192^3) is too small for an unfused route to
beat cuBLAS at DiT shapes, so a GEMM stays dense unless sparse measured faster here.

- A *problem* is what decides a kernel's time: device, dtype, pattern, M (its compiled value, or
  the next power of two when M is dynamic), K, N, batch, low-rank rank and bias.
- Each route is timed end to end: dense is the GEMM Inductor would run (``addmm`` with the bias);
  a sparse kernel runs the whole layer (compression, GEMM, epilogue, low-rank branch).
- Timing uses CUDA events after warm-up, the median over inputs rotated through several buffers,
  and stops at ``timing_budget_ms`` per route.
- Times are stored in a JSON file (``timing_cache_path()``), under a key of the device name, the
  driver, torch and the kernels' source; delete the file, or call ``clear_timings()``, to time
  again. A file that cannot be read is ignored with a warning that names it, and rewritten.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from .log import log
from .progress import Progress

CACHE_ENV = "LYNX_TIMING_CACHE"
CACHE_FORMAT, CACHE_VERSION = "lynx-compile-timings", 1
DENSE = "dense"
WARMUP, MAX_REPEATS, MAX_ROTATED_BYTES = 3, 50, 256 << 20


@dataclass(frozen=True)
class TimingProblem:
    device: str        # the device's name, e.g. "NVIDIA H100 80GB HBM3"
    dtype: str
    pattern: str
    m: int
    k: int
    n: int
    batch: int = 1
    rank: int = 0      # low-rank compensation rank, 0 without
    bias: bool = False

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def m_bucket(m, hint: int | None) -> int:
    """The M a problem is timed at: M itself when static, else its compiled hint rounded up to a power of two."""
    if isinstance(m, int):
        return m
    return 1 << max(0, math.ceil(math.log2(max(hint or 1, 1))))


# A timer takes (route, problem, run) where run(i) executes the route once on the i-th input buffers,
# and returns milliseconds; it raises when the route cannot run. Tests inject their own.
Timer = Callable[[str, TimingProblem, Callable[[int], object]], float]


def cuda_event_timer(budget_ms: float) -> Timer:
    """Median of CUDA-event times after warm-up, bounded by ``budget_ms`` of measured time per route."""

    def timer(route: str, problem: TimingProblem, run: Callable[[int], object]) -> float:
        for i in range(WARMUP):
            run(i)
        torch.cuda.synchronize()
        times: list[float] = []
        while len(times) < MAX_REPEATS and sum(times) < budget_ms:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run(len(times))
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    return timer


_INJECTED: list[Timer] = []


@contextlib.contextmanager
def use_timer(timer: Timer):
    """Time with ``timer`` instead of CUDA events inside the block (tests; other devices' timers)."""
    _INJECTED.append(timer)
    try:
        yield timer
    finally:
        _INJECTED.pop()


def current_timer(budget_ms: float) -> Timer | None:
    """The injected timer, else CUDA events where CUDA runs, else None (nothing to measure with)."""
    if _INJECTED:
        return _INJECTED[-1]
    return cuda_event_timer(budget_ms) if torch.cuda.is_available() else None


# ---- the store on disk ----------------------------------------------------------------------------
def timing_cache_path() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lynx_compile" / "timings.json"


def environment_key(device: str) -> str:
    """Times hold for one device, driver, torch and kernel source: a change of any times again."""
    from .passes.source_digest import source_digest

    driver = torch.version.cuda or "no-cuda"
    return f"{device}|cuda {driver}|torch {torch.__version__}|kernels {source_digest('lynx_compile.kernels.registry')[:16]}"


def _read(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if data.get("format") != CACHE_FORMAT or data.get("version") != CACHE_VERSION:
            raise ValueError(f"expected format {CACHE_FORMAT!r} version {CACHE_VERSION}")
        entries = data["environments"]
        if not isinstance(entries, dict):
            raise ValueError("'environments' is not an object")
        return entries
    except (OSError, ValueError, KeyError, AttributeError) as error:
        warnings.warn(f"rtlynx: ignoring the timing cache {path}: it cannot be read ({error}); the GEMMs are "
                      f"timed again and the file is rewritten", stacklevel=2)
        return {}


def load_times(device: str) -> dict[str, dict[str, object]]:
    """problem key -> {route: ms, or "error: ..."} stored for this environment."""
    return _read(timing_cache_path()).get(environment_key(device), {})


def store_times(device: str, problem: TimingProblem, times: dict[str, object]) -> None:
    path = timing_cache_path()
    environments = _read(path)
    environments.setdefault(environment_key(device), {})[problem.key()] = times
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"format": CACHE_FORMAT, "version": CACHE_VERSION, "environments": environments},
                              indent=1, sort_keys=True))
    tmp.replace(path)


def clear_timings() -> None:
    """Forget every stored time: the next compile measures again."""
    timing_cache_path().unlink(missing_ok=True)


def stored_digest() -> str:
    """A hash of the stored times, for the pass's cache key: a graph compiled before a measurement was
    stored is not served after it (the times decide what the pass rewrites)."""
    path = timing_cache_path()
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "none"


# ---- measuring one problem ----------------------------------------------------------------------
def _inputs(problem: TimingProblem, device: torch.device, dtype: torch.dtype):
    """Rotated activation buffers and one weight, bias and low-rank pair, in the layer's layout."""
    gen = torch.Generator().manual_seed(0)
    lead = (problem.batch,) if problem.batch > 1 else ()
    x_bytes = problem.batch * problem.m * problem.k * dtype.itemsize
    copies = max(1, min(4, MAX_ROTATED_BYTES // max(x_bytes, 1)))
    xs = [torch.randn(*lead, problem.m, problem.k, generator=gen).to(device, dtype) for _ in range(copies)]
    weight = torch.randn(*lead, problem.n, problem.k, generator=gen).to(device, dtype)
    bias = torch.randn(problem.n, generator=gen).to(device, dtype) if problem.bias else None
    lowrank = (None, None)
    if problem.rank:
        lowrank = (torch.randn(problem.k, problem.rank, generator=gen).to(device, dtype) / problem.k,
                   torch.randn(problem.rank, problem.n, generator=gen).to(device, dtype))
    return xs, weight.transpose(-1, -2), bias, lowrank


def measure(problem: TimingProblem, device: torch.device, dtype: torch.dtype, kernels: dict[str, Callable],
            timer: Timer, n: int, m: int, norm_comp: bool) -> dict[str, object]:
    """{route: median ms, or "error: ..."} for dense and each of ``kernels`` (name -> the kernel's run)."""
    xs, other, bias, (lr_down, lr_up) = _inputs(problem, device, dtype)

    def dense(i):  # what Inductor runs for the dense layer: addmm with its bias, or a (b)mm
        x = xs[i % len(xs)]
        if bias is not None and x.dim() == 2:
            return torch.addmm(bias, x, other)
        y = torch.matmul(x, other)
        return y + bias if bias is not None else y

    routes = {DENSE: dense}
    for name, run in kernels.items():
        routes[name] = (lambda run: lambda i: run(xs[i % len(xs)], other, bias, lr_down, lr_up, n=n, m=m,
                                                   norm_comp=norm_comp))(run)
    times: dict[str, object] = {}
    what = f"rtlynx: timing {problem.dtype} M={problem.m} K={problem.k} N={problem.n}"
    bar, started = Progress(what, total=len(routes), unit="routes"), time.perf_counter()
    for route, call in routes.items():
        try:
            times[route] = float(timer(route, problem, call))
        except Exception as error:  # a kernel that fails to build or run here stays out of the choice
            times[route] = f"error: {type(error).__name__}: {error}".splitlines()[0]
        bar.update()
    bar.close()
    summary = ", ".join(f"{route} {_ms(value)}" for route, value in times.items())
    log.info("%s: %s (%.2f s)", what.replace("timing", "timed"), summary, time.perf_counter() - started)
    sys.stderr.write(f"{what.replace('timing', 'timed')}: {summary} in {time.perf_counter() - started:.2f} s\n")
    return times


def _ms(value) -> str:
    return f"{value:.3f} ms" if isinstance(value, float) else str(value)
