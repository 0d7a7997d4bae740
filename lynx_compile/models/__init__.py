"""The trained tiny MNIST DiT and its digit classifier, shipped with the package (see weights/MODEL_CARD.md)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from .digit_classifier import DigitClassifier
from .tiny_dit import TinyDiT, TinyDiTConfig, calibration_run, sample

WEIGHTS_DIR = Path(__file__).parent / "weights"
# file names inside a weights folder (written by examples/train_tiny_dit.py)
DIT_FILE = "tiny_dit_mnist.safetensors"
EVAL_FILE = "tiny_dit_mnist_eval.safetensors"
RECORD_FILE = "tiny_dit_mnist.json"


def _require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; it ships with lynx-compile, or run examples/train_tiny_dit.py to rebuild it")
    return path


def load_tiny_dit(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                  folder: str | Path = WEIGHTS_DIR) -> TinyDiT:
    """The EMA weights of the trained DiT (stored in fp16, upcast here), in eval mode."""
    folder = Path(folder)
    record = training_record(folder)
    model = TinyDiT(TinyDiTConfig(**record["dit_config"]))
    model.load_state_dict({k: v.float() for k, v in load_file(_require(folder / DIT_FILE)).items()})
    return model.eval().requires_grad_(False).to(device=device, dtype=dtype)


def load_evaluation(folder: str | Path = WEIGHTS_DIR) -> tuple[DigitClassifier, dict[str, torch.Tensor]]:
    """The digit classifier and the tensors the quality metrics compare against (held-out features, ...)."""
    tensors = load_file(_require(Path(folder) / EVAL_FILE))
    classifier = DigitClassifier()
    classifier.load_state_dict({k.removeprefix("classifier."): v for k, v in tensors.items() if k.startswith("classifier.")})
    rest = {k: v for k, v in tensors.items() if not k.startswith("classifier.")}
    return classifier.eval().requires_grad_(False), rest


def training_record(folder: str | Path = WEIGHTS_DIR) -> dict:
    """The training script's record: command, seed, data, timings and the sample accuracy over training."""
    return json.loads(_require(Path(folder) / RECORD_FILE).read_text())


def reference_forward_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fixed (x, t, y) whose dense output the training script records, so tests can check the weights load."""
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(4, 1, 28, 28, generator=generator)
    return x, torch.tensor([0.9, 0.6, 0.3, 0.1]), torch.tensor([3, 7, 10, 1])


__all__ = ["TinyDiT", "TinyDiTConfig", "DigitClassifier", "sample", "calibration_run", "load_tiny_dit", "load_evaluation",
           "training_record", "reference_forward_inputs", "WEIGHTS_DIR", "DIT_FILE", "EVAL_FILE", "RECORD_FILE"]
