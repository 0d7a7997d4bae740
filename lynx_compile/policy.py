"""The policy: for each GEMM, rewrite to the sparse op or keep it dense, and say why."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .config import LynxConfig
from .kernels import registry
from .kernels.reference import SUPPORTED_DTYPES

SUPPORTED_DEVICES = ("cpu", "cuda")


class KernelUnavailableError(ValueError):
    """A forced ``kernel`` option cannot run a GEMM on this device, dtype or shape."""


@dataclass(frozen=True)
class Decision:
    rewrite: bool
    reason: str = ""            # why the GEMM stays dense; "" when rewritten
    kernel: str = ""            # the concrete kernel when rewritten
    kernel_reason: str = ""     # why "auto" passed over faster kernels ("" when it took the first)
    runtime_guard: bool = False  # M is symbolic: the op itself falls back to dense below min_tokens


def _is_static(value) -> bool:
    return isinstance(value, int)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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


def decide(site, config: LynxConfig) -> Decision:
    """Apply the options and the op's limits to one ``GemmSite`` in a fixed, documented order."""
    if config.nm is None:
        return Decision(False, "pattern is 'dense'")
    n, m = config.nm
    if site.kind not in config.op_kinds:
        return Decision(False, f"op kind {site.kind!r} not in op_kinds {list(config.op_kinds)}")
    if config.include and not any(re.search(p, site.module_path) for p in config.include):
        return Decision(False, "module path not matched by include")
    for pattern in config.exclude:
        if re.search(pattern, site.module_path):
            return Decision(False, f"module path matches exclude {pattern!r}")
    if tuple(site.scalars) != (1, 1):
        return Decision(False, f"{site.op} with beta/alpha {tuple(site.scalars)} is not supported")
    if site.dtype not in SUPPORTED_DTYPES:
        valid = ", ".join(_dtype_name(d) for d in SUPPORTED_DTYPES)
        return Decision(False, f"dtype {_dtype_name(site.dtype)} unsupported (supported: {valid})")
    if site.device.type not in SUPPORTED_DEVICES:
        return Decision(False, f"device {site.device.type!r} unsupported (supported: {', '.join(SUPPORTED_DEVICES)})")
    if not _is_static(site.k):
        return Decision(False, f"reduction dim K={site.k} is dynamic")
    if site.k % m != 0:
        return Decision(False, f"K={site.k} is not divisible by M={m}")
    if _is_static(site.m) and site.m < config.min_tokens:
        return Decision(False, f"M={site.m} tokens < min_tokens={config.min_tokens}")
    problem = registry.Problem(site.device.type, site.dtype, site.m, site.k, site.n, site.batch, (n, m))
    try:
        kernel, reason = resolve_kernel(config, problem)
    except KernelUnavailableError as error:
        raise KernelUnavailableError(f"{site.name} ({site.op}, MxKxN={site.m}x{site.k}x{site.n}): {error}") from None
    if not kernel:
        return Decision(False, reason)
    return Decision(True, kernel=kernel, kernel_reason=reason,
                    runtime_guard=not _is_static(site.m) and config.min_tokens > 0)
