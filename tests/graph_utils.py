"""Build post-grad-style ATen graphs and run ``LynxPass`` on them without a full compile."""

from collections import Counter

import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch._inductor.decomposition import select_decomp_table

from lynx_compile import LynxConfig
from lynx_compile.passes.lynx_pass import LynxPass

SPARSE = torch.ops.rtlynx.sparse_matmul.default


def aten_graph(fn, *inputs):
    """The ATen graph Inductor's decompositions give for ``fn`` (linear -> addmm/mm, matmul -> bmm)."""
    return make_fx(fn, decomposition_table=select_decomp_table())(*inputs)


def op_counts(gm) -> Counter:
    return Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")


def run_pass(gm, **options):
    """Apply LynxPass in place; returns the GraphReport."""
    lynx_pass = LynxPass(LynxConfig.from_options({"min_tokens": 0, **options}))
    lynx_pass(gm.graph)
    gm.recompile()
    return lynx_pass.report


def sparse_nodes(gm):
    return [n for n in gm.graph.nodes if n.target == SPARSE]
