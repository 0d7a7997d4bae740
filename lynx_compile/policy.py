"""The policy: for each GEMM, rewrite to the sparse op or keep it dense, and say why."""

from __future__ import annotations

import math
from dataclasses import dataclass

import sympy
import torch

from . import cost_model, selection
from .config import LynxConfig
from .log import log
from .selection import KernelFailedError  # noqa: F401  (raised by the policy; importable from here)
from .kernels import registry
from .kernels.contract import device_reason, gemm_dtype_reason, reduction_dim_reason


class PlanMismatchError(ValueError):
    """The calibration plan does not fit the graph (another model, or other layer shapes)."""


def plan_layer_for(site, plan):
    """The plan's entry for this GEMM (checked against its shape), or None when the plan has none."""
    if plan is None or site.kind != "linear" or site.module_path not in plan.layers:
        return None
    layer = plan.layers[site.module_path]
    if (layer.in_features, layer.out_features) != (site.k, site.n):
        raise PlanMismatchError(f"plan layer {site.module_path!r} has K={layer.in_features}, N={layer.out_features} "
                                f"but the model's GEMM has K={site.k}, N={site.n}: the plan is for another model")
    return layer


class KernelUnavailableError(ValueError):
    """A forced ``kernel`` option cannot run a GEMM on this device, dtype or shape."""


@dataclass(frozen=True)
class Decision:
    rewrite: bool
    reason: str = ""            # why the GEMM stays dense; "" when rewritten
    kernel: str = ""            # the concrete kernel when rewritten
    kernel_reason: str = ""     # why "auto" passed over faster kernels ("" when it took the first)
    runtime_guard: bool = False  # M is symbolic: the op itself falls back to dense below min_tokens
    min_tokens: int = 0          # the threshold the op applies at run time
    cost: dict | None = None     # cost-model estimates at this M (see cost_model.GemmCost.at)
    plan_layer: object = None    # the calibration plan's LayerPlan for this GEMM, if any
    selection: str = ""          # how it was chosen: "always", "cost_model", "measured", "forced"
    measured_dense_ms: float | None = None   # with selection "measured"
    measured_sparse_ms: float | None = None  # the fastest sparse kernel's time


def _is_static(value) -> bool:
    return isinstance(value, int)


def _size_hint(value):
    """The concrete size a symbolic dim had when compiled (None when unknown)."""
    return value if isinstance(value, int) else getattr(getattr(value, "node", None), "hint", None)


def device_profile(config: LynxConfig, device: torch.device) -> cost_model.DeviceProfile:
    """The configured profile, else the one matching the CUDA device's name, else H100's."""
    if config.device_profile:
        return cost_model.PROFILES[config.device_profile]
    if device.type == "cuda" and torch.cuda.is_available():
        try:
            return cost_model.profile_for(torch.cuda.get_device_name(device))
        except ValueError:
            pass
    return cost_model.PROFILES["H100"]


def estimate(site, config: LynxConfig, kernel: str, *, break_even: bool = True):
    """(cost expressions, their values at the node's hinted M, profile) for one GEMM."""
    profile = device_profile(config, site.device)
    n, m = config.nm or (2, 4)
    cost = cost_model.gemm_cost(profile, _size_hint(site.k) or 1, _size_hint(site.n) or 1, pattern=(n, m),
                                kernel=kernel or "cusparselt",
                                dtype_bytes=site.dtype.itemsize, batch=_size_hint(site.batch) or 1)
    hint = _size_hint(site.m)
    values = cost.at(hint) if hint is not None else {}
    if break_even:
        root = cost.break_even()
        values["break_even_m"] = "inf" if root == sympy.oo else math.ceil(root)
    return cost, values, profile


def resolve_kernel(config: LynxConfig, problem: registry.Problem) -> tuple[str, str]:
    """(kernel, reason): the kernel to use, with "" or, for ``auto``, why faster ones were passed over.

    A forced kernel that cannot run a GEMM the policy would rewrite is an error, never a silent
    dense fallback: the user asked for that kernel.
    """
    if config.kernel != "auto":
        reason = registry.get_kernel(config.kernel).unavailable_reason(problem)
        if reason:
            raise KernelUnavailableError(f"kernel={config.kernel!r} cannot run here: {reason}")
        return config.kernel, ""
    passed_over = []
    for kernel in registry.auto_candidates(problem.device_type):
        reason = kernel.unavailable_reason(problem)
        if not reason:
            return kernel.name, "; ".join(passed_over)
        passed_over.append(f"{kernel.name}: {reason}")
    return "", "no kernel can run it (" + "; ".join(passed_over) + ")"


def decide(site, config: LynxConfig, plan=None) -> Decision:
    """Apply the options, the plan and the op's limits to one ``GemmSite`` in a fixed, documented order."""
    if config.nm is None:
        return Decision(False, "pattern is 'dense'")
    layer = plan_layer_for(site, plan)
    if layer is not None and not layer.sparse:
        return Decision(False, f"plan keeps it dense: {layer.reason}")
    n, m = config.nm
    if site.kind not in config.op_kinds:
        return Decision(False, f"op kind {site.kind!r} not in op_kinds {list(config.op_kinds)}")
    filtered_out = config.layer_filter.reason(site.module_path)
    if filtered_out:
        return Decision(False, filtered_out)
    if tuple(site.scalars) != (1, 1):
        return Decision(False, f"{site.op} with beta/alpha {tuple(site.scalars)} is not supported")
    unsupported = gemm_dtype_reason(site.dtype, site.other_dtype or site.dtype, site.bias_dtype) or device_reason(site.device)
    if unsupported:
        return Decision(False, unsupported)
    k_reason = reduction_dim_reason(site.k, m)
    if k_reason:
        return Decision(False, k_reason)
    if config.min_tokens != "auto" and _is_static(site.m) and site.m < config.min_tokens:
        return Decision(False, f"M={site.m} tokens < min_tokens={config.min_tokens}")
    problem = registry.Problem(site.device.type, site.dtype, site.m, site.k, site.n, site.batch, (n, m))
    mode = "forced" if config.kernel != "auto" else selection.effective_mode(config, site.device)
    measured = {}
    if mode == "measured":
        choice = selection.measured_choice(site, config, problem, layer)
        measured = {"measured_dense_ms": choice.dense_ms, "measured_sparse_ms": choice.sparse_ms}
        if not choice.kernel:
            return Decision(False, choice.reason, selection=mode, **measured)
        kernel, reason = choice.kernel, choice.reason
    else:
        try:
            kernel, reason = resolve_kernel(config, problem)
        except KernelUnavailableError as error:
            raise KernelUnavailableError(f"{site.name} ({site.op}, MxKxN={site.m}x{site.k}x{site.n}): {error}") \
                from None
        if not kernel:
            return Decision(False, reason)
        failure = selection.self_test_failure(kernel, site, config, (n, m))
        if failure:
            log.warning("rtlynx: %s keeps %s dense", failure, site.name)
            return Decision(False, failure + "; kept dense")
    _, cost, profile = estimate(site, config, kernel)
    if mode == "cost_model":
        stored = selection.stored_times(site, config, layer, kernel)
        if stored is not None:  # a measurement of this problem on this device outranks the estimate
            measured = {"measured_dense_ms": stored[0], "measured_sparse_ms": stored[1]}
            if stored[1] * (1 + config.selection_margin) > stored[0]:
                return Decision(False, f"stored measurement: {stored[1]:.3f} ms sparse ({kernel}) vs {stored[0]:.3f} "
                                       f"ms dense", cost=cost, selection=mode, **measured)
        elif "sparse_us" in cost and cost["sparse_us"] * (1 + config.selection_margin) > cost["dense_us"]:
            return Decision(False, f"cost model: {cost['sparse_us']:.3g} us sparse ({kernel}) vs {cost['dense_us']:.3g} "
                                   f"us dense on {profile.name}", cost=cost, selection=mode)
    min_tokens = config.min_tokens
    if min_tokens == "auto":
        break_even = cost["break_even_m"]
        where = f"kernel {kernel!r} on {profile.name} (cost model)"
        if break_even == "inf":
            return Decision(False, f"sparsity never pays for {where}", cost=cost)
        if _is_static(site.m) and site.m < break_even:
            return Decision(False, f"M={site.m} tokens < break-even M={break_even} for {where}", cost=cost)
        min_tokens = break_even
    return Decision(True, kernel=kernel, kernel_reason=reason, min_tokens=min_tokens, cost=cost, plan_layer=layer,
                    runtime_guard=not _is_static(site.m) and min_tokens > 0, selection=mode, **measured)
