"""Logging: one INFO line per graph, per-node DEBUG lines, TORCH_LOGS, and TORCH_TRACE artifacts."""

import logging
import os
import subprocess
import sys
import textwrap

import torch
import torch.nn as nn

SCRIPT = textwrap.dedent("""
    import torch
    layer = torch.nn.Linear(16, 8)
    with torch.no_grad():
        torch.compile(layer, backend="rtlynx", options={"min_tokens": 6})(torch.randn(4, 16))
""")


def _run(env_extra):
    env = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1", **env_extra}
    return subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)


@torch.no_grad()
def test_debug_lines_give_each_decision(caplog):
    with caplog.at_level(logging.DEBUG, logger="lynx_compile"):
        torch.compile(nn.Linear(16, 8), backend="rtlynx", options={"min_tokens": 6})(torch.randn(4, 16))
    lines = [r.getMessage() for r in caplog.records if r.name == "lynx_compile" and r.levelno == logging.DEBUG]
    assert any(line.endswith("(root) addmm [4, 16, 8] -> dense (M=4 tokens < min_tokens=6)") for line in lines), lines


def test_torch_logs_enables_the_info_line():
    result = _run({"TORCH_LOGS": "lynx_compile"})
    assert result.returncode == 0, result.stderr
    info = [line for line in result.stderr.splitlines() if "rtlynx graph" in line]
    assert len(info) == 1 and info[0].endswith("1 GEMMs, 0 rewritten to 2:4 sparse ops, 1 dense")
    assert "-> dense" not in result.stderr  # the per-node lines are DEBUG: TORCH_LOGS=+lynx_compile


def test_torch_trace_holds_graphs_and_report(tmp_path):
    trace_dir = tmp_path / "trace"
    result = _run({"TORCH_TRACE": str(trace_dir)})
    assert result.returncode == 0, result.stderr
    trace = "".join(p.read_text() for p in trace_dir.iterdir())
    for name in ("rtlynx_graph_before", "rtlynx_graph_after", "rtlynx_report"):
        assert f'"name": "{name}"' in trace


def test_missing_pydot_gives_a_clear_message_and_no_drawings(caplog, monkeypatch):
    from lynx_compile.passes.graph_artifacts import region_svgs

    monkeypatch.setitem(sys.modules, "pydot", None)  # as if not installed
    graph = torch.fx.Graph()
    node = graph.call_function(torch.ops.aten.relu.default, (graph.placeholder("x"),))
    with caplog.at_level(logging.INFO, logger="lynx_compile"):
        assert region_svgs(graph, [node]) == {}
    assert "no SVG drawings of rewritten regions (install pydot and graphviz: pip install 'lynx-compile[graphs]')" \
        in caplog.text
