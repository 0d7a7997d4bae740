"""Pure-PyTorch reference for N:M activation sparsity: the numerical ground truth.

Every later kernel (Triton, cuSPARSELt, fused CUDA) is tested against these functions, so they
favour clarity and exact, documented rules over speed:

* Selection: in every group of ``m`` consecutive values along the last dim, keep the ``n`` of
  largest magnitude. NaN ranks above everything (so it is kept and propagates, as in a dense
  GEMM), then +-Inf, then finite values by ``|x|``. Ties keep the lower index.
* Kept positions are stored in ascending order inside each group (the order sparse tensor cores
  expect: idx0 < idx1), as ``uint8`` indices in ``[0, m)``.
* Norm compensation: one fp32 scale per row, ``s = ||x|| / ||S(x)||``. It is computed on the row
  divided by its largest magnitude, so fp16 sums of squares cannot overflow and fp32 subnormals
  do not vanish. Rows that are all zero, or hold NaN/Inf, get ``s = 1``.
* GEMMs accumulate in fp32 and round once to the input dtype.
"""

from __future__ import annotations

import torch

from .contract import check_compress_inputs, check_pattern, check_sparse_matmul_args, check_sparse_mm_inputs

_SAME_WIDTH_INT = {2: torch.int16, 4: torch.int32}


def _gather_bits(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``gather`` on the raw bits: CPU gather canonicalises bf16 NaNs, losing payload and sign."""
    as_int = _SAME_WIDTH_INT[x.element_size()]
    return x.view(as_int).gather(-1, index).view(x.dtype)


def fold_comp_bias(x: torch.Tensor, bias: torch.Tensor | None, comp_bias: torch.Tensor | None):
    """The bias with a plan's fp32 bias correction added, rounded once to x's dtype."""
    if comp_bias is None:
        return bias
    return ((bias.float() if bias is not None else 0.0) + comp_bias).to(x.dtype)


def dense_matmul(x: torch.Tensor, other: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The exact dense layer, for M below ``min_tokens``: every kernel falls back to this."""
    y = torch.matmul(x, other)
    return (y + bias if bias is not None else y).contiguous()


def nm_select(x: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-n-of-m by magnitude along the last dim -> (values, uint8 in-group indices)."""
    check_compress_inputs(x, n, m)
    k = x.shape[-1]
    groups = x.reshape(*x.shape[:-1], k // m, m)
    # Rank by (class, |x|) with NaN > Inf > finite; two stable sorts give the lexicographic order
    # and keep the lower index on ties.
    is_nan = torch.isnan(groups)
    magnitude = torch.where(is_nan, 0.0, groups.abs().float())
    klass = is_nan.to(torch.int8) * 2 + torch.isinf(groups).to(torch.int8)
    order = torch.sort(magnitude, dim=-1, descending=True, stable=True).indices
    by_class = torch.sort(klass.gather(-1, order), dim=-1, descending=True, stable=True).indices
    order = order.gather(-1, by_class)
    kept = order[..., :n].sort(dim=-1).values
    values = _gather_bits(groups, kept)
    out_shape = (*x.shape[:-1], k // m * n)
    return values.reshape(out_shape).contiguous(), kept.to(torch.uint8).reshape(out_shape).contiguous()


def norm_scale(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """fp32 per-row ``||x|| / ||kept||`` (overflow-safe; 1 for zero or non-finite rows)."""
    xf = x.float()
    vf = values.float()
    finite = torch.isfinite(xf).all(dim=-1, keepdim=True)
    xf = torch.where(finite, xf, 0.0)
    vf = torch.where(finite, vf, 0.0)
    amax = xf.abs().amax(dim=-1, keepdim=True)
    amax = torch.where(amax > 0, amax, 1.0)
    total = (xf / amax).square().sum(dim=-1)
    kept = (vf / amax).square().sum(dim=-1)
    ok = finite.squeeze(-1) & (kept > 0)
    return torch.where(ok, torch.sqrt(total / torch.where(ok, kept, 1.0)), 1.0)


def compress(x: torch.Tensor, n: int, m: int, norm_comp: bool = True):
    """x (..., K) -> values (..., K*n/m), uint8 indices (..., K*n/m), fp32 scale (...)."""
    values, indices = nm_select(x, n, m)
    if norm_comp:
        scale = norm_scale(x, values)
    else:
        scale = torch.ones(x.shape[:-1], dtype=torch.float32, device=x.device)
    return values, indices, scale


def decompress(values: torch.Tensor, indices: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Scatter kept values back to a dense (..., K) tensor with zeros elsewhere."""
    check_pattern(n, m)
    if values.shape != indices.shape:
        raise ValueError(f"values {tuple(values.shape)} and indices {tuple(indices.shape)} differ in shape")
    if values.shape[-1] % n != 0:
        raise ValueError(f"compressed dim {values.shape[-1]} is not a multiple of N={n}")
    g = values.shape[-1] // n
    # On the raw bits, like _gather_bits: CPU scatter canonicalises bf16 NaNs.
    bits = values.view(_SAME_WIDTH_INT[values.element_size()])
    dense = bits.new_zeros(*values.shape[:-1], g, m)
    dense.scatter_(-1, indices.reshape(*values.shape[:-1], g, n).long(), bits.reshape(*values.shape[:-1], g, n))
    return dense.reshape(*values.shape[:-1], g * m).view(values.dtype)


def sparse_mm(values, indices, scale, other, bias=None, *, n: int, m: int) -> torch.Tensor:
    """``scale * (S(x) @ other) + bias`` with torch.matmul broadcasting; fp32 accumulate."""
    check_sparse_mm_inputs(values, indices, scale, other, bias, n, m)
    xs = decompress(values, indices, n, m)
    y = torch.matmul(xs.float(), other.float()) * scale.unsqueeze(-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(values.dtype)


def sparse_matmul(
    x: torch.Tensor,
    other: torch.Tensor,
    bias: torch.Tensor | None = None,
    lr_down: torch.Tensor | None = None,
    lr_up: torch.Tensor | None = None,
    *,
    n: int,
    m: int,
    norm_comp: bool = True,
    min_tokens: int = 0,
) -> torch.Tensor:
    """The fused layer: ``s * S(x) @ other + (x @ lr_down) @ lr_up + bias``.

    ``other`` is the dense right operand in matmul layout (K, N) or (B, K, N); for a linear layer
    it is ``weight.t()``. Rows fewer than ``min_tokens`` (x.shape[-2]) take the exact dense path:
    sparsity does not pay there, and this keeps one compiled graph correct for every M.
    """
    check_sparse_matmul_args(x, other, bias, lr_down, lr_up, n, m)
    if x.shape[-2] < min_tokens:
        return dense_matmul(x, other, bias)
    values, indices, scale = compress(x, n, m, norm_comp)
    y = torch.matmul(decompress(values, indices, n, m).float(), other.float()) * scale.unsqueeze(-1)
    if lr_down is not None:
        y = y + torch.matmul(torch.matmul(x.float(), lr_down.float()), lr_up.float())
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).contiguous()
