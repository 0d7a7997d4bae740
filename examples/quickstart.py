"""Compile a small random-weight diffusers DiT with the rtlynx backend and show what it rewrote.

    python examples/quickstart.py [--pattern 2:4] [--dump-dir lynx_dump]

On the CPU this runs the reference kernels: it shows the rewrite and the numerics, not the GPU
speed-up.
"""

import argparse
import logging

import torch
from diffusers import DiTTransformer2DModel

import lynx_compile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pattern", default="2:4", help="2:4, 1:2, 4:8 or dense")
    parser.add_argument("--dump-dir", default="lynx_dump", help="where graphs and reports are written")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    torch.manual_seed(0)
    model = DiTTransformer2DModel(
        num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
        sample_size=32, patch_size=2, num_embeds_ada_norm=10, norm_type="ada_norm_zero").eval()
    inputs = dict(hidden_states=torch.randn(2, 4, 32, 32), timestep=torch.tensor([10, 500]),
                  class_labels=torch.tensor([1, 2]), return_dict=False)

    # 2 images x 256 patches = 512 tokens per block linear: the default min_tokens lets them through.
    fast = torch.compile(model, backend="rtlynx", options={"pattern": args.pattern, "dump_dir": args.dump_dir})
    with torch.no_grad():
        dense = model(**inputs)[0]
        sparse = fast(**inputs)[0]

    print(lynx_compile.reports()[-1])
    rel = ((sparse - dense).norm() / dense.norm()).item()
    print(f"\nrelative L2 difference to the dense model (random weights): {rel:.4f}")
    print(f"graphs and report.json written to {args.dump_dir}/")


if __name__ == "__main__":
    main()
