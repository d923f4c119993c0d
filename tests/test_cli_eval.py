"""`ciss eval`: which model, on how many images, and any batch folder with --folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from batchmaker import make_batch
from model_helpers import _save_model
from status_helpers import add_steps, runner

from ciss_daemon.cli import app
from ciss_daemon.workspace import Workspace, find_workspace


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    assert runner.invoke(app, ["init", str(tmp_path / "ws"), "--profile", "cpu"]).exit_code == 0
    workspace = find_workspace(tmp_path / "ws")
    add_steps(workspace, "promoted")
    _save_model(workspace.models / "v0001", favour=1)  # classes cat, bicycle; cat wins every pixel
    return workspace


def test_eval_on_a_folder_names_the_model_and_the_images(ws: Workspace, tmp_path: Path) -> None:
    # "dog" is unknown to the model: its pixels are ignored, not counted as background.
    folder = make_batch(tmp_path, "pets", classes={1: "cat", 2: "dog"}, n_train=3, kind="eval", size=(32, 32))
    result = runner.invoke(
        app, ["eval", "--model", "v0001", "--folder", str(folder), "--json", "-w", str(ws.root)]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert (data["model"], data["images"], data["sets"]) == ("v0001", 3, {"pets": 3})
    assert data["iou"]["1"] > 0 and data["iou"]["0"] == 0.0
    table = runner.invoke(app, ["eval", "--model", "v0001", "--folder", str(folder), "-w", str(ws.root)])
    assert table.output.splitlines()[0] == "v0001 on 3 images: pets (3)"


def test_eval_on_a_training_folder_without_held_out_images_says_what_to_do(
    ws: Workspace, tmp_path: Path
) -> None:
    folder = make_batch(tmp_path, "bikes", classes={1: "bicycle"}, n_train=2)
    result = runner.invoke(app, ["eval", "--model", "v0001", "--folder", str(folder), "-w", str(ws.root)])
    assert result.exit_code == 1
    assert result.output == (
        f"Error: no held-out images in batch {folder}: a training batch is evaluated on its val/ folder; "
        'add one, or mark a fully labelled folder kind = "eval" in batch.toml\n'
    )
