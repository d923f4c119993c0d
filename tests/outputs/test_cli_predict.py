"""`ciss predict`'s messages: skips named once, renamed duplicates, no empty folder, the --device flag."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from model_helpers import _noise, _save_model
from status_helpers import add_steps, runner

from ciss_daemon.cli import app
from ciss_daemon.service.promotion import swap_current
from ciss_daemon.workspace import Workspace, find_workspace


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    assert runner.invoke(app, ["init", str(tmp_path / "ws"), "--profile", "cpu"]).exit_code == 0
    workspace = find_workspace(tmp_path / "ws")
    add_steps(workspace, "promoted")
    _save_model(workspace.models / "v0001")
    swap_current(workspace.models, "v0001")
    return workspace


def test_duplicates_say_which_input_each_came_from_and_a_skip_names_the_file_once(
    ws: Workspace, tmp_path: Path
) -> None:
    a, b, bad = tmp_path / "a" / "x.png", tmp_path / "b" / "x.png", tmp_path / "bad.png"
    _noise(a, (20, 20), 0)
    _noise(b, (20, 20), 1)
    bad.write_bytes(b"not an image")
    out = tmp_path / "out"
    result = runner.invoke(app, ["predict", str(a), str(b), str(bad), "--out", str(out), "-w", str(ws.root)])
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        f"skipped {bad}: cannot decode the image (cannot identify image file '{bad}'); replace or remove the "
        "file",
        f"{b} is written as x-2.*: another input is also named x",
        f"2 of 3 images predicted into {out}",
    ]


def test_a_run_that_predicts_nothing_leaves_no_folder(ws: Workspace, tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    result = runner.invoke(app, ["predict", str(bad), "--out", str(tmp_path / "out"), "-w", str(ws.root)])
    assert result.output.splitlines()[-1] == "0 of 1 images predicted (nothing written)"
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_a_gpu_names_the_flag(ws: Workspace, tmp_path: Path) -> None:
    result = runner.invoke(app, ["predict", str(tmp_path), "--device", "cuda", "-w", str(ws.root)])
    assert result.output == "Error: --device cuda: no CUDA device is visible; use --device auto or cpu\n"
