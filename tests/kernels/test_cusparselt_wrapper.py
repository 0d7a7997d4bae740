"""The cuSPARSELt wrapper's own logic (kernels/cusparselt.py), on the CPU.

``torch._cslt_compress``, ``torch._cslt_sparse_mm``, ``torch._cslt_sparse_mm_search`` and
``torch._C._cusparselt.mm_search`` are replaced by fakes that compute the dense equivalent on CPU
tensors (fp32 accumulation, one rounding to the layer dtype, as cuSPARSELt does) and record how they
were called: the dense operand's pointer and strides, the alg_id and split-k passed. A dispatch mode
records the aten ops the wrapper runs around them (host reads of tensor values, passes over Y). The
numbers themselves on real sparse tensor cores are checked by the CUDA tests in test_kernel_selection.
"""

from __future__ import annotations

import contextlib
import math
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lynx_compile.kernels import cusparselt, reference

SEARCHED = {"alg_id": 3, "split_k": 2, "split_k_mode": 1}  # what the fake mm_search picks
OLD_SEARCHED_ALG = 5                                       # what the fake deprecated search picks


class Recorder(TorchDispatchMode):
    """Every aten op run while active and not paused: (op, output shapes/dtypes); host reads apart."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple] = []
        self.host_reads: list[str] = []
        self._paused = 0

    @contextlib.contextmanager
    def paused(self):
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self._paused:
            if func is torch.ops.aten._local_scalar_dense.default:  # .item(), bool(), int(), float()
                self.host_reads.append(str(func))
            outs = out if isinstance(out, (tuple, list)) else (out,)
            self.ops.append((func, [(tuple(o.shape), o.dtype) for o in outs if isinstance(o, torch.Tensor)]))
        return out

    def clear(self):
        self.ops.clear()
        self.host_reads.clear()


class FakeCusparseLt:
    """The torch._cslt_* API on CPU tensors, recording its calls."""

    def __init__(self, recorder: Recorder):
        self.recorder = recorder
        self.compress_calls: list[tuple] = []
        self.gemm_calls: list[dict] = []
        self.searches: list[tuple] = []
        self.old_searches: list[tuple] = []
        self.wrong_alg_ids: set[int] = set()
        self.mm_search_result = (SEARCHED["alg_id"], SEARCHED["split_k"], SEARCHED["split_k_mode"], 9)

    def compress(self, pruned):
        with self.recorder.paused():
            rows, k = pruned.shape
            assert rows % 16 == 0 and k % 16 == 0, f"sparse operand {tuple(pruned.shape)} not padded to 16"
            kept = (pruned.reshape(rows, k // 4, 4) != 0).sum(-1)
            assert int(kept.max()) <= 2, "sparse operand is not 2:4"
            self.compress_calls.append(tuple(pruned.shape))
            return pruned.clone()  # "packed": the fake GEMM reads it back as the pruned dense X

    def _check_dense(self, dense):
        # PyTorch describes a non-contiguous dense operand as the transpose of a row-major (N, K)
        # matrix with leading dim K: any other strides would be misread on the GPU.
        assert dense.is_contiguous() or dense.t().is_contiguous(), f"unreadable dense strides {dense.stride()}"
        assert dense.shape[1] % 8 == 0, f"dense N={dense.shape[1]} not padded to 8"

    def sparse_mm(self, packed, dense, bias=None, alpha=None, out_dtype=None, transpose_result=False, **config):
        with self.recorder.paused():
            self._check_dense(dense)
            assert packed.shape[1] == dense.shape[0]
            self.gemm_calls.append(dict(dense_ptr=dense.data_ptr(), dense_stride=dense.stride(),
                                        dense_shape=tuple(dense.shape), bias=bias, alpha=alpha,
                                        out_dtype=out_dtype, transpose_result=transpose_result, config=config))
            y = (packed.float() @ dense.float()).to(packed.dtype)
            if config.get("alg_id", 0) in self.wrong_alg_ids:
                y = y + 1
            return y

    def mm_search(self, packed, dense, bias, alpha, out_dtype, transpose_result):
        with self.recorder.paused():
            self._check_dense(dense)
            self.searches.append((tuple(packed.shape), tuple(dense.shape)))
            return self.mm_search_result

    def old_search(self, packed, dense, bias=None, alpha=None, out_dtype=None, transpose_result=False):
        with self.recorder.paused():
            self.old_searches.append((tuple(packed.shape), tuple(dense.shape)))
            return OLD_SEARCHED_ALG


@pytest.fixture
def recorder():
    return Recorder()


@pytest.fixture
def fake(monkeypatch, recorder):
    fake = FakeCusparseLt(recorder)
    monkeypatch.setattr(torch, "_cslt_compress", fake.compress)
    monkeypatch.setattr(torch, "_cslt_sparse_mm", fake.sparse_mm)
    monkeypatch.setattr(torch, "_cslt_sparse_mm_search", fake.old_search)
    monkeypatch.setattr(torch._C, "_cusparselt", types.SimpleNamespace(mm_search=fake.mm_search), raising=False)
    monkeypatch.setattr(cusparselt, "_GEMM_CONFIGS", {}, raising=False)  # no configuration from another test
    # tolist() reads values without aten._local_scalar_dense
    tolist = torch.Tensor.tolist

    def recording_tolist(self):
        recorder.host_reads.append("tolist")
        return tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", recording_tolist)
    return fake


def _layer(m, k, n, dtype=torch.bfloat16, rank=8, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)  # nn.Linear layout; other = w.t()
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    lr = ((torch.randn(k, rank, generator=g) / k**0.5).to(dtype),
          (torch.randn(rank, n, generator=g) / rank**0.5).to(dtype)) if rank else (None, None)
    return x, w, b, lr


def _run(x, other, b=None, lr=(None, None), recorder=None):
    with recorder if recorder is not None else contextlib.nullcontext():
        return cusparselt.sparse_matmul(x, other, b, *lr, n=2, m=4)


def _gpu_tolerance(expected):
    """The tolerance test_cusparselt_matches_reference_on_gpu holds the GPU results to."""
    eps = torch.finfo(expected.dtype).eps
    return dict(rtol=2 * eps, atol=2 * eps * expected.abs().max().item())


# -- the weight is read in place -------------------------------------------------------------------


def test_weight_t_reaches_the_gemm_without_a_copy(fake, recorder):
    m, k, n = 40, 64, 72  # aligned K and N; M pads to 48
    x, w, b, lr = _layer(m, k, n)
    for _ in range(2):
        recorder.clear()
        _run(x, w.t(), b, lr, recorder)
        # nothing of the weight's size is made: no copy, no fp32 cast, no padded weight. (M < N keeps
        # every activation-sized tensor smaller; uint8 buffers are the Triton interpreter's bytes of x.)
        made = [(str(op), shapes) for op, shapes in recorder.ops if not op.is_view
                and any(math.prod(s) >= k * n and dtype != torch.uint8 for s, dtype in shapes)]
        assert made == []
    for call in fake.gemm_calls:  # verification and result GEMMs alike
        assert call["dense_ptr"] == w.data_ptr()
        assert call["dense_stride"] == (1, k) and call["dense_shape"] == (k, n)


def test_row_major_other_is_read_in_place_too(fake):
    x, w, b, lr = _layer(40, 64, 72)
    other = w.t().contiguous()  # (K, N) row-major, as a matmul's weight would be
    _run(x, other, b, lr)
    assert {c["dense_ptr"] for c in fake.gemm_calls} == {other.data_ptr()}


def test_unaligned_weight_is_padded_once_and_recopied_when_it_changes(fake):
    m, k, n = 40, 64, 36  # N=36 pads to 40
    x, w, b, lr = _layer(m, k, n)
    first = _run(x, w.t(), b, lr)
    second = _run(x, w.t(), b, lr)
    ptrs = {c["dense_ptr"] for c in fake.gemm_calls}
    assert len(ptrs) == 1 and w.data_ptr() not in ptrs  # one padded copy, reused
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    with torch.no_grad():
        w.mul_(-1)  # in place: the version counter moves, the copy is stale
    third = _run(x, w.t(), b, lr)
    assert fake.gemm_calls[-1]["dense_ptr"] not in ptrs
    expected = reference.sparse_matmul(x, w.t(), b, *lr, n=2, m=4)
    torch.testing.assert_close(third, expected, **_gpu_tolerance(expected))


def test_strides_cusparselt_would_misread_get_a_copy(fake):
    x, w, b, lr = _layer(40, 64, 72)
    wide = torch.cat([w, w], dim=1)  # (N, 2K)
    other = wide[:, :64].t()  # (K, N) with strides (1, 2K): neither layout PyTorch describes
    got = _run(x, other, b, lr)  # the fake asserts the layout it gets
    expected = reference.sparse_matmul(x, other, b, *lr, n=2, m=4)
    torch.testing.assert_close(got, expected, **_gpu_tolerance(expected))


# -- search: once per shape, with its split-k ------------------------------------------------------


def test_search_runs_once_per_shape_and_its_split_k_reaches_the_gemm(fake):
    x, w, b, lr = _layer(45, 64, 72)
    _run(x, w.t(), b, lr)
    _run(x, w.t(), b, lr)
    _run(x[:40], w.t(), b, lr)  # M=40 pads to 48 like M=45: same problem for cuSPARSELt
    assert fake.searches == [((48, 64), (64, 72))]
    assert fake.old_searches == []  # the deprecated API is not used where mm_search exists
    # the first call checks the searched configuration, then every result GEMM uses it, split-k included
    assert [c["config"] for c in fake.gemm_calls] == [SEARCHED] * 4
    _run(x[:17], w.t(), b, lr)  # M=17 pads to 32: a new problem, searched once more
    assert len(fake.searches) == 2


def test_split_k_one_kernel_is_passed_where_torch_names_it_so(fake, monkeypatch):
    # torch < 2.8: mm_search returns split_k_one_kernel (a bool), _cslt_sparse_mm takes it by that name
    names = frozenset({"compressed_A", "dense_B", "bias", "alpha", "out_dtype", "transpose_result", "alg_id",
                       "split_k", "split_k_one_kernel"})
    monkeypatch.setattr(cusparselt, "_gemm_arg_names", lambda: names, raising=False)
    fake.mm_search_result = (4, 3, False, 9)
    x, w, b, lr = _layer(32, 64, 72)
    _run(x, w.t(), b, lr)
    assert fake.gemm_calls[-1]["config"] == {"alg_id": 4, "split_k": 3, "split_k_one_kernel": False}


def test_without_mm_search_the_deprecated_search_is_used(fake, monkeypatch):
    monkeypatch.delattr(torch._C, "_cusparselt", raising=False)
    x, w, b, lr = _layer(32, 64, 72)
    _run(x, w.t(), b, lr)
    _run(x, w.t(), b, lr)
    assert len(fake.old_searches) == 1 and fake.searches == []
    assert [c["config"] for c in fake.gemm_calls] == [{"alg_id": OLD_SEARCHED_ALG}] * 3


def test_a_wrong_searched_configuration_falls_back_to_alg_0(fake):
    fake.wrong_alg_ids = {SEARCHED["alg_id"]}
    x, w, b, lr = _layer(32, 64, 72)
    got = _run(x, w.t(), b, lr)
    assert [c["config"] for c in fake.gemm_calls] == [SEARCHED, {"alg_id": 0}, {"alg_id": 0}]
    expected = reference.sparse_matmul(x, w.t(), b, *lr, n=2, m=4)
    torch.testing.assert_close(got, expected, **_gpu_tolerance(expected))


def test_wrong_results_from_every_configuration_are_an_error(fake):
    fake.wrong_alg_ids = {SEARCHED["alg_id"], 0}
    x, w, b, lr = _layer(32, 64, 72)
    with pytest.raises(RuntimeError, match="cuSPARSELt gave wrong results"):
        _run(x, w.t(), b, lr)


def test_nan_in_the_first_call_propagates_instead_of_failing_the_check(fake):
    x, w, b, lr = _layer(32, 64, 72)
    x[3, 5] = float("nan")
    got = _run(x, w.t(), b, lr)
    assert fake.gemm_calls[-1]["config"] == SEARCHED
    assert got[3].isnan().all() and not got[torch.arange(32) != 3].isnan().any()


# -- no host sync after the first call for a shape -------------------------------------------------


def test_no_host_sync_after_the_first_call_for_a_shape(fake, recorder):
    x, w, b, lr = _layer(40, 64, 72)
    _run(x, w.t(), b, lr, recorder)  # the search and its check read results on the host
    assert recorder.host_reads
    for rows in (40, 33):  # same padded shape
        recorder.clear()
        _run(x[:rows], w.t(), b, lr, recorder)
        assert recorder.host_reads == []


def test_graph_capture_uses_the_cached_configuration_and_never_searches(fake, recorder, monkeypatch):
    x, w, b, lr = _layer(40, 64, 72)
    monkeypatch.setattr(cusparselt, "_capturing", lambda device: True, raising=False)
    with pytest.raises(RuntimeError, match="run the model once before capturing"):
        _run(x, w.t(), b, lr)  # a search would sync: a clear error, not a broken capture
    assert fake.searches == [] and fake.gemm_calls == []
    monkeypatch.setattr(cusparselt, "_capturing", lambda device: False)
    _run(x, w.t(), b, lr)  # warm-up
    monkeypatch.setattr(cusparselt, "_capturing", lambda device: True)
    recorder.clear()
    _run(x, w.t(), b, lr, recorder)
    assert recorder.host_reads == [] and len(fake.searches) == 1


# -- M = 0 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)])
def test_no_rows_return_an_empty_result_without_a_call(fake, monkeypatch, lead):
    x, w, b, lr = _layer(8, 64, 72)
    monkeypatch.setattr(cusparselt, "_prune", lambda *a, **k: pytest.fail("pruned an empty x"))
    got = _run(x.new_empty(*lead, 64), w.t(), b, lr)
    assert got.shape == (*lead, 72) and got.dtype == x.dtype
    assert fake.compress_calls == [] and fake.gemm_calls == [] and fake.searches == []


# -- the epilogue: few passes over Y, low rank in the layer dtype, reference numerics ----------------


def _y_ops(recorder, m, n):
    """The non-view ops that wrote a tensor of Y's size (M, N) or more, N last."""
    allocations = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default}
    return [(str(op), shapes) for op, shapes in recorder.ops
            if op not in allocations and not op.is_view
            and any(len(s) >= 2 and s[-1] in (n, n + -n % 8) and s[-2] >= m for s, _ in shapes)]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rank", [8, 0])
def test_epilogue_is_at_most_two_passes_over_y_in_the_layer_dtype(fake, recorder, bias, rank):
    m, k, n = 40, 64, 72
    x, w, b, lr = _layer(m, k, n, rank=rank, bias=bias)
    _run(x, w.t(), b, lr)  # first call: the search and its check
    recorder.clear()
    _run(x, w.t(), b, lr, recorder)
    y_ops = _y_ops(recorder, m, n)
    assert len(y_ops) <= (2 if rank else 1), y_ops
    assert all(dtype == x.dtype for _, shapes in y_ops for _, dtype in shapes), y_ops
    # no cast of x, the weight or the low-rank factors: both low-rank GEMMs take the layer dtype
    casts = [shapes for op, shapes in recorder.ops if op is torch.ops.aten._to_copy.default]
    assert casts == []
    gemms = [(str(op), shapes) for op, shapes in recorder.ops
             if op in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default)]
    assert len(gemms) == (2 if rank else 0)
    assert all(dtype == x.dtype for _, shapes in gemms for _, dtype in shapes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rank", [8, 0])
def test_epilogue_math_matches_the_reference(dtype, bias, rank):
    """_epilogue on the product cuSPARSELt returns (fp32 accumulation, one rounding to dtype)."""
    for seed, (m, k, n) in enumerate([(100, 128, 72), (33, 64, 40), (256, 1152, 64)]):
        x, w, b, lr = _layer(m, k, n, dtype=dtype, rank=rank, bias=bias, seed=seed)
        values, indices, scale = reference.compress(x, 2, 4)
        y = (reference.decompress(values, indices, 2, 4).float() @ w.t().float()).to(dtype)
        got = cusparselt._epilogue(y, scale, x, b, *lr)
        expected = reference.sparse_matmul(x, w.t(), b, *lr, n=2, m=4)
        assert got.dtype == dtype and got.is_contiguous()
        if dtype == torch.float32:
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(got, expected, **_gpu_tolerance(expected))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(100, 128, 72), (256, 1152, 1152), (33, 64, 40), (7, 36, 20)])
def test_wrapper_matches_the_reference_within_the_gpu_tolerance(fake, dtype, shape):
    m, k, n = shape
    x, w, b, lr = _layer(m, k, n, dtype=dtype)
    got = _run(x.reshape(1, m, k), w.t(), b, lr)
    expected = reference.sparse_matmul(x.reshape(1, m, k), w.t(), b, *lr, n=2, m=4)
    assert got.shape == expected.shape and got.is_contiguous()
    torch.testing.assert_close(got, expected, **_gpu_tolerance(expected))
