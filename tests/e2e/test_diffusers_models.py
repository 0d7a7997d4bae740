"""DiT, PixArt, SD3, Flux and Sana transformers from diffusers (tiny random-weight fp32 configs) through
rtlynx on the CPU.

For each model: ``pattern="dense"`` equals plain Inductor bit for bit; ``"2:4"`` equals plain Inductor
compiling the same model with the reference op swapped in for every GEMM that rtlynx rewrites (the
non-GEMM ops then run in the same Inductor kernels, so top-k sees identical inputs); every
``nn.Linear`` inside the transformer blocks is rewritten; one graph with ``fullgraph=True``.

What the models produce (post-grad ATen, found by these tests):
- every ``nn.Linear`` becomes one GEMM node of kind "linear": ``addmm``, or ``mm`` when it has no bias
  (Sana's ``attn1.to_q/k/v``) or when its input is not contiguous: ATen's linear then decomposes to
  matmul + a separate bias add (SD3's ``attn.to_out.0`` gets a slice of the joint text+image
  sequence, Sana's ``attn1.to_out.0`` a transposed tensor). The sparse op then gets no bias, and the
  add stays in an Inductor pointwise kernel;
- SD3 and Flux attention runs through ``scaled_dot_product_attention``, which Inductor keeps as one
  fused ATen op on the CPU: those attention products are not GEMM nodes, so they are neither
  reported nor rewritten;
- Sana's self-attention is *linear* attention (``SanaLinearAttnProcessor2_0``): two ``torch.matmul``
  per block that become ``bmm`` nodes of kind "matmul". The first, ``pad(V) @ K^T``, reduces over the
  token axis (K = tokens, M = head_dim + 1); the second reduces over head_dim. Both are rewritten
  with ``min_tokens=0``; the default ``min_tokens=512`` keeps them dense (M = head_dim + 1);
- Sana's feed-forward (``GLUMBConv``) and every patch embedding (SD3, Sana) are convolutions, not
  GEMMs: they are not reported and stay dense.
"""

from unittest import mock

import pytest
import torch
import torch.nn as nn

import lynx_compile
from shared import not_installed

diffusers = pytest.importorskip("diffusers", reason=not_installed("diffusers"))

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("share_compiled_kernels_within_a_test")]


_real_matmul = torch.matmul


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


def _sd3():
    model = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
        pos_embed_max_size=8)
    inputs = dict(hidden_states=torch.randn(2, 4, 8, 8), encoder_hidden_states=torch.randn(2, 6, 32),
                  pooled_projections=torch.randn(2, 64), timestep=torch.tensor([3, 7]), return_dict=False)
    return model, inputs


def _flux(num_layers=1, num_single_layers=1):
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=(4, 4, 8))
    inputs = dict(hidden_states=torch.randn(1, 16, 8), encoder_hidden_states=torch.randn(1, 8, 32),
                  pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]),
                  img_ids=torch.randn(16, 3), txt_ids=torch.randn(8, 3), return_dict=False)
    return model, inputs


def _sana():
    model = diffusers.SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=8,
        sample_size=8)
    inputs = dict(hidden_states=torch.randn(2, 4, 8, 8), encoder_hidden_states=torch.randn(2, 6, 8),
                  timestep=torch.tensor([3, 7]), return_dict=False)
    return model, inputs


MODELS = {"DiTTransformer2DModel": _dit, "PixArtTransformer2DModel": _pixart, "SD3Transformer2DModel": _sd3,
          "FluxTransformer2DModel": _flux, "SanaTransformer2DModel": _sana}
# The GEMMs that are not nn.Linear, as (module path, op, kind): only Sana's linear attention has any.
NON_LINEAR_GEMMS = {name: [] for name in MODELS} | {
    "SanaTransformer2DModel": [("transformer_blocks.0.attn1", "bmm", "matmul")] * 2,
}


# DiT computes its output conditioning with block 0's timestep embedder, a second call of its two linears.
LINEARS_CALLED_TWICE = {name: [] for name in MODELS} | {
    "DiTTransformer2DModel": [f"transformer_blocks.0.norm1.emb.timestep_embedder.linear_{i}" for i in (1, 2)],
}


def _build(name, **kwargs):
    torch.manual_seed(0)
    model, inputs = MODELS[name](**kwargs)
    return model.eval(), inputs


def _linear_paths(model, prefix=""):
    return {name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.startswith(prefix)}


# The reference ops get x.contiguous(). In these models the rewritten GEMM's x is the contiguous 2-D
# (mm/addmm) or 3-D (bmm) copy that ATen's linear/matmul decompositions make, while the op in the
# patched model may get a transposed x (Sana's attn1.to_out, attn2.to_q); the reference's fp32 norm
# scale depends on x's strides at the last bit (see test_properties.py::test_compress_op_on_any_layout).
def _reference_linear(self, x):
    return torch.ops.rtlynx.sparse_matmul(x.contiguous(), self.weight.t(), self.bias, n=2, m=4, impl="reference")


def _reference_matmul(a, b):
    """torch.matmul as rtlynx rewrites it (the left operand sparsified along the reduction dim), in
    traced code only: the reference kernel itself calls torch.matmul when the graph runs."""
    if torch.compiler.is_compiling():
        return torch.ops.rtlynx.sparse_matmul(a.contiguous(), b, n=2, m=4, impl="reference")
    return _real_matmul(a, b)


def _non_linear_gemms(report):
    return [(r.name, r.op, r.kind) for r in report.records if r.kind != "linear"]


@torch.no_grad()
@pytest.mark.parametrize("name", MODELS)
def test_dense_pattern_matches_plain_inductor(name):
    model, inputs = _build(name)
    expected = torch.compile(model, backend="inductor", fullgraph=True)(**inputs)[0]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    out = torch.compile(model, backend="rtlynx", fullgraph=True, options={"pattern": "dense"})(**inputs)[0]
    assert not torch._dynamo.utils.counters["graph_break"]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    (report,) = lynx_compile.reports()
    assert report.num_rewritten == 0 and {r.reason for r in report.records} == {"pattern is 'dense'"}
    # Every nn.Linear of the model is one reported GEMM, and so is every other GEMM node.
    linear_records = [r.name for r in report.records if r.kind == "linear"]
    assert sorted(linear_records) == sorted([*_linear_paths(model), *LINEARS_CALLED_TWICE[name]])
    assert _non_linear_gemms(report) == NON_LINEAR_GEMMS[name]


@torch.no_grad()
@pytest.mark.parametrize("name", MODELS)
def test_sparse_rewrites_every_block_linear_and_matches_reference_op_model(name):
    model, inputs = _build(name)
    torch._dynamo.utils.counters.clear()
    out = torch.compile(model, backend="rtlynx", fullgraph=True, options={"min_tokens": 0})(**inputs)[0]
    assert not torch._dynamo.utils.counters["graph_break"]

    (report,) = lynx_compile.reports()  # one graph
    block_linears = _linear_paths(model, "transformer_blocks.") | _linear_paths(model, "single_transformer_blocks.")
    assert len(block_linears) >= 6
    rewritten = {r.name for r in report.records if r.rewritten}
    assert block_linears <= rewritten
    assert all(r.rewritten and r.kernel == "reference" and r.pattern == "2:4" for r in report.records)
    assert _non_linear_gemms(report) == NON_LINEAR_GEMMS[name]

    # Plain Inductor on the same model with the reference op in every nn.Linear (and, for Sana's
    # linear attention, in torch.matmul): bit-identical, because the non-GEMM ops run in the same
    # Inductor kernels and the ops see identical inputs.
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    with mock.patch.object(nn.Linear, "forward", _reference_linear), \
            mock.patch.object(torch, "matmul", _reference_matmul if NON_LINEAR_GEMMS[name] else _real_matmul):
        expected = torch.compile(model, backend=counter, fullgraph=True)(**inputs)[0]
    assert counter.frame_count == 1
    torch.testing.assert_close(out, expected, rtol=0, atol=0)

    # ... and the sparse model really differs from the dense one (the comparison above is not vacuous).
    dense = model(**inputs)[0]
    assert ((out - dense).norm() / dense.norm()).item() > 0.05


@torch.no_grad()
def test_flux_compile_repeated_blocks_compiles_each_block_class_and_rewrites_its_linears():
    """Regional compilation through rtlynx. It runs with inner="eager" (the same passes on the same
    decomposed graph, executed op by op), so that the reference can be the same regional compile of
    the reference-op model by AOTAutograd with the same decompositions, bit for bit, at a fraction of
    Inductor's compile time; the Inductor route of these blocks is checked on the whole model above."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.decomposition import select_decomp_table

    assert hasattr(diffusers.ModelMixin, "compile_repeated_blocks")
    model, inputs = _build("FluxTransformer2DModel", num_layers=2, num_single_layers=3)
    assert model._repeated_blocks == ["FluxTransformerBlock", "FluxSingleTransformerBlock"]
    dense = model(**inputs)[0]

    model.compile_repeated_blocks(backend="rtlynx", fullgraph=True, options={"min_tokens": 0, "inner": "eager"})
    out = model(**inputs)[0]
    # One graph serves both double blocks. The single blocks need two: the first one gets the
    # (contiguous) output of the last double block, the later ones a slice of the previous single
    # block's joint text+image sequence (stride(0) 768, not 512), and Dynamo's stride guard
    # recompiles once for that; the third single block reuses the second graph. Module paths are
    # relative to the compiled block.
    double_paths = sorted(_linear_paths(model.transformer_blocks[0]))
    single_paths = sorted(_linear_paths(model.single_transformer_blocks[0]))
    graphs = lynx_compile.reports()
    assert [sorted(r.name for r in g.records) for g in graphs] == [double_paths, single_paths, single_paths]
    assert all(r.rewritten and r.kind == "linear" and r.kernel == "reference" for g in graphs for r in g.records)
    assert ((out - dense).norm() / dense.norm()).item() > 0.05
    out_again = model(**inputs)[0]
    assert len(lynx_compile.reports()) == 3 and torch.equal(out_again, out)

    # The same regional compile of the model with the reference op in the blocks' linears (and only
    # there: the rest of the model runs eagerly and dense in both).
    torch._dynamo.reset()
    model, inputs = _build("FluxTransformer2DModel", num_layers=2, num_single_layers=3)
    for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
        for module in block.modules():
            if isinstance(module, nn.Linear):
                module.forward = _reference_linear.__get__(module)
    counter = torch._dynamo.testing.CompileCounterWithBackend(
        aot_autograd(fw_compiler=lambda gm, _: gm, decompositions=select_decomp_table()))
    model.compile_repeated_blocks(backend=counter, fullgraph=True)
    expected = model(**inputs)[0]
    assert counter.frame_count == 3
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
