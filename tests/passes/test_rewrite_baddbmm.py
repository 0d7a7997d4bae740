"""baddbmm(c, a, b): batched product plus a broadcast addend, which becomes the op's bias."""

import torch

from graph_utils import SPARSE, aten_graph, op_counts, run_pass, sparse_nodes
from lynx_compile.kernels import reference


def test_baddbmm_becomes_sparse_op_with_bias():
    c, a, b = torch.randn(3, 5, 4), torch.randn(3, 5, 8), torch.randn(3, 8, 4)
    gm = aten_graph(lambda c, a, b: torch.baddbmm(c.tanh(), a.sin(), b.cos()), c, a, b)
    assert op_counts(gm)["aten.baddbmm.default"] == 1
    report = run_pass(gm)
    assert op_counts(gm)["aten.baddbmm.default"] == 0 and op_counts(gm)[str(SPARSE)] == 1
    (node,) = sparse_nodes(gm)
    assert node.args[2].target == torch.ops.aten.tanh.default
    assert report.records[0].op == "baddbmm"
    expected = reference.sparse_matmul(a.sin(), b.cos(), c.tanh(), n=2, m=4)
    torch.testing.assert_close(gm(c, a, b), expected, rtol=0, atol=0)


def test_baddbmm_with_scaling_stays_dense():
    c, a, b = torch.randn(3, 5, 4), torch.randn(3, 5, 8), torch.randn(3, 8, 4)
    gm = aten_graph(lambda c, a, b: torch.baddbmm(c, a.sin(), b, beta=2.0), c, a, b)
    report = run_pass(gm)
    assert not sparse_nodes(gm)
    assert report.records[0].reason == "baddbmm with beta/alpha (2.0, 1) is not supported"
