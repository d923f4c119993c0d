"""Noise images and a saved tiny model that favours one class, for the prediction and evaluation tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from engine.config import EngineConfig, ModelConfig
from engine.model import DKDSegmenter
from engine.runner import save_trained_model

NAMES = {1: "cat", 2: "bicycle"}


def _noise(path: Path, size: tuple[int, int], seed: int) -> Image.Image:
    width, height = size
    image = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return image


def _save_model(directory: Path, *, favour: int | None = None) -> DKDSegmenter:
    """A random resnet18 segmenter of classes 1 and 2; ``favour`` makes that class win every pixel."""
    torch.manual_seed(0)
    config = EngineConfig(model=ModelConfig(backbone="resnet18"))
    model = DKDSegmenter(config.model, [2]).eval()
    if favour is not None:
        with torch.no_grad():
            model.classifiers[0].bias.copy_(torch.tensor([-50.0, -50.0]))
            model.classifiers[0].bias[favour - 1] = 50.0
    save_trained_model(model, directory, config=config, class_names=NAMES, step_index=0)
    return model
