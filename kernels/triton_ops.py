"""``rtlynx::triton_sparse_matmul``: the Triton route of ``rtlynx::sparse_matmul`` as a ``triton_op``.

``rtlynx::sparse_matmul`` is opaque to torch.compile: Inductor calls it through the dispatcher, and
the op launches its kernels from Python on every call. A ``torch.library.triton_op`` is traceable
instead. Under functionalization its body is traced, and its ``wrap_triton`` launches become
``triton_kernel_wrapper_functional`` nodes that Inductor compiles and launches from its own
generated code. ``passes/inline_triton.py`` traces it into the graph on CUDA.

The op computes the same layer, with three differences:
- it has no run-time switches (``min_tokens``, ``run_dense()``): a traced body is fixed when it is
  traced, so the pass inlines it only where neither is needed, and the backend handles
  ``run_dense()`` (see ``backend.py``);
- with a channel permutation, the compress kernel gathers ``x[..., perm]`` as it loads x, where the
  opaque op copies it first (``perm`` must be a permutation: ``Plan.load`` checks that);
- the low-rank term is ``x @ lr_down[perm^-1]``, the same product summed in another order.

Eager calls run the kernels directly (``triton_op`` turns ``wrap_triton`` off there), so the CPU
tests run this body in Triton's interpreter.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import contract, reference, triton_sparse_mm
from .triton_compress import triton
from .triton_sparse_mm import permute_rows


def triton_sparse_matmul_body(
    x: Tensor,
    other: Tensor,
    bias: Optional[Tensor] = None,
    lr_down: Optional[Tensor] = None,
    lr_up: Optional[Tensor] = None,
    perm: Optional[Tensor] = None,
    comp_bias: Optional[Tensor] = None,
    n: int = 2,
    m: int = 4,
    norm_comp: bool = True,
) -> Tensor:
    """``s * S(xp) @ otherp + (xp @ lr_down) @ lr_up + bias + comp_bias`` with the Triton kernels."""
    contract.check_layer_inputs(x, other, bias, lr_down, lr_up, perm, comp_bias, n, m)
    if perm is not None:
        other = permute_rows(other, perm)
    bias = reference.fold_comp_bias(x, bias, comp_bias)
    return triton_sparse_mm.sparse_matmul(x, other, bias, lr_down, lr_up, n=n, m=m, norm_comp=norm_comp,
                                          perm=perm, traceable=True)


if triton is not None:
    triton_sparse_matmul = torch.library.triton_op("rtlynx::triton_sparse_matmul", triton_sparse_matmul_body,
                                                   mutates_args=())
