"""A kernel that fails its compile-time self-test keeps the GEMM dense (warning + report), or with
strict=True stops the compile."""

import dataclasses
import logging
import re

import pytest
import torch
import torch.nn as nn

import lynx_compile
from lynx_compile.kernels import registry
from lynx_compile.policy import KernelFailedError


def _broken(*args, **kwargs):
    raise RuntimeError("PTX assembly failed\nsecond line")


@pytest.fixture
def broken_triton(monkeypatch):
    """A "triton" kernel that says it can run (with or without Triton here) and fails when it does."""
    broken = dataclasses.replace(registry.get_kernel("triton"), run=_broken, unavailable_reason=lambda problem: "")
    monkeypatch.setitem(registry._KERNELS, "triton", broken)
    monkeypatch.setattr(registry, "_SELF_TEST", {})


@torch.no_grad()
def test_failing_kernel_keeps_the_node_dense_with_warning_and_reason(broken_triton, caplog):
    layer, x = nn.Linear(16, 8), torch.randn(4, 16)
    with caplog.at_level(logging.WARNING, logger="lynx_compile"):
        out = torch.compile(layer, backend="rtlynx", options={"min_tokens": 0, "kernel": "triton"})(x)
    torch.testing.assert_close(out, layer(x))
    (record,) = lynx_compile.reports()[-1].records
    reason = "kernel 'triton' failed on cpu: self-test failed: RuntimeError: PTX assembly failed; kept dense"
    assert (record.rewritten, record.reason) == (False, reason)
    assert "rtlynx: kernel 'triton' failed on cpu: self-test failed: RuntimeError: PTX assembly failed keeps " \
           "(root) dense" in caplog.text


@torch.no_grad()
def test_strict_makes_a_failing_kernel_an_error(broken_triton):
    fn = torch.compile(nn.Linear(16, 8), backend="rtlynx", options={"min_tokens": 0, "kernel": "triton", "strict": True})
    with pytest.raises(Exception) as info:
        fn(torch.randn(4, 16))
    assert isinstance(info.value.inner_exception, KernelFailedError)
    assert str(info.value.inner_exception) == ("(root): kernel 'triton' failed on cpu: self-test failed: RuntimeError: "
                                               "PTX assembly failed (strict=True)")


@pytest.mark.triton(device="cpu")
def test_self_test_passes_for_working_kernels_and_is_cached():
    triton = registry.get_kernel("triton")
    assert registry.self_test(triton, torch.device("cpu"), torch.float32, (2, 4)) == ""
    assert registry._SELF_TEST[("triton", "cpu", torch.float32, (2, 4))] == ""
    assert registry.self_test(registry.get_kernel("reference"), torch.device("cpu"), torch.bfloat16, (1, 2)) == ""


def test_wrong_results_fail_the_self_test(monkeypatch):
    monkeypatch.setattr(registry, "_SELF_TEST", {})
    wrong = dataclasses.replace(registry.get_kernel("reference"), name="wrong",
                                run=lambda x, other, *a, **k: torch.matmul(x, other))  # forgets the sparsity
    assert re.fullmatch(r"self-test error \S+ > tolerance \S+", registry.self_test(wrong, torch.device("cpu"),
                                                                                      torch.float32, (2, 4)))


@pytest.mark.triton(device="cpu")
@torch.no_grad()
def test_self_test_runs_on_real_tensors_inside_the_compile(monkeypatch):
    # Passes run under the compile's FakeTensorMode (inner="eager", explain()): the self-test must not.
    monkeypatch.setattr(registry, "_SELF_TEST", {})
    torch.manual_seed(0)
    layer, x = nn.Linear(64, 32), torch.randn(40, 64)
    torch.compile(layer, backend="rtlynx", options={"min_tokens": 0, "kernel": "triton", "inner": "eager"})(x)
    (record,) = lynx_compile.reports()[-1].records
    assert (record.rewritten, record.kernel, record.reason) == (True, "triton", "")
    assert registry._SELF_TEST == {("triton", "cpu", torch.float32, (2, 4)): ""}
