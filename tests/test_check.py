"""`ciss check FOLDER`: validation without submitting, printing what REJECTED.txt would say, grouped."""

from __future__ import annotations

from pathlib import Path

import pytest
from batchmaker import make_batch, manifest_text
from typer.testing import CliRunner

from ciss_daemon.cli import app

runner = CliRunner()


def test_an_undeclared_value_in_26_masks_is_one_problem_with_a_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no workspace here
    batch = make_batch(tmp_path, "bikes", classes={1: "bicycle", 7: "scooter"}, n_train=26)
    (batch / "batch.toml").write_text(manifest_text({1: "bicycle"}))
    result = runner.invoke(app, ["check", str(batch)])
    assert result.exit_code == 1
    assert result.output == (
        "no workspace here: checking the folder alone (not against taught classes)\n"
        'Batch "bikes" would be rejected, because of 1 problem:\n'
        "\n"
        "1. masks/0000.png, masks/0001.png, masks/0002.png and 23 more (26 files): contains value 7 not "
        "declared in batch.toml [classes]\n"
        "   What to do: declare it in [classes], or set those pixels to 0 (background) or 255 (ignore)\n"
        "\n"
        "To resubmit: fix every problem above in this folder, then move the folder back into the inbox\n"
        "(or run `ciss submit` on it). You may delete this REJECTED.txt first; it is ignored either way.\n"
    )
    assert not (batch / "REJECTED.txt").exists()


def test_a_good_batch_is_checked_against_the_workspace(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    assert runner.invoke(app, ["init", str(ws), "--profile", "cpu"]).exit_code == 0
    batch = make_batch(tmp_path, "bikes", classes={1: "bicycle", 2: "scooter"}, n_train=3, n_val=1)
    result = runner.invoke(app, ["check", str(batch), "-w", str(ws)])
    assert result.exit_code == 0
    assert result.output == (
        "Batch 'bikes' would be accepted (train): 3 images, 1 held out; classes 1 = bicycle, 2 = scooter\n"
    )
    assert list((ws / "inbox").iterdir()) == [ws / "inbox" / ".staging"]  # nothing submitted
