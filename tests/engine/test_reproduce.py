"""The one-command reproduction, end to end on tiny VOC- and ADE20K-format trees made here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ciss_daemon.cli import app
from engine.exceptions import ConfigError
from engine.reproduce import Run, load_config, main, reproduce

TINY = """
[model]
backbone = "resnet18"
pretrained = "none"

[train]
epochs_base = 1
epochs_incremental = 1
batch_size = 2
crop_size = 32
amp = false
"""


def blocks(classes: list[int], size: int = 32) -> np.ndarray:
    """A (size, size) label map with one square block per class (4x4 grid), background elsewhere."""
    labels = np.zeros((size, size), np.uint8)
    cell = size // 8
    for index, value in enumerate(classes[:16]):
        row, col = divmod(index, 4)
        labels[2 * row * cell : (2 * row + 1) * cell, 2 * col * cell : (2 * col + 1) * cell] = value
    return labels


def write(image: Path, mask: Path, labels: np.ndarray, seed: int) -> None:
    rng = np.random.default_rng(seed)
    image.parent.mkdir(parents=True, exist_ok=True)
    mask.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (*labels.shape, 3), dtype=np.uint8)).save(image)
    Image.fromarray(labels).save(mask)


def voc_tree(root: Path) -> Path:
    """VOCdevkit/VOC2012 with 6 training and 3 validation images covering the 20 classes."""
    ids = {"train": [f"t{i}" for i in range(6)], "val": [f"v{i}" for i in range(3)]}
    for split, stems in ids.items():
        for i, stem in enumerate(stems):
            classes = [1 + (i * 4 + k) % 20 for k in range(7)]
            write(
                root / "JPEGImages" / f"{stem}.jpg",
                root / "SegmentationClassAug" / f"{stem}.png",
                blocks(classes),
                i,
            )
        lists = root / "ImageSets" / "Segmentation"
        lists.mkdir(parents=True, exist_ok=True)
        (lists / ("train_aug.txt" if split == "train" else "val.txt")).write_text("\n".join(stems) + "\n")
    return root


def ade_tree(root: Path) -> Path:
    """ADEChallengeData2016 with 4 training and 2 validation images; steps 50-50 each see their classes."""
    for split, count in (("training", 4), ("validation", 2)):
        for i in range(count):
            classes = [1 + (i * 37 + k * 10) % 150 for k in range(15)]
            stem = f"ADE_{split}_{i}"
            write(
                root / "images" / split / f"{stem}.jpg",
                root / "annotations" / split / f"{stem}.png",
                blocks(classes),
                i,
            )
    return root


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


def test_voc_protocol_runs_every_method_writes_the_table_and_resumes(
    tmp_path: Path, tiny_config: Path
) -> None:
    root = voc_tree(tmp_path / "VOC2012")
    out = tmp_path / "out"
    main(["voc", "--protocol", "19-1", "--root", str(root), "--out", str(out), "--config", str(tiny_config),
          "--eval-crop", "32", "--memory", "--device", "cpu"])  # fmt: skip
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["results"]) == {"dkd", "dkd_m", "finetune", "joint"}
    assert [len(v) for v in summary["results"].values()] == [2, 2, 2, 1]
    assert summary["published"]["dkd"] == [76.13, 56.95]
    table = (out / "results.md").read_text()
    assert "| DKD | " in table and "| 76.13 | 56.95 |" in table and "| DKD-M | " in table
    assert (out / "miou.png").stat().st_size > 1000
    # The base step is shared; every step saved a model.
    assert (
        not (out / "dkd" / "step-00").exists()
        and (out / "base" / "step-00" / "model" / "model.json").is_file()
    )
    # Resume: a removed step is trained again, the others are read back.
    model_json = out / "dkd" / "step-01" / "model" / "model.json"
    kept = (out / "finetune" / "step-01" / "model" / "model.json").stat().st_mtime_ns
    model_json.unlink()
    reproduce(Run("voc", "19-1", root, out, load_config("voc", tiny_config), ("dkd", "finetune"), 32, "cpu"))
    assert model_json.is_file()
    assert (out / "finetune" / "step-01" / "model" / "model.json").stat().st_mtime_ns == kept


def test_ade_protocol_runs_three_steps(tmp_path: Path, tiny_config: Path) -> None:
    root = ade_tree(tmp_path / "ADEChallengeData2016")
    out = tmp_path / "out"
    config = load_config("ade", tiny_config)
    assert config.train.warmup_fraction_base == config.train.warmup_fraction_incremental == 0.2
    assert config.loss.pos_weight_incremental == 35.0
    results = reproduce(Run("ade", "50-50", root, out, config, ("dkd",), 32, "cpu"))
    assert len(results["dkd"]) == 3
    last = results["dkd"][-1]
    assert last.paper is not None and set(last.iou) == set(range(151))


def test_bad_config_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[optimiser]\nlr = 1\n")
    with pytest.raises(ConfigError, match=r"bad.toml: unknown table \[optimiser\]; allowed: \[model\]"):
        load_config("voc", path)


@pytest.mark.parametrize("route", ["ciss", "module"])
def test_a_diverging_step_ends_the_command_with_one_line(tmp_path: Path, route: str) -> None:
    root = voc_tree(tmp_path / "VOC2012")
    config = tmp_path / "diverging.toml"
    config.write_text(TINY.replace("[train]\n", "[train]\nlr_base = 1e30\n"))
    args = ["voc", "--protocol", "19-1", "--root", str(root), "--out", str(tmp_path / "out"),
            "--config", str(config), "--eval-crop", "32", "--device", "cpu"]  # fmt: skip
    if route == "ciss":
        result = CliRunner().invoke(app, ["experiment", *args])
        assert result.exit_code == 1, result.output
        message = result.output.strip()  # a progress bar that never drew leaves an empty line
    else:
        with pytest.raises(SystemExit) as stopped:
            main(args)
        message = str(stopped.value.code)
    assert message.startswith("Error: step 0: the loss became") and "Traceback" not in message
    assert message.endswith("lower train.lr_base (now 1e+30)") and "\n" not in message
