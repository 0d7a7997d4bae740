"""torch.export: transform() keeps the rtlynx ops, and the program reloads in a fresh process."""

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import lynx_compile
from lynx_compile.kernels import reference


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).eval()


def _expected(model, x):
    h = reference.sparse_matmul(x.reshape(-1, 16), model[0].weight.t(), model[0].bias, n=2, m=4)
    y = reference.sparse_matmul(nn.functional.gelu(h), model[2].weight.t(), model[2].bias, n=2, m=4)
    return y.reshape(*x.shape[:-1], 8)


@torch.no_grad()
def test_transform_rewrites_an_exported_program(tmp_path):
    model, x = _model(), torch.randn(2, 5, 16)
    program = lynx_compile.transform(torch.export.export(model, (x,)), {"min_tokens": 0})
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.rtlynx.sparse_matmul.default) == 2 and torch.ops.aten.addmm.default not in targets
    assert [(r.name, r.kind, r.rewritten) for r in lynx_compile.reports()[-1].records] == [
        ("0", "linear", True), ("2", "linear", True)]
    expected = _expected(model, x)
    torch.testing.assert_close(program.module()(x), expected, rtol=1e-6, atol=1e-6)

    path = tmp_path / "lynx.pt2"
    torch.export.save(program, path)
    torch.save({"x": x, "expected": expected}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import torch
        import lynx_compile  # registers torch.ops.rtlynx.*
        program = torch.export.load({str(path)!r})
        io = torch.load({str(tmp_path / "io.pt")!r})
        with torch.no_grad():
            torch.testing.assert_close(program.module()(io["x"]), io["expected"], rtol=1e-6, atol=1e-6)
        print("reloaded ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "reloaded ok"


@torch.no_grad()
def test_a_rewritten_gemm_that_is_the_programs_output_saves_and_loads(tmp_path):
    # With a 2-D input the last addmm is the graph's output itself (no reshape after it): the
    # signature must name the new node, or torch.export.save raises SpecViolationError.
    model, x = _model(), torch.randn(10, 16)
    program = lynx_compile.transform(torch.export.export(model, (x,)), {"min_tokens": 0})
    (output,) = program.graph.output_node().args[0]
    assert output.target == torch.ops.rtlynx.sparse_matmul.default
    assert [spec.arg.name for spec in program.graph_signature.output_specs] == [output.name]
    torch.export.save(program, tmp_path / "lynx.pt2")
    loaded = torch.export.load(tmp_path / "lynx.pt2")
    torch.testing.assert_close(loaded.module()(x), _expected(model, x), rtol=1e-6, atol=1e-6)


def test_transform_rejects_other_inputs_and_plans():
    with pytest.raises(TypeError, match="transform\\(\\) takes a torch.export.ExportedProgram or an fx.GraphModule, "
                                        "got Sequential"):
        lynx_compile.transform(_model())
    with pytest.raises(ValueError, match="transform\\(\\) does not apply calibration plans yet"):
        lynx_compile.transform(_model(), {"plan": "somewhere"})


@pytest.mark.slow
@torch.no_grad()
def test_aot_inductor_package_runs_the_rtlynx_ops(tmp_path):
    model, x = _model(), torch.randn(2, 5, 16)
    program = lynx_compile.transform(torch.export.export(model, (x,)), {"min_tokens": 0})
    package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "lynx_aoti.pt2"))
    runner = torch._inductor.aoti_load_package(package)
    torch.testing.assert_close(runner(x), _expected(model, x), rtol=1e-6, atol=1e-6)
