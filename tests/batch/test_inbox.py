"""The inbox: completeness with a fake clock, submit, accept, reject, and the watcher's hint."""

import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from batchmaker import make_batch
from daemon_helpers import FakeClock, in_process_daemon, inbox_names, new_workspace, settings_text
from sqlalchemy import select

from ciss_daemon.batch.inbox import (
    STAGING,
    SUBMITTED_MARKER,
    CompletenessTracker,
    InboxWatcher,
    archive_folder,
    candidate_folders,
    folder_signature,
    reject_folder,
    store_folder,
    submit_folder,
)
from ciss_daemon.batch.validation import Problem, validate_batch
from ciss_daemon.catalog.tables import Batch, Step
from ciss_daemon.exceptions import SubmitError, WorkspaceError

NOW = datetime(2026, 11, 25, 10, 15, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    """``seconds`` after ``NOW``: the times a test moves its clock to by hand."""
    return NOW + timedelta(seconds=seconds)


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Relative path -> content of every regular file under `root`."""
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in root.rglob("*")
        if path.is_file() and not path.is_symlink()
    }


def test_signature_sees_content_size_and_mtime(tmp_path: Path) -> None:
    folder = make_batch(tmp_path)
    first = folder_signature(folder)
    assert {rel for rel, _, _ in first} >= {"batch.toml", "images", "images/0000.png", "masks/0001.png"}
    assert folder_signature(folder) == first
    os.utime(folder / "images/0000.png", ns=(5, 5))
    assert folder_signature(folder) != first
    assert folder_signature(tmp_path / "gone") == ()


def test_not_complete_before_settle_time_and_complete_after(tmp_path: Path) -> None:
    folder = make_batch(tmp_path)
    tracker = CompletenessTracker(settle_seconds=5)
    assert not tracker.observe(folder, now=at(100.0))
    assert not tracker.observe(folder, now=at(104.9))
    assert tracker.observe(folder, now=at(105.0))


def test_a_change_restarts_the_settle_time(tmp_path: Path) -> None:
    folder = make_batch(tmp_path)
    tracker = CompletenessTracker(settle_seconds=5)
    tracker.observe(folder, now=at(100.0))
    (folder / "images/0002.png").write_bytes(b"still copying")
    assert not tracker.observe(folder, now=at(103.0))  # changed: the clock starts again at 103
    assert not tracker.observe(folder, now=at(107.0))
    assert tracker.observe(folder, now=at(108.0))


def test_never_complete_without_manifest(tmp_path: Path) -> None:
    folder = make_batch(tmp_path)
    (folder / "batch.toml").unlink()
    tracker = CompletenessTracker(settle_seconds=0)
    assert not tracker.observe(folder, now=at(0.0))
    assert not tracker.observe(folder, now=at(1000.0))
    (folder / "batch.toml").write_text('[classes]\n1 = "bicycle"\n')
    assert tracker.observe(folder, now=at(1000.0))  # settle 0: complete as soon as the manifest is there


def test_forget_makes_a_folder_settle_again(tmp_path: Path) -> None:
    folder = make_batch(tmp_path)
    tracker = CompletenessTracker(settle_seconds=5)
    tracker.observe(folder, now=at(0.0))
    assert tracker.observe(folder, now=at(10.0))
    tracker.forget(folder)
    assert not tracker.observe(folder, now=at(11.0))


def test_candidates_skip_hidden_folders_and_files(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    for name in ("b-batch", "a-batch", ".staging", ".hidden"):
        (inbox / name).mkdir(parents=True)
    (inbox / "notes.txt").write_text("not a batch")
    assert candidate_folders(inbox) == [inbox / "a-batch", inbox / "b-batch"]
    with pytest.raises(WorkspaceError, match="the inbox .* is missing; run `ciss init`"):
        candidate_folders(tmp_path / "nowhere")


def test_the_daemons_scan_ingests_complete_folders_in_name_order(tmp_path: Path) -> None:
    ws = new_workspace(tmp_path / "ws", settings_text(daemon__settle_seconds=2))
    make_batch(ws.inbox, "zebras", classes={1: "zebra"})
    make_batch(ws.inbox, "apples", classes={1: "apple"})
    half = make_batch(ws.inbox, "half", classes={1: "pear"})
    (half / "batch.toml").unlink()
    make_batch(ws.inbox / STAGING, "in-flight", classes={1: "plum"})
    clock = FakeClock(NOW)
    daemon = in_process_daemon(ws, clock)
    try:
        daemon.scan_inbox(clock.now)
        assert inbox_names(ws) == ["apples", "half", "zebras"]  # nothing settled yet
        daemon.scan_inbox(clock.advance(2.0))
        assert inbox_names(ws) == ["half"]
        with daemon.factory() as s:
            steps = s.execute(select(Step.index, Batch.name).join(Batch).order_by(Step.index)).all()
        assert [tuple(row) for row in steps] == [(0, "apples"), (1, "zebras")]
    finally:
        daemon.shutdown()


def test_submit_copies_through_staging_and_renames_in(tmp_path: Path) -> None:
    source = make_batch(tmp_path / "desk", "bikes", n_val=1)
    (source / "images/0009.png").symlink_to("0000.png")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    target = submit_folder(source, inbox)
    assert target == inbox / "bikes"
    assert tree_bytes(target) == {**tree_bytes(source), SUBMITTED_MARKER: b""}
    assert (target / "images/0009.png").is_symlink()  # kept as a link, for validation to refuse
    assert list((inbox / STAGING).iterdir()) == []
    assert candidate_folders(inbox) == [target]
    assert tree_bytes(source)  # the source is left as it was


def test_submit_refuses_an_existing_name(tmp_path: Path) -> None:
    source = make_batch(tmp_path / "desk", "bikes")
    inbox = tmp_path / "inbox"
    (inbox / "bikes").mkdir(parents=True)
    with pytest.raises(SubmitError) as raised:
        submit_folder(source, inbox)
    assert str(raised.value) == "a batch named bikes is already in the inbox; rename the folder or wait"
    assert list((inbox / "bikes").iterdir()) == []


def test_submit_explains_a_bad_source(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    with pytest.raises(SubmitError) as raised:
        submit_folder(tmp_path / "absent", inbox)
    assert str(raised.value) == f"{tmp_path / 'absent'} does not exist; give the path of a batch folder"
    no_manifest = make_batch(tmp_path, "draft")
    (no_manifest / "batch.toml").unlink()
    with pytest.raises(SubmitError) as raised:
        submit_folder(no_manifest, inbox)
    assert str(raised.value) == (
        f"{no_manifest} has no batch.toml; write the manifest with its [classes] table, then submit"
    )
    (tmp_path / "batch.toml").write_text('[classes]\n1 = "bicycle"\n')
    with pytest.raises(SubmitError, match="contains the inbox itself; submit the batch folder"):
        submit_folder(tmp_path, inbox)  # would copy the inbox into itself


def test_submit_cleans_staging_when_the_copy_fails(tmp_path: Path) -> None:
    source = make_batch(tmp_path / "desk", "bikes")
    os.mkfifo(source / "images/pipe")  # copytree refuses to copy a named pipe
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    with pytest.raises(SubmitError, match="could not copy .* into the inbox"):
        submit_folder(source, inbox)
    assert not (inbox / "bikes").exists()
    assert list((inbox / STAGING).iterdir()) == []


def accept(folder: Path, *, store: Path, archive: Path, sha256: str, now: datetime) -> tuple[Path, Path]:
    """What the daemon does with an accepted folder: a copy in the store, then the original archived."""
    stored = store_folder(folder, store=store, sha256=sha256)
    return stored, archive_folder(folder, archive=archive, now=now)


def test_accept_copies_to_store_and_archives_the_original(tmp_path: Path) -> None:
    inbox, store, archive = tmp_path / "inbox", tmp_path / "store", tmp_path / "archive"
    folder = make_batch(inbox, "bikes")
    original = tree_bytes(folder)
    sha = validate_batch(folder).batch.sha256
    stored, archived = accept(folder, store=store, archive=archive, sha256=sha, now=NOW)
    assert stored == store / f"bikes-{sha[:8]}"
    assert archived == archive / "bikes-20261125T101500Z"
    assert not folder.exists()
    assert tree_bytes(stored) == original
    assert tree_bytes(archived) == original
    assert validate_batch(stored).batch.sha256 == sha
    assert sorted(path.name for path in store.iterdir()) == [stored.name]  # no temporary copy left

    again = make_batch(inbox, "bikes")  # the same name and content once more, in the same second
    stored_again, archived_again = accept(again, store=store, archive=archive, sha256=sha, now=NOW)
    assert stored_again == store / f"bikes-{sha[:8]}-2"
    assert archived_again == archive / "bikes-20261125T101500Z-2"
    assert tree_bytes(stored) == original  # the first copy is never overwritten


def test_reject_moves_the_folder_and_writes_every_problem(tmp_path: Path) -> None:
    inbox, rejected = tmp_path / "inbox", tmp_path / "rejected"
    folder = make_batch(inbox, "bikes")
    original = tree_bytes(folder)
    problems = [
        Problem("batch.toml", "is missing", "write it last"),
        Problem(
            "masks/0003.png", "is 640x480 but images/0003.jpg is 480x640", "resize the mask to its image"
        ),
    ]
    destination = reject_folder(folder, rejected=rejected, problems=problems, now=NOW)
    assert destination == rejected / "bikes"
    assert not folder.exists()
    report = (destination / "REJECTED.txt").read_text()
    assert report == (
        'Batch "bikes" was rejected on 2026-11-25 at 10:15:00 UTC, because of 2 problems:\n'
        "\n"
        "1. batch.toml: is missing\n"
        "   What to do: write it last\n"
        "2. masks/0003.png: is 640x480 but images/0003.jpg is 480x640\n"
        "   What to do: resize the mask to its image\n"
        "\n"
        "To resubmit: fix every problem above in this folder, then move the folder back into the inbox\n"
        "(or run `ciss submit` on it). You may delete this REJECTED.txt first; it is ignored either way.\n"
    )
    assert {rel: data for rel, data in tree_bytes(destination).items() if rel != "REJECTED.txt"} == original

    second = make_batch(inbox, "bikes")
    moved = reject_folder(second, rejected=rejected, problems=problems[:1], now=NOW)
    assert moved == rejected / "bikes-20261125T101500Z"
    assert "because of 1 problem:" in (moved / "REJECTED.txt").read_text()


def test_reject_never_writes_through_a_link(tmp_path: Path) -> None:
    target = make_batch(tmp_path / "elsewhere", "bikes")
    inbox, rejected = tmp_path / "inbox", tmp_path / "rejected"
    inbox.mkdir()
    (inbox / "bikes").symlink_to(target, target_is_directory=True)
    problems = validate_batch(inbox / "bikes").problems
    destination = reject_folder(inbox / "bikes", rejected=rejected, problems=problems, now=NOW)
    assert (destination / "bikes").is_symlink()
    assert (destination / "REJECTED.txt").is_file()
    assert not (target / "REJECTED.txt").exists()


def test_rejected_text_survives_undecodable_names(tmp_path: Path) -> None:
    inbox, rejected = tmp_path / "inbox", tmp_path / "rejected"
    inbox.mkdir()
    raw = os.fsencode(inbox) + b"/bad\xff"
    os.mkdir(raw)
    folder = inbox / os.fsdecode(b"bad\xff")
    problems = validate_batch(folder).problems
    destination = reject_folder(folder, rejected=rejected, problems=problems, now=NOW)
    report = (destination / "REJECTED.txt").read_text()
    assert report.startswith('Batch "bad\\xff" was rejected')
    assert ".: the folder name is not valid UTF-8 (b'bad\\xff')" in report


def test_watcher_sets_changed_when_a_folder_appears(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "existing.txt").write_text("here before the watcher")
    watcher = InboxWatcher(inbox)
    watcher.start()
    try:
        time.sleep(0.2)
        watcher.changed.clear()
        (inbox / "existing.txt").read_text()  # reading changes nothing and must not wake the daemon
        assert not watcher.changed.wait(0.5)
        (inbox / "new-batch").mkdir()
        assert watcher.changed.wait(5.0)
    finally:
        watcher.stop()
