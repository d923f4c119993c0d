"""Hostile and failing files: malicious pickles in place of checkpoints and models, a disk that fills up.

A pickle can run any code when it is loaded, so nothing loads one it did not write: checkpoints are read with
``torch.load(weights_only=True)`` (even when TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD asks otherwise) and models are
safetensors checked against their recorded hash. A full disk is simulated by raising ENOSPC from ``os`` calls,
in-process or in the training child (tests/helpers/faults): the error is recorded, the previous checkpoint and
the current model stay whole, and the daemon carries on.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from batchmaker import write_image
from daemon_helpers import (
    FAULTS_DIR,
    REPO,
    FakeClock,
    catalog_rows,
    in_process_daemon,
    integrity_problems,
    new_workspace,
    record_figure,
    settings_text,
    tiny_batch,
)
from sqlalchemy.exc import OperationalError

import ciss_daemon.service.daemon as daemon_module
from ciss_daemon.batch.inbox import submit_folder
from ciss_daemon.service import promotion
from ciss_daemon.service.jobs import Outcome, TrainingProcess
from ciss_daemon.service.protocol import JobRequest, JobResult
from ciss_daemon.settings import load_settings
from ciss_daemon.workspace import Workspace
from engine.checkpoint import META_FILE, MODEL_FILE, load_checkpoint, load_model_files
from engine.config import EngineConfig
from engine.exceptions import CheckpointError
from engine.model import build_model
from engine.runner import load_model, save_trained_model


class _Payload:
    """Unpickling this object runs code that writes ``marker``: the shape of a malicious file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def _malicious(path: Path, marker: Path) -> None:
    """A torch.save archive (what a checkpoint looks like) whose loading would write ``marker``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": _Payload(marker)}, path)


def _tiny_model(settings_config: EngineConfig, step_sizes: list[int]) -> Any:
    torch.manual_seed(0)
    return build_model(replace(settings_config.model, pretrained=None), step_sizes)


class FakeTraining:
    """Stands in for the training child: a real (untrained) candidate model is written at once."""

    def __init__(self, job_dir: Path, result: JobResult) -> None:
        self.job_dir = job_dir
        self.result = result
        self.pid = os.getpid()

    @classmethod
    def start(cls, job_dir: Path, request: JobRequest, launch: object = None) -> FakeTraining:
        config = EngineConfig.from_dict(request.config)
        model = _tiny_model(config, request.step_sizes)
        files = save_trained_model(
            model,
            job_dir / "candidate",
            config=config,
            class_names=request.class_names,
            step_index=request.step_index,
        )
        metrics = {"miou_all": 0.5, "miou_old": 0.5, "miou_new": 0.5, "hiou": 0.5, "iou": {}}
        current = metrics if request.step_index else None
        return cls(job_dir, JobResult(request.step_index, metrics, current, files, train_images=1))

    def poll(self) -> Outcome:
        return Outcome("done", result=self.result)

    def progress(self) -> dict[str, Any]:
        return {"phase": "done"}

    def stop(self, timeout: float) -> Outcome:
        return self.poll()


def _promote_fake_step(ws: Workspace, daemon: Any, clock: FakeClock, tmp_path: Path, index: int) -> None:
    submit_folder(tiny_batch(tmp_path / "data", index), ws.inbox)
    daemon._flag_rescan()  # what the watcher or the rescan timer does
    for _ in range(3):
        daemon.tick(clock.advance(1.0))
    assert catalog_rows(ws, 'SELECT state FROM steps WHERE "index" = ?', (index,)) == [("promoted",)]


# --- 8. malicious pickles -------------------------------------------------------------------------------


def test_a_malicious_checkpoint_fails_the_job_through_the_worker_without_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # inherited by the training child
    ws = new_workspace(tmp_path / "ws", settings_text(daemon__settle_seconds=0.0))
    clock = FakeClock()
    marker = tmp_path / "pwned"
    daemon = in_process_daemon(ws, clock)
    try:
        daemon.ingest(tiny_batch(ws.inbox, 0), clock.now)  # recorded, not yet started
        _malicious(ws.jobs / "1" / "checkpoint.pt", marker)  # as if the job had run and were resuming
        daemon.tick(clock.advance(1.0))
        assert daemon.process is not None
        assert daemon.process.process.wait(300) == 1
        daemon.tick(clock.advance(1.0))
        assert daemon.process is None
    finally:
        daemon.shutdown()
    assert not marker.exists()
    [(state, reason)] = catalog_rows(ws, "SELECT state, reason FROM steps")
    assert state == "failed" and "\n" not in reason
    assert "refused as unsafe" in reason and "checkpoint.pt" in reason
    assert integrity_problems(ws, at_rest=True) == []


@pytest.fixture
def poisoned_model(tmp_path: Path) -> tuple[Workspace, Path]:
    """A workspace whose current model's weights were replaced by a malicious pickle (hash updated too)."""
    ws = new_workspace(tmp_path / "ws", settings_text())
    config = load_settings(ws.settings_path).engine
    save_trained_model(
        _tiny_model(config, [1]), ws.models / "v0001", config=config, class_names={1: "c0"}, step_index=0
    )
    promotion.swap_current(ws.models, "v0001")
    marker = tmp_path / "pwned"
    weights = ws.current / MODEL_FILE
    _malicious(weights, marker)
    meta = json.loads((ws.current / META_FILE).read_text())
    meta["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()  # a careful attacker
    (ws.current / META_FILE).write_text(json.dumps(meta))
    return ws, marker


def test_a_malicious_model_file_is_refused_by_load_model(
    poisoned_model: tuple[Workspace, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    ws, marker = poisoned_model
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(CheckpointError) as caught:
        load_model(promotion.resolve_current(ws.models))
    assert "is corrupt" in str(caught.value) and "\n" not in str(caught.value)
    assert not marker.exists()


def test_ciss_predict_refuses_a_malicious_model_file_with_one_line(
    poisoned_model: tuple[Workspace, Path], tmp_path: Path
) -> None:
    ws, marker = poisoned_model
    write_image(tmp_path / "photo.png", (32, 32))
    result = subprocess.run(
        [sys.executable, "-m", "ciss_daemon.cli", "predict", str(tmp_path / "photo.png")]
        + ["--out", str(tmp_path / "out"), "--device", "cpu", "--workspace", str(ws.root)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"},
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and MODEL_FILE in lines[0], result.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_imagenet_weights_in_the_hub_cache_are_loaded_weights_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchvision.models import ResNet18_Weights

    from engine.config import ModelConfig

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    marker = tmp_path / "pwned"
    cached = tmp_path / "torch" / "hub" / "checkpoints" / Path(ResNet18_Weights.IMAGENET1K_V1.url).name
    _malicious(cached, marker)  # a file in the cache is loaded without its hash being checked again
    with pytest.raises(CheckpointError) as caught:
        build_model(ModelConfig(backbone="resnet18", pretrained="imagenet"), [1])
    assert "torch hub cache" in str(caught.value)
    assert not marker.exists()


# --- 9. a full disk -------------------------------------------------------------------------------------


def _enospc(*args: Any, **kwargs: Any) -> Any:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


FULL_DISK_MOMENTS = {
    # The pointer's temporary link cannot be created: nothing has changed yet.
    "symlink": lambda mp: mp.setattr(promotion.os, "symlink", _enospc),
    # The pointer was swapped but the folder's fsync fails: the pointer is ahead of the catalog.
    "fsync-after-swap": lambda mp: mp.setattr(promotion, "fsync_dir", _enospc),
    # Everything on disk is done but the catalog cannot commit ("database or disk is full").
    "commit": lambda mp: mp.setattr(
        daemon_module.catalog,
        "log_event",
        lambda **kw: (_ for _ in ()).throw(
            OperationalError("INSERT", {}, Exception("database or disk is full"))
        ),
    ),
}


@pytest.mark.parametrize("moment", sorted(FULL_DISK_MOMENTS))
def test_a_full_disk_during_a_promotion_keeps_the_current_model_and_promotes_once_space_is_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, moment: str
) -> None:
    monkeypatch.setattr(daemon_module, "TrainingProcess", FakeTraining)
    ws = new_workspace(tmp_path / "ws", settings_text(daemon__settle_seconds=0.0))
    clock = FakeClock()
    daemon = in_process_daemon(ws, clock)
    try:
        _promote_fake_step(ws, daemon, clock, tmp_path, 0)
        before = load_model_files(ws.current)
        submit_folder(tiny_batch(tmp_path / "data", 1), ws.inbox)
        daemon._flag_rescan()
        daemon.tick(clock.advance(1.0))  # accepted and started
        with monkeypatch.context() as full:
            FULL_DISK_MOMENTS[moment](full)
            daemon.tick(clock.advance(1.0))  # the promotion fails; the iteration does not
        assert os.readlink(ws.current) == "v0001"
        state, meta = load_model_files(promotion.resolve_current(ws.models))
        assert meta == before[1] and all(torch.equal(state[k], before[0][k]) for k in state)
        assert catalog_rows(ws, "SELECT state FROM jobs ORDER BY id") == [("done",), ("running",)]
        errors = [m for (m,) in catalog_rows(ws, "SELECT message FROM events WHERE level = 'error'")]
        if moment != "commit":  # a catalog that cannot commit cannot record the error either: it is logged
            assert len(errors) == 1 and "No space left on device" in errors[0], errors
        assert integrity_problems(ws, at_rest=True) == []
        # The daemon goes on: it ingests meanwhile, and tries the promotion again later, once.
        submit_folder(tiny_batch(tmp_path / "data", 2, kind="eval", n_train=1, n_val=0), ws.inbox)
        daemon._flag_rescan()
        daemon.tick(clock.advance(1.0))
        assert catalog_rows(ws, "SELECT name FROM batches WHERE kind = 'eval'") == [("b002",)]
        daemon.tick(clock.advance(daemon_module.OUTCOME_RETRY_SECONDS))
        assert daemon.process is None
    finally:
        daemon.shutdown()
    assert os.readlink(ws.current) == "v0002"
    assert catalog_rows(ws, "SELECT version, state FROM model_versions ORDER BY id") == [
        ("v0001", "retired"),
        ("v0002", "promoted"),
    ]
    assert integrity_problems(ws, at_rest=True) == []
    record_figure("disk_full_promotion", moment=moment, survived=True)


def test_a_full_disk_during_a_checkpoint_fails_the_step_and_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = settings_text(
        daemon__settle_seconds=0.0,
        train__epochs_incremental=1,
        train__batch_size=2,
        train__checkpoint_every=2,
    )
    ws = new_workspace(tmp_path / "ws", text)
    clock = FakeClock()
    daemon = in_process_daemon(ws, clock)
    try:
        with monkeypatch.context() as fake:
            fake.setattr(daemon_module, "TrainingProcess", FakeTraining)
            _promote_fake_step(ws, daemon, clock, tmp_path, 0)  # a current model, to train step 1 from
        current = load_model_files(ws.current)
        # The training child: its first checkpoint (iteration 2) is written, the next meets a full disk.
        rule = {"op": "fsync", "match": r"\.checkpoint\.pt\..*\.tmp$", "action": "enospc", "skip": 1}
        monkeypatch.setenv("CISS_FAULTS", json.dumps([rule]))
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(FAULTS_DIR), str(REPO)]))
        assert daemon_module.TrainingProcess is TrainingProcess
        submit_folder(tiny_batch(tmp_path / "data", 1), ws.inbox)
        daemon._flag_rescan()
        daemon.tick(clock.advance(1.0))
        assert daemon.process is not None
        assert daemon.process.process.wait(300) == 1
        daemon.tick(clock.advance(1.0))
        # Carries on: a new batch is still accepted.
        submit_folder(tiny_batch(tmp_path / "data", 2, kind="eval", n_train=1, n_val=0), ws.inbox)
        daemon._flag_rescan()
        daemon.tick(clock.advance(1.0))
    finally:
        daemon.shutdown()
    [(state, reason)] = catalog_rows(ws, 'SELECT state, reason FROM steps WHERE "index" = 1')
    assert state == "failed" and "No space left on device" in reason and "checkpoint" in reason, reason
    job_dir = ws.jobs / "2"
    assert load_checkpoint(job_dir / "checkpoint.pt")["position"]["iteration"] == 2  # the previous one, whole
    assert not list(job_dir.glob(".*.tmp"))
    assert os.readlink(ws.current) == "v0001"
    state_dict, meta = load_model_files(ws.current)
    assert meta == current[1] and all(torch.equal(state_dict[k], current[0][k]) for k in state_dict)
    assert catalog_rows(ws, "SELECT name FROM batches WHERE kind = 'eval'") == [("b002",)]
    assert integrity_problems(ws, at_rest=True) == []
    record_figure("disk_full_checkpoint", survived=True)


def test_a_full_disk_while_writing_progress_does_not_stop_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from ciss_daemon.service.protocol import PROGRESS
    from ciss_daemon.service.worker import ProgressWriter

    writer = ProgressWriter(tmp_path / PROGRESS)
    writer.phase("starting")
    real_fsync = os.fsync

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with caplog.at_level("WARNING", logger="ciss.worker"):
        writer.phase("training", iteration=1)
        writer.phase("training", iteration=2)
    assert [r.getMessage().count("No space left") for r in caplog.records] == [1]  # said once
    assert json.loads((tmp_path / PROGRESS).read_text())["phase"] == "starting"  # the last whole one
    assert not list(tmp_path.glob(".*.tmp"))
    monkeypatch.setattr(os, "fsync", real_fsync)
    writer.phase("training", iteration=3)
    assert json.loads((tmp_path / PROGRESS).read_text())["iteration"] == 3
