"""2:4 sparse tensor cores through cuSPARSELt, with the activation X as the sparse *first* operand.

The route is unfused: one Triton pass writes the pruned dense X and the scale (the reference where
Triton cannot run) ->
``torch._cslt_compress`` -> ``torch._cslt_sparse_mm`` -> fp32 epilogue (per-token scale, low-rank
term, bias) in PyTorch. It is the hardware baseline the fused kernel (issue 8) must beat, and what
``kernel="auto"`` picks on CUDA until then.

Why these limits:
- cuSPARSELt's bias is a per-row-of-the-result vector and its alpha a per-row scale; with X first,
  rows are tokens, so the layer's per-output-feature bias cannot go through the API and is added in
  the epilogue together with the per-token scale (one extra pass over Y in fp32).
- fp16/bf16 need the sparse operand's sizes padded to multiples of 16 and the dense operand's N to a
  multiple of 8 (PyTorch's own constraints for cuSPARSELt); padding rows and K with zeros keeps a
  valid 2:4 pattern and does not change the result.
- cuSPARSELt rounds its product to the input dtype before our fp32 epilogue: two roundings in all,
  so results match the reference within 2 ulp instead of 1.
- Some ``alg_id``s have returned wrong results on some cuSPARSELt versions, so each (shape, dtype)
  gets its alg_id once from ``_cslt_sparse_mm_search`` and the result is checked against a dense
  matmul of the same pruned X before the id is cached; a wrong id falls back to alg 0, and an alg 0
  that is wrong too is an error, never a silent result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import contract, reference

SPARSE_ALIGN = 16  # rows and K of the sparse operand (fp16/bf16)
DENSE_ALIGN = 8    # N of the dense operand
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)

# (M padded, K padded, N padded, dtype, device index) -> verified alg_id
_ALG_IDS: dict[tuple, int] = {}


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


def _pad_to(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    pad_rows, pad_cols = -t.shape[0] % rows, -t.shape[1] % cols
    return F.pad(t, (0, pad_cols, 0, pad_rows)) if pad_rows or pad_cols else t


def _verified_alg_id(packed: torch.Tensor, pruned: torch.Tensor, dense: torch.Tensor) -> int:
    key = (*pruned.shape, dense.shape[1], pruned.dtype, pruned.device.index)
    if key in _ALG_IDS:
        return _ALG_IDS[key]
    expected = pruned.float() @ dense.float()
    tolerance = 2e-2 * expected.abs().max().item() + 1e-3
    candidates = [torch._cslt_sparse_mm_search(packed, dense), 0]
    for alg_id in dict.fromkeys(candidates):
        got = torch._cslt_sparse_mm(packed, dense, alg_id=alg_id).float()
        if (got - expected).abs().max().item() <= tolerance:
            _ALG_IDS[key] = alg_id
            return alg_id
    raise RuntimeError(f"cuSPARSELt gave wrong results for shape {tuple(pruned.shape)} x {tuple(dense.shape)} "
                       f"({pruned.dtype}) with alg_ids {sorted(set(candidates))}; use kernel='triton' or 'reference'")


def _prune(x2d: torch.Tensor, n: int, m: int, norm_comp: bool):
    """(x with dropped values zeroed, scale): one Triton pass where Triton runs, else the reference."""
    from . import triton_compress

    if not triton_compress.triton_unavailable_reason(x2d.device.type):
        return triton_compress.prune(x2d, n, m, norm_comp)
    values, indices, scale = reference.compress(x2d, n, m, norm_comp)
    return reference.decompress(values, indices, n, m), scale


def sparse_matmul(x, other, bias=None, lr_down=None, lr_up=None, *, n: int, m: int, norm_comp: bool = True,
                  min_tokens: int = 0) -> torch.Tensor:
    """Same contract as ``reference.sparse_matmul``; the GEMM runs on sparse tensor cores."""
    contract.check_sparse_matmul_args(x, other, bias, lr_down, lr_up, n, m)
    if other.dim() != 2:
        raise ValueError("the cuSPARSELt path needs a 2-D other (K, N); batched GEMMs use another kernel")
    if x.shape[-2] < min_tokens:
        return reference.dense_matmul(x, other, bias)
    k, n_out = other.shape
    x2d = x.reshape(-1, k)
    pruned, scale = _prune(x2d, n, m, norm_comp)
    pruned = _pad_to(pruned, SPARSE_ALIGN, SPARSE_ALIGN)
    dense = _pad_to(other, SPARSE_ALIGN, DENSE_ALIGN).contiguous()
    packed = torch._cslt_compress(pruned)
    y = torch._cslt_sparse_mm(packed, dense, alg_id=_verified_alg_id(packed, pruned, dense))
    y = y[: x2d.shape[0], :n_out].float() * scale.unsqueeze(-1)
    if lr_down is not None:
        y = y + (x2d.float() @ lr_down.float()) @ lr_up.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], n_out)
