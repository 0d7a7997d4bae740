"""kernel="auto" picks per node and says why; a forced kernel runs or fails clearly."""

import re

import pytest
import torch
import torch.nn as nn

import lynx_compile
from lynx_compile.kernels import cusparselt, reference, registry
from lynx_compile.policy import KernelUnavailableError
from shared import DEVICE, HALF_DTYPES, HAS_CUDA

# On a CUDA device, cuSPARSELt's own reason (compute capability below 8.0, no cuSPARSELt in this torch);
# the gpu marker says when there is no CUDA device at all.
CUSPARSELT_REASON = cusparselt.unavailable_reason(
    registry.Problem("cuda", torch.bfloat16, 64, 64, 64, 1, (2, 4))) if HAS_CUDA else ""


def _problem(**changes):
    base = dict(device_type="cuda", dtype=torch.bfloat16, m=4096, k=3072, n=3072, batch=1, pattern=(2, 4))
    return registry.Problem(**{**base, **changes})


def test_auto_preference_order_per_device():
    assert [k.name for k in registry.auto_candidates("cuda")] == ["cusparselt", "triton", "reference"]
    assert [k.name for k in registry.auto_candidates("cpu")] == ["reference"]


def test_cusparselt_reasons():
    assert cusparselt.unavailable_reason(_problem(pattern=(4, 8))) == "sparse tensor cores support 2:4 only, not 4:8"
    assert cusparselt.unavailable_reason(_problem(device_type="cpu")) == "needs a CUDA device, got 'cpu'"
    if not HAS_CUDA:
        assert cusparselt.unavailable_reason(_problem()) == "CUDA is not available"


@torch.no_grad()
def test_auto_on_cpu_uses_reference_and_records_it():
    layer = nn.Linear(16, 8)
    torch.compile(layer, backend="rtlynx", options={"min_tokens": 0})(torch.randn(4, 16))
    (record,) = lynx_compile.reports()[-1].records
    assert (record.kernel, record.kernel_reason) == ("reference", "")


@pytest.mark.triton
@torch.no_grad()
def test_forced_triton_runs_through_inductor_and_matches_reference():
    torch.manual_seed(0)
    layer, x = nn.Linear(64, 32).to(DEVICE), torch.randn(40, 64, device=DEVICE)
    out = torch.compile(layer, backend="rtlynx", options={"min_tokens": 0, "kernel": "triton"})(x)
    (record,) = lynx_compile.reports()[-1].records
    assert record.kernel == "triton"
    # On CUDA, Inductor launches the kernels (rtlynx::triton_sparse_matmul inlined). On the CPU they
    # are the interpreter's, which it cannot launch: the op launches them.
    assert (record.launch, record.launch_reason) == (("inductor", "") if DEVICE == "cuda" else (
        "op", "the Triton interpreter's kernels (not on CUDA) cannot be traced"))
    expected = reference.sparse_matmul(x, layer.weight.t(), layer.bias, n=2, m=4)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.skipif(HAS_CUDA, reason="checks the error on a machine without CUDA")
def test_forced_cusparselt_without_cuda_is_a_clear_error():
    layer = nn.Linear(16, 8)
    fn = torch.compile(layer, backend="rtlynx", options={"min_tokens": 0, "kernel": "cusparselt"})
    message = "(root) (addmm, MxKxN=4x16x8): kernel='cusparselt' cannot run here: needs a CUDA device, got 'cpu'"
    with pytest.raises(Exception, match=re.escape(message)) as info:
        fn(torch.randn(4, 16))
    # Inductor wraps errors raised inside its passes and keeps the original as inner_exception.
    assert isinstance(info.value.inner_exception, KernelUnavailableError)


@pytest.mark.gpu("cuSPARSELt")
@pytest.mark.skipif(bool(CUSPARSELT_REASON), reason=f"cuSPARSELt cannot run here: {CUSPARSELT_REASON}")
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("shape", [(100, 128, 72), (256, 1152, 1152), (33, 64, 40)])
def test_cusparselt_matches_reference_on_gpu(dtype, shape):
    m, k, n = shape
    torch.manual_seed(0)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    w, b = torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5, torch.randn(n, device="cuda", dtype=dtype)
    lr_down, lr_up = torch.randn(k, 8, device="cuda", dtype=dtype) / k**0.5, torch.randn(8, n, device="cuda", dtype=dtype)
    got = cusparselt.sparse_matmul(x, w.t(), b, lr_down, lr_up, n=2, m=4)
    expected = reference.sparse_matmul(x, w.t(), b, lr_down, lr_up, n=2, m=4)
    # cuSPARSELt rounds once to dtype before the fp32 epilogue: 2 ulp against the reference.
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(got, expected, rtol=2 * eps, atol=2 * eps * expected.abs().max().item())
