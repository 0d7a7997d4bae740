"""bmm(a, b): activation x activation products (torch.matmul, @, einsum) and batched weights."""

import torch

from graph_utils import SPARSE, aten_graph, op_counts, run_pass, sparse_nodes
from lynx_compile.kernels import reference


def test_matmul_of_two_activations_sparsifies_left_operand_along_k():
    q, k = torch.randn(2, 6, 16), torch.randn(2, 6, 16)
    gm = aten_graph(lambda q, k: torch.matmul(q.sin(), k.cos().transpose(-1, -2)), q, k)
    assert op_counts(gm)["aten.bmm.default"] == 1
    report = run_pass(gm)
    assert op_counts(gm)["aten.bmm.default"] == 0 and op_counts(gm)[str(SPARSE)] == 1
    (record,) = report.records
    assert (record.op, record.kind, record.shape, record.batch) == ("bmm", "matmul", [6, 16, 6], 2)
    expected = reference.sparse_matmul(q.sin(), k.cos().transpose(-1, -2), n=2, m=4)
    torch.testing.assert_close(gm(q, k), expected, rtol=0, atol=0)


def test_einsum_and_operator_spellings():
    a, b = torch.randn(3, 5, 8), torch.randn(3, 8, 4)
    for spelling in (lambda a, b: torch.einsum("bij,bjk->bik", a.relu(), b.exp()),
                     lambda a, b: a.relu() @ b.exp(),
                     lambda a, b: torch.bmm(a.relu(), b.exp())):
        gm = aten_graph(spelling, a, b)
        report = run_pass(gm)
        assert [(r.op, r.kind) for r in report.records] == [("bmm", "matmul")]
        torch.testing.assert_close(gm(a, b), reference.sparse_matmul(a.relu(), b.exp(), n=2, m=4), rtol=0, atol=0)


def test_op_kinds_filter_keeps_matmul_dense():
    a, b = torch.randn(2, 4, 8), torch.randn(2, 8, 4)
    gm = aten_graph(lambda a, b: torch.bmm(a.relu(), b.exp()), a, b)
    report = run_pass(gm, op_kinds=["linear"])
    assert not sparse_nodes(gm)
    assert report.records[0].reason == "op kind 'matmul' not in op_kinds ['linear']"


def test_einsum_with_weight_is_a_linear():
    x, w = torch.randn(2, 5, 16), torch.randn(12, 16)
    gm = aten_graph(lambda x, w: torch.einsum("bsk,nk->bsn", x, w), x, w)
    report = run_pass(gm)
    (record,) = report.records
    assert record.kind == "linear" and record.rewritten
    expected = reference.sparse_matmul(x.reshape(10, 16), w.t(), n=2, m=4).reshape(2, 5, 12)
    torch.testing.assert_close(gm(x, w), expected, rtol=1e-6, atol=1e-6)
