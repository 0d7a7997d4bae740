"""Property tests of the ``torch.ops.rtlynx`` ops and the Triton kernels on strided inputs and every
class of value, and a catalogue of bad input with its exact error.

tests/kernels/test_reference_ops.py checks the reference itself against naive float64 loops on contiguous
inputs. Here hypothesis draws what that file does not: memory layouts (transposed, column and row
steps, storage offsets, stride-0 rows, permuted 3-D batches) and value classes (zeros and -0.0,
ties, NaN and +-Inf, values whose squares overflow fp16 or fp32, subnormals, and rows that mix
them), and checks that

* an op on a strided tensor gives the reference's bits on that very tensor;
* the kept values and indices do not depend on the layout, and the fp32 norm scale only at the
  last bit (the reference sums squares in an order that follows the strides);
* nothing is silently wrong: a NaN in a row makes that output row NaN, an Inf makes it non-finite,
  a finite row (without overflowing magnitudes) gives a finite row, zero and non-finite rows get
  scale exactly 1, indices are in range and ascending;
* the Triton kernels (Triton's CPU interpreter without a GPU) match the reference on the same inputs.
"""

from __future__ import annotations

import os
import re
from unittest import mock

import pytest
import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode

import lynx_compile
from lynx_compile import LynxConfig
from lynx_compile.config import option_names
from lynx_compile.kernels import reference, triton_compress
from shared import DEVICE, DTYPES, HUGE, PATTERNS, TINY, bits, given, requires, settings, st

rtlynx = torch.ops.rtlynx

VALUE_CLASSES = ["randn", "zeros", "ties", "nonfinite", "huge", "subnormal"]
LAYOUTS = ["contiguous", "transposed", "column_step", "row_step", "offset", "stride0_rows", "permuted_batch"]
# Outputs against the reference on contiguous copies: rtol, and atol as a fraction of max |output|.
GEMM_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.equal(bits(actual), bits(expected)), f"\nactual:   {actual}\nexpected: {expected}"


def assert_same_nonfinite(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert torch.equal(actual.isnan(), expected.isnan()), "NaN positions differ"
    assert torch.equal(actual.isinf() & (actual > 0), expected.isinf() & (expected > 0)), "+Inf positions differ"
    assert torch.equal(actual.isinf() & (actual < 0), expected.isinf() & (expected < 0)), "-Inf positions differ"


def assert_close_finite(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert_same_nonfinite(actual, expected)
    finite = torch.isfinite(expected)
    if finite.any():
        a, e = actual[finite].double(), expected[finite].double()
        rtol = GEMM_TOL[dtype]
        torch.testing.assert_close(a, e, rtol=rtol, atol=rtol * e.abs().max().item())


# ----------------------------------------------------------------------------------------------
# Inputs: values by class, then the same values in another memory layout
# ----------------------------------------------------------------------------------------------


def make_values(shape, dtype, klass, gen) -> torch.Tensor:
    def randn():
        return torch.randn(shape, generator=gen)

    def sign():
        return torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)

    if klass == "randn":
        x = randn() * 3
    elif klass == "zeros":
        x = torch.zeros(shape) * sign()  # +0.0 and -0.0
    elif klass == "ties":
        x = torch.randint(-2, 3, shape, generator=gen).float()
    elif klass == "nonfinite":
        x = randn()
        pick = torch.rand(shape, generator=gen)
        x = torch.where(pick < 0.1, float("nan"), x)
        x = torch.where((pick >= 0.1) & (pick < 0.2), float("inf"), x)
        x = torch.where((pick >= 0.2) & (pick < 0.3), float("-inf"), x)
    elif klass == "huge":
        x = HUGE[dtype] * (1 + torch.rand(shape, generator=gen)) * sign()
    elif klass == "subnormal":
        x = TINY[dtype] * torch.randint(1, 4, shape, generator=gen) * sign()
    else:
        raise AssertionError(klass)
    return x.to(dtype)


def mixed_rows(shape, dtype, classes, gen) -> torch.Tensor:
    """One value class per row (every row of a 3-D x counts as a row)."""
    rows = [make_values((shape[-1],), dtype, c, gen) for c in classes]
    return torch.stack(rows).reshape(shape)


def in_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """A tensor equal to x (bit for bit) with other strides; "stride0_rows" repeats x's first row."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "transposed":  # K is the slow dim: column-major rows
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "column_step":  # every other element of a wider buffer: K stride 2
        big = torch.full((*x.shape[:-1], 2 * x.shape[-1]), 7.0, dtype=x.dtype)
        big[..., ::2] = x
        return big[..., ::2]
    if layout == "row_step":  # every other row of a taller buffer
        big = torch.full((*x.shape[:-2], 2 * x.shape[-2], x.shape[-1]), 7.0, dtype=x.dtype)
        big[..., ::2, :] = x
        return big[..., ::2, :]
    if layout == "offset":  # a view that starts 3 elements into its storage
        flat = torch.full((x.numel() + 3,), 7.0, dtype=x.dtype)
        view = flat[3:].view(x.shape)
        view.copy_(x)
        return view
    if layout == "stride0_rows":  # one row broadcast over all rows
        return x[..., :1, :].expand(x.shape)
    if layout == "permuted_batch":  # batch dim between rows and K in memory (2-D x: column-major)
        if x.dim() < 3:
            return in_layout(x, "transposed")
        return x.movedim(0, -2).contiguous().movedim(-2, 0)
    raise AssertionError(layout)


@st.composite
def activations(draw, min_dims=2):
    """(x in a drawn layout, n, m, per-row value classes of x)."""
    n, m = draw(st.sampled_from(PATTERNS))
    dtype = draw(st.sampled_from(DTYPES))
    batch = draw(st.sampled_from([(), (2,), (3,)] if min_dims == 2 else [(), (1,), (2,)]))
    rows = draw(st.integers(1, 6))
    k = m * draw(st.integers(1, 4))
    shape = (*batch, rows, k)
    count = rows * (batch[0] if batch else 1)
    classes = draw(st.lists(st.sampled_from(VALUE_CLASSES), min_size=count, max_size=count))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    layout = draw(st.sampled_from(LAYOUTS))
    x = in_layout(mixed_rows(shape, dtype, classes, gen), layout)
    if layout == "stride0_rows":  # every row now holds the first row of its batch
        per_batch = rows
        classes = [classes[(i // per_batch) * per_batch] for i in range(count)]
    return x, n, m, classes


def _row_masks(x: torch.Tensor, classes):
    """Per row of x (flattened to 2-D): has NaN, has +-Inf, is finite and free of huge values."""
    rows = x.reshape(-1, x.shape[-1])
    has_nan = rows.isnan().any(-1)
    has_inf = rows.isinf().any(-1)
    huge = torch.tensor([c == "huge" for c in classes])
    return has_nan, has_inf & ~has_nan, ~has_nan & ~has_inf & ~huge


# ----------------------------------------------------------------------------------------------
# 1. rtlynx::compress on any layout
# ----------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(case=activations(), norm_comp=st.booleans())
def test_compress_op_on_any_layout(case, norm_comp):
    x, n, m, classes = case
    values, indices, scale = rtlynx.compress(x, n, m, norm_comp)
    # the op gives the reference's bits on the very same strided tensor
    same = reference.compress(x, n, m, norm_comp)
    for got, want in zip((values, indices, scale), same):
        assert_same_bits(got, want)
    # the selection does not depend on the layout; the fp32 scale only at the last bit
    contiguous = reference.compress(x.contiguous(), n, m, norm_comp)
    assert_same_bits(values, contiguous[0])
    assert torch.equal(indices, contiguous[1])
    torch.testing.assert_close(scale, contiguous[2], rtol=1e-6, atol=0)
    # invariants
    assert values.is_contiguous() and indices.dtype == torch.uint8 and scale.dtype == torch.float32
    groups = indices.long().reshape(*indices.shape[:-1], -1, n)
    assert bool((groups < m).all()) and bool((groups[..., 1:] > groups[..., :-1]).all())
    assert bool(torch.isfinite(scale).all()) and bool((scale >= 1 - 1e-5).all())
    rows = x.reshape(-1, x.shape[-1])
    special = (~torch.isfinite(rows)).any(-1) | (rows == 0).all(-1)
    flat_scale = scale.reshape(-1)
    assert bool((flat_scale[special] == 1).all()), "zero and non-finite rows must get scale exactly 1"
    if not norm_comp:
        assert bool((flat_scale == 1).all())
    # a NaN or Inf is always kept: the compressed row holds as many of them as it can
    kept_nonfinite = (~torch.isfinite(values.reshape(-1, values.shape[-1]))).any(-1)
    assert torch.equal(kept_nonfinite, (~torch.isfinite(rows)).any(-1))


# ----------------------------------------------------------------------------------------------
# 2. rtlynx::sparse_matmul and rtlynx::sparse_mm on any layout
# ----------------------------------------------------------------------------------------------


@st.composite
def gemms(draw):
    x, n, m, classes = draw(activations())
    dtype, k = x.dtype, x.shape[-1]
    cols = draw(st.integers(1, 6))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    bmm = x.dim() == 3 and draw(st.booleans())
    if bmm:  # activation x activation: other is (B, K, N)
        other = (torch.randn(x.shape[0], k, cols, generator=gen) * k ** -0.5).to(dtype)
        other = in_layout(other, draw(st.sampled_from(["contiguous", "transposed", "column_step"])))
    else:  # a linear layer: other is weight.t() (a transposed view), or (K, N) in another layout
        weight = (torch.randn(cols, k, generator=gen) * k ** -0.5).to(dtype)
        other_layout = draw(st.sampled_from(["weight_t", "contiguous", "column_step", "row_step"]))
        other = weight.t() if other_layout == "weight_t" else in_layout(weight.t(), other_layout)
    bias = draw(st.sampled_from([None, "contiguous", "step"]))
    if bias is not None:
        b = torch.randn(2 * cols, generator=gen).to(dtype)
        bias = b[:cols] if bias == "contiguous" else b[::2]
    return x, other, bias, n, m, classes


@settings(max_examples=40, deadline=None)
@given(case=gemms(), norm_comp=st.booleans(), below_min_tokens=st.booleans())
def test_sparse_matmul_op_on_any_layout(case, norm_comp, below_min_tokens):
    x, other, bias, n, m, classes = case
    min_tokens = x.shape[-2] + 1 if below_min_tokens else 0
    kwargs = dict(n=n, m=m, norm_comp=norm_comp, min_tokens=min_tokens)
    out = rtlynx.sparse_matmul(x, other, bias, **kwargs)
    assert out.is_contiguous() and out.dtype == x.dtype
    assert out.shape == (*torch.broadcast_shapes(x.shape[:-2], other.shape[:-2]), x.shape[-2], other.shape[-1])
    assert_same_bits(out, reference.sparse_matmul(x, other, bias, **kwargs))
    if below_min_tokens:  # the exact dense layer
        dense = torch.matmul(x, other)
        assert_same_bits(out, (dense + bias if bias is not None else dense).contiguous())
        return
    # the two-op route gives the same bits as the fused op
    assert_same_bits(rtlynx.sparse_mm(*rtlynx.compress(x, n, m, norm_comp), other, bias, n, m), out)
    # layout changes the result at most at the last bits of the norm scale
    contiguous = reference.sparse_matmul(x.contiguous(), other.contiguous(), bias, n=n, m=m, norm_comp=norm_comp)
    assert_close_finite(out, contiguous, x.dtype)
    # nothing silently wrong
    has_nan, has_inf, plain = _row_masks(x, classes)
    rows = out.reshape(-1, out.shape[-1])
    assert bool(rows[has_nan].isnan().all()), "a NaN in x must give NaN in its whole output row"
    assert not bool(torch.isfinite(rows[has_inf]).any()), "an Inf in x must give a non-finite output row"
    assert bool(torch.isfinite(rows[plain]).all()), "a finite row of ordinary magnitude must give a finite row"


# ----------------------------------------------------------------------------------------------
# 3. The Triton kernels (the interpreter on a machine without GPU) on any layout
# ----------------------------------------------------------------------------------------------

@pytest.mark.triton
@settings(max_examples=25, deadline=None)
@given(case=gemms(), norm_comp=st.booleans())
def test_triton_kernels_on_any_layout_match_the_reference(case, norm_comp):
    x, other, bias, n, m, classes = case
    x, other = x.to(DEVICE), other.to(DEVICE)
    bias = bias.to(DEVICE) if bias is not None else None
    # poisoned outputs (NaN / 255): an element a kernel forgets to write cannot pass
    with mock.patch.dict(os.environ, {triton_compress.POISON_ENV: "1"}):
        values, indices, scale = triton_compress.compress(x, n, m, norm_comp)
        out = rtlynx.sparse_matmul(x, other, bias, n=n, m=m, norm_comp=norm_comp, impl="triton")
    want = reference.compress(x, n, m, norm_comp)
    assert_same_bits(values, want[0])
    assert torch.equal(indices, want[1])
    torch.testing.assert_close(scale, want[2], rtol=1e-6, atol=0)
    assert bool((scale[want[2] == 1] == 1).all())
    expected = reference.sparse_matmul(x, other, bias, n=n, m=m, norm_comp=norm_comp)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert_close_finite(out, expected, x.dtype)


# ----------------------------------------------------------------------------------------------
# 4. Catalogue of bad input: the cases not already covered in test_config.py,
#    test_kernel_selection.py, test_plan_compile.py, test_reference_ops.py and test_rewrite_*.py
# ----------------------------------------------------------------------------------------------


def _compile_error(options, model=None, x=None, backend="rtlynx"):
    """The error that torch.compile raises, unwrapped from Dynamo's BackendCompilerFailed."""
    model = model or nn.Linear(16, 8)
    x = torch.randn(4, 16) if x is None else x
    fn = torch.compile(model, backend=backend, options=options) if isinstance(backend, str) else \
        torch.compile(model, backend=backend)
    with pytest.raises(Exception) as info:
        fn(x)
    return getattr(info.value, "inner_exception", None) or info.value


VALID_OPTIONS = ", ".join(repr(name) for name in option_names(LynxConfig))


@pytest.mark.parametrize("options, error", [
    ({"patern": "2:4"}, f"unknown option 'patern'; valid options: {VALID_OPTIONS}"),
    ({"min_tokens": -1}, "option 'min_tokens' must be an integer >= 0 or 'auto', got -1"),
    ({"kernel": "cutlass"}, "option 'kernel' has invalid value 'cutlass'; valid choices: 'auto', 'reference', "
                            "'triton', 'cusparselt', 'fused'"),
    ({"op_kinds": []}, "option 'op_kinds' must name at least one of 'linear', 'matmul'"),
    ({"inner": "aot_eager"}, "option 'inner' has invalid value 'aot_eager'; valid choices: 'inductor', 'eager'"),
])
@torch.no_grad()
def test_bad_option_through_torch_compile_and_explain(options, error):
    err = _compile_error(options)
    assert type(err) is ValueError and str(err) == error
    with pytest.raises(ValueError) as info:
        lynx_compile.explain(nn.Linear(16, 8), torch.randn(4, 16), options=options)
    assert str(info.value) == error


@torch.no_grad()
def test_mode_given_twice_is_a_clear_error():
    import functools

    backend = functools.partial(lynx_compile.rtlynx, mode="max-autotune", options={"mode": "reduce-overhead"})
    err = _compile_error(None, backend=backend)
    assert type(err) is ValueError
    assert str(err) == "mode given twice with different values: 'max-autotune' and options['mode']='reduce-overhead'"


@torch.no_grad()
def test_plan_option_naming_a_folder_without_a_plan(tmp_path):
    err = _compile_error({"plan": str(tmp_path)})
    assert type(err) is ValueError and str(err) == f"{tmp_path} is not a lynx-compile plan: plan.json is missing"


@torch.no_grad()
def test_unknown_inductor_config_key_is_rejected_by_from_options():
    # Regression test for a fixed bug (config.LynxConfig.from_options): 'inductor_config' keys are not checked, so an unknown
    # Inductor key passes the check that README says to run "before you compile", and compiling
    # then fails inside Inductor with AttributeError("torch._inductor.config.no_such_key does not
    # exist") instead of a ValueError that names the option.
    with pytest.raises(ValueError, match=r"option 'inductor_config'.*'no_such_key'"):
        LynxConfig.from_options({"inductor_config": {"no_such_key": 1}})


@pytest.mark.parametrize("kernel, options, reason", [
    pytest.param("triton", {}, "device 'cpu' needs TRITON_INTERPRET=1 for the Triton interpreter",
                 marks=requires("triton", "triton")),  # without triton, the reason says so instead
    ("cusparselt", {"pattern": "4:8"}, "sparse tensor cores support 2:4 only, not 4:8"),
])
@torch.no_grad()
def test_forced_kernel_that_cannot_run_names_node_and_reason(monkeypatch, kernel, options, reason):
    from lynx_compile.policy import KernelUnavailableError

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # read when the policy asks, not only at import
    err = _compile_error({"min_tokens": 0, "kernel": kernel, "inner": "eager", **options})
    assert isinstance(err, KernelUnavailableError)
    assert str(err) == f"(root) (addmm, MxKxN=4x16x8): kernel={kernel!r} cannot run here: {reason}"


@pytest.mark.parametrize("dtype, in_features, options, reason", [
    (torch.float64, 16, {}, "dtype float64 unsupported (supported: float32, float16, bfloat16)"),
    (torch.float32, 30, {}, "K=30 is not divisible by M=4"),
    (torch.float32, 36, {"pattern": "4:8"}, "K=36 is not divisible by M=8"),
    (torch.float16, 18, {"pattern": "1:2"}, ""),  # 1:2 divides 18: rewritten
])
@pytest.mark.parametrize("inner", ["eager", "inductor"])
@torch.no_grad()
def test_dense_reason_in_the_report_through_torch_compile(dtype, in_features, options, reason, inner):
    torch.manual_seed(0)
    layer = nn.Linear(in_features, 8).to(dtype)
    x = torch.randn(6, in_features).to(dtype)
    out = torch.compile(layer, backend="rtlynx", options={"min_tokens": 0, "inner": inner, **options})(x)
    (record,) = lynx_compile.reports()[-1].records
    assert record.reason == reason and record.rewritten == (not reason)
    if reason:  # the dense layer
        torch.testing.assert_close(out, layer(x), rtol=1e-6, atol=1e-6)
    else:
        n, m = map(int, options["pattern"].split(":"))
        expected = reference.sparse_matmul(x, layer.weight.t(), layer.bias, n=n, m=m)
        torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3)


@pytest.mark.triton(device="cpu")
@pytest.mark.parametrize("how", ["inner_eager", "explain", "inductor_after_eager"])
@torch.no_grad()
def test_forced_triton_passes_its_self_test_in_every_compile_path(monkeypatch, how):
    # Regression test for a fixed bug (kernels/registry.py self_test, called from policy.decide): the compile-time self-test
    # makes its random data with torch.randn while the caller's FakeTensorMode is active, as it is
    # when the pass runs for inner="eager" (backend._compile_eager) and for explain(). The Triton
    # kernel then gets FakeTensors and raises "Cannot access data pointer of Tensor", so the GEMM is
    # reported as "kernel 'triton' failed on cpu: self-test failed: RuntimeError: ...; kept dense",
    # although the kernel works (test_kernel_selection.py runs it through inner="inductor"). The
    # failure is cached per (kernel, device, dtype, pattern) for the whole process, so a later
    # inner="inductor" compile keeps the GEMM dense too, and explain() disagrees with torch.compile.
    from lynx_compile.kernels import registry

    monkeypatch.setattr(registry, "_SELF_TEST", {})  # a fresh self-test cache, restored afterwards
    torch.manual_seed(0)
    layer, x = nn.Linear(64, 32), torch.randn(40, 64)
    options = {"min_tokens": 0, "kernel": "triton"}
    if how == "explain":
        records = lynx_compile.explain(layer, x, options=options).records
    else:
        if how == "inductor_after_eager":
            torch.compile(layer, backend="rtlynx", options={**options, "inner": "eager"})(x)
            torch._dynamo.reset()
        inner = "eager" if how == "inner_eager" else "inductor"
        out = torch.compile(layer, backend="rtlynx", options={**options, "inner": inner})(x)
        records = lynx_compile.reports()[-1].records
        expected = reference.sparse_matmul(x, layer.weight.t(), layer.bias, n=2, m=4)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert [(r.rewritten, r.kernel, r.reason) for r in records] == [(True, "triton", "")]


def _fake_and_real(op, args, kwargs=None):
    """(real error or None, fake error or None) of one op call."""
    kwargs = kwargs or {}
    errors = []
    for fake in (False, True):
        try:
            if fake:
                with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                    op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args],
                       **{k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
            else:
                op(*args, **kwargs)
            errors.append(None)
        except Exception as error:  # noqa: BLE001
            errors.append(error)
    return errors


K, N = 16, 5


@pytest.mark.parametrize("what, kwargs, message", [
    ("perm too short", dict(perm=torch.arange(K - 4)),
     f"perm must be int64 of shape (K={K},), got torch.int64 ({K - 4},)"),
    ("perm int32", dict(perm=torch.arange(K, dtype=torch.int32)),
     f"perm must be int64 of shape (K={K},), got torch.int32 ({K},)"),
    ("comp_bias float64", dict(comp_bias=torch.zeros(N, dtype=torch.float64)),
     f"comp_bias must be float32 of shape (N={N},), got torch.float64 ({N},)"),
    ("comp_bias (1,)", dict(comp_bias=torch.zeros(1)),
     f"comp_bias must be float32 of shape (N={N},), got torch.float32 (1,)"),
])
def test_sparse_matmul_rejects_bad_perm_and_comp_bias_eagerly_as_when_traced(what, kwargs, message):
    # Regression test for a fixed bug (kernels/ops.py, sparse_matmul): only the fake implementation checks perm and comp_bias.
    # The real op accepts them: a perm shorter than K silently drops input channels
    # (x.index_select(-1, perm) on 12 of 16 channels gives a (6, 5) result), and a (1,) comp_bias
    # is broadcast over every output feature. Eager and compiled calls disagree on what is valid.
    x, other = torch.randn(6, K), torch.randn(K, N)
    real, fake = _fake_and_real(rtlynx.sparse_matmul, (x, other, None), dict(n=2, m=4, **kwargs))
    assert type(fake) is ValueError and str(fake) == message
    assert type(real) is ValueError and str(real) == message, f"{what}: the real op gave {real!r}"


@pytest.mark.parametrize("what, lr_down, lr_up", [
    ("lr_down has the wrong K", torch.randn(K // 2, 2), torch.randn(2, N)),
    ("lr_up has the wrong N", torch.randn(K, 2), torch.randn(2, 1)),
    ("ranks differ", torch.randn(K, 2), torch.randn(3, N)),
])
def test_sparse_matmul_checks_low_rank_shapes(what, lr_down, lr_up):
    # Regression test for a fixed bug (reference.check_sparse_matmul_args, used by the op and every kernel): the low-rank factors
    # are only checked to be matrices, not to be (K, R) and (R, N) as the message says. The fake
    # implementation accepts every case (so torch.compile traces it); the real op then fails with a
    # raw matmul error (wrong K, mismatched ranks) or silently broadcasts a (R, 1) lr_up over N.
    x, other = torch.randn(6, K), torch.randn(K, N)
    real, fake = _fake_and_real(rtlynx.sparse_matmul, (x, other, None, lr_down, lr_up), dict(n=2, m=4))
    for error in (real, fake):
        assert type(error) is ValueError and re.search(r"lr_down .*lr_up", str(error)), f"{what}: got {error!r}"


@pytest.mark.parametrize("what, change, message", [
    ("int64 indices", lambda v, i, s: (v, i.long(), s),
     "indices must be uint8 of the values' shape (6, 8), got torch.int64 (6, 8)"),
    ("scale of another shape", lambda v, i, s: (v, i, s[:1]),
     "scale must be float32 of shape (6,), got torch.float32 (1,)"),
    ("float64 scale", lambda v, i, s: (v, i, s.double()), "scale must be float32 of shape (6,), got torch.float64 (6,)"),
    ("indices of another shape", lambda v, i, s: (v, i[:, :4], s),
     "indices must be uint8 of the values' shape (6, 8), got torch.uint8 (6, 4)"),
])
@pytest.mark.parametrize("entry", ["op", "triton"])
def test_sparse_mm_checks_the_compressed_operand(what, change, message, entry):
    # The op (real and fake) and the Triton launcher share reference.check_compressed: one message
    # for each bad compressed operand, never a silent broadcast of a (1,) scale.
    x, other = torch.randn(6, K), torch.randn(K, N)
    values, indices, scale = change(*rtlynx.compress(x, 2, 4))
    if entry == "op":
        errors = _fake_and_real(rtlynx.sparse_mm, (values, indices, scale, other, None, 2, 4))
    else:
        from lynx_compile.kernels import triton_sparse_mm

        with pytest.raises(ValueError) as info:
            triton_sparse_mm._check_compressed(values, indices, scale, other, None, 2, 4)
        errors = [info.value]
    for error in errors:
        assert type(error) is ValueError and str(error) == message, f"{what}: got {error!r}"
