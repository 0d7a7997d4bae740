"""Which GEMMs the allowed ones are worth rewriting: the ``selection`` option.

- ``measured`` (the default on CUDA): time dense and every sparse kernel that can run the GEMM on
  this device (``timing.py``), and rewrite with the fastest only when it beats dense by
  ``selection_margin``; otherwise the GEMM stays dense and the reason gives both times.
- ``cost_model``: the same rule on the cost model's estimates (``cost_model.py``), no timing; where
  this device has stored times for the GEMM's problem (an earlier ``measured`` compile), on those.
- ``always`` (the default on the CPU, where the kernels exist for numerics and inspection, not speed):
  every GEMM the options allow is rewritten.
A forced ``kernel`` is always used: selection applies to ``kernel="auto"`` only.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

from . import timing
from .kernels import registry
from .kernels.contract import dtype_name
from .log import log


class KernelFailedError(RuntimeError):
    """With ``strict=True``: a kernel chosen for a GEMM failed its compile-time self-test."""


def effective_mode(config, device: torch.device) -> str:
    if config.selection != "auto":
        return config.selection
    if device.type == "cuda":
        return "measured"
    _note_cpu_once()
    return "always"


@functools.cache
def _note_cpu_once() -> None:
    log.info("rtlynx: on the CPU every GEMM the options allow is rewritten (selection='always'); the CPU "
             "kernels are for numerics and inspection and are slower than dense, so expect no speed-up here")


def self_test_failure(kernel: str, site, config, pattern) -> str:
    """"" when ``kernel`` passed its self-test on the GEMM's device and dtype, else the reason (or an error
    with ``strict=True``)."""
    failure = registry.self_test(registry.get_kernel(kernel), site.device, site.dtype, pattern)
    if not failure:
        return ""
    message = f"kernel {kernel!r} failed on {site.device}: {failure}"
    if config.strict:
        raise KernelFailedError(f"{site.name}: {message} (strict=True)")
    return message


@dataclass(frozen=True)
class MeasuredChoice:
    kernel: str             # "" keeps the GEMM dense
    reason: str             # why dense, or how the kernel won
    dense_ms: float | None = None
    sparse_ms: float | None = None


def cache_key(config) -> str:
    """The part of the pass's uuid that selection adds: the stored times, where they can decide."""
    may_measure = config.kernel == "auto" and config.selection in ("auto", "measured")
    return timing.stored_digest() if may_measure else ""


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def timing_problem(site, config, layer) -> timing.TimingProblem:
    hint = getattr(getattr(site.m, "node", None), "hint", None)
    rank = layer.lr_down.shape[1] if layer is not None and layer.lr_down is not None else 0
    batch = site.batch if isinstance(site.batch, int) else 1
    return timing.TimingProblem(_device_name(site.device), dtype_name(site.dtype), config.pattern,
                                timing.m_bucket(site.m, hint), site.k, site.n, batch, rank, site.bias is not None)


def measured_choice(site, config, problem: registry.Problem, layer) -> MeasuredChoice:
    """Time dense and each sparse kernel ``auto`` may use here; the fastest wins by the margin, or dense stays."""
    n, m = problem.pattern
    candidates, passed_over = {}, []
    for kernel in registry.auto_candidates(problem.device_type):
        if kernel.name == "reference":  # the ground truth: a dense GEMM on decompressed x, never faster
            continue
        reason = kernel.unavailable_reason(problem)
        if not reason:
            reason = self_test_failure(kernel.name, site, config, (n, m))
            if reason:
                log.warning("rtlynx: %s; %s is timed without it", reason, site.name)
        if reason:
            passed_over.append(f"{kernel.name}: {reason}")
        else:
            candidates[kernel.name] = kernel.run
    if not candidates:
        return MeasuredChoice("", "no sparse kernel to time (" + "; ".join(passed_over) + ")")
    timer = timing.current_timer(config.timing_budget_ms)
    if timer is None:
        return MeasuredChoice("", f"selection 'measured' cannot time on {site.device.type} (no CUDA device)")
    key = timing_problem(site, config, layer)
    times = dict(timing.load_times(key.device).get(key.key(), {}))
    missing = {name: run for name, run in candidates.items() if name not in times}
    if missing or timing.DENSE not in times:
        with unset_fake_temporarily():  # the passes run under the compile's FakeTensorMode
            times.update(timing.measure(key, site.device, site.dtype, missing, timer, n, m, config.norm_comp)
                         if timing.DENSE in times else
                         timing.measure(key, site.device, site.dtype, candidates, timer, n, m, config.norm_comp))
        timing.store_times(key.device, key, times)
    return _choose(times, list(candidates), config.selection_margin, passed_over)


def stored_times(site, config, layer, kernel: str) -> tuple[float, float] | None:
    """(dense ms, ``kernel`` ms) measured earlier on this device for this GEMM problem, if both are stored:
    ``cost_model`` selection prefers them to its estimates."""
    key = timing_problem(site, config, layer)
    times = timing.load_times(key.device).get(key.key(), {})
    dense, sparse = times.get(timing.DENSE), times.get(kernel)
    return (dense, sparse) if isinstance(dense, float) and isinstance(sparse, float) else None


def _choose(times: dict, candidates: list[str], margin: float, passed_over: list[str]) -> MeasuredChoice:
    dense = times.get(timing.DENSE)
    failed = [f"{name}: {times[name]}" for name in candidates if not isinstance(times.get(name), float)]
    if not isinstance(dense, float):
        return MeasuredChoice("", f"timing the dense GEMM failed ({dense})")
    sparse = {name: times[name] for name in candidates if isinstance(times.get(name), float)}
    if not sparse:
        return MeasuredChoice("", "timing failed for every sparse kernel (" + "; ".join(failed) + ")", dense)
    best = min(sparse, key=sparse.get)
    both = f"measured {sparse[best]:.3f} ms sparse ({best}) vs {dense:.3f} ms dense"
    if sparse[best] * (1 + margin) > dense:
        margin_text = f", short of the {margin:.0%} margin" if margin and sparse[best] < dense else ""
        return MeasuredChoice("", both + margin_text, dense, sparse[best])
    others = [f"{name}: {ms:.3f} ms" for name, ms in sparse.items() if name != best] + failed + passed_over
    return MeasuredChoice(best, both + (f" (also: {'; '.join(others)})" if others else ""), dense, sparse[best])
