"""Named implementations of the fused sparse matmul; the passes pick one per node.

A kernel is registered with a function that does the work and a function that says whether it
can run for given tensors (returning the reason when it cannot). ``"reference"`` runs anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import reference


@dataclass(frozen=True)
class Kernel:
    name: str
    run: Callable[..., torch.Tensor]
    # (device type, dtype, (M, K, N)) -> "" when runnable, else the reason it is not.
    unavailable_reason: Callable[[str, torch.dtype, tuple], str]


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


register_kernel(Kernel("reference", reference.sparse_matmul, lambda device, dtype, shape: ""))
