"""The backend end to end through Dynamo and Inductor on the CPU."""

import json
import logging
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import lynx_compile
from lynx_compile.kernels import reference
from dit_block import block_and_input
from shared import installed


@torch.no_grad()
def test_dense_pattern_reproduces_plain_inductor():
    model, x = block_and_input()
    expected = torch.compile(model, backend="inductor")(x)
    torch._dynamo.reset()
    out = torch.compile(model, backend="rtlynx", options={"pattern": "dense"})(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    (report,) = lynx_compile.reports()
    assert len(report.records) == 4 and report.num_rewritten == 0


@torch.no_grad()
@pytest.mark.parametrize("inner", ["inductor", "eager"])
def test_sparse_compile_matches_reference_ops(inner):
    model, x = block_and_input()
    out = torch.compile(model, backend="rtlynx", options={"min_tokens": 0, "inner": inner})(x)

    def sparse(a, b, bias=None):
        return reference.sparse_matmul(a, b, bias, n=2, m=4)

    fc1 = sparse(model.norm(x).reshape(32, 32), model.fc1.weight.t(), model.fc1.bias)
    h = sparse(torch.nn.functional.gelu(fc1), model.fc2.weight.t(), model.fc2.bias).reshape(2, 16, 32)
    expected = x + sparse(torch.softmax(sparse(h, x.transpose(-1, -2)), dim=-1), h)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    (report,) = lynx_compile.reports()
    assert [(r.name, r.op, r.kind, r.rewritten) for r in report.records] == [
        ("fc1", "addmm", "linear", True), ("fc2", "addmm", "linear", True),
        ("(root)", "bmm", "matmul", True), ("(root)", "bmm", "matmul", True)]


@torch.no_grad()
def test_default_min_tokens_keeps_small_gemms_dense():
    model, x = block_and_input()
    torch.compile(model, backend="rtlynx")(x)
    (report,) = lynx_compile.reports()
    assert [r.reason for r in report.records] == ["M=32 tokens < min_tokens=512"] * 2 + ["M=16 tokens < min_tokens=512"] * 2


@torch.no_grad()
def test_include_exclude_filters_by_module_path():
    model, x = block_and_input()
    torch.compile(model, backend="rtlynx", options={"min_tokens": 0, "include": r"^fc", "exclude": r"fc2$"})(x)
    (report,) = lynx_compile.reports()
    assert [(r.name, r.rewritten, r.reason) for r in report.records] == [
        ("fc1", True, ""),
        ("fc2", False, "module path matches exclude 'fc2$'"),
        ("(root)", False, "module path not matched by include"),
        ("(root)", False, "module path not matched by include")]


@torch.no_grad()
def test_dump_dir_writes_graphs_and_reports_for_every_graph(tmp_path):
    tmp_path = tmp_path / "lynx_dump"
    model, x = block_and_input()

    def two_graphs(x):
        y = model(x)
        torch._dynamo.graph_break()
        return model(y)

    compiled = torch.compile(two_graphs, backend="rtlynx", options={"min_tokens": 0, "dump_dir": str(tmp_path)})
    assert torch.isfinite(compiled(x)).all()
    compiled(torch.randn(2, 24, 32))  # a new token count: both graphs recompile (dynamic now)
    graph_dirs = [f"graph_{i:03d}" for i in range(4)]
    assert sorted(p.name for p in tmp_path.iterdir()) == graph_dirs + ["report.json", "report.txt"]
    # The optional extras' files: report.png needs matplotlib ([plots]; without it lynx_compile/plots.py
    # logs how to get it and writes none), the SVG per rewritten GEMM pydot and graphviz's dot ([graphs];
    # passes/graph_artifacts.py likewise). The test holds with and without them.
    png = ["report.png"] if installed("matplotlib") else []
    draws = installed("pydot") and shutil.which("dot") is not None
    # After the recompile the token count is symbolic, and so is K of `scores @ h`: that one stays dense.
    for graph_dir, rewrites in zip(graph_dirs, [4, 4, 3, 3]):
        files = sorted(p.name for p in (tmp_path / graph_dir).iterdir())
        svgs = [name for name in files if name.startswith("region_") and name.endswith(".svg")]
        assert len(svgs) == (rewrites if draws else 0), files
        assert [name for name in files if name not in svgs] == sorted(
            ["graph_after.py", "graph_before.py", "report.json", *png, "report.txt", "repro.py"])
        after = (tmp_path / graph_dir / "graph_after.py").read_text()
        assert after.count("torch.ops.rtlynx.sparse_matmul.default(") == rewrites
        assert "torch.ops.aten.addmm" in (tmp_path / graph_dir / "graph_before.py").read_text()
    if png:
        assert (tmp_path / "graph_003" / "report.png").read_bytes().startswith(b"\x89PNG")
    repro = subprocess.run([sys.executable, str(tmp_path / "graph_000" / "repro.py")], capture_output=True, text=True,
                           timeout=300)
    assert repro.returncode == 0, repro.stderr
    assert repro.stdout.splitlines() == ["(2, 16, 32) torch.float32 finite"]
    combined = json.loads((tmp_path / "report.json").read_text())
    assert len(combined["nodes"]) == 16 and len(combined["graphs"]) == 4
    assert re.fullmatch(r"reduction dim K=\d+\*s\d+ is dynamic|reduction dim K=s\d+ is dynamic",
                        combined["graphs"][2]["nodes"][3]["reason"])
    first = combined["nodes"][0]
    cost = {key: first.pop(key) for key in ("est_dense_us", "est_sparse_us", "flops", "flops_saved", "break_even_m")}
    # The reference kernel does dense FLOPs on the expanded tile: the cost model says it never pays.
    assert cost["flops"] == 2 * 32 * 32 * 128 and cost["flops_saved"] == 0 and cost["break_even_m"] == "inf"
    assert cost["est_sparse_us"] > cost["est_dense_us"] > 0
    assert first == {"name": "fc1", "node": "addmm", "op": "addmm", "kind": "linear", "shape": [32, 32, 128],
                     "batch": 1, "dtype": "float32", "rewritten": True, "pattern": "2:4", "kernel": "reference",
                     "norm_comp": True, "reason": "", "kernel_reason": "", "runtime_guard": False, "compensation": "norm",
                     "plan_errors": None, "launch": "op", "launch_reason": "",
                     "min_tokens": 0, "selection": "always", "measured_dense_us": None, "measured_sparse_us": None}
    assert combined["graphs"][0]["totals"]["sparse_flop_fraction"] == 1.0
    text = (tmp_path / "report.txt").read_text()
    assert "rtlynx graph" in text and "fc1" in text and "reason" in text


@torch.no_grad()
def test_one_info_line_per_graph_without_dump_dir(caplog):
    model, x = block_and_input()
    with caplog.at_level(logging.INFO, logger="lynx_compile"):
        torch.compile(model, backend="rtlynx", options={"min_tokens": 0, "op_kinds": "linear"})(x)
    lines = [r.getMessage() for r in caplog.records if r.name == "lynx_compile"]
    assert len(lines) == 1
    assert re.fullmatch(r"rtlynx graph \d+: 4 GEMMs, 2 rewritten to 2:4 sparse ops, 2 dense", lines[0])


@torch.no_grad()
@pytest.mark.parametrize("how", ["argument", "option"])
def test_mode_is_passed_to_inductor_as_inductor_maps_it(monkeypatch, how):
    from torch._inductor import compile_fx as compile_fx_module, list_mode_options

    seen = {}

    def spy(gm, example_inputs, **kwargs):
        seen.update(kwargs["config_patches"])
        return gm.forward

    monkeypatch.setattr(compile_fx_module, "compile_fx", spy)
    model, x = block_and_input()
    if how == "argument":
        torch.compile(model, backend="rtlynx", mode="max-autotune")(x)
    else:
        torch.compile(model, backend="rtlynx", options={"mode": "max-autotune"})(x)
    from lynx_compile.passes.pipeline import LynxPipeline

    pipeline = seen.pop("post_grad_custom_post_pass")  # in every cache key
    assert isinstance(pipeline, LynxPipeline)
    assert pipeline.pass_names == ["sparsify_gemms", "inline_triton"]
    assert seen == dict(list_mode_options("max-autotune"))


def test_backend_is_registered_on_import():
    from torch._dynamo.backends.registry import lookup_backend

    assert "rtlynx" in torch._dynamo.list_backends()
    assert lookup_backend("rtlynx") is lynx_compile.rtlynx


def test_entry_point_finds_backend_without_import():
    script = textwrap.dedent("""
        import sys, torch
        assert "lynx_compile" not in sys.modules
        layer = torch.nn.Linear(16, 8)
        with torch.no_grad():
            torch.compile(layer, backend="rtlynx", options={"min_tokens": 0, "inner": "eager"})(torch.randn(4, 16))
        print(sys.modules["lynx_compile"].reports()[-1].summary_line())
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("1 GEMMs, 1 rewritten to 2:4 sparse ops, 0 dense")


def test_training_forward_is_sparse_and_backward_is_dense_straight_through():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    x = torch.randn(6, 16, requires_grad=True)
    out = torch.compile(layer, backend="rtlynx", options={"min_tokens": 0})(x)
    expected = reference.sparse_matmul(x.detach(), layer.weight.detach().t(), layer.bias.detach(), n=2, m=4)
    torch.testing.assert_close(out.detach(), expected, rtol=1e-6, atol=1e-6)
    grad = torch.randn_like(out)
    out.backward(grad)
    torch.testing.assert_close(x.grad, grad @ layer.weight.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.weight.grad, grad.t() @ x.detach(), rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_symbolic_tokens_get_a_runtime_guard_and_small_m_runs_dense():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    compiled = torch.compile(layer, backend="rtlynx", dynamic=True, options={"min_tokens": 10})
    small, large = torch.randn(4, 16), torch.randn(12, 16)
    torch.testing.assert_close(compiled(small), torch.addmm(layer.bias, small, layer.weight.t()))
    expected = reference.sparse_matmul(large, layer.weight.t(), layer.bias, n=2, m=4)
    torch.testing.assert_close(compiled(large), expected, rtol=1e-6, atol=1e-6)
    (report,) = lynx_compile.reports()  # one graph serves both sizes
    (record,) = report.records
    assert record.rewritten and record.runtime_guard and isinstance(record.shape[0], str)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_match_the_reference_op_model(dtype):
    from unittest import mock

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).to(dtype).eval()
    x = torch.randn(4, 32, 64, dtype=dtype)
    out = torch.compile(model, backend="rtlynx", options={"min_tokens": 0})(x)
    assert out.dtype == dtype and lynx_compile.reports()[-1].num_rewritten == 2

    def reference_linear(self, inp):
        return torch.ops.rtlynx.sparse_matmul(inp, self.weight.t(), self.bias, n=2, m=4)

    torch._dynamo.reset()
    with mock.patch.object(nn.Linear, "forward", reference_linear):
        expected = torch.compile(model, backend="inductor")(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
