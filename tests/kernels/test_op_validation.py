"""Inputs the fused op and sparse_mm reject the same way eagerly and when traced (no silent broadcast)."""

import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

rtlynx = torch.ops.rtlynx


def _both(call, message):
    """The eager op and its fake implementation raise the same ValueError."""
    with pytest.raises(ValueError, match=re.escape(message)):
        call(lambda t: t)
    with FakeTensorMode() as mode, pytest.raises(ValueError, match=re.escape(message)):
        call(mode.from_tensor)


X, W = torch.randn(6, 16), torch.randn(16, 5)


@pytest.mark.parametrize("perm, message", [
    (torch.arange(12), "perm must be int64 of shape (K=16,), got torch.int64 (12,)"),
    (torch.arange(16, dtype=torch.int32), "perm must be int64 of shape (K=16,), got torch.int32 (16,)"),
])
def test_bad_perm(perm, message):
    _both(lambda f: rtlynx.sparse_matmul(f(X), f(W), None, None, None, f(perm), None), message)


@pytest.mark.parametrize("comp_bias", [torch.zeros(1), torch.zeros(5, dtype=torch.float64)])
def test_bad_comp_bias(comp_bias):
    message = f"comp_bias must be float32 of shape (N=5,), got {comp_bias.dtype} {tuple(comp_bias.shape)}"
    _both(lambda f: rtlynx.sparse_matmul(f(X), f(W), None, None, None, None, f(comp_bias)), message)


@pytest.mark.parametrize("down, up", [((8, 4), (4, 5)), ((16, 4), (3, 5)), ((16, 4), (4, 1))])
def test_bad_low_rank_shapes(down, up):
    message = f"lr_down must be (K=16, R) and lr_up (R, N=5), got {down} and {up}"
    _both(lambda f: rtlynx.sparse_matmul(f(X), f(W), None, f(torch.randn(down)), f(torch.randn(up))), message)


def test_bad_compressed_operand():
    values, indices, scale = rtlynx.compress(X, 2, 4)
    for bad_indices in (indices.long(), indices[:, :4]):
        message = f"indices must be uint8 of the values' shape (6, 8), got {bad_indices.dtype} {tuple(bad_indices.shape)}"
        _both(lambda f: rtlynx.sparse_mm(f(values), f(bad_indices), f(scale), f(W), None, 2, 4), message)
    for bad_scale in (scale[:1], scale.double()):
        message = f"scale must be float32 of shape (6,), got {bad_scale.dtype} {tuple(bad_scale.shape)}"
        _both(lambda f: rtlynx.sparse_mm(f(values), f(indices), f(bad_scale), f(W), None, 2, 4), message)
