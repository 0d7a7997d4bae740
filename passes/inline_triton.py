"""Inline the Triton route of ``rtlynx::sparse_matmul`` nodes, so that Inductor launches the kernels.

Input: a post-grad graph holding ``rtlynx::sparse_matmul`` nodes. Output: the same graph, where
each node that runs the Triton kernels on CUDA is replaced by the traced body of
``rtlynx::triton_sparse_matmul`` (see ``kernels/triton_ops.py``): the torch ops around the kernels
(permuting W, folding the bias correction, ``x @ lr_down``) plus two
``triton_kernel_wrapper_functional`` nodes, compress and GEMM. Inductor's own post-grad passes then
turn those into in-place launches (its mutation analysis finds that the kernels write only their
outputs) and compile the kernels with the rest of the graph.

The replacement is traced with Inductor's pattern matcher (``Match.replace_by_example``), under
``dispatch_functionalize``, the functionalization under which a ``triton_op`` traces into its body.
"""

from __future__ import annotations

import contextlib

import torch
from torch import fx
from torch._guards import detect_fake_mode
from torch._inductor.virtualized import V
from torch._inductor.pattern_matcher import CallFunctionVarArgs, PatternMatcherPass, register_graph_pattern
from torch._subclasses.functional_tensor import dispatch_functionalize
from torch.fx.operator_schemas import normalize_function

from ..kernels import triton_ops
from .source_digest import source_digest

_OP = torch.ops.rtlynx.sparse_matmul.default


def _arguments(node: fx.Node) -> dict:
    """Every argument of the node by name, defaults included."""
    return normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True).kwargs


def inline_blocker(node: fx.Node) -> str:
    """"" when the node's Triton kernels can be inlined, else why the node stays an op."""
    args = _arguments(node)
    if args["impl"] != "triton":
        return f"kernel {args['impl']!r} is not the Triton route"
    if not hasattr(triton_ops, "triton_sparse_matmul"):
        return "triton is not installed"
    x = args["x"].meta.get("val")
    if x is None or x.device.type != "cuda":
        return "the Triton interpreter's kernels (not on CUDA) cannot be traced"
    if args["min_tokens"] > 0 and not isinstance(x.shape[-2], int):
        return f"M is dynamic and min_tokens={args['min_tokens']} is checked at run time, which only the op can do"
    return ""


_PASS = PatternMatcherPass(pass_name="rtlynx_inline_triton")


@register_graph_pattern(CallFunctionVarArgs(_OP), extra_check=lambda match: not inline_blocker(match.nodes[0]),
                        pass_dict=_PASS)
def _inline(match, *args, **kwargs):
    named = _arguments(match.nodes[0])
    # The triton_op takes the op's arguments but its run-time switches (min_tokens, impl).
    parameters = [a.name for a in torch.ops.rtlynx.triton_sparse_matmul.default._schema.arguments]
    inputs = [name for name in parameters if isinstance(named[name], fx.Node)]
    options = {name: named[name] for name in parameters if name not in inputs and named[name] is not None}

    def traced_body(*tensors):
        return torch.ops.rtlynx.triton_sparse_matmul(**dict(zip(inputs, tensors)), **options)

    match.replace_by_example(dispatch_functionalize(traced_body), [named[name] for name in inputs])


def inline_triton_kernels(graph: fx.Graph) -> set[str]:
    """Inline every ``rtlynx::sparse_matmul`` node that :func:`inline_blocker` allows; returns their names.

    The replacement is traced on the nodes' fake values, in their fake mode.
    """
    candidates = graph.find_nodes(op="call_function", target=_OP)
    if not candidates:
        return set()
    fake_mode = detect_fake_mode([node.meta.get("val") for node in graph.find_nodes(op="placeholder")])
    with V.set_fake_mode(fake_mode) if fake_mode is not None else contextlib.nullcontext():
        _PASS.apply(graph)
    remaining = set(graph.find_nodes(op="call_function", target=_OP))
    return {node.name for node in candidates if node not in remaining}


class InlineTritonKernels:
    """Inline the Triton GEMMs that can be (``enabled``), and record for each rewritten GEMM who launches it.

    Disabled for exported programs, which keep the ops, and by the option ``triton_op=False``; the
    records then say so.
    """

    name = "inline_triton"

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, graph: fx.Graph, context) -> None:
        blockers = {node: inline_blocker(node) for node in context.rewritten}
        inlinable = self.enabled and not all(blockers.values())
        inlined = inline_triton_kernels(graph) if inlinable else set()
        for node, record in context.rewritten.items():
            record.launch = "inductor" if node.name in inlined else "op"
            if record.kernel == "triton" and node.name not in inlined:
                record.launch_reason = blockers[node] or "option triton_op=False (or an exported program)"

    def uuid(self) -> str:
        return f"enabled={self.enabled};{source_digest(__name__)}"
