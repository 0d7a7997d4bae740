"""The sympy cost model: exact break-even values, and how the policy uses them (min_tokens="auto")."""

import dataclasses

import pytest
import sympy
import torch

from lynx_compile import LynxConfig
from lynx_compile.cost_model import M, PROFILES, DeviceProfile, gemm_cost, profile_for
from lynx_compile.kernels import registry
from lynx_compile.passes.gemm_sites import GemmSite
from lynx_compile.policy import decide

# 1 TFLOP/s at full efficiency, 1 TB/s, a 2x sparse GEMM, no launch cost, 1 us sparse setup.
UNIT = DeviceProfile("unit", dense_tflops=1, hbm_tbps=1, sparse_ratio=2, efficiency=1, launch_us=0, setup_us=1,
                     source="test")


def test_dense_time_is_flops_plus_bytes():
    cost = gemm_cost(UNIT, 1024, 1024)
    # 2*M*K*N FLOPs at 1e6 FLOP/us, plus (M*K + K*N + M*N) bf16 bytes at 1e6 B/us.
    assert sympy.simplify(cost.dense_us - (2101248 * M + 2097152) / sympy.Integer(10**6)) == 0


def test_fused_break_even_is_setup_over_slope_difference():
    # dense slope 2101248e-6, fused slope 1052672e-6 per token: 1 us of setup pays back at M = 1e6 / 1048576.
    assert gemm_cost(UNIT, 1024, 1024, kernel="fused").break_even() == sympy.Rational(15625, 16384)


def test_unfused_without_setup_pays_from_the_first_token():
    profile = dataclasses.replace(UNIT, setup_us=0)
    assert gemm_cost(profile, 1024, 1024, kernel="cusparselt").break_even() == 0


@pytest.mark.parametrize("kernel", ["triton", "reference"])
def test_kernels_without_sparse_tensor_cores_never_pay(kernel):
    assert gemm_cost(UNIT, 1024, 1024, kernel=kernel).break_even() == sympy.oo


def test_only_2_4_uses_sparse_tensor_cores():
    assert gemm_cost(UNIT, 1024, 1024, kernel="fused", pattern=(4, 8)).break_even() == sympy.oo


def test_low_rank_branch_raises_the_break_even():
    plain = gemm_cost(UNIT, 1024, 1024, kernel="fused").break_even()
    assert gemm_cost(UNIT, 1024, 1024, kernel="fused", rank=64).break_even() > plain


def test_shipped_profiles():
    # With the published 1.2x for cuSPARSELt on an H100, the unfused route never beats dense
    # at K=N=3072; on an H20 (1.46x, measured) it does.
    assert gemm_cost(PROFILES["H100"], 3072, 3072, kernel="cusparselt").break_even() == sympy.oo
    assert 0 < gemm_cost(PROFILES["H20"], 3072, 3072, kernel="cusparselt").break_even() < 512
    assert profile_for("NVIDIA H100 80GB HBM3").name == "H100"
    with pytest.raises(ValueError, match="no device profile for 'Quadro'; shipped profiles: H100, H200"):
        profile_for("Quadro")


def _site(m, device="cuda"):
    node = torch.fx.Graph().placeholder("x")
    return GemmSite(node=node, op="addmm", kind="linear", x=node, other=node, bias=None, module_path="blocks.0.ff",
                    batch=1, m=m, k=3072, n=3072, dtype=torch.bfloat16, device=torch.device(device))


def test_auto_min_tokens_uses_break_even_of_the_chosen_kernel(monkeypatch):
    usable = dataclasses.replace(registry.get_kernel("cusparselt"), unavailable_reason=lambda problem: "")
    monkeypatch.setitem(registry._KERNELS, "cusparselt", usable)
    monkeypatch.setattr(registry, "self_test", lambda *args: "")  # no CUDA here to run it on
    config = LynxConfig.from_options({"min_tokens": "auto", "device_profile": "H20", "selection": "always"})
    break_even = int(sympy.ceiling(gemm_cost(PROFILES["H20"], 3072, 3072, kernel="cusparselt").break_even()))
    small = decide(_site(break_even - 1), config)
    assert not small.rewrite
    assert small.reason == f"M={break_even - 1} tokens < break-even M={break_even} for kernel 'cusparselt' on H20 (cost model)"
    large = decide(_site(4096), config)
    assert large.rewrite and large.kernel == "cusparselt" and large.min_tokens == break_even


def test_auto_min_tokens_on_cpu_keeps_everything_dense():
    decision = decide(_site(4096, device="cpu"), LynxConfig.from_options({"min_tokens": "auto"}))
    assert (decision.rewrite, decision.reason) == (False, "sparsity never pays for kernel 'reference' on H100 (cost model)")
