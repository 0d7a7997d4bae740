"""One pass pipeline for compile, explain() and export, built by ``build_pipeline`` from the options."""

import pytest
import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode

import lynx_compile
from lynx_compile import LynxConfig
from lynx_compile.passes.pipeline import build_pipeline
from lynx_compile.policy import decide
from lynx_compile.passes.gemm_sites import as_gemm_site

aten = torch.ops.aten


@pytest.mark.parametrize("options, purpose, names", [
    ({}, "compile", ["sparsify_gemms", "inline_triton"]),
    ({}, "explain", ["sparsify_gemms", "inline_triton"]),
    ({}, "export", ["sparsify_gemms", "inline_triton"]),
    ({"dump_dir": "somewhere"}, "compile", ["sparsify_gemms", "draw_rewritten_regions", "inline_triton"]),
])
def test_the_passes_in_order(options, purpose, names):
    pipeline = build_pipeline(LynxConfig.from_options(options), purpose=purpose, graph_index=0)
    assert pipeline.pass_names == names
    inline = pipeline.passes[-1]
    assert inline.enabled == (purpose != "export")  # exported programs keep the ops


def test_each_pass_and_option_is_in_the_uuid():
    def uuid(options, purpose="compile", param_inputs=frozenset()):
        return build_pipeline(LynxConfig.from_options(options), purpose=purpose, param_inputs=param_inputs,
                              graph_index=0).uuid()

    base = uuid({})
    assert uuid({}) == base
    assert build_pipeline(LynxConfig(), param_inputs=frozenset(), graph_index=7).uuid() == base  # not the number
    others = [uuid({"pattern": "4:8"}), uuid({"triton_op": False}), uuid({}, "export"), uuid({"min_tokens": 0}),
              uuid({}, param_inputs=frozenset({1}))]
    assert len({base, *others}) == 6
    assert uuid({"dump_dir": "a"}) != base  # the region drawings pass joins the pipeline


def test_bad_purpose_and_plan_for_export_are_errors_before_any_graph_work():
    with pytest.raises(ValueError, match="unknown pipeline purpose 'aot'; valid: compile, explain, export"):
        build_pipeline(LynxConfig(), purpose="aot")
    with pytest.raises(ValueError, match=r"transform\(\) does not apply calibration plans yet"):
        build_pipeline(LynxConfig.from_options({"plan": "somewhere"}), purpose="export")


@torch.no_grad()
def test_compile_and_explain_share_one_graph_numbering_and_the_same_records():
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)), torch.randn(4, 16)
    options = {"min_tokens": 0, "inner": "eager"}
    torch.compile(model, backend="rtlynx", options=options)(x)
    explanation = lynx_compile.explain(model, x, options=options)
    (compiled,) = lynx_compile.reports()
    assert (compiled.index, [g.index for g in explanation.graphs]) == (0, [1])
    assert explanation.graphs[0].records == compiled.records
    lynx_compile.clear_reports()  # numbering starts again with the reports
    assert [g.index for g in lynx_compile.explain(model, x, options=options).graphs] == [0]


def _mixed_dtype_mm(x_dtype, other_dtype):
    """A post-grad mm whose operands have these dtypes (Dynamo itself rejects such a call before us)."""
    graph = fx.Graph()
    x, other = graph.placeholder("x"), graph.placeholder("w")
    mm = graph.call_function(aten.mm.default, (x, other))
    graph.output(mm)
    with FakeTensorMode():
        x.meta["val"] = torch.empty(64, 16, dtype=x_dtype)
        other.meta["val"] = torch.empty(16, 8, dtype=other_dtype)
        mm.meta["val"] = torch.empty(64, 8, dtype=other_dtype)
    return fx.GraphModule(nn.Module(), graph)


@pytest.mark.parametrize("x_dtype, other_dtype, reason", [
    (torch.int8, torch.float32, "dtype int8 unsupported (supported: float32, float16, bfloat16)"),
    (torch.float32, torch.int8, "dtype int8 unsupported (supported: float32, float16, bfloat16)"),
    (torch.float16, torch.float32, "operand dtypes differ: x is float16, other is float32"),
])
def test_both_operands_dtypes_decide_before_a_rewrite(x_dtype, other_dtype, reason):
    gm = _mixed_dtype_mm(x_dtype, other_dtype)
    site = as_gemm_site(next(n for n in gm.graph.nodes if n.target == aten.mm.default))
    decision = decide(site, LynxConfig.from_options({"min_tokens": 0}))
    assert (decision.rewrite, decision.reason) == (False, reason)
    pipeline = build_pipeline(LynxConfig.from_options({"min_tokens": 0}), graph_index=0)
    pipeline(gm.graph)
    assert [(r.rewritten, r.reason) for r in pipeline.report.records] == [(False, reason)]
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [aten.mm.default]  # untouched
