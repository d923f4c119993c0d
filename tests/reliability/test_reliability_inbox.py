"""Reliability of the inbox: bursts of folders, slow copies, lost watcher events, a failed step's batch
handed in again. Hostile and broken batches are in test_reliability_hostile.py.

Most tests drive the ``Daemon`` in-process with a clock moved by hand (``tick(now)``), so that settling is
deterministic and nothing sleeps; one test runs the real ``ciss daemon`` through a burst. Training never
starts: the training window "0 0 29 2 *" opens only at midnight on 29 February.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import (
    DaemonProcess,
    FakeClock,
    catalog_rows,
    in_process_daemon,
    inbox_names,
    integrity_problems,
    record_figure,
    tiny_batch,
    wait_for,
)
from inbox_helpers import SETTLE, accepted_names, never_training_workspace, rejections, settle

from ciss_daemon.batch.inbox import REJECTION_REPORT, submit_folder
from ciss_daemon.service.training import fail_job
from ciss_daemon.workspace import Workspace


def test_a_failed_steps_batch_can_be_submitted_again(daemon, ws: Workspace, clock: FakeClock) -> None:
    from sqlalchemy import select

    from ciss_daemon.catalog import records as catalog
    from ciss_daemon.catalog.tables import Job

    source = tiny_batch(ws.root / "kept", 0, kind="train", n_train=2, n_val=1)
    submit_folder(source, ws.inbox)
    settle(daemon, clock)
    shutil.copytree(source, ws.inbox / "again")  # while its step waits: the same data twice is refused
    settle(daemon, clock)
    assert accepted_names(ws) == ["b000"]
    assert any("identical to a batch accepted before" in r for r in rejections(ws)["again"])

    with daemon.session() as s:  # the step fails for good (e.g. its attempts ran out on a full disk)
        job = s.scalar(select(Job))
        catalog.start_job(session=s, job=job, pid=1)
        fail_job(s, job, "disk full", now=clock.now)
    submit_folder(source, ws.inbox)
    settle(daemon, clock)
    assert accepted_names(ws) == ["b000", "b000"]
    steps = catalog_rows(ws, 'SELECT "index", state FROM steps ORDER BY "index"')
    assert steps == [(0, "failed"), (1, "queued")]
    assert catalog_rows(ws, "SELECT id, name, step_id FROM classes") == [(1, "c0", 2)]


# --- 6. bursts ---------------------------------------------------------------------------------------------


def test_the_training_window_never_opens_so_nothing_trains(daemon, clock: FakeClock) -> None:
    for hours in range(0, 24 * 400, 37):  # over a year, at many hours of the day
        assert not daemon.window_open(clock.now + dt.timedelta(hours=hours))
    leap = dt.datetime(2028, 2, 29, tzinfo=dt.UTC)
    assert daemon.window_open(leap) and not daemon.window_open(leap + dt.timedelta(minutes=1))


def test_a_burst_of_200_folders_is_ingested_once_each_and_never_early(
    ws: Workspace, clock: FakeClock, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"  # same file system as the inbox, so a move is one rename
    outside.mkdir()
    kinds = {i: ("train" if i % 4 == 0 else "eval") for i in range(200)}

    def build(i: int, parent: Path) -> Path:
        return tiny_batch(parent, i, kind=kinds[i], n_train=1, n_val=0)

    # 1. Dropped while the daemon is down (found by the start-up scan).
    down = list(range(0, 50))
    for i in down:
        build(i, ws.inbox)
    daemon = in_process_daemon(ws, clock)
    try:
        daemon.tick(clock.now)
        assert accepted_names(ws) == []  # seen for the first time: not settled yet
        settle(daemon, clock)
        assert sorted(accepted_names(ws)) == [f"b{i:03d}" for i in down]

        # 2. Moved in whole (one rename each), and handed in by `ciss submit` (no need to settle).
        moved = [build(i, outside) for i in range(50, 110)]
        _move_and_submit(daemon, clock, ws, moved, [build(i, outside) for i in range(110, 130)])
        # 3. Copied slowly, file by file, some with batch.toml first: never ingested before complete.
        _copy_file_by_file(daemon, clock, ws, {i: build(i, outside) for i in range(130, 200)})
    finally:
        daemon.shutdown()

    names = accepted_names(ws)
    assert sorted(names) == [f"b{i:03d}" for i in range(200)]  # each exactly once
    assert rejections(ws) == {}
    assert inbox_names(ws) == []
    assert len(list(ws.archive.iterdir())) == 200 and len(list(ws.store.iterdir())) == 200
    n_train = dict(catalog_rows(ws, "SELECT name, n_train FROM batches"))
    assert set(n_train.values()) == {1}  # every batch recorded whole
    # 50 training batches are 50 queued steps; the shut window kept every one from starting.
    assert catalog_rows(ws, "SELECT state, count(*) FROM steps GROUP BY state") == [("queued", 50)]
    assert catalog_rows(ws, "SELECT count(*) FROM jobs WHERE attempts > 0") == [(0,)]
    assert integrity_problems(ws, at_rest=True) == []
    record_figure("burst_in_process", folders=200, ingested_once=len(names), early=0)


def _move_and_submit(
    daemon: Any, clock: FakeClock, ws: Workspace, moved: list[Path], submitted: list[Path]
) -> None:
    """``moved`` renamed into the inbox and ``submitted`` handed in by ``ciss submit``: the submitted ones
    are ingested at the next rescan without settling, then the moved ones settle."""
    for folder in moved:
        os.rename(folder, ws.inbox / folder.name)
    for folder in submitted:
        submit_folder(folder, ws.inbox)
    daemon._flag_rescan()  # the periodic rescan (no watcher here)
    daemon.tick(clock.now)
    assert set(accepted_names(ws)) >= {folder.name for folder in submitted}
    settle(daemon, clock)


def _copy_file_by_file(daemon: Any, clock: FakeClock, ws: Workspace, sources: dict[int, Path]) -> None:
    """Batch ``i`` copied from ``sources[i]`` one file per tick, batch.toml first for even ``i`` and last for
    odd ones; no batch may be ingested before its last file has landed."""
    plans = {}
    for i in sources:
        files = sorted(p.relative_to(sources[i]) for p in sources[i].rglob("*") if p.is_file())
        manifest_first = i % 2 == 0
        files.sort(key=lambda rel: (rel.name != "batch.toml") if manifest_first else rel.name == "batch.toml")
        plans[i] = files
    pending = dict(plans)
    daemon._flag_rescan()
    while pending:
        for i, files in list(pending.items()):
            rel = files[0]
            target = ws.inbox / f"b{i:03d}" / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(sources[i] / rel, target)
            pending[i] = files[1:]
            if not pending[i]:
                del pending[i]
        clock.advance(SETTLE / 3)  # the next file lands well within the settle time
        daemon.tick(clock.now)
        early = set(accepted_names(ws)) & {f"b{i:03d}" for i in pending}
        assert not early, f"ingested before complete: {early}"
    settle(daemon, clock)


@pytest.mark.parametrize("watch", [False, True])
def test_a_lost_watcher_event_is_covered_by_the_rescan(ws: Workspace, clock: FakeClock, watch: bool) -> None:
    daemon = in_process_daemon(ws, clock, watch=watch)
    try:
        settle(daemon, clock)  # the start-up scan, on an empty inbox
        tiny_batch(ws.inbox, 7, kind="eval", n_train=1, n_val=0)
        if daemon.watcher is not None:
            wait_for(daemon.watcher.changed.is_set, "the watcher's event", timeout=10)
            # Every event from now on is lost: the watcher keeps signalling an Event nobody reads.
            daemon.watcher.changed = threading.Event()
        for _ in range(5):
            clock.advance(SETTLE)
            daemon.tick(clock.now)
        assert accepted_names(ws) == []  # nothing told the daemon
        daemon._flag_rescan()  # what the rescan timer does every rescan_seconds
        settle(daemon, clock)
        assert accepted_names(ws) == ["b007"]
    finally:
        daemon.shutdown()


@pytest.mark.slow
def test_a_real_daemon_takes_a_burst_of_folders_in_every_way(tmp_path: Path) -> None:
    count = 200
    ws = never_training_workspace(tmp_path / "ws", daemon__settle_seconds=1.5, daemon__rescan_seconds=2.0)
    outside = tmp_path / "outside"
    outside.mkdir()
    third = count // 3
    for i in range(third):  # dropped while no daemon runs
        tiny_batch(ws.inbox, i, kind="eval", n_train=2, n_val=0)
    sources = [tiny_batch(outside, i, kind="eval", n_train=2, n_val=0) for i in range(third, count)]
    hostile = _three_hostile_folders(ws, outside)
    daemon = DaemonProcess(ws)
    try:
        moved, slow = sources[: len(sources) // 2], sources[len(sources) // 2 :]
        copier = threading.Thread(target=_copy_slowly, args=(slow, ws.inbox))
        copier.start()
        for folder in moved:
            os.rename(folder, ws.inbox / folder.name)
        copier.join()
        wait_for(lambda: len(accepted_names(ws)) >= count, f"{count} batches", timeout=300)
        for name in ("dup", "trunc", b"bad-\xff"):  # dropped last, so the duplicate comes after b000
            raw = name if isinstance(name, bytes) else name.encode()
            os.rename(os.fsencode(outside) + b"/" + raw, os.fsencode(ws.inbox) + b"/" + raw)
        wait_for(lambda: len(rejections(ws)) >= len(hostile), "the hostile folders", timeout=120)
        time.sleep(2 * 2.0)  # two more rescans: nothing may be ingested twice
    finally:
        assert daemon.stop() == 0
    names = accepted_names(ws)
    assert sorted(names) == [f"b{i:03d}" for i in range(count)]
    rejected = rejections(ws)
    assert set(rejected) == set(hostile)
    for name, words in hostile.items():
        assert any(words in reason for reason in rejected[name]), rejected[name]
    folders = os.listdir(ws.rejected)
    assert len(folders) == 3 and all((ws.rejected / f / REJECTION_REPORT).is_file() for f in folders)
    assert set(dict(catalog_rows(ws, "SELECT name, n_train FROM batches")).values()) == {2}
    assert inbox_names(ws) == []
    log = (ws.root / "daemon.log").read_text(errors="replace")
    assert "database is locked" not in log and "Traceback" not in log
    record_figure("burst_real_daemon", folders=count, ingested_once=len(names), early=0)


def _three_hostile_folders(ws: Workspace, outside: Path) -> dict[str, str]:
    """Three hostile folders in the burst (a duplicate of b000, a truncated image, a name that is not UTF-8),
    prepared in ``outside``: the real daemon rejects each with its report and goes on. Their names as
    rejected, with words of the reasons."""
    shutil.copytree(ws.inbox / "b000", outside / "dup")
    tiny_batch(outside, 900, kind="eval", n_train=2, n_val=0).rename(outside / "trunc")
    image = outside / "trunc" / "images" / "0000.png"
    image.write_bytes(image.read_bytes()[:60])
    os.rename(tiny_batch(outside, 901, kind="eval", n_train=2, n_val=0), os.fsencode(outside) + b"/bad-\xff")
    return {
        "dup": "identical to a batch accepted before",
        "trunc": "images/0000.png",
        "bad-\\xff": "UTF-8",
    }


def _copy_slowly(folders: list[Path], inbox: Path) -> None:
    """Each folder copied into ``inbox`` a file every 20 ms, batch.toml first for every other one."""
    for number, folder in enumerate(folders):
        target = inbox / folder.name
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        if number % 2:  # manifest first: only settling protects the half-copied folder
            files.sort(key=lambda p: p.name != "batch.toml")
        else:
            files.sort(key=lambda p: p.name == "batch.toml")
        for file in files:
            (target / file.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, target / file.relative_to(folder))
            time.sleep(0.02)
