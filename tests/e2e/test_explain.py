"""explain(): a dry run whose decisions equal what compiling decides, and its CLI."""

import json
import textwrap

import torch

import lynx_compile
from lynx_compile.cli import main
from dit_block import block_and_input


def _key(record):
    return (record.name, record.op, record.kind, tuple(record.shape), record.rewritten, record.kernel, record.reason)


@torch.no_grad()
def test_explain_matches_compile_and_runs_the_dense_graph():
    model, x = block_and_input()
    options = {"min_tokens": 20, "exclude": "fc2"}
    explanation = lynx_compile.explain(model, x, options=options)
    assert lynx_compile.reports() == []  # a dry run records nothing and compiles nothing
    assert [(r.name, r.rewritten, r.reason) for r in explanation.records] == [
        ("fc1", True, ""), ("fc2", False, "module path matches exclude 'fc2'"),
        ("(root)", False, "M=16 tokens < min_tokens=20"), ("(root)", False, "M=16 tokens < min_tokens=20")]
    assert "fc1" in str(explanation) and json.loads(explanation.dumps())["graphs"][0]["nodes"][0]["name"] == "fc1"

    torch._dynamo.reset()
    torch.compile(model, backend="rtlynx", options=options)(x)
    (compiled,) = lynx_compile.reports()
    assert sorted(map(_key, explanation.records)) == sorted(map(_key, compiled.records))


def test_cli_explain_prints_the_table_and_writes_json(tmp_path, capsys):
    builder = tmp_path / "build.py"
    builder.write_text(textwrap.dedent("""
        import torch
        def build():
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)), (torch.randn(4, 16),)
    """))
    assert main(["explain", f"{builder}:build", "--options", '{"min_tokens": 0}', "--json", str(tmp_path / "e.json")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("rtlynx graph 0: 2 GEMMs, 2 rewritten to 2:4 sparse ops, 0 dense")
    nodes = json.loads((tmp_path / "e.json").read_text())["graphs"][0]["nodes"]
    assert [(n["name"], n["shape"]) for n in nodes] == [("0", [4, 16, 32]), ("2", [4, 32, 8])]
