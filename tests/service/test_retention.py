"""Disk retention: `ciss prune` for models beyond the rollback depth, checkpoints beyond keep_checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select
from status_helpers import add_steps, factory_of, runner
from typer.testing import Result

from ciss_daemon.catalog import connection
from ciss_daemon.catalog.listings import model_rows
from ciss_daemon.catalog.tables import Job
from ciss_daemon.cli import app
from ciss_daemon.service.retention import prune_checkpoints
from ciss_daemon.workspace import Workspace, find_workspace

MIB = 1024**2


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    assert runner.invoke(app, ["init", str(tmp_path / "ws"), "--profile", "cpu"]).exit_code == 0
    return find_workspace(tmp_path / "ws")


def fill(path: Path, mib: int = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * (mib * MIB))


def invoke(*args: str) -> Result:
    return runner.invoke(app, list(args))


def test_prune_keeps_current_held_and_rollback_depth_and_says_what_it_freed(ws: Workspace) -> None:
    add_steps(ws, "promoted", "promoted", "promoted", "promoted", "held")
    for version in ("v0001", "v0002", "v0003", "v0004", "v0005"):
        fill(ws.models / version / "model.safetensors")
    result = invoke("prune", "--depth", "1", "-w", str(ws.root))
    assert result.output == "pruned 2 models, 2 MiB freed (v0001, v0002); `ciss models` lists what is left\n"
    assert sorted(p.name for p in ws.models.iterdir()) == ["v0003", "v0004", "v0005"]
    rows = {r["version"]: r for r in model_rows(factory_of(ws))}
    assert rows["v0001"]["pruned"] and not rows["v0001"]["rollback"] and rows["v0003"]["rollback"]
    refused = invoke("rollback", "v0001", "-w", str(ws.root))
    assert refused.output == (
        "Error: model v0001 was pruned (its folder is gone); `ciss models` lists the models you can roll "
        "back to\n"
    )
    again = invoke("prune", "--depth", "1", "-w", str(ws.root))
    assert again.output == (
        "nothing to prune: every model folder is current, waiting, or within rollback depth 1\n"
    )
    assert invoke("eval", "--model", "v0002", "-w", str(ws.root)).output == (
        "Error: model v0002 was pruned (its folder is gone); `ciss models` lists the others\n"
    )


def test_checkpoints_of_finished_jobs_go_beyond_the_newest_ones_but_held_steps_keep_theirs(
    ws: Workspace,
) -> None:
    add_steps(ws, "promoted", "promoted", "promoted", "held", "requeued")
    factory = factory_of(ws)
    with factory() as s:
        dirs = {job.step.index: Path(job.workdir) for job in s.scalars(select(Job))}
    for workdir in dirs.values():
        fill(workdir / "checkpoint.pt")
    with connection.transaction(factory) as s:
        freed = prune_checkpoints(s, keep=1)
    assert freed.words("checkpoint") == "2 checkpoints, 2 MiB freed"
    kept = sorted(i for i, d in dirs.items() if (d / "checkpoint.pt").exists())
    assert kept == [2, 3, 4]  # the newest finished one, the held step's and the queued (resumable) one
