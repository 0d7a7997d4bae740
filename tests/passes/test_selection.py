"""Measured kernel selection (the ``selection`` option): a GEMM is rewritten only where sparse measured
faster by the margin, with an injected timer standing in for CUDA events on the CPU."""

import json
import logging
import re

import pytest
import torch
from torch import nn

import lynx_compile
from lynx_compile import LynxConfig, timing
from lynx_compile.kernels import reference, registry

M_TOKENS = 32
FC1, FC2 = (64, 128), (128, 64)  # (K, N)


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(*FC1), nn.Linear(*FC2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture(autouse=True)
def timing_setup(tmp_path, monkeypatch):
    """A timing cache of the test's own, and a sparse kernel that ``auto`` may time on the CPU."""
    monkeypatch.setenv(timing.CACHE_ENV, str(tmp_path / "timings.json"))
    stub = registry.Kernel("stub", reference.sparse_matmul, lambda problem: "", ("cpu",))
    monkeypatch.setattr(registry, "_KERNELS", {"stub": stub, **registry._KERNELS})  # auto's first choice here


class TableTimer:
    """Milliseconds by (route, (K, N)); counts its calls; an Exception value is raised."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def __call__(self, route, problem, run):
        self.calls.append((route, problem.k, problem.n))
        value = self.table[(route, (problem.k, problem.n))]
        if isinstance(value, Exception):
            raise value
        return value


def _compile(options, timer=None):
    torch.manual_seed(0)
    model, x = TwoLayers().eval(), torch.randn(M_TOKENS, FC1[0])
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="rtlynx", options={"min_tokens": 0, "inner": "eager", **options})
    if timer is None:
        out = compiled(x)
    else:
        with timing.use_timer(timer):
            out = compiled(x)
    return model, x, out, lynx_compile.reports()[-1].records


@torch.no_grad()
def test_only_gemms_that_measured_faster_are_rewritten(capsys):
    timer = TableTimer({("dense", FC1): 1.0, ("stub", FC1): 0.5, ("dense", FC2): 1.0, ("stub", FC2): 1.2})
    model, x, out, records = _compile({"selection": "measured"}, timer)
    by_name = {r.name: r for r in records}
    assert [(r.name, r.rewritten, r.kernel, r.selection) for r in records] == [
        ("fc1", True, "stub", "measured"), ("fc2", False, "", "measured")]
    assert by_name["fc2"].reason == "measured 1.200 ms sparse (stub) vs 1.000 ms dense"
    assert by_name["fc1"].kernel_reason == "measured 0.500 ms sparse (stub) vs 1.000 ms dense"
    assert (by_name["fc1"].measured_dense_us, by_name["fc1"].measured_sparse_us) == (1000.0, 500.0)
    assert sorted(timer.calls) == sorted([("dense", *FC1), ("stub", *FC1), ("dense", *FC2), ("stub", *FC2)])
    progress = capsys.readouterr().err  # a line per timed problem, with the times
    assert "rtlynx: timed float32 M=32 K=64 N=128: dense 1.000 ms, stub 0.500 ms in " in progress
    hidden = reference.sparse_matmul(x, model.fc1.weight.t(), model.fc1.bias, n=2, m=4)
    torch.testing.assert_close(out, model.fc2(torch.relu(hidden)), rtol=1e-5, atol=1e-5)  # fc2 ran dense
    table = lynx_compile.reports()[-1].table()
    assert "measured dense us" in table and "measured sparse us" in table


@pytest.mark.parametrize("margin, rewritten", [(0.05, False), (0.0, True)])
@torch.no_grad()
def test_margin(margin, rewritten):
    timer = TableTimer({("dense", FC1): 1.0, ("stub", FC1): 0.97, ("dense", FC2): 1.0, ("stub", FC2): 2.0})
    *_, records = _compile({"selection": "measured", "selection_margin": margin}, timer)
    assert records[0].rewritten == rewritten
    if not rewritten:
        assert records[0].reason == "measured 0.970 ms sparse (stub) vs 1.000 ms dense, short of the 5% margin"


@torch.no_grad()
def test_second_compile_reuses_the_stored_times(tmp_path):
    table = {("dense", FC1): 1.0, ("stub", FC1): 0.5, ("dense", FC2): 1.0, ("stub", FC2): 0.5}
    first, second = TableTimer(table), TableTimer(table)
    *_, before = _compile({"selection": "measured"}, first)
    *_, after = _compile({"selection": "measured"}, second)
    assert len(first.calls) == 4 and second.calls == []
    assert [(r.rewritten, r.reason, r.kernel_reason) for r in after] == \
           [(r.rewritten, r.reason, r.kernel_reason) for r in before]
    stored = json.loads((tmp_path / "timings.json").read_text())
    (environment,) = stored["environments"].values()
    assert sorted(json.loads(key)["k"] for key in environment) == [64, 128]
    timing.clear_timings()
    *_, again = _compile({"selection": "measured"}, third := TableTimer(table))
    assert len(third.calls) == 4  # cleared: timed again


@torch.no_grad()
def test_a_failure_while_timing_keeps_the_gemm_dense_with_the_reason():
    timer = TableTimer({("dense", FC1): 1.0, ("stub", FC1): RuntimeError("launch failed"),
                        ("dense", FC2): 1.0, ("stub", FC2): 0.5})
    *_, records = _compile({"selection": "measured"}, timer)
    assert (records[0].rewritten, records[0].reason) == (
        False, "timing failed for every sparse kernel (stub: error: RuntimeError: launch failed)")
    assert records[1].rewritten


@torch.no_grad()
def test_a_corrupt_timing_cache_is_ignored_with_a_warning_and_rewritten(tmp_path):
    path = tmp_path / "timings.json"
    path.write_text("{not json")
    timer = TableTimer({("dense", FC1): 1.0, ("stub", FC1): 0.5, ("dense", FC2): 1.0, ("stub", FC2): 0.5})
    with pytest.warns(UserWarning, match=re.escape(f"rtlynx: ignoring the timing cache {path}: it cannot be read")):
        *_, records = _compile({"selection": "measured"}, timer)
    assert [r.rewritten for r in records] == [True, True]
    assert json.loads(path.read_text())["format"] == "lynx-compile-timings"


@torch.no_grad()
def test_cost_model_selection_keeps_what_the_model_says_is_slower_and_prefers_stored_times():
    *_, records = _compile({"selection": "cost_model", "device_profile": "H100"})
    # the stub is no sparse tensor-core kernel for the cost model: dense FLOPs on decompressed x, never faster
    assert not records[0].rewritten and records[0].selection == "cost_model"
    assert re.fullmatch(r"cost model: [\d.e+-]+ us sparse \(stub\) vs [\d.e+-]+ us dense on H100", records[0].reason)

    timer = TableTimer({("dense", FC1): 1.0, ("stub", FC1): 0.5, ("dense", FC2): 1.0, ("stub", FC2): 1.2})
    _compile({"selection": "measured"}, timer)
    *_, records = _compile({"selection": "cost_model", "device_profile": "H100"})  # no timer: stored times only
    assert [(r.rewritten, r.reason, r.measured_sparse_us) for r in records] == [
        (True, "", 500.0), (False, "stored measurement: 1.200 ms sparse (stub) vs 1.000 ms dense", 1200.0)]


@torch.no_grad()
def test_cpu_default_rewrites_everything_and_says_so_once(caplog):
    from lynx_compile import selection

    selection._note_cpu_once.cache_clear()
    with caplog.at_level(logging.INFO, logger="lynx_compile"):
        *_, records = _compile({}, TableTimer({}))  # the default: no timing on the CPU
    assert [(r.rewritten, r.selection) for r in records] == [(True, "always"), (True, "always")]
    assert LynxConfig().selection == "auto"
    assert caplog.text.count("on the CPU every GEMM the options allow is rewritten (selection='always')") == 1


@torch.no_grad()
def test_a_forced_kernel_is_never_timed():
    timer = TableTimer({})
    *_, records = _compile({"selection": "measured", "kernel": "reference"}, timer)
    assert timer.calls == [] and [(r.kernel, r.selection) for r in records] == [("reference", "forced")] * 2


@pytest.mark.parametrize("options, message", [
    ({"selection": "fastest"}, "option 'selection' has invalid value 'fastest'; valid choices: 'auto', 'measured', "
                               "'cost_model', 'always'"),
    ({"selection_margin": -0.1}, "option 'selection_margin' must be a finite number >= 0, got -0.1"),
    ({"timing_budget_ms": 0}, "option 'timing_budget_ms' must be a finite number > 0, got 0"),
])
def test_bad_selection_options(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        LynxConfig.from_options(options)


def test_dynamic_m_is_timed_at_the_next_power_of_two():
    assert timing.m_bucket(300, None) == 300
    sym = torch.fx.experimental.symbolic_shapes.ShapeEnv().create_unbacked_symint()
    assert timing.m_bucket(sym, 300) == 512 and timing.m_bucket(sym, 512) == 512
