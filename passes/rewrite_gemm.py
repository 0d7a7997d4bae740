"""Replace one GEMM node by ``rtlynx::sparse_matmul``, keeping the node's metadata."""

from __future__ import annotations

import re

import torch
from torch import fx
from torch._guards import detect_fake_mode

from ..kernels import ops  # noqa: F401  (defines rtlynx::sparse_matmul, the op this inserts)


def add_constant(graph: fx.Graph, name: str, tensor: torch.Tensor) -> fx.Node:
    """A tensor owned by the graph's module, read through ``get_attr``: a constant of the compiled
    graph, so it adds no graph input and no guard.

    The op reads it through a ``clone``: Inductor hands a constant's real tensor to the fake run of
    a fallback op, which FakeTensorMode rejects; a cloned buffer gets a fake example like any other.
    Plan tensors are small (K x R, R x N, K, N), so the copy is negligible next to the GEMM.
    """
    gm = graph.owning_module
    name = re.sub(r"\W", "_", name)
    gm.register_buffer(name, tensor, persistent=False)
    fake_mode = detect_fake_mode([n.meta.get("val") for n in graph.nodes if n.op == "placeholder"])
    fake = fake_mode.from_tensor(tensor, static_shapes=True) if fake_mode else tensor
    constant = graph.get_attr(name)
    constant.meta["val"] = fake
    copy = graph.call_function(torch.ops.aten.clone.default, (constant,))
    copy.meta["val"] = fake
    return copy


def plan_constants(graph: fx.Graph, site, layer) -> tuple:
    """(lr_down, lr_up, perm, comp_bias) nodes from a calibration plan's layer, on the GEMM's device."""
    prefix = f"rtlynx_plan_{site.module_path}_"
    device, dtype = site.device, site.dtype
    tensors = (
        None if layer.lr_down is None else layer.lr_down.to(device, dtype),
        None if layer.lr_up is None else layer.lr_up.to(device, dtype),
        None if layer.perm is None else layer.perm.to(device, torch.int64),
        None if layer.bias_delta is None else layer.bias_delta.to(device, torch.float32),
    )
    with graph.inserting_before(site.node):
        return tuple(None if t is None else add_constant(graph, prefix + name, t)
                     for name, t in zip(("lr_down", "lr_up", "perm", "comp_bias"), tensors))


def rewrite_gemm(graph: fx.Graph, site, *, n: int, m: int, norm_comp: bool, min_tokens: int, kernel: str,
                 plan_layer=None) -> fx.Node:
    """``x @ other (+ bias)`` -> ``sparse_matmul(x, other, bias, ...)``; the old node is erased.

    The new node inherits ``meta`` (module path, stack trace, fake value), so reports, Inductor's
    provenance tracking and later passes still see the original layer. A calibration plan's
    tensors enter as graph constants.
    """
    compensation = plan_constants(graph, site, plan_layer) if plan_layer is not None else ()
    kwargs = dict(n=n, m=m, norm_comp=norm_comp, min_tokens=min_tokens, impl=kernel)
    with graph.inserting_before(site.node):
        args = (site.x, site.other, site.bias, *compensation) if compensation else (site.x, site.other, site.bias)
        new = graph.call_function(torch.ops.rtlynx.sparse_matmul.default, args, kwargs)
    new.meta.update(site.node.meta)
    site.node.replace_all_uses_with(new)
    graph.erase_node(site.node)
    return new
