"""The backbone pre-trained on generated classes: trained once, cached, loaded by ``model.pretrained``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import train
from engine.config import ModelConfig
from engine.model import build_model
from engine.pretrain import PretrainRecipe, backbone_file, cache_dir, synthetic_backbone
from engine.synthetic import CLASSES, PRETRAINING_CLASSES

TINY = PretrainRecipe(images=32, image_size=16, epochs=1, batch_size=8)


def test_pretraining_classes_share_no_look_with_a_protocol_class() -> None:
    protocol = {(c.shape, c.colour) for c in CLASSES}
    assert len(PRETRAINING_CLASSES) == 32
    assert not {(c.shape, c.colour) for c in PRETRAINING_CLASSES} & protocol
    assert len({c.name for c in PRETRAINING_CLASSES}) == 32
    # Every shape, colour and texture of the protocol classes is seen in pre-training.
    for attribute in ("shape", "colour", "texture"):
        assert {getattr(c, attribute) for c in CLASSES} <= {
            getattr(c, attribute) for c in PRETRAINING_CLASSES
        }


def test_backbone_is_trained_once_and_then_read_from_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = train.train_step

    def counting(**kwargs: object) -> object:
        calls.append(1)
        return real(**kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(train, "train_step", counting)
    path = synthetic_backbone("resnet18", 16, recipe=TINY, cache=tmp_path, device=torch.device("cpu"))
    assert path == backbone_file("resnet18", 16, tmp_path, TINY) and path.is_file()
    assert synthetic_backbone("resnet18", 16, recipe=TINY, cache=tmp_path) == path
    assert calls == [1]
    assert not list(path.parent.glob("*.tmp"))
    # Another recipe or stride is another file.
    assert backbone_file("resnet18", 8, tmp_path, TINY) != path


def test_model_pretrained_synthetic_loads_the_cached_backbone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CISS_CACHE_DIR", str(tmp_path))
    assert cache_dir() == tmp_path
    config = ModelConfig(backbone="resnet18", output_stride=16, pretrained="synthetic")
    donor = build_model(ModelConfig(backbone="resnet18"), [2])
    target = backbone_file("resnet18", 16, tmp_path)
    target.parent.mkdir(parents=True)
    torch.save(donor.backbone.state_dict(), target)
    model = build_model(config, [3])
    assert torch.equal(model.backbone.conv1.weight, donor.backbone.conv1.weight)  # type: ignore[union-attr]
