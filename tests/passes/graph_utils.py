"""Build post-grad-style ATen graphs and run the rtlynx pass pipeline on them without a full compile."""

from collections import Counter

import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch._inductor.decomposition import select_decomp_table

from lynx_compile import LynxConfig
from lynx_compile.passes.pipeline import build_pipeline

SPARSE = torch.ops.rtlynx.sparse_matmul.default


def aten_graph(fn, *inputs):
    """The ATen graph Inductor's decompositions give for ``fn`` (linear -> addmm/mm, matmul -> bmm)."""
    return make_fx(fn, decomposition_table=select_decomp_table())(*inputs)


def op_counts(gm) -> Counter:
    return Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")


def run_pass(gm, **options):
    """Run the pipeline a compile would (``param_inputs`` unknown: every input counts as a weight) in
    place; returns the GraphReport."""
    pipeline = build_pipeline(LynxConfig.from_options({"min_tokens": 0, **options}))
    pipeline(gm.graph)
    gm.recompile()
    return pipeline.report


def sparse_nodes(gm):
    return [n for n in gm.graph.nodes if n.target == SPARSE]
