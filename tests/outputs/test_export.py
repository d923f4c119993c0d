"""`ciss export`: TorchScript and ONNX files answer like the model itself and carry the class names."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch

from ciss_daemon.outputs.export import METADATA_KEY, ExportError, export_format, export_model
from ciss_daemon.outputs.predict import palette
from engine.config import EngineConfig, ModelConfig
from engine.evaluate import predict_labels
from engine.model import DKDSegmenter, upsample
from engine.runner import save_trained_model

NAMES = {1: "cat", 2: "bicycle"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[DKDSegmenter, Path]:
    """A resnet18 segmenter whose classifier is scaled up so that its labels mix 0, 1 and 2.

    The bias shifts both logits (about +-17 here) so that some pixels have neither class above 0.5.
    """
    torch.manual_seed(0)
    config = EngineConfig(model=ModelConfig(backbone="resnet18"))
    model = DKDSegmenter(config.model, [2]).eval()
    with torch.no_grad():
        model.classifiers[0].weight.normal_(0.0, 1.0)
        model.classifiers[0].bias.fill_(-20.0)
    directory = tmp_path_factory.mktemp("export") / "model"
    save_trained_model(model, directory, config=config, class_names=NAMES, step_index=0)
    return model, directory


@pytest.fixture(scope="module")
def images_and_expected(saved: tuple[DKDSegmenter, Path]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of another size than the one traced, and the model's own labels and probabilities."""
    model, _ = saved
    images = torch.randn(2, 3, 48, 80, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = upsample(model(images).logits, (48, 80))  # (2, 3, 48, 80)
    labels = predict_labels(logits)
    assert set(labels.unique().tolist()) == {0, 1, 2}  # otherwise equality below would prove little
    return images, labels, torch.sigmoid(logits[:, 1:])


@pytest.fixture(scope="module")
def torchscript_file(saved: tuple[DKDSegmenter, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("torchscript")
    out = export_model(saved[1], folder / "model.pt", "torchscript")
    assert out == folder / "model.pt"
    assert [p.name for p in folder.iterdir()] == ["model.pt"]  # no partial file left behind
    return out


def _check_metadata(document: str) -> None:
    metadata = json.loads(document)
    assert metadata["classes"] == [
        {"id": 0, "name": "background"},
        {"id": 1, "name": "cat"},
        {"id": 2, "name": "bicycle"},
    ]
    assert metadata["palette"] == palette(2).tolist()
    assert metadata["mean"] == pytest.approx([0.485, 0.456, 0.406])


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_answers_like_the_model(torchscript_file: Path, images_and_expected) -> None:
    images, labels, probs = images_and_expected
    extra = {METADATA_KEY: ""}
    loaded = torch.jit.load(str(torchscript_file), _extra_files=extra)
    got_labels, got_probs = loaded(images)
    assert got_labels.dtype == torch.int64 and got_labels.shape == (2, 48, 80)
    assert torch.equal(got_labels, labels)
    torch.testing.assert_close(got_probs, probs)
    _check_metadata(extra[METADATA_KEY])


def test_torchscript_loads_without_this_package(torchscript_file: Path, tmp_path: Path) -> None:
    consumer = (
        "import sys, torch\n"
        f"labels, probs = torch.jit.load({str(torchscript_file)!r})(torch.zeros(1, 3, 33, 47))\n"
        "assert not {'ciss_daemon', 'engine'} & set(sys.modules), 'the file imported ciss'\n"
        "print(tuple(labels.shape), tuple(probs.shape))\n"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-c", consumer], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(1, 33, 47) (1, 2, 33, 47)"


def test_onnx_answers_like_the_model(saved, images_and_expected, tmp_path: Path) -> None:
    _, directory = saved
    images, labels, probs = images_and_expected
    out = export_model(directory, tmp_path / "model.onnx", "onnx")

    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    got_labels, got_probs = session.run(["labels", "probs"], {"images": images.numpy()})
    assert got_labels.dtype == np.int64 and got_labels.shape == (2, 48, 80)
    np.testing.assert_array_equal(got_labels, labels.numpy())
    np.testing.assert_allclose(got_probs, probs.numpy(), rtol=1e-4, atol=1e-5)
    _check_metadata(session.get_modelmeta().custom_metadata_map[METADATA_KEY])


def test_unknown_format_is_refused(saved, tmp_path: Path) -> None:
    _, directory = saved
    with pytest.raises(ExportError, match=r"^unknown export format 'tflite'; use one of: torchscript, onnx$"):
        export_model(directory, tmp_path / "model.tflite", "tflite")


def test_missing_output_folder_is_refused(saved, tmp_path: Path) -> None:
    _, directory = saved
    with pytest.raises(ExportError, match=r"folder .*nowhere does not exist; create it first"):
        export_model(directory, tmp_path / "nowhere" / "model.pt", "torchscript")


def test_the_format_comes_from_the_extension_and_a_mismatch_is_refused(tmp_path: Path) -> None:
    assert export_format(tmp_path / "model.onnx", None) == "onnx"
    assert export_format(tmp_path / "model.PT", None) == "torchscript"
    assert export_format(tmp_path / "model.bin", "onnx") == "onnx"
    with pytest.raises(ExportError) as mismatch:
        export_format(tmp_path / "model.pt", "onnx")
    assert str(mismatch.value) == (
        "model.pt names a torchscript file but --format is onnx; name it model.onnx or leave --format out"
    )
    with pytest.raises(ExportError) as unknown:
        export_format(tmp_path / "model.bin", None)
    assert str(unknown.value) == (
        "cannot tell the format from the name model.bin; end it in .onnx or .pt, or pass --format"
    )
