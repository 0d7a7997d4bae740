"""The ``rtlynx::*`` custom ops that the passes insert.

They are functional (no mutation, outputs never alias inputs) and have fake implementations with
symbolic sizes, so Dynamo, AOTAutograd, Inductor and export treat them as opaque, shape-known calls.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference
from .registry import get_kernel


def _batch_shape(x: Tensor, other: Tensor):
    return torch.broadcast_shapes(x.shape[:-2], other.shape[:-2])


@torch.library.custom_op("rtlynx::compress", mutates_args=())
def compress(x: Tensor, n: int, m: int, norm_comp: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """N:M-compress x along its last dim: (values, uint8 in-group indices, fp32 per-row scale)."""
    return reference.compress(x, n, m, norm_comp)


@compress.register_fake
def _compress_fake(x, n, m, norm_comp=True):
    reference.check_pattern(n, m)
    reference.check_operand(x, m)
    kc = x.shape[-1] // m * n
    return (
        x.new_empty(*x.shape[:-1], kc),
        x.new_empty(*x.shape[:-1], kc, dtype=torch.uint8),
        x.new_empty(x.shape[:-1], dtype=torch.float32),
    )


@torch.library.custom_op("rtlynx::sparse_mm", mutates_args=())
def sparse_mm(
    values: Tensor, indices: Tensor, scale: Tensor, other: Tensor, bias: Optional[Tensor], n: int, m: int
) -> Tensor:
    """``scale * (S(x) @ other) + bias`` from the output of ``rtlynx::compress``."""
    return reference.sparse_mm(values, indices, scale, other, bias, n=n, m=m).contiguous()


@sparse_mm.register_fake
def _sparse_mm_fake(values, indices, scale, other, bias, n, m):
    reference.check_pattern(n, m)
    reference.check_operand(values, 1, "values")
    reference.check_operand(other, 1, "other")
    reference.check_same_dtype(values, other=other, bias=bias)
    reference.check_reduction_dims(values, other, values.shape[-1] // n * m)
    return values.new_empty(*_batch_shape(values, other), values.shape[-2], other.shape[-1])


@torch.library.custom_op("rtlynx::sparse_matmul", mutates_args=())
def sparse_matmul(
    x: Tensor,
    other: Tensor,
    bias: Optional[Tensor] = None,
    lr_down: Optional[Tensor] = None,
    lr_up: Optional[Tensor] = None,
    *,
    n: int = 2,
    m: int = 4,
    norm_comp: bool = True,
    min_tokens: int = 0,
    impl: str = "reference",
) -> Tensor:
    """The fused layer the passes insert: ``s * S(x) @ other + (x @ lr_down) @ lr_up + bias``.

    ``other`` is in matmul layout, (K, N) or (B, K, N): ``weight.t()`` for a linear layer.
    ``impl`` names the kernel (see ``registry``); the passes resolve "auto" before inserting the op.
    """
    run = get_kernel(impl).run
    return run(x, other, bias, lr_down, lr_up, n=n, m=m, norm_comp=norm_comp, min_tokens=min_tokens)


@sparse_matmul.register_fake
def _sparse_matmul_fake(x, other, bias=None, lr_down=None, lr_up=None, *, n=2, m=4, norm_comp=True,
                        min_tokens=0, impl="reference"):
    reference.check_pattern(n, m)
    reference.check_operand(x, m)
    reference.check_operand(other, 1, "other")
    reference.check_same_dtype(x, other=other, bias=bias)
    reference.check_reduction_dims(x, other, x.shape[-1])
    get_kernel(impl)
    return x.new_empty(*_batch_shape(x, other), x.shape[-2], other.shape[-1])
