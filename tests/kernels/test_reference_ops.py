"""The pure-PyTorch reference and the ``torch.ops.rtlynx.*`` ops against independent computations.

Every later kernel is tested against ``kernels/reference.py``, so the reference itself is checked
here against deliberately naive code: plain Python loops over rows and groups, float64 arithmetic,
no torch.sort / gather / scatter. Selection results must match *bit for bit* (NaN payloads and the
sign of zero included); norm scales and GEMM outputs are compared in float64 with per-dtype
tolerances. The custom ops must agree with the reference, pass ``torch.library.opcheck``, have fake
implementations that work with symbolic sizes, and reject bad input with a clear error.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._subclasses.fake_tensor import FakeTensorMode

import lynx_compile.kernels  # noqa: F401  (importing registers torch.ops.rtlynx.*)
from lynx_compile.kernels import kernel_names, reference
from shared import DTYPES, NAN_BITS, PATTERNS, SUPPORTED_DTYPES, VALID_PATTERNS, bits, given, param_id, settings, st

# Relative tolerance of GEMM outputs against float64 (atol is this times the largest |output|,
# because outputs near zero after cancellation have no meaningful relative error).
GEMM_RTOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
SHAPES = [(32,), (6, 16), (2, 3, 16)]  # 1-D, 2-D, 3-D; K divisible by every M in PATTERNS

rtlynx = torch.ops.rtlynx


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------------------------
# Naive, obviously-correct implementations (loops, Python floats, float64)
# ----------------------------------------------------------------------------------------------


def _rank_key(value: float, j: int):
    """Sort key, ascending = best first: NaN, then +-Inf, then larger |x|; ties -> lower index."""
    if math.isnan(value):
        return (0, 0.0, j)
    if math.isinf(value):
        return (1, 0.0, j)
    return (2, -abs(value), j)


def naive_select(x: torch.Tensor, n: int, m: int):
    """-> (values bit-exact from x, uint8 in-group indices, kept absolute columns per row)."""
    k = x.shape[-1]
    rows = x.reshape(-1, k)
    kept_cols, kept_idx = [], []
    for row in rows.double().tolist():  # fp16/bf16/fp32 -> float64 is exact
        cols, idx = [], []
        for g in range(k // m):
            group = row[g * m:(g + 1) * m]
            best = sorted(range(m), key=lambda j: _rank_key(group[j], j))[:n]
            for j in sorted(best):
                idx.append(j)
                cols.append(g * m + j)
        kept_cols.append(cols)
        kept_idx.append(idx)
    out_shape = (*x.shape[:-1], k // m * n)
    row_ids = torch.arange(rows.shape[0]).unsqueeze(-1)
    values = rows[row_ids, torch.tensor(kept_cols, dtype=torch.long)].reshape(out_shape)
    indices = torch.tensor(kept_idx, dtype=torch.uint8).reshape(out_shape)
    return values, indices, kept_cols


def naive_scale(x: torch.Tensor, kept_cols) -> torch.Tensor:
    """float64 ||x|| / ||S(x)|| per row; 1 for all-zero rows and rows with NaN/Inf."""
    out = []
    for row, cols in zip(x.reshape(-1, x.shape[-1]).double().tolist(), kept_cols):
        total = sum(v * v for v in row)
        if not all(math.isfinite(v) for v in row) or total == 0.0:
            out.append(1.0)
        else:
            out.append(math.sqrt(total / sum(row[c] * row[c] for c in cols)))
    return torch.tensor(out, dtype=torch.float64).reshape(x.shape[:-1])


def naive_dense(x: torch.Tensor, kept_cols) -> torch.Tensor:
    """float64 copy of x with only the kept positions, zeros elsewhere."""
    k = x.shape[-1]
    out = []
    for row, cols in zip(x.reshape(-1, k).double().tolist(), kept_cols):
        dense = [0.0] * k
        for c in cols:
            dense[c] = row[c]
        out.append(dense)
    return torch.tensor(out, dtype=torch.float64).reshape(x.shape)


def expected_matmul(x, other, bias=None, lr_down=None, lr_up=None, *, n, m, norm_comp=True):
    """s * S(x) @ other + (x @ lr_down) @ lr_up + bias, all in float64 from the naive selection."""
    _, _, cols = naive_select(x, n, m)
    scale = naive_scale(x, cols) if norm_comp else torch.ones(x.shape[:-1], dtype=torch.float64)
    y = torch.matmul(naive_dense(x, cols), other.double()) * scale.unsqueeze(-1)
    if lr_down is not None:
        y = y + torch.matmul(torch.matmul(x.double(), lr_down.double()), lr_up.double())
    if bias is not None:
        y = y + bias.double()
    return y


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.equal(bits(actual), bits(expected)), f"\nactual:   {actual}\nexpected: {expected}"


def assert_values_exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-exact (sign of zero included), except that any NaN equals any NaN.

    NaN payloads are checked separately by test_kept_nan_keeps_its_bits, so that one defect there
    does not hide every other selection check.
    """
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan), f"\nactual:   {actual}\nexpected: {expected}"
    assert torch.equal(bits(actual)[~nan], bits(expected)[~nan]), f"\nactual:   {actual}\nexpected: {expected}"


def assert_gemm_close(actual: torch.Tensor, expected64: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == dtype
    assert actual.shape == expected64.shape
    rtol = GEMM_RTOL[dtype]
    torch.testing.assert_close(actual.double(), expected64, rtol=rtol, atol=rtol * expected64.abs().max().item())


def make_data(shape, dtype, kind: str) -> torch.Tensor:
    if kind == "randn":
        return (torch.randn(shape) * 3).to(dtype)
    if kind == "ties":  # integer values: many equal magnitudes (and zeros) inside a group
        return torch.randint(-2, 3, shape).to(dtype)
    assert kind == "special"
    x = torch.randint(-2, 3, shape).to(dtype)
    rows = x.view(-1, shape[-1])
    for r in range(rows.shape[0]):
        recipe = r % 4
        if r == 0:  # every rule in one row (so the 1-D case sees them all too)
            rows[r, :8] = torch.tensor([0.0, -0.0, 0.0, -0.0, -0.0, 0.0, -0.0, 0.0])
            bits(rows)[r, 8] = NAN_BITS[dtype]
            rows[r, 9], rows[r, 10], rows[r, 11] = float("inf"), float("-inf"), 1.0
            rows[r, 12], rows[r, 13], rows[r, 14] = float("-inf"), 2.0, float("inf")
            bits(rows)[r, 15] = NAN_BITS[dtype]
        elif recipe == 1:
            rows[r] = 0.0
        elif recipe == 2:
            rows[r, ::5] = float("nan")
        elif recipe == 3:
            rows[r, 1], rows[r, 2], rows[r, 6], rows[r, 7] = float("inf"), float("-inf"), float("-inf"), 2.0
        # recipe 0 (rows 4, 8, ...): the integer ties only
    return x


def nonfinite_or_zero_rows(x: torch.Tensor) -> torch.Tensor:
    return (~torch.isfinite(x)).any(-1) | (x == 0).all(-1)


# ----------------------------------------------------------------------------------------------
# 1. Selection (nm_select / compress) against the naive loops, bit for bit
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["randn", "ties", "special"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
@pytest.mark.parametrize("pattern", PATTERNS, ids=param_id)
def test_nm_select_matches_naive_loops(pattern, dtype, shape, kind):
    n, m = pattern
    x = make_data(shape, dtype, kind)
    values, indices = reference.nm_select(x, n, m)
    exp_values, exp_indices, _ = naive_select(x, n, m)
    assert_values_exact(values, exp_values)
    assert indices.dtype == torch.uint8
    assert torch.equal(indices, exp_indices)
    # compress returns the very same selection
    c_values, c_indices, _ = reference.compress(x, n, m)
    assert_values_exact(c_values, exp_values)
    assert torch.equal(c_indices, exp_indices)


@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
@pytest.mark.parametrize("pattern", PATTERNS, ids=param_id)
def test_indices_are_uint8_in_range_and_strictly_increasing_per_group(pattern, dtype):
    n, m = pattern
    x = make_data((5, 7, 32), dtype, "special")
    values, indices, scale = reference.compress(x, n, m)
    assert values.shape == indices.shape == (5, 7, 32 // m * n)
    assert scale.shape == (5, 7) and scale.dtype == torch.float32
    assert indices.dtype == torch.uint8
    idx = indices.long()
    assert bool((idx >= 0).all()) and bool((idx < m).all())
    groups = idx.reshape(5, 7, 32 // m, n)
    assert bool((groups[..., 1:] > groups[..., :-1]).all())  # ascending, hence distinct


def test_selection_rules_on_hand_written_groups():
    # One readable case per rule, for 2:4 (the expected kept in-group indices are written out).
    x = torch.tensor([
        [1.0, -3.0, 2.0, 0.5],                           # largest |x|: -3 (1) and 2 (2)
        [2.0, -2.0, 2.0, -2.0],                          # all tie: lowest indices 0, 1
        [0.0, -0.0, 0.0, 0.0],                           # all zero: 0, 1
        [1.0, float("nan"), 1e30, float("-inf")],        # NaN > Inf > finite: 1, 3
        [float("inf"), float("-inf"), float("nan"), 5.0],  # NaN, then the first Inf: 0, 2
        [float("nan"), 1.0, float("nan"), float("nan")],  # three NaNs tie: 0, 2
    ])
    _, indices = reference.nm_select(x, 2, 4)
    assert indices.tolist() == [[1, 2], [0, 1], [0, 1], [1, 3], [0, 2], [0, 2]]


@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
@pytest.mark.parametrize("pattern", PATTERNS, ids=param_id)
def test_kept_nan_keeps_its_bits(pattern, dtype):
    # Keeping a value is a copy: a kept NaN must come out with x's exact bits (payload and sign),
    # as the Triton kernel produces them; the ground truth must not rewrite what it keeps.
    # Regression test for a fixed bug (reference.nm_select, bfloat16): torch's CPU gather on bf16 turns every NaN into 0xFFFF,
    # so the kept NaN loses its payload and sign (fp32/fp16 are fine). Gathering on the integer
    # view (groups.view(torch.int16).gather(...).view(x.dtype)) keeps the bits.
    n, m = pattern
    x = torch.randn(4, 16).to(dtype)
    bits(x)[:, ::3] = NAN_BITS[dtype]
    values, _ = reference.nm_select(x, n, m)
    exp_values, _, _ = naive_select(x, n, m)
    assert_bits_equal(values, exp_values)
    assert_bits_equal(rtlynx.compress(x, n, m)[0], exp_values)


# ----------------------------------------------------------------------------------------------
# 2. Norm scale
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
@pytest.mark.parametrize("pattern", PATTERNS, ids=param_id)
def test_norm_scale_matches_float64(pattern, dtype, shape):
    n, m = pattern
    x = make_data(shape, dtype, "randn")
    _, _, scale = reference.compress(x, n, m)
    _, _, cols = naive_select(x, n, m)
    assert scale.dtype == torch.float32 and scale.shape == x.shape[:-1]
    torch.testing.assert_close(scale.double(), naive_scale(x, cols), rtol=1e-6, atol=0)
    assert bool((scale >= 1).all())  # ||x|| >= ||S(x)|| always


@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
@pytest.mark.parametrize("pattern", PATTERNS, ids=param_id)
def test_norm_scale_is_exactly_one_for_zero_and_nonfinite_rows(pattern, dtype):
    n, m = pattern
    x = make_data((8, 16), dtype, "special")
    special_rows = nonfinite_or_zero_rows(x)
    assert int(special_rows.sum()) >= 6  # rows 0, 1, 2, 3, 5, 6 of the recipe
    _, _, scale = reference.compress(x, n, m)
    assert bool((scale[special_rows] == 1.0).all()), scale
    # and the other (tie) rows still get the regular scale
    _, _, cols = naive_select(x, n, m)
    torch.testing.assert_close(scale.double(), naive_scale(x, cols), rtol=1e-6, atol=0)


@pytest.mark.parametrize("pattern", PATTERNS, ids=param_id)
def test_norm_scale_fp16_rows_whose_sum_of_squares_overflows(pattern):
    n, m = pattern
    magnitude = 40000 + 25000 * torch.rand(4, 32)  # ~60000, just below the fp16 max 65504
    x = (magnitude * torch.where(torch.rand(4, 32) < 0.5, -1.0, 1.0)).to(torch.float16)
    assert bool(torch.isinf(x.square().sum(-1)).all())  # the naive fp16 computation overflows
    _, _, scale = reference.compress(x, n, m)
    _, _, cols = naive_select(x, n, m)
    assert bool(torch.isfinite(scale).all())
    torch.testing.assert_close(scale.double(), naive_scale(x, cols), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=param_id)
@pytest.mark.parametrize("pattern", PATTERNS, ids=param_id)
def test_norm_scale_huge_values_whose_squares_overflow_fp32(pattern, dtype):
    n, m = pattern
    x = (torch.randn(4, 32) * 1e30).to(dtype)
    assert bool(torch.isinf(x.float().square().sum(-1)).all())
    _, _, scale = reference.compress(x, n, m)
    _, _, cols = naive_select(x, n, m)
    assert bool(torch.isfinite(scale).all())
    torch.testing.assert_close(scale.double(), naive_scale(x, cols), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=param_id)
@pytest.mark.parametrize("pattern", PATTERNS, ids=param_id)
def test_norm_scale_subnormal_values(pattern, dtype):
    n, m = pattern
    x = (torch.randn(4, 32) * 1e-40).to(dtype)
    assert bool((x != 0).any(-1).all()) and bool((x.abs() < torch.finfo(dtype).tiny).all())
    assert bool((x.float().square().sum(-1) == 0).all())  # squares underflow to 0 in fp32
    _, _, scale = reference.compress(x, n, m)
    _, _, cols = naive_select(x, n, m)
    assert bool(torch.isfinite(scale).all())
    torch.testing.assert_close(scale.double(), naive_scale(x, cols), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
def test_norm_comp_false_gives_ones_and_the_same_selection(dtype):
    x = make_data((3, 5, 16), dtype, "special")
    v1, i1, s1 = reference.compress(x, 2, 4, norm_comp=True)
    v0, i0, s0 = reference.compress(x, 2, 4, norm_comp=False)
    assert s0.dtype == torch.float32 and s0.shape == (3, 5)
    assert torch.equal(s0, torch.ones(3, 5))
    assert_bits_equal(v0, v1)
    assert torch.equal(i0, i1)
    assert not torch.equal(s1, s0)  # the compensated scale is not trivially 1 for this data


@pytest.mark.parametrize("pattern", PATTERNS, ids=param_id)
def test_scaled_selection_restores_the_row_norm_fp32(pattern):
    n, m = pattern
    x = torch.randn(2, 7, 64)
    values, _, scale = reference.compress(x, n, m)
    restored = torch.linalg.vector_norm(scale.double().unsqueeze(-1) * values.double(), dim=-1)
    torch.testing.assert_close(restored, torch.linalg.vector_norm(x.double(), dim=-1), rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------------------------
# 3. decompress(compress(x))
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["randn", "special"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
@pytest.mark.parametrize("pattern", PATTERNS, ids=param_id)
def test_decompress_puts_kept_values_back_and_zeros_elsewhere(pattern, dtype, shape, kind):
    n, m = pattern
    x = make_data(shape, dtype, kind)
    values, indices, _ = reference.compress(x, n, m)
    dense = reference.decompress(values, indices, n, m)
    _, _, cols = naive_select(x, n, m)
    keep = torch.zeros(x.numel() // x.shape[-1], x.shape[-1], dtype=torch.bool)
    for r, c in enumerate(cols):
        keep[r, c] = True
    keep = keep.reshape(x.shape)
    assert dense.shape == x.shape and dense.dtype == dtype
    assert_values_exact(dense[keep], x[keep])                    # kept: exact bits, at their position
    assert_bits_equal(dense[~keep], torch.zeros_like(x[~keep]))  # dropped: +0.0


@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
@pytest.mark.parametrize("pattern", PATTERNS, ids=param_id)
def test_decompress_has_exactly_n_nonzeros_per_group(pattern, dtype):
    n, m = pattern
    x = ((0.5 + torch.rand(4, 6, 64)) * torch.where(torch.rand(4, 6, 64) < 0.5, -1.0, 1.0)).to(dtype)
    assert bool((x != 0).all())
    dense = reference.decompress(*reference.compress(x, n, m)[:2], n, m)
    nonzeros = (dense != 0).reshape(4, 6, 64 // m, m).sum(-1)
    assert bool((nonzeros == n).all())


# ----------------------------------------------------------------------------------------------
# 4. sparse_mm / sparse_matmul against float64
# ----------------------------------------------------------------------------------------------

B, M, K, N, R = 2, 6, 32, 5, 3


def gemm_case(case: str, dtype: torch.dtype):
    """-> (x, other, bias, lr_down, lr_up) for a named layout."""
    def t(*shape, scale=1.0):
        return (torch.randn(*shape) * scale).to(dtype)

    if case == "linear2d":        # addmm: other is weight.t() (a transposed view), 1-D bias
        return t(M, K), t(N, K, scale=K ** -0.5).t(), t(N), None, None
    if case == "linear2d_lowrank":
        return t(M, K), t(N, K, scale=K ** -0.5).t(), t(N), t(K, R, scale=0.3), t(R, N, scale=0.3)
    if case == "linear3d_nobias":  # 3-D activations with a 2-D weight
        return t(B, M, K), t(N, K, scale=K ** -0.5).t(), None, None, None
    if case == "linear3d_lowrank_bias2d":
        return t(B, M, K), t(N, K, scale=K ** -0.5).t(), t(M, N), t(K, R, scale=0.3), t(R, N, scale=0.3)
    if case == "bmm":             # activation x activation, 3-D x 3-D
        return t(B, M, K), t(B, K, N, scale=K ** -0.5), None, None, None
    if case == "bmm_bias2d_lowrank":
        return t(B, M, K), t(B, K, N, scale=K ** -0.5), t(M, N), t(K, R, scale=0.3), t(R, N, scale=0.3)
    raise AssertionError(case)


GEMM_CASES = ["linear2d", "linear2d_lowrank", "linear3d_nobias", "linear3d_lowrank_bias2d", "bmm",
              "bmm_bias2d_lowrank"]


@pytest.mark.parametrize("case", GEMM_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
@pytest.mark.parametrize("pattern", PATTERNS, ids=param_id)
def test_sparse_matmul_matches_float64(pattern, dtype, case):
    n, m = pattern
    x, other, bias, lr_down, lr_up = gemm_case(case, dtype)
    out = reference.sparse_matmul(x, other, bias, lr_down, lr_up, n=n, m=m)
    assert out.is_contiguous()
    assert_gemm_close(out, expected_matmul(x, other, bias, lr_down, lr_up, n=n, m=m), dtype)


@pytest.mark.parametrize("case", ["linear2d", "linear3d_nobias", "bmm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
def test_sparse_matmul_without_norm_comp_matches_float64(dtype, case):
    x, other, bias, _, _ = gemm_case(case, dtype)
    out = reference.sparse_matmul(x, other, bias, n=2, m=4, norm_comp=False)
    assert_gemm_close(out, expected_matmul(x, other, bias, n=2, m=4, norm_comp=False), dtype)


@pytest.mark.parametrize("case", ["linear2d", "linear3d_lowrank_bias2d", "bmm", "bmm_bias2d_lowrank"])
@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
@pytest.mark.parametrize("pattern", PATTERNS, ids=param_id)
def test_sparse_mm_matches_float64(pattern, dtype, case):
    n, m = pattern
    x, other, bias, _, _ = gemm_case(case, dtype)  # sparse_mm has no low-rank term
    values, indices, scale = reference.compress(x, n, m)
    out = reference.sparse_mm(values, indices, scale, other, bias, n=n, m=m)
    assert_gemm_close(out, expected_matmul(x, other, bias, n=n, m=m), dtype)


@pytest.mark.parametrize("case", ["linear2d_lowrank", "linear3d_lowrank_bias2d", "bmm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
def test_min_tokens_above_m_is_the_exact_dense_matmul(dtype, case):
    x, other, bias, lr_down, lr_up = gemm_case(case, dtype)
    rows = x.shape[-2]
    dense = torch.matmul(x, other)
    if bias is not None:
        dense = dense + bias
    for min_tokens in (rows + 1, 10 * rows):
        out = reference.sparse_matmul(x, other, bias, lr_down, lr_up, n=2, m=4, min_tokens=min_tokens)
        assert torch.equal(out, dense)  # bitwise; the low-rank term is not added on the dense path
    # At and below M the sparse path runs (and it is really different from the dense result).
    sparse = reference.sparse_matmul(x, other, bias, lr_down, lr_up, n=2, m=4)
    assert not torch.equal(sparse, dense)
    for min_tokens in (rows, 1):
        out = reference.sparse_matmul(x, other, bias, lr_down, lr_up, n=2, m=4, min_tokens=min_tokens)
        assert torch.equal(out, sparse)
    assert_gemm_close(sparse, expected_matmul(x, other, bias, lr_down, lr_up, n=2, m=4), dtype)


# ----------------------------------------------------------------------------------------------
# 5. Custom ops: agreement with the reference, opcheck, fake implementations, dynamic shapes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES + [(3, 1, 4, 8)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
@pytest.mark.parametrize("pattern", PATTERNS, ids=param_id)
def test_op_compress_matches_reference(pattern, dtype, shape):
    n, m = pattern
    x = make_data(shape, dtype, "special" if shape[-1] >= 16 else "randn")
    for norm_comp in (True, False):
        got = rtlynx.compress(x, n, m, norm_comp)
        want = reference.compress(x, n, m, norm_comp)
        for g, w in zip(got, want):
            assert_bits_equal(g, w)


@pytest.mark.parametrize("case", GEMM_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
def test_op_sparse_mm_and_sparse_matmul_match_reference(dtype, case):
    x, other, bias, lr_down, lr_up = gemm_case(case, dtype)
    values, indices, scale = rtlynx.compress(x, 2, 4)
    got = rtlynx.sparse_mm(values, indices, scale, other, bias, 2, 4)
    assert_bits_equal(got, reference.sparse_mm(values, indices, scale, other, bias, n=2, m=4))
    want = reference.sparse_matmul(x, other, bias, lr_down, lr_up, n=2, m=4)
    assert_bits_equal(rtlynx.sparse_matmul(x, other, bias, lr_down, lr_up, n=2, m=4), want)
    assert_bits_equal(rtlynx.sparse_matmul(x, other, bias, lr_down, lr_up, n=2, m=4, impl="reference"), want)
    for kwargs in (dict(norm_comp=False), dict(min_tokens=x.shape[-2] + 1)):
        got = rtlynx.sparse_matmul(x, other, bias, lr_down, lr_up, n=2, m=4, **kwargs)
        assert_bits_equal(got, reference.sparse_matmul(x, other, bias, lr_down, lr_up, n=2, m=4, **kwargs))


@pytest.mark.parametrize("case", ["linear2d", "linear3d_nobias", "bmm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
@pytest.mark.parametrize("pattern", PATTERNS, ids=param_id)
def test_sparse_mm_of_compress_equals_sparse_matmul(pattern, dtype, case):
    # The two-op route the passes may emit and the fused op must give the same bits.
    n, m = pattern
    x, other, bias, _, _ = gemm_case(case, dtype)
    unfused = rtlynx.sparse_mm(*rtlynx.compress(x, n, m), other, bias, n, m)
    assert_bits_equal(unfused, rtlynx.sparse_matmul(x, other, bias, n=n, m=m))


@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
def test_opcheck_compress(dtype):
    for shape, (n, m), norm_comp in [((6, 16), (2, 4), True), ((2, 3, 16), (4, 8), True),
                                     ((16,), (1, 2), False)]:
        # zeros, ties and +-Inf, but no NaN: opcheck compares outputs with assert_close, for which
        # NaN != NaN, so a NaN output would fail it whatever the op does.
        x = torch.nan_to_num(make_data(shape, dtype, "special"), nan=7.0, posinf=math.inf, neginf=-math.inf)
        assert bool(torch.isinf(x).any()) and not bool(torch.isnan(x).any())
        torch.library.opcheck(rtlynx.compress.default, (x, n, m, norm_comp))


@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
def test_opcheck_sparse_mm(dtype):
    for case, (n, m) in [("linear2d", (2, 4)), ("bmm_bias2d_lowrank", (4, 8))]:
        x, other, bias, _, _ = gemm_case(case, dtype)
        values, indices, scale = rtlynx.compress(x, n, m)
        torch.library.opcheck(rtlynx.sparse_mm.default, (values, indices, scale, other, bias, n, m))


@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
def test_opcheck_sparse_matmul(dtype):
    for case, kwargs in [("linear2d", dict(n=2, m=4)),
                         ("linear3d_lowrank_bias2d", dict(n=1, m=2, norm_comp=False)),
                         ("bmm", dict(n=4, m=8, min_tokens=M + 1))]:
        x, other, bias, lr_down, lr_up = gemm_case(case, dtype)
        torch.library.opcheck(rtlynx.sparse_matmul.default, (x, other, bias, lr_down, lr_up), kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
def test_fake_implementations_give_real_shapes_and_dtypes(dtype):
    cases = [
        # (x shape, other shape, bias shape, n, m)
        ((M, K), (K, N), (N,), 2, 4),
        ((B, M, K), (K, N), None, 4, 8),
        ((B, M, K), (B, K, N), (M, N), 1, 2),
        ((1, M, K), (B, K, N), None, 2, 4),  # broadcast batch
    ]
    for xs, os_, bs, n, m in cases:
        real = [torch.randn(s).to(dtype) if s is not None else None for s in (xs, os_, bs)]
        real_c = rtlynx.compress(real[0], n, m)
        real_mm = rtlynx.sparse_mm(*real_c, real[1], real[2], n, m)
        real_fused = rtlynx.sparse_matmul(*real, n=n, m=m)
        with FakeTensorMode():
            fake = [torch.empty(s, dtype=dtype) if s is not None else None for s in (xs, os_, bs)]
            fake_c = rtlynx.compress(fake[0], n, m)
            fake_mm = rtlynx.sparse_mm(*fake_c, fake[1], fake[2], n, m)
            fake_fused = rtlynx.sparse_matmul(*fake, n=n, m=m)
        kc = xs[-1] // m * n
        assert [(t.shape, t.dtype) for t in fake_c] == [
            ((*xs[:-1], kc), dtype), ((*xs[:-1], kc), torch.uint8), (xs[:-1], torch.float32)]
        out_shape = (*torch.broadcast_shapes(xs[:-2], os_[:-2]), xs[-2], os_[-1])
        for f, r in [*zip(fake_c, real_c), (fake_mm, real_mm), (fake_fused, real_fused)]:
            assert (f.shape, f.dtype, f.stride()) == (r.shape, r.dtype, r.stride())
        assert fake_mm.shape == fake_fused.shape == out_shape


def test_ops_compile_once_for_two_token_counts():
    # Symbolic M (and K) through the fake implementations: one graph for both sizes.
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")

    def layer(x, weight, bias):
        values, indices, scale = torch.ops.rtlynx.compress(x, 2, 4)
        unfused = torch.ops.rtlynx.sparse_mm(values, indices, scale, weight.t(), bias, 2, 4)
        fused = torch.ops.rtlynx.sparse_matmul(x, weight.t(), bias, n=2, m=4)
        return unfused, fused, scale

    compiled = torch.compile(layer, backend=counter, dynamic=True, fullgraph=True)
    weight, bias = torch.randn(N, K), torch.randn(N)
    for rows in (7, 13):  # not N=5 or K=32: duck sizing would tie them and specialise
        x = torch.randn(2, rows, K)
        got = compiled(x, weight, bias)
        want = layer(x, weight, bias)
        assert got[0].shape == got[1].shape == (2, rows, N)
        for g, w in zip(got, want):
            assert_bits_equal(g, w)
    assert counter.frame_count == 1
    # the graph really has a symbolic token count
    placeholders = [nd for nd in counter.graphs[0].graph.nodes if nd.op == "placeholder"]
    assert any(isinstance(d, torch.SymInt) for nd in placeholders
               for d in getattr(nd.meta.get("example_value"), "shape", ()))
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------
# 6. Bad input gets a clear error
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", [(3, 4), (2, 5)], ids=param_id)
def test_unsupported_pattern_lists_valid_patterns(pattern):
    n, m = pattern
    msg = re.escape(f"unsupported N:M pattern {n}:{m}; {VALID_PATTERNS}")
    x, w = torch.randn(4, 40), torch.randn(40, 3)  # K=40 is divisible by 4, 5 and 8
    calls = [
        lambda: reference.nm_select(x, n, m),
        lambda: reference.compress(x, n, m),
        lambda: reference.decompress(torch.randn(4, 6), torch.zeros(4, 6, dtype=torch.uint8), n, m),
        lambda: reference.sparse_matmul(x, w, n=n, m=m),
        lambda: rtlynx.compress(x, n, m),
        lambda: rtlynx.sparse_matmul(x, w, n=n, m=m),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=msg):
            call()
    with FakeTensorMode():  # the fake implementations say the same
        fx, fw = torch.empty(4, 40), torch.empty(40, 3)
        with pytest.raises(ValueError, match=msg):
            rtlynx.compress(fx, n, m)
        with pytest.raises(ValueError, match=msg):
            rtlynx.sparse_matmul(fx, fw, n=n, m=m)


@pytest.mark.parametrize("pattern", [(3, 4), (2, 5)], ids=param_id)
def test_op_sparse_mm_unsupported_pattern_lists_valid_patterns(pattern):
    # Regression test for a fixed bug (ops.sparse_mm): the real op computes K = values.shape[-1] // n * m and checks it against
    # other *before* checking the pattern, so it reports "reduction dims differ: x has K=4" (a K the
    # user never had) instead of the unsupported pattern. The fake implementation checks the
    # pattern first, so eager and traced calls disagree on the error.
    n, m = pattern
    values, indices, scale = rtlynx.compress(torch.randn(4, 8), 2, 4)
    with pytest.raises(ValueError, match=re.escape(f"unsupported N:M pattern {n}:{m}; {VALID_PATTERNS}")):
        rtlynx.sparse_mm(values, indices, scale, torch.randn(8, 3), None, n, m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=param_id)
def test_k_not_divisible_by_m(dtype):
    x, w = torch.randn(4, 10).to(dtype), torch.randn(10, 3).to(dtype)
    msg = re.escape("reduction dim K=10 is not divisible by M=4")
    for call in (lambda: reference.nm_select(x, 2, 4), lambda: reference.compress(x, 2, 4),
                 lambda: reference.sparse_matmul(x, w, n=2, m=4), lambda: rtlynx.compress(x, 2, 4),
                 lambda: rtlynx.sparse_matmul(x, w, n=2, m=4)):
        with pytest.raises(ValueError, match=msg):
            call()
    with pytest.raises(ValueError, match=re.escape("K=12 is not divisible by M=8")):
        reference.compress(torch.randn(2, 12), 4, 8)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32], ids=param_id)
def test_unsupported_dtype_lists_supported_dtypes(dtype):
    x = torch.randint(-3, 4, (4, 8)).to(dtype)
    w = torch.randint(-3, 4, (8, 3)).to(dtype)
    msg = re.escape(f"x has unsupported dtype {dtype}; {SUPPORTED_DTYPES}")
    for call in (lambda: reference.nm_select(x, 2, 4), lambda: reference.compress(x, 2, 4),
                 lambda: reference.sparse_matmul(x, w, n=2, m=4), lambda: rtlynx.compress(x, 2, 4),
                 lambda: rtlynx.sparse_matmul(x, w, n=2, m=4)):
        with pytest.raises(TypeError, match=msg):
            call()
    # a bad `other` is named as such
    with pytest.raises(TypeError, match=re.escape(f"other has unsupported dtype {dtype}; {SUPPORTED_DTYPES}")):
        rtlynx.sparse_matmul(torch.randn(4, 8), w, n=2, m=4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32], ids=param_id)
def test_op_sparse_mm_rejects_unsupported_dtype(dtype):
    # Regression test for a fixed bug (ops.sparse_mm / reference.sparse_mm): neither checks the operand dtype, so float64 or
    # int32 values are silently computed (and returned in that dtype) although compress, sparse_matmul
    # and every kernel accept only float32/float16/bfloat16.
    values, indices, scale = rtlynx.compress(torch.randint(-3, 4, (4, 8)).float(), 2, 4)
    other = torch.randint(-3, 4, (8, 3)).to(dtype)
    with pytest.raises(TypeError, match=re.escape(SUPPORTED_DTYPES)):
        rtlynx.sparse_mm(values.to(dtype), indices, scale, other, None, 2, 4)


def test_low_rank_factors_must_come_together():
    x, w = torch.randn(4, 8), torch.randn(8, 3)
    down, up = torch.randn(8, 2), torch.randn(2, 3)
    msg = "lr_down and lr_up must be given together"
    for call in (lambda: reference.sparse_matmul(x, w, None, down, None, n=2, m=4),
                 lambda: reference.sparse_matmul(x, w, None, None, up, n=2, m=4),
                 lambda: rtlynx.sparse_matmul(x, w, None, down, None, n=2, m=4),
                 lambda: rtlynx.sparse_matmul(x, w, None, None, up, n=2, m=4)):
        with pytest.raises(ValueError, match=msg):
            call()


def test_unknown_kernel_name_lists_registered_kernels():
    assert "reference" in kernel_names()
    msg = re.escape(f"unknown kernel 'no_such_kernel'; registered kernels: {', '.join(kernel_names())}")
    x, w = torch.randn(4, 8), torch.randn(8, 3)
    with pytest.raises(ValueError, match=msg):
        rtlynx.sparse_matmul(x, w, n=2, m=4, impl="no_such_kernel")
    with FakeTensorMode():
        with pytest.raises(ValueError, match=msg):
            rtlynx.sparse_matmul(torch.empty(4, 8), torch.empty(8, 3), n=2, m=4, impl="no_such_kernel")


def test_mismatched_reduction_dims():
    x, w = torch.randn(4, 8), torch.randn(12, 3)
    msg = re.escape("reduction dims differ: x has K=8, other has K=12")
    values, indices, scale = rtlynx.compress(x, 2, 4)
    with pytest.raises(ValueError, match=msg):
        rtlynx.sparse_matmul(x, w, n=2, m=4)
    with pytest.raises(ValueError, match=msg):
        rtlynx.sparse_mm(values, indices, scale, w, None, 2, 4)
    with pytest.raises(ValueError, match=msg):  # also on the dense (min_tokens) path
        rtlynx.sparse_matmul(x, w, n=2, m=4, min_tokens=100)
    with FakeTensorMode():
        fx, fw = torch.empty(4, 8), torch.empty(12, 3)
        with pytest.raises(ValueError, match=msg):
            rtlynx.sparse_matmul(fx, fw, n=2, m=4)
    with pytest.raises(ValueError, match="at least 2 dims"):
        rtlynx.sparse_matmul(torch.randn(8), torch.randn(8, 3), n=2, m=4)


@pytest.mark.parametrize("operand", ["bias", "other"])
def test_sparse_matmul_output_dtype_does_not_depend_on_min_tokens(operand):
    # Mixed dtypes would make the dense path (min_tokens > M) type-promote or fail while the sparse
    # path rounds to x's dtype; the op rejects them up front, the same way on every path.
    x = torch.randn(4, 8).half()
    other = torch.randn(8, 3).to(torch.float32 if operand == "other" else torch.float16)
    bias = torch.randn(3).to(torch.float32 if operand == "bias" else torch.float16)
    message = re.escape(f"{operand} has dtype torch.float32 but x has torch.float16")
    with FakeTensorMode(), pytest.raises(TypeError, match=message):
        rtlynx.sparse_matmul(torch.empty(4, 8, dtype=torch.half), torch.empty(8, 3, dtype=other.dtype),
                             torch.empty(3, dtype=bias.dtype), n=2, m=4)
    for min_tokens in (0, 100):  # sparse path, dense path
        with pytest.raises(TypeError, match=message):
            rtlynx.sparse_matmul(x, other, bias, n=2, m=4, min_tokens=min_tokens)


# ----------------------------------------------------------------------------------------------
# 7. Property tests: compress against the naive loops on drawn shapes, patterns, dtypes and values
# ----------------------------------------------------------------------------------------------

PALETTE = [0.0, -0.0, 1.0, -1.0, 2.0, -2.0, 0.5, -3.5, 1e-3, float("nan"), float("inf"), float("-inf")]


@st.composite
def compress_inputs(draw):
    n, m = draw(st.sampled_from(PATTERNS))
    dtype = draw(st.sampled_from(DTYPES))
    lead = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    k = m * draw(st.integers(1, 4))
    count = math.prod(lead) * k
    data = draw(st.lists(st.sampled_from(PALETTE), min_size=count, max_size=count))
    x = torch.tensor(data, dtype=torch.float32).reshape(*lead, k).to(dtype)
    return x, n, m


@settings(max_examples=30, deadline=None)
@given(compress_inputs())
def test_property_compress_matches_naive(args):
    x, n, m = args
    values, indices, scale = reference.compress(x, n, m)
    exp_values, exp_indices, cols = naive_select(x, n, m)
    assert_values_exact(values, exp_values)
    assert torch.equal(indices, exp_indices)
    torch.testing.assert_close(scale.double(), naive_scale(x, cols), rtol=1e-6, atol=0)
    op_values, op_indices, op_scale = rtlynx.compress(x, n, m)
    assert_bits_equal(op_values, values)
    assert torch.equal(op_indices, indices)
    assert torch.equal(op_scale, scale)


@settings(max_examples=20, deadline=None)
@given(pattern=st.sampled_from(PATTERNS), dtype=st.sampled_from(DTYPES), rows=st.integers(1, 5),
       groups=st.integers(1, 4), cols=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_property_sparse_matmul_matches_float64(pattern, dtype, rows, groups, cols, seed):
    n, m = pattern
    gen = torch.Generator().manual_seed(seed)
    k = m * groups
    x = torch.randn(rows, k, generator=gen).to(dtype)
    other = (torch.randn(cols, k, generator=gen) * k ** -0.5).to(dtype).t()
    bias = torch.randn(cols, generator=gen).to(dtype)
    out = rtlynx.sparse_matmul(x, other, bias, n=n, m=m)
    assert_gemm_close(out, expected_matmul(x, other, bias, n=n, m=m), dtype)
