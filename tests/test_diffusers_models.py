"""Tiny random-weight diffusers DiTs through the whole pipeline (Dynamo, passes, Inductor) on the CPU."""

from unittest import mock

import pytest
import torch
import torch.nn as nn

import lynx_compile

diffusers = pytest.importorskip("diffusers", reason="diffusers is a test dependency (pip install -e .[test])")

pytestmark = pytest.mark.slow


def _dit():
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_type="ada_norm_zero")
    inputs = dict(hidden_states=torch.randn(2, 4, 8, 8), timestep=torch.tensor([3, 7]),
                  class_labels=torch.tensor([1, 2]), return_dict=False)
    return model, inputs


def _pixart():
    model = diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, cross_attention_dim=32, caption_channels=24, norm_type="ada_norm_single",
        use_additional_conditions=False)
    inputs = dict(hidden_states=torch.randn(2, 4, 8, 8), encoder_hidden_states=torch.randn(2, 5, 24),
                  timestep=torch.tensor([3, 7]), return_dict=False)
    return model, inputs


MODELS = {"DiTTransformer2DModel": _dit, "PixArtTransformer2DModel": _pixart}


def _build(name):
    torch.manual_seed(0)
    model, inputs = MODELS[name]()
    return model.eval(), inputs


def _linear_paths(model):
    return {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}


def _reference_linear(self, x):
    return torch.ops.rtlynx.sparse_matmul(x, self.weight.t(), self.bias, n=2, m=4, impl="reference")


@torch.no_grad()
@pytest.mark.parametrize("name", MODELS)
def test_dense_pattern_matches_plain_inductor(name):
    model, inputs = _build(name)
    expected = torch.compile(model, backend="inductor", fullgraph=True)(**inputs)[0]
    torch._dynamo.reset()
    out = torch.compile(model, backend="rtlynx", fullgraph=True, options={"pattern": "dense"})(**inputs)[0]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    (report,) = lynx_compile.reports()
    assert report.num_rewritten == 0 and {r.name for r in report.records} == _linear_paths(model)


@torch.no_grad()
@pytest.mark.parametrize("name", MODELS)
def test_sparse_rewrites_every_block_linear_and_matches_reference_op_model(name):
    model, inputs = _build(name)
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    out = torch.compile(model, backend="rtlynx", fullgraph=True, options={"min_tokens": 0})(**inputs)[0]

    (report,) = lynx_compile.reports()  # one graph: no graph breaks
    block_linears = {p for p in _linear_paths(model) if p.startswith("transformer_blocks.")}
    rewritten = {r.name for r in report.records if r.rewritten}
    assert block_linears <= rewritten
    assert all(r.rewritten and r.kernel == "reference" and r.kind == "linear" for r in report.records)

    # The same model with every nn.Linear calling the reference op, compiled by plain Inductor: the
    # non-GEMM ops are then computed by the same Inductor kernels, so top-k sees identical inputs.
    torch._dynamo.reset()
    with mock.patch.object(nn.Linear, "forward", _reference_linear):
        expected = torch.compile(model, backend=counter, fullgraph=True)(**inputs)[0]
    assert counter.frame_count == 1
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
