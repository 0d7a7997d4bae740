"""The ``rtlynx::*`` custom ops that the passes insert.

They are functional (no mutation, outputs never alias inputs) and have fake implementations with
symbolic sizes, so Dynamo, AOTAutograd, Inductor and export treat them as opaque, shape-known calls.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import contract, dense_mode, reference, triton_ops  # noqa: F401  (triton_ops registers rtlynx::triton_sparse_matmul)
from .registry import get_kernel


def _batch_shape(x: Tensor, other: Tensor):
    return torch.broadcast_shapes(x.shape[:-2], other.shape[:-2])


@torch.library.custom_op("rtlynx::compress", mutates_args=())
def compress(x: Tensor, n: int, m: int, norm_comp: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """N:M-compress x along its last dim: (values, uint8 in-group indices, fp32 per-row scale)."""
    return reference.compress(x, n, m, norm_comp)


@compress.register_fake
def _compress_fake(x, n, m, norm_comp=True):
    contract.check_compress_inputs(x, n, m)
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
    contract.check_sparse_mm_inputs(values, indices, scale, other, bias, n, m)
    return values.new_empty(*_batch_shape(values, other), values.shape[-2], other.shape[-1])


@torch.library.custom_op("rtlynx::sparse_matmul", mutates_args=())
def sparse_matmul(
    x: Tensor,
    other: Tensor,
    bias: Optional[Tensor] = None,
    lr_down: Optional[Tensor] = None,
    lr_up: Optional[Tensor] = None,
    perm: Optional[Tensor] = None,
    comp_bias: Optional[Tensor] = None,
    *,
    n: int = 2,
    m: int = 4,
    norm_comp: bool = True,
    min_tokens: int = 0,
    impl: str = "reference",
) -> Tensor:
    """The fused layer the passes insert: ``s * S(xp) @ otherp + (xp @ lr_down) @ lr_up + bias + comp_bias``.

    ``other`` is in matmul layout, (K, N) or (B, K, N): ``weight.t()`` for a linear layer. With a
    channel permutation ``perm`` (int64, K), the groups of M are formed over ``xp = x[..., perm]``
    and ``otherp = other[..., perm, :]``, which leaves the dense product unchanged. ``comp_bias``
    (fp32, N) is a calibrated bias correction of the sparse path.

    The exact dense ``x @ other + bias`` runs instead when ``x`` has fewer than ``min_tokens`` rows, or
    inside ``lynx_compile.run_dense()`` (dense denoising steps): both are decided here, at run time,
    so switching never recompiles. ``impl`` names the kernel (see ``registry``).
    """
    contract.check_layer_inputs(x, other, bias, lr_down, lr_up, perm, comp_bias, n, m)
    if x.shape[-2] < min_tokens or dense_mode.active():
        return reference.dense_matmul(x, other, bias)
    if perm is not None:
        x, other = x.index_select(-1, perm), other.index_select(-2, perm)
    bias = reference.fold_comp_bias(x, bias, comp_bias)
    return get_kernel(impl).run(x, other, bias, lr_down, lr_up, n=n, m=m, norm_comp=norm_comp)


@sparse_matmul.register_fake
def _sparse_matmul_fake(x, other, bias=None, lr_down=None, lr_up=None, perm=None, comp_bias=None, *, n=2, m=4,
                        norm_comp=True, min_tokens=0, impl="reference"):
    contract.check_layer_inputs(x, other, bias, lr_down, lr_up, perm, comp_bias, n, m)
    get_kernel(impl)
    return x.new_empty(*_batch_shape(x, other), x.shape[-2], other.shape[-1])
