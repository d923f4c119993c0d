"""A tiny model, its settings and a random segmentation dataset, for the training tests."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.data import Dataset

from engine.config import EngineConfig, ModelConfig, TrainConfig
from engine.model import build_model


class RandomSegmentation(Dataset):
    """Deterministic random images with labels of the given classes; accepts (index, seed) items."""

    def __init__(self, n: int, classes: list[int], size: int = 32) -> None:
        g = torch.Generator().manual_seed(1)
        self.images = torch.randn(n, 3, size, size, generator=g)
        choices = torch.tensor([0, *classes])
        self.labels = choices[torch.randint(len(choices), (n, size, size), generator=g)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = item[0] if isinstance(item, tuple) else item
        return self.images[index], self.labels[index]


def tiny_config(**train: object) -> EngineConfig:
    values = {"batch_size": 4, "crop_size": 32, "epochs_base": 2, "epochs_incremental": 2, "amp": False}
    values.update(train)
    return EngineConfig(model=ModelConfig(backbone="resnet18"), train=TrainConfig(**values))  # type: ignore[arg-type]


def base_and_student(config: EngineConfig) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    teacher = build_model(config.model, [2])
    student = copy.deepcopy(teacher)
    student.add_step(1)
    return teacher, student
