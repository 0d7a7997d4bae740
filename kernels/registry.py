"""Named implementations of the fused sparse matmul; the policy picks one per GEMM node.

Each kernel says whether it can run a given problem (and why not), and on which devices
``kernel="auto"`` may choose it. The Triton interpreter on the CPU is a testing tool, not a fast
path, so ``auto`` never picks Triton there; ``kernel="triton"`` still forces it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

from . import cusparselt, fused_cuda, reference, triton_sparse_mm


@dataclass(frozen=True)
class Problem:
    """What a kernel needs to know to say whether it can run one GEMM."""

    device_type: str
    dtype: torch.dtype
    m: object      # tokens per GEMM (int, or a SymInt / str when dynamic)
    k: int
    n: object
    batch: object  # 1 for a 2-D GEMM
    pattern: tuple[int, int]


@dataclass(frozen=True)
class Kernel:
    name: str
    run: Callable[..., torch.Tensor]
    unavailable_reason: Callable[[Problem], str]  # "" when it can run the problem
    auto_devices: tuple[str, ...]                 # where kernel="auto" may choose it, in preference order
    # A kernel with several builds tests each: self_test(device, dtype, check) with check(run) -> ""
    # or why run's result is wrong; returns "" or why the kernel cannot be used. None: check(run).
    self_test: Callable[..., str] | None = None


_KERNELS: dict[str, Kernel] = {}


def register_kernel(kernel: Kernel) -> None:
    if kernel.name in _KERNELS:
        raise ValueError(f"kernel {kernel.name!r} is already registered")
    _KERNELS[kernel.name] = kernel


def kernel_names() -> tuple[str, ...]:
    return tuple(_KERNELS)


def get_kernel(name: str) -> Kernel:
    try:
        return _KERNELS[name]
    except KeyError:
        raise ValueError(f"unknown kernel {name!r}; registered kernels: {', '.join(_KERNELS)}") from None


_SELF_TEST: dict[tuple, str] = {}


def self_test(kernel: Kernel, device: torch.device, dtype: torch.dtype, pattern: tuple[int, int]) -> str:
    """Run the kernel once on small random data against the reference: "" when it agrees, else why.

    Done once per (kernel, device, dtype, pattern) at compile time, so that a kernel that cannot
    build or run here (a Triton or driver problem) is caught before the graph depends on it.
    """
    key = (kernel.name, str(device), dtype, pattern)
    if kernel.name == "reference":
        return ""
    if key not in _SELF_TEST:
        # Passes run inside the compile's FakeTensorMode: the self-test needs real tensors.
        with unset_fake_temporarily():
            _SELF_TEST[key] = _run_self_test(kernel, device, dtype, pattern)
    return _SELF_TEST[key]


def _run_self_test(kernel: Kernel, device, dtype, pattern) -> str:
    check = functools.partial(_check_against_reference, device=device, dtype=dtype, pattern=pattern)
    return check(kernel.run) if kernel.self_test is None else kernel.self_test(device, dtype, check)


def _check_against_reference(run, device, dtype, pattern) -> str:
    """Several K tiles of 64 and partial M and N tiles, so that a pipelined kernel is exercised."""
    n, m = pattern
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 64 * m, generator=gen).to(device, dtype)
    w = torch.randn(24, 64 * m, generator=gen).to(device, dtype)
    try:
        got = run(x, w.t(), None, None, None, n=n, m=m, norm_comp=True).float()
        expected = reference.sparse_matmul(x, w.t(), n=n, m=m).float()
        tolerance = 4 * torch.finfo(dtype).eps * expected.abs().max().item() + 1e-6
        error = (got - expected).abs().max().item()
        return "" if error <= tolerance else f"self-test error {error:.3g} > tolerance {tolerance:.3g}"
    except Exception as exc:  # any failure to build or run the kernel
        return f"self-test failed: {type(exc).__name__}: {exc}".splitlines()[0]


def auto_candidates(device_type: str) -> list[Kernel]:
    return [k for k in _KERNELS.values() if device_type in k.auto_devices]


def _triton_reason(problem: Problem) -> str:
    return triton_sparse_mm.unavailable_reason(problem.device_type, problem.dtype, (problem.m, problem.k, problem.n))


# Registration order is the order "auto" tries them.
register_kernel(Kernel("cusparselt", cusparselt.sparse_matmul, cusparselt.unavailable_reason, ("cuda",)))
register_kernel(Kernel("triton", triton_sparse_mm.sparse_matmul, _triton_reason, ("cuda",)))
register_kernel(Kernel("reference", reference.sparse_matmul, lambda problem: "", ("cpu", "cuda")))
# Opt-in until a GPU benchmark shows it ahead of cuSPARSELt (benchmarks/NOTES.md): "auto" never picks it.
register_kernel(Kernel("fused", fused_cuda.sparse_matmul, fused_cuda.unavailable_reason, (), fused_cuda.self_test))
