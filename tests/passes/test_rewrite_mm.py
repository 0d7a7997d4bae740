"""mm(x2d, permute(w)) and mm(x, t(w)): bias-free linears and the x @ w.T spellings."""

import torch
import torch.nn.functional as F

from graph_utils import SPARSE, aten_graph, op_counts, run_pass, sparse_nodes
from lynx_compile.kernels import reference


def test_bias_free_linear_3d():
    x, w = torch.randn(2, 5, 32), torch.randn(12, 32)
    gm = aten_graph(lambda x, w: F.linear(x, w), x, w)
    assert op_counts(gm)["aten.mm.default"] == 1
    run_pass(gm)
    assert op_counts(gm)["aten.mm.default"] == 0 and op_counts(gm)[str(SPARSE)] == 1
    (node,) = sparse_nodes(gm)
    assert node.args[2] is None
    expected = reference.sparse_matmul(x.reshape(10, 32), w.t(), n=2, m=4).reshape(2, 5, 12)
    torch.testing.assert_close(gm(x, w), expected, rtol=0, atol=0)


def test_x_at_w_t_and_permute_spellings():
    x, w = torch.randn(7, 16), torch.randn(9, 16)
    for spelling in (lambda x, w: x @ w.t(), lambda x, w: x @ w.T, lambda x, w: torch.mm(x, w.permute(1, 0))):
        gm = aten_graph(spelling, x, w)
        report = run_pass(gm)
        assert [r.op for r in report.records] == ["mm"] and report.records[0].kind == "linear"
        torch.testing.assert_close(gm(x, w), reference.sparse_matmul(x, w.t(), n=2, m=4), rtol=0, atol=0)


def test_k_not_divisible_by_m_stays_dense_with_reason():
    x, w = torch.randn(6, 30), torch.randn(8, 30)
    gm = aten_graph(lambda x, w: F.linear(x, w), x, w)
    report = run_pass(gm)
    assert not sparse_nodes(gm) and op_counts(gm)["aten.mm.default"] == 1
    assert report.records[0].reason == "K=30 is not divisible by M=4"
    torch.testing.assert_close(gm(x, w), x @ w.t())


def test_unsupported_dtype_stays_dense_with_reason():
    x, w = torch.randn(6, 16, dtype=torch.float64), torch.randn(8, 16, dtype=torch.float64)
    gm = aten_graph(lambda x, w: F.linear(x, w), x, w)
    report = run_pass(gm)
    assert not sparse_nodes(gm)
    assert report.records[0].reason == "dtype float64 unsupported (supported: float32, float16, bfloat16)"


def test_min_tokens_keeps_small_m_dense():
    x, w = torch.randn(6, 16), torch.randn(8, 16)
    gm = aten_graph(lambda x, w: F.linear(x, w), x, w)
    report = run_pass(gm, min_tokens=7)
    assert not sparse_nodes(gm)
    assert report.records[0].reason == "M=6 tokens < min_tokens=7"


def test_dense_pattern_reports_but_rewrites_nothing():
    x, w = torch.randn(6, 16), torch.randn(8, 16)
    gm = aten_graph(lambda x, w: F.linear(x, w), x, w)
    before = op_counts(gm)
    report = run_pass(gm, pattern="dense")
    assert op_counts(gm) == before
    assert [(r.rewritten, r.pattern, r.reason) for r in report.records] == [(False, "dense", "pattern is 'dense'")]
