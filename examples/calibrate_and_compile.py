"""Calibrate RT-Lynx compensation on a diffusers DiT across denoising steps, save the plan, compile with it.

    python examples/calibrate_and_compile.py [--plan-dir lynx_plan] [--steps 10]

The DiT has random weights (nothing is downloaded), so the errors show the mechanism, not image
quality. On the CPU the reference kernels run: no speed-up is shown.
"""

import argparse

import torch
from diffusers import DiTTransformer2DModel

import lynx_compile


def build():
    torch.manual_seed(0)
    return DiTTransformer2DModel(
        num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
        sample_size=16, patch_size=2, num_embeds_ada_norm=10, norm_type="ada_norm_zero").eval()


def sample(model, labels, steps):
    """A toy Euler loop over timesteps: what calibration must see is every step's activations."""
    latents = torch.randn(len(labels), 4, 16, 16)
    for t in torch.linspace(999, 0, steps).long():
        out = model(latents, timestep=t.repeat(len(labels)), class_labels=labels, return_dict=False)[0]
        latents = latents - 0.05 * out[:, :4]
    return latents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan-dir", default="lynx_plan")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    model = build()
    cases = [torch.tensor([1, 2]), torch.tensor([3, 4])]
    calibration = lynx_compile.calibration_inputs_from_loop(lambda m, labels: sample(m, labels, args.steps), cases)
    with torch.no_grad():
        plan = lynx_compile.calibrate(model, calibration, {"rank": 16, "permutation": True, "error_budget": 0.2,
                                                           "exclude": r"emb\.|norm1\.linear", "min_tokens": 64})
    print(plan.table())
    plan.save(args.plan_dir)

    fast = torch.compile(model, backend="rtlynx", options={"plan": args.plan_dir})  # with the plan's settings
    schedule = lynx_compile.DenseSteps(args.steps, first=1)
    latents, labels = torch.randn(2, 4, 16, 16), torch.tensor([5, 6])
    with torch.no_grad():
        for i, t in enumerate(torch.linspace(999, 0, args.steps).long()):
            with schedule.step(i):
                out = fast(latents, timestep=t.repeat(2), class_labels=labels, return_dict=False)[0]
            latents = latents - 0.05 * out[:, :4]
    print()
    print(lynx_compile.reports()[-1])
    print(f"\n{len(lynx_compile.reports())} compile(s) for {args.steps} steps; plan saved to {args.plan_dir}/")


if __name__ == "__main__":
    main()
