"""2:4 sparse tensor cores through cuSPARSELt, with the activation X as the sparse *first* operand.

The route is unfused: one Triton pass writes the pruned dense X and the scale (the reference where
Triton cannot run) -> ``torch._cslt_compress`` -> ``torch._cslt_sparse_mm`` -> an epilogue in PyTorch
(per-token scale, low-rank term, bias). It is the hardware baseline the fused kernel (issue 8) must
beat, and what ``kernel="auto"`` picks on CUDA until then.

Why these choices:
- The weight is read where it lies: ``torch._cslt_sparse_mm`` takes a row-major (K, N) dense operand
  or its transpose, a (N, K) row-major matrix seen as ``weight.t()``, which it describes to
  cuSPARSELt as a transposed operand. Only a weight whose sizes or pointer are not aligned (see
  below), or that is neither layout, needs a padded copy; that copy is made once per weight and
  reused while the weight is unchanged (same storage, same version counter).
- cuSPARSELt's bias is a per-row-of-the-result vector; with X first, rows are tokens, so the layer's
  per-output-feature bias cannot go through the API. Its per-row alpha would be the per-token scale,
  but PyTorch's own tests skip fp16/bf16 alpha scaling ("cuSPARSELt v0.6.x does not support
  bfloat/float16 alpha scaling"), and a one-element alpha is read with ``.item()``: neither is used.
- The epilogue is at most two passes over Y, both in the layer dtype with fp32 arithmetic: one
  ``addcmul`` (bias + scale * Y, or scale * Y) and, with low-rank compensation, one in-place
  ``addmm_`` of ``(x @ lr_down) @ lr_up`` (both GEMMs in the layer dtype with fp32 accumulation; the
  small (M, R) intermediate is rounded to the layer dtype). No fp32 copy of Y is made.
- fp16/bf16 need the sparse operand's sizes padded to multiples of 16 and the dense operand's N to a
  multiple of 8 (PyTorch's own constraints for cuSPARSELt); padding rows and K with zeros keeps a
  valid 2:4 pattern and does not change the result.
- Roundings: cuSPARSELt rounds its product to the layer dtype, the epilogue rounds once per pass, and
  ``x @ lr_down`` is rounded once: results match the reference within the tolerance the GPU test
  uses (2 eps relative, plus 2 eps of the largest output).
- Each (device, dtype, padded M, K, N, dense layout) gets its GEMM configuration once: cuSPARSELt's
  search (``torch._C._cusparselt.mm_search`` where it exists, which also returns the split-k it
  chose; the deprecated ``torch._cslt_sparse_mm_search``, alg_id only, before), checked against a
  dense matmul of the same pruned X before it is cached, because some alg_ids have returned wrong
  results on some cuSPARSELt versions. A wrong configuration falls back to alg 0 without split-k,
  and an alg 0 that is wrong too is an error, never a silent result. That first call reads results
  on the host (a sync); every later call for the key makes no host sync, so it can be captured in a
  CUDA graph. A first call during graph capture is an error that says to warm up first.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from . import contract, reference

SPARSE_ALIGN = 16  # rows and K of the sparse operand (fp16/bf16)
DENSE_ALIGN = 8    # N of the dense operand
PTR_ALIGN = 16     # bytes: PyTorch describes every cuSPARSELt operand with a 16-byte alignment
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)

# (device type, device index, dtype, M padded, K padded, N padded, dense operand row-major) ->
# verified keyword arguments of torch._cslt_sparse_mm (alg_id, and split-k where this torch has it)
_GEMM_CONFIGS: dict[tuple, dict] = {}
# weight (the base of the view passed as ``other``) -> {view: (version, padded copy)}: dense operands
# cuSPARSELt cannot read in place; dropped with the weight
_DENSE_COPIES = WeakIdKeyDictionary()


def unavailable_reason(problem) -> str:
    """"" when this path can run ``problem`` (a ``registry.Problem``), else why not."""
    if problem.pattern != (2, 4):
        return f"sparse tensor cores support 2:4 only, not {problem.pattern[0]}:{problem.pattern[1]}"
    if problem.device_type != "cuda":
        return f"needs a CUDA device, got {problem.device_type!r}"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 0):
        return f"compute capability {major}.{minor} < 8.0 (no sparse tensor cores)"
    if not torch.backends.cusparselt.is_available():
        return "this PyTorch build has no cuSPARSELt"
    if problem.dtype not in SUPPORTED_DTYPES:
        return f"dtype {contract.dtype_name(problem.dtype)} unsupported (supported: float16, bfloat16)"
    if problem.batch != 1:
        return "batched GEMMs (bmm) are not supported by the cuSPARSELt path"
    return ""


def _round_up(size: int, align: int) -> int:
    return size + -size % align


def _pad_to(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    pad_rows, pad_cols = -t.shape[0] % rows, -t.shape[1] % cols
    return F.pad(t, (0, pad_cols, 0, pad_rows)) if pad_rows or pad_cols else t


def _readable_in_place(other: torch.Tensor, k_pad: int, n_pad: int) -> bool:
    """Whether cuSPARSELt can read ``other`` (K, N) as it is: aligned sizes and pointer, and row-major
    (K, N) or the transpose of a row-major (N, K), e.g. ``weight.t()`` (PyTorch passes it as a
    transposed operand; any other strides it would misread)."""
    return (tuple(other.shape) == (k_pad, n_pad) and other.data_ptr() % PTR_ALIGN == 0
            and (other.is_contiguous() or other.t().is_contiguous()))


def _padded_copy(other: torch.Tensor, k_pad: int, n_pad: int) -> torch.Tensor:
    copy = other.new_zeros(k_pad, n_pad)
    copy[: other.shape[0], : other.shape[1]] = other
    return copy


def _dense_operand(other: torch.Tensor, k_pad: int, n_pad: int) -> torch.Tensor:
    """``other`` itself when cuSPARSELt can read it, else a zero-padded row-major copy, made once per
    weight and reused while the weight's storage and version counter are unchanged."""
    if _readable_in_place(other, k_pad, n_pad):
        return other
    try:
        version = other._version
    except RuntimeError:  # inference tensors track no version: a copy could go stale, so none is kept
        return _padded_copy(other, k_pad, n_pad)
    owner = other if other._base is None else other._base
    view = (other.data_ptr(), tuple(other.shape), other.stride(), k_pad, n_pad)
    copies = _DENSE_COPIES.setdefault(owner, {})
    cached = copies.get(view)
    if cached is None or cached[0] != version:
        cached = copies[view] = (version, _padded_copy(other, k_pad, n_pad))
    return cached[1]


@functools.cache
def _gemm_arg_names() -> frozenset:
    """The keyword arguments ``torch._cslt_sparse_mm`` takes in this PyTorch (split-k came later)."""
    return frozenset(arg.name for arg in torch.ops.aten._cslt_sparse_mm.default._schema.arguments)


def _search(packed: torch.Tensor, dense: torch.Tensor) -> dict:
    """cuSPARSELt's own pick for this problem, as keyword arguments of ``torch._cslt_sparse_mm``."""
    names = _gemm_arg_names()
    mm_search = getattr(getattr(torch._C, "_cusparselt", None), "mm_search", None)
    if mm_search is None or "split_k" not in names:
        return {"alg_id": int(torch._cslt_sparse_mm_search(packed, dense))}
    # (alg_id, split_k, split_k_mode, max_alg_id); torch < 2.8 returns split_k_one_kernel (a bool)
    # third, and its _cslt_sparse_mm takes it under that name.
    alg_id, split_k, mode = mm_search(packed, dense, None, None, None, False)[:3]
    config = {"alg_id": int(alg_id), "split_k": int(split_k)}
    if "split_k_mode" in names:
        config["split_k_mode"] = int(mode)
    elif "split_k_one_kernel" in names:
        config["split_k_one_kernel"] = bool(mode)
    return config


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _gemm_config(packed: torch.Tensor, pruned: torch.Tensor, dense: torch.Tensor) -> dict:
    """The verified configuration for this problem: searched and checked on the first call (host
    syncs), a dict look-up with no host sync on every later call."""
    key = (pruned.device.type, pruned.device.index, pruned.dtype, *pruned.shape, dense.shape[1],
           dense.is_contiguous())
    config = _GEMM_CONFIGS.get(key)
    if config is not None:
        return config
    if _capturing(pruned.device):
        raise RuntimeError(
            f"cuSPARSELt: the first call for shape {tuple(pruned.shape)} x {tuple(dense.shape)} ({pruned.dtype}) "
            "searches the GEMM configuration, which reads results on the host and cannot run during CUDA graph "
            "capture; run the model once before capturing it")
    expected = torch.mm(pruned, dense).float()
    finite = torch.isfinite(expected)  # NaN/Inf in X propagate as in a dense GEMM: compare the rest
    tolerance = 2e-2 * torch.where(finite, expected.abs(), 0.0).max() + 1e-3
    tried: list[dict] = []
    for config in (_search(packed, dense), {"alg_id": 0}):
        if config in tried:
            continue
        tried.append(config)
        got = torch._cslt_sparse_mm(packed, dense, **config).float()
        error = torch.where(finite, (got - expected).abs(), 0.0).max()  # NaN where got alone is not finite
        if bool(error <= tolerance):  # host sync: first call for this key only
            _GEMM_CONFIGS[key] = config
            return config
    raise RuntimeError(f"cuSPARSELt gave wrong results for shape {tuple(pruned.shape)} x {tuple(dense.shape)} "
                       f"({pruned.dtype}) with {tried}; use kernel='triton' or 'reference'")


def _prune(x2d: torch.Tensor, n: int, m: int, norm_comp: bool):
    """(x with dropped values zeroed, scale): one Triton pass where Triton runs, else the reference."""
    from . import triton_compress

    if not triton_compress.triton_unavailable_reason(x2d.device.type):
        return triton_compress.prune(x2d, n, m, norm_comp)
    values, indices, scale = reference.compress(x2d, n, m, norm_comp)
    return reference.decompress(values, indices, n, m), scale


def _epilogue(y: torch.Tensor, scale: torch.Tensor, x2d: torch.Tensor, bias=None, lr_down=None,
              lr_up=None) -> torch.Tensor:
    """``scale[:, None] * y + (x2d @ lr_down) @ lr_up + bias`` in y's dtype, contiguous.

    ``y`` (M, N) is the sparse product in the layer dtype (a view into the padded GEMM result is
    fine), ``scale`` the fp32 per-row scale. Two passes over Y at most: ``addcmul`` computes
    ``bias + y * scale`` in fp32 (the fp32 scale makes it the op's dtype) and rounds once into the
    output; ``addmm_`` adds the low-rank term with fp32 accumulation and rounds once. Both low-rank
    GEMMs take the layer dtype; only their small (M, R) intermediate is rounded.
    """
    out = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    if bias is None:
        torch.mul(y, scale.unsqueeze(-1), out=out)
    else:
        torch.addcmul(bias, y, scale.unsqueeze(-1), out=out)
    if lr_down is not None:
        out.addmm_(torch.mm(x2d, lr_down), lr_up)
    return out


def sparse_matmul(x, other, bias=None, lr_down=None, lr_up=None, *, n: int, m: int, norm_comp: bool = True,
                  min_tokens: int = 0) -> torch.Tensor:
    """Same contract as ``reference.sparse_matmul``; the GEMM runs on sparse tensor cores."""
    contract.check_sparse_matmul_args(x, other, bias, lr_down, lr_up, n, m)
    if other.dim() != 2:
        raise ValueError("the cuSPARSELt path needs a 2-D other (K, N); batched GEMMs use another kernel")
    k, n_out = other.shape
    x2d = x.reshape(-1, k)
    rows = x2d.shape[0]
    if rows == 0:  # nothing to compute: no launch, no search
        return x.new_empty(*x.shape[:-1], n_out)
    if x.shape[-2] < min_tokens:
        return reference.dense_matmul(x, other, bias)
    pruned, scale = _prune(x2d, n, m, norm_comp)
    pruned = _pad_to(pruned, SPARSE_ALIGN, SPARSE_ALIGN)
    dense = _dense_operand(other, pruned.shape[1], _round_up(n_out, DENSE_ALIGN))
    packed = torch._cslt_compress(pruned)
    y = torch._cslt_sparse_mm(packed, dense, **_gemm_config(packed, pruned, dense))
    out = _epilogue(y[:rows, :n_out], scale, x2d, bias, lr_down, lr_up)
    return out.reshape(*x.shape[:-1], n_out)
