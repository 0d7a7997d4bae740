"""Put an rtlynx-compiled transformer into a diffusers pipeline and sample with it on the CPU.

    python examples/diffusers_pipeline.py [--steps 4] [--pattern 2:4] [--min-tokens 512] [--dump-dir DIR]

Every component is built from a small config with random weights, so nothing is downloaded:
a class-conditional DiT transformer, a one-level AutoencoderKL and a DDIM scheduler, assembled
into a ``DiTPipeline``. DiT needs no text encoder, so the example needs no ``transformers``.

The pipeline runs classifier-free guidance: two class labels become a batch of four, and each of
the 32 x 32 latents is 256 patches, so every block linear sees M = 4 x 256 = 1024 tokens, above
the default ``min_tokens=512``. The timestep and AdaLN linears (M = 4) stay dense.

The whole sampling loop runs one compiled graph. The images are random (so are the weights); the
example prints how far the sparse pipeline's images are from the dense pipeline's. On the CPU the
rewritten model runs the reference kernel, which is slower than dense: this shows the rewrite and
the numerics, not the GPU speed-up.
"""

from __future__ import annotations

import argparse

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

import lynx_compile

LATENT_SIZE = 32
CLASS_LABELS = [207, 360]


def build_components(seed: int = 0):
    """A tiny DiT, VAE and scheduler from configs, with random weights."""
    torch.manual_seed(seed)
    # num_embeds_ada_norm=1000: DiTPipeline uses class 1000 as the "null" label for guidance.
    transformer = DiTTransformer2DModel(
        num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
        sample_size=LATENT_SIZE, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero").eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(16,), layers_per_block=1, latent_channels=4, norm_num_groups=8,
        sample_size=LATENT_SIZE).eval()
    return transformer, vae, DDIMScheduler()


def sample(pipe: DiTPipeline, steps: int) -> torch.Tensor:
    return pipe(class_labels=CLASS_LABELS, num_inference_steps=steps, guidance_scale=4.0, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="denoising steps")
    parser.add_argument("--pattern", default="2:4", help="2:4, 1:2, 4:8 or dense")
    parser.add_argument("--min-tokens", type=int, default=512, help="GEMMs with fewer rows stay dense")
    parser.add_argument("--dump-dir", default=None, help="write graphs and reports here")
    args = parser.parse_args(argv)

    transformer, vae, scheduler = build_components()
    options = {"pattern": args.pattern, "min_tokens": args.min_tokens, "dump_dir": args.dump_dir}
    compiled = torch.compile(transformer, backend="rtlynx", options=options)

    dense_pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)
    sparse_pipe = DiTPipeline(transformer=compiled, vae=vae, scheduler=DDIMScheduler.from_config(scheduler.config))
    for pipe in (dense_pipe, sparse_pipe):
        pipe.set_progress_bar_config(disable=True)

    with torch.no_grad():
        dense = sample(dense_pipe, args.steps)
        sparse = sample(sparse_pipe, args.steps)

    graphs = lynx_compile.reports()
    for report in graphs:
        print(report)
        print()
    print(f"compiled graphs: {len(graphs)} for {args.steps} denoising steps")
    print(f"images: {tuple(sparse.shape)}, finite: {bool(torch.isfinite(sparse).all())}")
    rel = ((sparse - dense).norm() / dense.norm()).item()
    print(f"relative L2 difference to the dense pipeline (random weights): {rel:.4f}")
    if args.dump_dir:
        print(f"graphs and report.json written to {args.dump_dir}/")


if __name__ == "__main__":
    main()
