"""Recompiles and dynamic shapes: a DiT sampling loop through rtlynx compiles once, shape changes
recompile at most once (``dynamic=None``) or never (``dynamic=True``, ``mark_dynamic``), and the
``min_tokens`` decision holds at run time for every token count of one symbolic graph.

``len(lynx_compile.reports())`` grows by one per graph that rtlynx compiles, and Dynamo's
``counters["stats"]["unique_graphs"]`` counts the graphs that Dynamo produced; both are checked.

A diffusers detail that shapes these tests: ``PatchEmbed`` takes a Python branch on whether the
input has the model's native ``sample_size`` (``if self.height != height or self.width != width``,
diffusers/models/embeddings.py), so Dynamo guards on it and the native resolution and every other
resolution need a graph each, whatever ``dynamic`` says. The dynamic tests therefore stay off the
native resolution.
"""

from unittest import mock

import pytest
import torch
import torch.nn as nn

import lynx_compile
from shared import not_installed

diffusers = pytest.importorskip("diffusers", reason=not_installed("diffusers"))

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("share_compiled_kernels_within_a_test")]


SAMPLE_SIZE = 8  # native latent resolution; patch_size 2, so 16 tokens per image


def _dit():
    torch.manual_seed(0)
    # num_embeds_ada_norm=1000: DiTPipeline hard-codes the null class 1000 for classifier-free guidance.
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=1,
        sample_size=SAMPLE_SIZE, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero").eval()


def _pipeline(transformer):
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                                  up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1,
                                  latent_channels=4, norm_num_groups=4, sample_size=SAMPLE_SIZE).eval()
    return diffusers.DiTPipeline(transformer=transformer, vae=vae, scheduler=diffusers.DDIMScheduler())


def _inputs(batch, size, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, size, size, generator=gen),
                timestep=torch.randint(0, 1000, (batch,), generator=gen),
                class_labels=torch.randint(0, 1000, (batch,), generator=gen), return_dict=False)


def _graphs():
    return len(lynx_compile.reports()), torch._dynamo.utils.counters["stats"]["unique_graphs"]


@torch.no_grad()
def test_cfg_sampling_loop_compiles_once_and_shape_changes_recompile_at_most_once():
    """The subject is Dynamo's graphs and guards, so the passes run with inner="eager" here (the
    same rewritten graph, executed op by op), which keeps 30 steps and three compiles cheap. The
    Inductor route of a dynamic graph is the next test's."""
    torch._dynamo.utils.counters.clear()
    transformer = _dit()
    # dynamic=None (the default): static first, then automatic dynamic for what changed
    transformer.compile(backend="rtlynx", options={"min_tokens": 0, "inner": "eager"})
    pipe = _pipeline(transformer)
    # nn.Module.compile makes __call__ go through _compiled_call_impl: spy on it to see every step.
    with mock.patch.object(transformer, "_compiled_call_impl", wraps=transformer._compiled_call_impl) as spy:
        images = pipe(class_labels=[3], num_inference_steps=30, guidance_scale=4.0, output_type="pt",
                      generator=torch.Generator().manual_seed(0)).images
        calls = spy.call_args_list
    # 30 denoising steps, each with a new timestep and the batch doubled for guidance: one compile.
    assert len(calls) == 30
    assert {tuple(c.args[0].shape) for c in calls} == {(2, 4, SAMPLE_SIZE, SAMPLE_SIZE)}
    assert len({int(c.kwargs["timestep"][0]) for c in calls}) == 30
    assert images.shape == (1, 3, SAMPLE_SIZE, SAMPLE_SIZE) and torch.isfinite(images).all()
    assert _graphs() == (1, 1)
    (report,) = lynx_compile.reports()
    blocks = {r.name for r in report.records if r.name.startswith("transformer_blocks.0.") and r.rewritten}
    assert {"transformer_blocks.0.attn1.to_q", "transformer_blocks.0.ff.net.2"} <= blocks
    assert all(isinstance(d, int) for r in report.records for d in r.shape)  # a static graph

    # Batch size 2 -> 4 (two class labels, doubled): one recompile, with a symbolic batch ...
    pipe(class_labels=[3, 5], num_inference_steps=3, output_type="pt")
    assert _graphs() == (2, 2)
    assert isinstance(lynx_compile.reports()[-1].records[0].shape[0], str)
    # ... which serves every later batch size.
    pipe(class_labels=[1, 2, 3], num_inference_steps=3, output_type="pt")
    assert _graphs() == (2, 2)

    # Another resolution (PatchEmbed's non-native branch): one recompile, dynamic in batch and size ...
    out = transformer(**_inputs(2, 12))[0]
    assert out.shape == (2, 8, 12, 12)
    assert _graphs() == (3, 3)
    # ... which serves every later non-native resolution and batch size.
    for batch, size in [(2, 16), (6, 12), (4, 20)]:
        assert transformer(**_inputs(batch, size))[0].shape == (batch, 8, size, size)
    assert _graphs() == (3, 3)
    tokens = [r.shape[0] for r in lynx_compile.reports()[-1].records if r.name == "transformer_blocks.0.ff.net.2"]
    assert len(tokens) == 1 and isinstance(tokens[0], str)  # M = batch * tokens, symbolic


MIN_TOKENS = 64
# (batch, resolution) -> M = batch * (resolution / 2)^2 tokens per block GEMM; none is the native size.
SHAPES = [(2, 12), (2, 16), (2, 10), (4, 20), (3, 6), (2, 12)]


def _tokens(batch, size):
    return batch * (size // 2) ** 2


def _reference_linear(self, x):
    """nn.Linear as the rewrite computes it: on x folded to 2-D, so that M (the rows the op compares
    with min_tokens) is batch * tokens, as in the post-grad addmm; a 3-D x would give M = tokens."""
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.ops.rtlynx.sparse_matmul(x2d, self.weight.t(), self.bias, n=2, m=4, min_tokens=MIN_TOKENS,
                                       impl="reference")
    return y.reshape(*x.shape[:-1], y.shape[-1])


@torch.no_grad()
def test_dynamic_graph_never_recompiles_and_min_tokens_is_decided_at_run_time():
    assert {_tokens(*s) >= MIN_TOKENS for s in SHAPES} == {True, False}
    model = _dit()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model, backend="rtlynx", dynamic=True, fullgraph=True,
                             options={"min_tokens": MIN_TOKENS})
    outputs = [compiled(**_inputs(batch, size, seed))[0] for seed, (batch, size) in enumerate(SHAPES)]
    assert _graphs() == (1, 1)  # one graph for every batch size and resolution
    (report,) = lynx_compile.reports()
    # Every GEMM is rewritten, with the token count symbolic, so the op itself applies min_tokens.
    assert len(report.records) == 13
    for record in report.records:
        assert record.rewritten and record.runtime_guard and record.min_tokens == MIN_TOKENS, record
        assert isinstance(record.shape[0], str) and all(isinstance(d, int) for d in record.shape[1:])

    # Plain Inductor on the model with the reference op (same min_tokens) in every nn.Linear, with
    # mark_dynamic instead of dynamic=True: one graph too, and the same bits for every shape.
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    with mock.patch.object(nn.Linear, "forward", _reference_linear):
        reference = torch.compile(model, backend=counter, fullgraph=True)
        for seed, ((batch, size), out) in enumerate(zip(SHAPES, outputs)):
            inputs = _inputs(batch, size, seed)
            if seed == 0:
                for name, dims in [("hidden_states", (0, 2, 3)), ("timestep", (0,)), ("class_labels", (0,))]:
                    for dim in dims:
                        torch._dynamo.mark_dynamic(inputs[name], dim)
            torch.testing.assert_close(out, reference(**inputs)[0], rtol=0, atol=0)
    assert counter.frame_count == 1

    # Below min_tokens every GEMM runs the exact dense layer: the dense model up to fp32 rounding
    # (Inductor fuses the rest differently from eager). Above it the block GEMMs are sparse.
    for seed, ((batch, size), out) in enumerate(zip(SHAPES, outputs)):
        dense = model(**_inputs(batch, size, seed))[0]
        if _tokens(batch, size) < MIN_TOKENS:
            torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)
        else:
            assert ((out - dense).norm() / dense.norm()).item() > 0.05, (batch, size)
