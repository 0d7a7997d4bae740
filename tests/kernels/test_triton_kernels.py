"""Triton compress and sparse GEMM kernels against kernels/reference.py, on the Triton interpreter.

Triton fixes interpreter mode when it is first imported, so tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports torch on machines without an NVIDIA GPU. On a GPU
machine these tests run the compiled kernels on CUDA instead.

The launchers are asked to poison their outputs (NaN / 255, LYNX_TRITON_POISON=1) so that an
element a kernel forgets to write cannot pass as correct.
"""

import subprocess
import sys

import pytest
import torch

from lynx_compile.kernels import reference
from lynx_compile.kernels import triton_compress as tc
from lynx_compile.kernels import triton_sparse_mm as tsm
from shared import DEVICE, DTYPES, HUGE, NAN_BITS, PATTERNS, TINY, bits, param_id

pytestmark = pytest.mark.triton  # every test here runs the kernels, or asks whether they can run

# (rtol, atol as a fraction of the largest reference output) for the GEMM outputs.
GEMM_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (2**-7, 1e-3)}


@pytest.fixture(autouse=True)
def _setup(monkeypatch):
    monkeypatch.setenv(tc.POISON_ENV, "1")
    torch.manual_seed(0)
    with torch.device(DEVICE):  # the compiled kernels on a GPU machine, the interpreter elsewhere
        yield


def special_rows(rows: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """Random rows plus rows that hit every rule: zeros, NaN, +-Inf, overflow, subnormals, ties."""
    x = (torch.randn(rows, k) * 3).to(dtype)
    x[0] = 0                                        # all-zero row: scale 1
    bits(x)[1, ::7] = NAN_BITS[dtype]               # NaN beats everything, keeps its payload
    x[2, 3], x[2, 10], x[2, 11] = float("inf"), float("-inf"), float("inf")
    bits(x)[2, 9] = NAN_BITS[dtype]                 # NaN and Inf in one group
    x[3] = (torch.randn(k) * HUGE[dtype]).to(dtype)
    x[4] = (torch.randint(1, 4, (k,)) * TINY[dtype]).to(dtype)
    x[5, :8], x[5, 8:16] = 1.0, -1.0                # whole groups of equal magnitude
    x[6, :8] = torch.tensor([-0.0, 0.0, -0.0, 1.0, 0.0, -0.0, 0.0, 0.0])
    x[7, :8] = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, 0.0]) * float("inf")
    bits(x)[7, 7] = NAN_BITS[dtype]                 # NaN after Infs: it must still win in 1:2, 2:4, 4:8
    return x


def check_compress(x, n, m, got, *, perm=None, norm_comp=True):
    """Values (as bits, NaN payloads included) and indices exactly, scale within rtol 1e-6, of
    reference.compress(x[..., perm])."""
    values, indices, scale = got
    want = reference.compress(x if perm is None else x[..., perm], n, m, norm_comp)
    assert values.dtype == x.dtype and indices.dtype == torch.uint8 and scale.dtype == torch.float32
    assert values.shape == want[0].shape and indices.shape == want[1].shape and scale.shape == want[2].shape
    assert torch.equal(indices, want[1]), "indices differ from the reference"
    assert torch.equal(bits(values), bits(want[0])), "kept values differ from the reference (as bits)"
    torch.testing.assert_close(scale, want[2], rtol=1e-6, atol=0)


def assert_gemm_close(got: torch.Tensor, want: torch.Tensor):
    assert got.dtype == want.dtype and got.shape == want.shape and got.is_contiguous()
    assert not got.isnan().any(), "NaN in the output: an element was not written (or not computed)"
    rtol, atol = GEMM_TOL[want.dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol * want.float().abs().max().item())


# ----------------------------------------------------------------------------------- compress

COMPRESS_CASES = {
    # name: (x builder(dtype), launcher kwargs)
    "randn": (lambda dt: torch.randn(70, 200).to(dt), {}),
    "3d": (lambda dt: torch.randn(3, 5, 40).to(dt), {}),
    # 37 rows over row blocks of 8, K=200 over K blocks of 64: ragged in both, running max rescaled
    "multiblock": (lambda dt: (torch.randn(37, 200) * torch.logspace(-3, 3, 200)).to(dt),
                   dict(block_rows=8, block_k=64)),
    "ties": (lambda dt: torch.randint(-2, 3, (33, 96)).to(dt), dict(block_k=32)),
    "special": (lambda dt: special_rows(9, 48, dt), dict(block_k=16)),
}


@pytest.mark.parametrize("case", list(COMPRESS_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
@pytest.mark.parametrize("pattern", PATTERNS, ids=param_id)
def test_compress_matches_reference(pattern, dtype, case):
    build, kwargs = COMPRESS_CASES[case]
    x = build(dtype)
    check_compress(x, *pattern, tc.compress(x, *pattern, **kwargs))


@pytest.mark.parametrize("pattern", PATTERNS, ids=param_id)
def test_compress_perm(pattern):
    x = special_rows(12, 64, torch.bfloat16).reshape(3, 4, 64)
    perm = torch.randperm(64)
    check_compress(x, *pattern, tc.compress(x, *pattern, perm=perm, block_k=32), perm=perm)
    check_compress(x, *pattern, tc.compress(x, *pattern, perm=perm.int()), perm=perm)


def test_compress_strided_input_and_no_norm_comp():
    x = torch.randn(40, 50)[:, 2:42]  # row stride 50: read in place
    got = tc.compress(x, 2, 4, norm_comp=False)
    check_compress(x, 2, 4, got, norm_comp=False)
    assert torch.equal(got[2], torch.ones(40))


def test_compress_validation():
    x = torch.randn(4, 16)
    with pytest.raises(ValueError, match="unsupported N:M pattern 3:4"):
        tc.compress(x, 3, 4)
    with pytest.raises(TypeError, match="unsupported dtype"):
        tc.compress(x.double(), 2, 4)
    with pytest.raises(ValueError, match="not divisible by M=8"):
        tc.compress(torch.randn(4, 12), 4, 8)
    with pytest.raises(ValueError, match=r"perm must have shape \(16,\)"):
        tc.compress(x, 2, 4, perm=torch.arange(8))
    with pytest.raises(ValueError, match=r"perm values must lie in \[0, 16\)"):
        tc.compress(x, 2, 4, perm=torch.arange(16) + 1)
    with pytest.raises(TypeError, match="perm must be an int64"):
        tc.compress(x, 2, 4, perm=torch.arange(16).float())


def test_poisoning_is_on_and_caught():
    """The launchers poison their outputs here, and check_compress rejects an unwritten element."""
    assert tc.new_output((3,), torch.float32, "cpu").isnan().all()
    assert (tc.new_output((3,), torch.uint8, "cpu") == 255).all()
    x = torch.randn(8, 16)
    values, indices, scale = reference.compress(x, 2, 4)
    for poisoned in (values.clone().index_fill_(1, torch.tensor([5]), float("nan")),
                     values.clone().index_fill_(0, torch.tensor([7]), float("nan"))):
        with pytest.raises(AssertionError):
            check_compress(x, 2, 4, (poisoned, indices, scale))
    with pytest.raises(AssertionError):
        check_compress(x, 2, 4, (values, indices.clone().fill_(255), scale))


# ---------------------------------------------------------------------------------------- GEMM

def _linear_case(dt, bias=True, lowrank=True, m_rows=70, k=200, n=48):
    x = torch.randn(m_rows, k).to(dt)
    weight = (torch.randn(n, k) / k**0.5).to(dt)
    args = [x, weight.t(), torch.randn(n).to(dt) if bias else None]   # other is a transposed view
    if lowrank:
        args += [(torch.randn(k, 24) / k**0.5).to(dt), (torch.randn(n, 24) / 5).to(dt).t()]
    return args, {}


GEMM_CASES = {
    # name: dtype -> (sparse_matmul args, launcher block kwargs); (M, K, N) = (70, 200, 48) by default,
    # so M and K are not multiples of the 64-blocks.
    "bias_lowrank": lambda dt: _linear_case(dt),
    "plain": lambda dt: _linear_case(dt, bias=False, lowrank=False),
    # bias only; 3 x 3 output tiles, K=96 over blocks of 32: every program reads several K blocks
    "bias_small_blocks": lambda dt: (_linear_case(dt, lowrank=False, m_rows=40, k=96, n=40)[0],
                                     dict(block_m=16, block_n=16, block_k=32)),
    # low-rank only; x (2, 5, K) folds into 10 rows of one GEMM
    "lowrank_3d_x": lambda dt: ([torch.randn(2, 5, 64).to(dt), torch.randn(64, 40).to(dt) / 8, None,
                                 torch.randn(64, 8).to(dt) / 8, torch.randn(8, 40).to(dt)], {}),
    "batched": lambda dt: ([torch.randn(2, 33, 64).to(dt), torch.randn(2, 40, 64).to(dt).transpose(1, 2) / 8,
                            torch.randn(40).to(dt), torch.randn(64, 16).to(dt) / 8, torch.randn(16, 40).to(dt) / 4],
                           {}),
    "batch_broadcast": lambda dt: ([torch.randn(33, 64).to(dt), torch.randn(3, 64, 24).to(dt) / 8], {}),
}


@pytest.mark.parametrize("case", list(GEMM_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
@pytest.mark.parametrize("pattern", PATTERNS, ids=param_id)
def test_sparse_matmul_matches_reference(pattern, dtype, case):
    args, blocks = GEMM_CASES[case](dtype)
    n, m = pattern
    got = tsm.sparse_matmul(*args, n=n, m=m, **blocks)
    assert_gemm_close(got, reference.sparse_matmul(*args, n=n, m=m))


@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
def test_sparse_mm_matches_reference(dtype):
    x = torch.randn(2, 35, 96).to(dtype)
    other = (torch.randn(40, 96) / 10).to(dtype).t()
    bias = torch.randn(40).to(dtype)
    values, indices, scale = reference.compress(x, 2, 4)
    got = tsm.sparse_mm(values, indices, scale, other, bias, n=2, m=4)
    assert_gemm_close(got, reference.sparse_mm(values, indices, scale, other, bias, n=2, m=4))


def test_sparse_matmul_without_norm_comp_and_nonfinite():
    x = torch.randn(20, 64)
    x[3, 5], x[7, 9] = float("nan"), float("inf")
    other = torch.randn(64, 16)
    got = tsm.sparse_matmul(x, other, n=2, m=4, norm_comp=False)
    want = reference.sparse_matmul(x, other, n=2, m=4, norm_comp=False)
    assert got[3].isnan().all() and got[7].isinf().any()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want[torch.isfinite(want)].abs().max().item(),
                               equal_nan=True)


def test_empty_shapes():
    for x, other in [(torch.randn(0, 8), torch.randn(8, 4)), (torch.randn(5, 8), torch.randn(8, 0)),
                     (torch.randn(2, 0, 8), torch.randn(2, 8, 3))]:
        got = tsm.sparse_matmul(x, other, n=2, m=4)
        assert got.shape == reference.sparse_matmul(x, other, n=2, m=4).shape
    assert [t.shape for t in tc.compress(torch.randn(0, 3, 8), 2, 4)] == [(0, 3, 4), (0, 3, 4), (0, 3)]


def test_min_tokens_takes_the_dense_path():
    x, other, bias = torch.randn(10, 32), torch.randn(32, 8), torch.randn(8)
    got = tsm.sparse_matmul(x, other, bias, n=2, m=4, min_tokens=11)
    assert torch.equal(got, reference.sparse_matmul(x, other, bias, n=2, m=4, min_tokens=11))
    assert torch.equal(got, x @ other + bias)


def test_sparse_matmul_validation():
    x, other = torch.randn(8, 32), torch.randn(32, 8)
    with pytest.raises(ValueError, match="must be given together"):
        tsm.sparse_matmul(x, other, None, torch.randn(32, 4), n=2, m=4)
    with pytest.raises(ValueError, match="reduction dims differ"):
        tsm.sparse_matmul(x, torch.randn(16, 8), n=2, m=4)
    with pytest.raises(ValueError, match="unsupported N:M pattern"):
        tsm.sparse_matmul(x, other, n=2, m=8)
    with pytest.raises(ValueError, match="at least 2 dims"):
        tsm.sparse_matmul(x[0], other, n=2, m=4)
    with pytest.raises(TypeError, match="other has dtype torch.float16"):
        tsm.sparse_matmul(x, other.half(), n=2, m=4)
    with pytest.raises(TypeError, match="bias has dtype torch.bfloat16"):
        tsm.sparse_matmul(x, other, other[0].bfloat16(), n=2, m=4)
    values, indices, scale = reference.compress(x, 2, 4)
    with pytest.raises(ValueError, match="indices must be uint8"):
        tsm.sparse_mm(values, indices.long(), scale, other, n=2, m=4)
    with pytest.raises(ValueError, match="scale must be float32 of shape"):
        tsm.sparse_mm(values, indices, scale[:4], other, n=2, m=4)
    with pytest.raises(ValueError, match="bias of shape"):
        tsm.sparse_mm(values, indices, scale, other, torch.randn(5), n=2, m=4)


# -------------------------------------------------------------------------------- availability

def test_unavailable_reason(monkeypatch):
    assert tsm.unavailable_reason("cpu", torch.bfloat16, (64, 128, 32)) == ""
    assert tsm.unavailable_reason("cuda", torch.float16, (64, 128, 32)) == ""
    assert "float64" in tsm.unavailable_reason("cuda", torch.float64, (64, 128, 32))
    assert "'mps'" in tsm.unavailable_reason("mps", torch.float16, (64, 128, 32))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in tsm.unavailable_reason("cpu", torch.float32, (64, 128, 32))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        tsm.sparse_matmul(torch.randn(8, 16), torch.randn(16, 8), n=2, m=4)


def test_import_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from lynx_compile.kernels import triton_sparse_mm as t\n"
        "print(t.unavailable_reason('cuda', torch.float16, (1, 4, 1)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "triton is not installed" in out.stdout


# -------------------------------------------------------------------------------- pruned layout

@pytest.mark.parametrize("n, m", PATTERNS, ids=param_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
def test_prune_writes_the_dense_layout_cusparselt_packs(n, m, dtype):
    x = special_rows(24, 40 * m, dtype)
    perm = torch.randperm(x.shape[-1])
    for p in (None, perm):
        pruned, scale = tc.prune(x, n, m, True, p, block_rows=8, block_k=64)
        values, indices, expected_scale = reference.compress(x if p is None else x[..., p], n, m, True)
        expected = reference.decompress(values, indices, n, m)
        assert torch.equal(bits(pruned), bits(expected))  # kept bits exact, dropped ones +0.0
        torch.testing.assert_close(scale, expected_scale, rtol=1e-6, atol=0)
