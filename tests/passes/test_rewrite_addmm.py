"""addmm(bias, x2d, permute(w)): nn.Linear / F.linear with a bias, 3-D and 2-D activations."""

import pytest
import torch
import torch.nn.functional as F

from graph_utils import SPARSE, aten_graph, op_counts, run_pass, sparse_nodes
from lynx_compile.kernels import reference


@pytest.mark.parametrize("x_shape", [(2, 6, 16), (5, 16)], ids=["3d-tokens", "2d-adaln"])
def test_linear_with_bias_becomes_one_sparse_op(x_shape):
    x, w, b = torch.randn(x_shape), torch.randn(24, 16), torch.randn(24)
    gm = aten_graph(lambda x, w, b: F.linear(x, w, b), x, w, b)
    assert op_counts(gm)["aten.addmm.default"] == 1

    report = run_pass(gm)

    counts = op_counts(gm)
    assert counts["aten.addmm.default"] == 0 and counts[str(SPARSE)] == 1
    (node,) = sparse_nodes(gm)
    x2d, other, bias = node.args
    assert other.target == torch.ops.aten.permute.default and other.args[0].name == "w_1"
    assert bias.name == "b_1"
    assert node.kwargs == {"n": 2, "m": 4, "norm_comp": True, "min_tokens": 0, "impl": "reference"}
    (record,) = report.records
    assert (record.op, record.kind, record.rewritten, record.shape) == ("addmm", "linear", True, [x.numel() // 16, 16, 24])

    expected = reference.sparse_matmul(x.reshape(-1, 16), w.t(), b, n=2, m=4).reshape(*x_shape[:-1], 24)
    torch.testing.assert_close(gm(x, w, b), expected, rtol=0, atol=0)


def test_norm_comp_off_and_other_patterns_reach_the_op():
    x, w, b = torch.randn(8, 32), torch.randn(8, 32), torch.randn(8)
    for pattern, (n, m) in {"1:2": (1, 2), "4:8": (4, 8)}.items():
        gm = aten_graph(lambda x, w, b: F.linear(x, w, b), x, w, b)
        run_pass(gm, pattern=pattern, norm_comp=False)
        (node,) = sparse_nodes(gm)
        assert (node.kwargs["n"], node.kwargs["m"], node.kwargs["norm_comp"]) == (n, m, False)
        expected = reference.sparse_matmul(x, w.t(), b, n=n, m=m, norm_comp=False)
        torch.testing.assert_close(gm(x, w, b), expected, rtol=0, atol=0)


def test_addmm_with_alpha_beta_stays_dense_with_reason():
    x, w, b = torch.randn(8, 16), torch.randn(16, 12), torch.randn(12)
    gm = aten_graph(lambda x, w, b: torch.addmm(b, x, w, beta=0.5, alpha=2.0), x, w, b)
    report = run_pass(gm)
    assert op_counts(gm)["aten.addmm.default"] == 1 and not sparse_nodes(gm)
    assert report.records[0].reason == "addmm with beta/alpha (0.5, 2.0) is not supported"


def test_rewritten_node_keeps_metadata():
    x, w, b = torch.randn(4, 16), torch.randn(8, 16), torch.randn(8)
    gm = aten_graph(lambda x, w, b: F.linear(x, w, b), x, w, b)
    (addmm,) = [n for n in gm.graph.nodes if n.target == torch.ops.aten.addmm.default]
    addmm.meta["nn_module_stack"] = {"k": ("L['self'].__dict__['_modules']['blocks'][3].ff", torch.nn.Linear)}
    addmm.meta["stack_trace"] = 'File "model.py", line 7, in forward'
    report = run_pass(gm)
    (node,) = sparse_nodes(gm)
    assert node.meta["stack_trace"] == 'File "model.py", line 7, in forward'
    assert node.meta["nn_module_stack"] == addmm.meta["nn_module_stack"]
    assert node.meta["val"].shape == (4, 8)
    assert report.records[0].name == "blocks.3.ff"
