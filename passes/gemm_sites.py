"""Find every GEMM in a post-grad ATen graph and describe it as a ``GemmSite``.

Every GEMM must appear in the report, rewritten or not, so this classifies each node instead of
pattern-matching only the rewritable ones. The forms a DiT produces after Inductor's
decompositions are a single ATen node each (the reshapes around them are views):

    linear:  addmm(bias, x2d, permute(w)) | mm(x2d, permute(w)) | bmm(x, expand(permute(w)))
    matmul:  bmm(a, b) | baddbmm(c, a, b) | mm(a, b)   (right operand is not a parameter)

The left operand is the one sparsified along the reduction dim K.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import fx

aten = torch.ops.aten

GEMM_TARGETS = {
    aten.mm.default: "mm",
    aten.addmm.default: "addmm",
    aten.bmm.default: "bmm",
    aten.baddbmm.default: "baddbmm",
}

# Ops through which a weight stays "the same weight": views, layout changes, dtype-free copies.
_WEIGHT_VIEW_OPS = {
    aten.permute.default, aten.t.default, aten.transpose.int, aten.view.default, aten.reshape.default,
    aten._unsafe_view.default, aten.expand.default, aten.clone.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.alias.default, aten.contiguous.default,
}


@dataclass
class GemmSite:
    """One GEMM node: ``out = x @ other (+ bias)``, with x sparsifiable along K."""

    node: fx.Node
    op: str                  # mm | addmm | bmm | baddbmm
    kind: str                # linear | matmul
    x: fx.Node
    other: fx.Node
    bias: fx.Node | None
    module_path: str         # e.g. "transformer_blocks.0.ff.net.2"; "" at the model's top level
    batch: object            # int or SymInt (1 for 2-D GEMMs)
    m: object                # tokens (rows of x per GEMM); int or SymInt
    k: object
    n: object
    dtype: torch.dtype              # x's
    device: torch.device
    other_dtype: torch.dtype | None = None
    bias_dtype: torch.dtype | None = None
    scalars: tuple = (1, 1)  # (beta, alpha) of addmm/baddbmm

    @property
    def name(self) -> str:
        return self.module_path or "(root)"


def module_path(node: fx.Node) -> str:
    """The innermost ``nn_module_stack`` entry as a plain dotted path (``blocks.0.ff``)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = re.sub(r"^L\[['\"][^'\"]*['\"]\]", "", path)                        # Dynamo's L['self'] root
    path = re.sub(r"\.?__dict__\[['\"]_(modules|parameters|buffers)['\"]\]", "", path)
    path = re.sub(r"\._(modules|parameters|buffers)\b", "", path)
    path = re.sub(r"\[['\"]?([^'\"\]]+)['\"]?\]", r".\1", path)           # [0] / ['key'] -> .0 / .key
    return path.strip(".")


def _placeholder_index(node: fx.Node) -> int | None:
    """Position of a placeholder among the graph inputs (AOTAutograd records it in ``desc``)."""
    index = getattr(node.meta.get("desc"), "idx", None)
    if isinstance(index, int):
        return index
    placeholders = [n for n in node.graph.nodes if n.op == "placeholder"]
    return placeholders.index(node)


def _is_weight(node: fx.Node, param_inputs: frozenset[int] | None) -> bool:
    """True when the operand is a parameter or constant reached only through views.

    ``param_inputs`` are the graph-input positions holding ``nn.Parameter``s; when unknown (None),
    any graph input counts as a weight.
    """
    while node.op == "call_function" and node.target in _WEIGHT_VIEW_OPS:
        node = node.args[0]
    if node.op == "get_attr":
        return True
    if node.op != "placeholder":
        return False
    return param_inputs is None or _placeholder_index(node) in param_inputs


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def as_gemm_site(node: fx.Node, param_inputs: frozenset[int] | None = None) -> GemmSite | None:
    if node.op != "call_function" or node.target not in GEMM_TARGETS:
        return None
    op = GEMM_TARGETS[node.target]
    if op in ("addmm", "baddbmm"):
        bias, x, other = node.args[:3]
        scalars = (node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1))
    else:
        (x, other), bias, scalars = node.args[:2], None, (1, 1)
    xv, ov = _val(x), _val(other)
    if xv is None or ov is None:
        return None
    batch = xv.shape[0] if xv.dim() == 3 else 1
    return GemmSite(
        node=node, op=op, kind="linear" if _is_weight(other, param_inputs) else "matmul", x=x, other=other, bias=bias,
        module_path=module_path(node), batch=batch, m=xv.shape[-2], k=xv.shape[-1], n=ov.shape[-1],
        dtype=xv.dtype, device=xv.device, scalars=scalars, other_dtype=ov.dtype,
        bias_dtype=_val(bias).dtype if _val(bias) is not None else None,
    )


def find_gemm_sites(graph: fx.Graph, param_inputs: frozenset[int] | None = None) -> list[GemmSite]:
    return [site for node in graph.nodes if (site := as_gemm_site(node, param_inputs)) is not None]
