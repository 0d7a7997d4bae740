"""A roofline cost model of one GEMM, dense and N:M-sparse, as sympy expressions in the token count M.

Time = FLOPs / achieved rate + bytes / bandwidth + launches * launch overhead, plus a fixed setup
cost for a sparse GEMM (which stands in for its poorer tile efficiency at small M). Every term is
linear in M, so the token count above which sparsity pays (the break-even M) is the exact root of
``t_sparse(M) - t_dense(M)``. The policy uses it for ``min_tokens="auto"``, and the report shows it.

The model is deliberately simple and explicit: peak rates and bandwidths are public datasheet
numbers, and the achieved fraction of peak and the sparse-over-dense GEMM ratio are either measured
(with the source named) or marked as assumptions. Pass your own ``DeviceProfile`` once you have
measured numbers for your device.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

M = sympy.Symbol("M", positive=True)  # tokens (rows of the activation)


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    dense_tflops: float   # bf16 dense tensor-core peak
    hbm_tbps: float       # memory bandwidth, TB/s
    sparse_ratio: float   # achieved 2:4 sparse GEMM speed over dense at large shapes
    efficiency: float     # fraction of the dense peak a large GEMM reaches
    launch_us: float      # cost of one extra kernel launch
    setup_us: float       # fixed extra time of a sparse GEMM (setup, tile quantisation at small M)
    source: str           # where the numbers come from


_ASSUMED = "efficiency 0.7, launch 3 us and sparse setup 5 us assumed"
PROFILES = {
    # Peaks and bandwidths: NVIDIA datasheets (bf16 dense tensor core, SXM parts).
    "H100": DeviceProfile("H100", 989.4, 3.35, 1.2, 0.7, 3.0, 5.0,
                          "datasheet H100 SXM5; sparse_ratio 1.2 = cuSPARSELt at 8192^3 (published NVIDIA cuSPARSELt and CUTLASS example 62 figures); " + _ASSUMED),
    "H200": DeviceProfile("H200", 989.4, 4.8, 1.2, 0.7, 3.0, 5.0,
                          "datasheet H200 SXM; sparse_ratio 1.2 assumed as on H100; " + _ASSUMED),
    "A100": DeviceProfile("A100", 312.0, 2.039, 1.2, 0.7, 3.0, 5.0,
                          "datasheet A100 SXM4 80GB; sparse_ratio 1.2 assumed; " + _ASSUMED),
    "L40S": DeviceProfile("L40S", 362.05, 0.864, 1.2, 0.7, 3.0, 5.0,
                          "datasheet L40S; sparse_ratio 1.2 assumed; " + _ASSUMED),
    "H20": DeviceProfile("H20", 148.0, 4.0, 1.46, 0.7, 3.0, 5.0,
                         "datasheet H20; sparse_ratio 1.46 = cuSPARSELt 8192x8192x12288, 11.95 -> 8.20 ms "
                         "(RT-Lynx, arXiv 2605.26632); " + _ASSUMED),
}


def profile_for(name_or_device: str) -> DeviceProfile:
    """A shipped profile by name, or the one whose name appears in a CUDA device name."""
    if name_or_device in PROFILES:
        return PROFILES[name_or_device]
    for name, profile in PROFILES.items():
        if name.lower() in name_or_device.lower():
            return profile
    raise ValueError(f"no device profile for {name_or_device!r}; shipped profiles: {', '.join(PROFILES)}")


def _exact(value: float) -> sympy.Rational:
    """Profile numbers as exact rationals, so break-even values are exact sympy numbers."""
    return sympy.Rational(str(value))


@dataclass(frozen=True)
class GemmCost:
    """Times in microseconds and counts, each a sympy expression in ``M``."""

    dense_flops: sympy.Expr
    dense_us: sympy.Expr
    sparse_us: sympy.Expr
    flops_saved: sympy.Expr

    def break_even(self):
        """Smallest M at which the sparse route is no slower: a sympy number, or ``oo`` if never."""
        slope = sympy.diff(self.dense_us - self.sparse_us, M)
        if slope <= 0:
            return sympy.oo
        root = sympy.solve(sympy.Eq(self.sparse_us, self.dense_us), M)
        return root[0] if root else sympy.Integer(0)

    def at(self, m: int) -> dict:
        return {"flops": int(self.dense_flops.subs(M, m)), "dense_us": float(self.dense_us.subs(M, m)),
                "sparse_us": float(self.sparse_us.subs(M, m)), "flops_saved": int(self.flops_saved.subs(M, m))}


def gemm_cost(profile: DeviceProfile, k: int, n: int, *, pattern=(2, 4), rank: int = 0, kernel: str = "cusparselt",
              dtype_bytes: int = 2, batch: int = 1) -> GemmCost:
    """Dense vs sparse cost of ``(M x K) @ (K x N)`` (times ``batch``) on ``profile`` with ``kernel``.

    ``cusparselt``: separate compress pass (read X, write values + 2-bit metadata), a sparse GEMM at
    ``sparse_ratio`` times the dense rate for 2:4 only, a fp32 epilogue pass over Y, and the
    low-rank branch as two small GEMMs that re-read X. ``fused``: compress in the GEMM's prologue
    and the epilogue in registers, so only the GEMM's own traffic remains. ``triton`` and
    ``reference`` do dense FLOPs on the expanded tile and never pay.
    """
    keep = sympy.Rational(*pattern)
    rate = _exact(profile.dense_tflops) * _exact(profile.efficiency) * 10**6  # FLOP per us
    bw = _exact(profile.hbm_tbps) * 10**6                                      # bytes per us
    launch = _exact(profile.launch_us)
    b = dtype_bytes
    sparse_rate = rate * _exact(profile.sparse_ratio) if (pattern == (2, 4) and kernel in ("cusparselt", "fused")) \
        else rate
    flops = 2 * M * k * n
    dense_us = batch * (flops / rate + (M * k + k * n + M * n) * b / bw)
    meta = M * k * keep / 4  # 2 bits per kept value
    gemm_us = flops / sparse_rate + (M * k * keep * b + meta + k * n * b + M * n * b) / bw + _exact(profile.setup_us)
    lowrank_flops = 2 * M * rank * (k + n)
    if kernel == "fused":
        sparse_us = gemm_us + (M * k * b * (1 - keep) - meta) / bw + lowrank_flops / rate
    else:
        compress_us = (M * k * b + M * k * keep * b + meta) / bw + launch
        epilogue_us = 2 * M * n * b / bw + launch
        lowrank_us = (lowrank_flops / rate + (M * k + 2 * M * rank) * b / bw + 2 * launch) if rank else 0
        sparse_us = compress_us + gemm_us + epilogue_us + lowrank_us
    saved = flops * (1 - keep) - lowrank_flops if sparse_rate != rate else -lowrank_flops
    return GemmCost(batch * flops, dense_us, batch * sparse_us, batch * saved)
