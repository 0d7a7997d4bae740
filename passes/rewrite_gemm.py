"""Replace one GEMM node by ``rtlynx::sparse_matmul``, keeping the node's metadata."""

from __future__ import annotations

import torch
from torch import fx


def rewrite_gemm(graph: fx.Graph, site, *, n: int, m: int, norm_comp: bool, min_tokens: int, kernel: str) -> fx.Node:
    """``x @ other (+ bias)`` -> ``sparse_matmul(x, other, bias, ...)``; the old node is erased.

    The new node inherits ``meta`` (module path, stack trace, fake value), so reports, Inductor's
    provenance tracking and later passes still see the original layer.
    """
    kwargs = dict(n=n, m=m, norm_comp=norm_comp, min_tokens=min_tokens, impl=kernel)
    with graph.inserting_before(site.node):
        new = graph.call_function(torch.ops.rtlynx.sparse_matmul.default, (site.x, site.other, site.bias), kwargs)
    new.meta.update(site.node.meta)
    site.node.replace_all_uses_with(new)
    graph.erase_node(site.node)
    return new
