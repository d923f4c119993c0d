"""``run_step``: one step from batch folders and a teacher directory, on a tiny model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from batchmaker import write_image, write_mask

from engine.config import EngineConfig, ModelConfig, TrainConfig
from engine.model import build_model
from engine.runner import BatchRef, StepRequest, run_step, save_trained_model


def tiny_config(setting: str) -> EngineConfig:
    train = TrainConfig(epochs_incremental=1, batch_size=2, crop_size=16, amp=False, setting=setting)
    return EngineConfig(model=ModelConfig(backbone="resnet18"), train=train)


def mixed_batch(folder: Path) -> Path:
    """Six 16x16 images: all show mask value 1; images 0 and 3 also show value 2 (a later class)."""
    for index in range(6):
        labels = np.zeros((16, 16), np.uint8)
        labels[4:10, 4:10] = 1
        if index % 3 == 0:
            labels[12:, 12:] = 2
        write_image(folder / f"images/{index:04d}.png", seed=index)
        write_mask(folder / f"masks/{index:04d}.png", labels)
    (folder / "batch.toml").write_text('[classes]\n1 = "kite"\n2 = "drone"\n')
    return folder


def kite_step(tmp_path: Path, setting: str, value_map: dict[int, int], **options: Any) -> StepRequest:
    """Step 1 (class 3, "kite") of a tiny model, from a saved random teacher of classes 1 and 2."""
    config = tiny_config(setting)
    torch.manual_seed(0)
    teacher = build_model(config.model, [2])
    save_trained_model(
        teacher, tmp_path / "teacher", config=config, class_names={1: "a", 2: "b"}, step_index=0
    )
    return StepRequest(
        step_index=1,
        step_sizes=[2, 1],
        class_names={1: "a", 2: "b", 3: "kite"},
        train_batches=[BatchRef("kites", mixed_batch(tmp_path / "kites"), value_map)],
        eval_batches=[],
        teacher_dir=tmp_path / "teacher",
        workdir=tmp_path / "job",
        output_dir=tmp_path / "model",
        config=config,
        device="cpu",
        **options,
    )


@pytest.mark.parametrize(("setting", "expected"), [("overlap", 6), ("disjoint", 4)])
def test_run_step_honours_the_disjoint_setting(tmp_path: Path, setting: str, expected: int) -> None:
    # Fully labelled data, as in a protocol run: class 3 is this step's, class 4 a future step's.
    request = kite_step(tmp_path, setting, {1: 3, 2: 4}, future_classes=[4])
    result = run_step(request)
    assert result.finished and result.train_images == expected


@pytest.mark.parametrize("keep", [True, False])
def test_a_protocol_run_drops_a_finished_steps_checkpoint(tmp_path: Path, keep: bool) -> None:
    assert run_step(kite_step(tmp_path, "overlap", {1: 3, 2: 0}, keep_checkpoint=keep)).finished
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert (tmp_path / "job" / "checkpoint.pt").is_file() == keep
