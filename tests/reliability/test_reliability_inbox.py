"""Reliability of the inbox: bursts of folders, slow copies, lost watcher events, hostile and broken batches.

Most tests drive the ``Daemon`` in-process with a clock moved by hand (``tick(now)``), so that settling is
deterministic and nothing sleeps; one test runs the real ``ciss daemon`` through a burst. Training never
starts: the training window "0 0 29 2 *" opens only at midnight on 29 February.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from batchmaker import make_batch, write_image, write_mask
from daemon_helpers import (
    DaemonProcess,
    FakeClock,
    catalog_rows,
    in_process_daemon,
    inbox_names,
    integrity_problems,
    new_workspace,
    record_figure,
    settings_text,
    tiny_batch,
    wait_for,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ciss_daemon.batch.inbox import REJECTION_REPORT, submit_folder
from ciss_daemon.service.training import fail_job
from ciss_daemon.workspace import Workspace

NEVER = "0 0 29 2 *"  # a training window that opens only at 00:00 on 29 February
SETTLE = 5.0
AFTERNOON = dt.datetime(2026, 9, 21, 14, 13, 20, tzinfo=dt.UTC)


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    text = settings_text(
        daemon__settle_seconds=SETTLE,
        daemon__rescan_seconds=3600.0,  # in-process tests flag rescans by hand
        daemon__training_window=NEVER,
        limits__max_files=40,
        limits__max_image_side=512,
    )
    return new_workspace(tmp_path / "ws", text)


@pytest.fixture
def clock() -> FakeClock:
    # An ordinary afternoon: the window is shut (29 February 00:00 is the only minute it opens).
    return FakeClock(AFTERNOON)


@pytest.fixture
def daemon(ws: Workspace, clock: FakeClock) -> Iterator:
    d = in_process_daemon(ws, clock)
    yield d
    d.shutdown()


def accepted_names(ws: Workspace) -> list[str]:
    return [row[0] for row in catalog_rows(ws, "SELECT name FROM batches ORDER BY id")]


def rejections(ws: Workspace) -> dict[str, list[str]]:
    import json

    return {
        name: json.loads(reasons)
        for name, reasons in catalog_rows(ws, "SELECT batch_name, reasons FROM rejections")
    }


def settle(daemon, clock: FakeClock, rounds: int = 2) -> None:
    """Rescan, then tick until folders present now have settled (each first sighting counts as a change)."""
    daemon._flag_rescan()
    for _ in range(rounds):
        daemon.tick(clock.now)
        clock.advance(SETTLE + 0.1)
    daemon.tick(clock.now)


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
        moved, submitted = list(range(50, 110)), list(range(110, 130))
        for i in moved:
            os.rename(build(i, outside), ws.inbox / f"b{i:03d}")
        for i in submitted:
            submit_folder(build(i, outside), ws.inbox)
        daemon._flag_rescan()  # the periodic rescan (no watcher here)
        daemon.tick(clock.now)
        assert set(accepted_names(ws)) >= {f"b{i:03d}" for i in submitted}
        settle(daemon, clock)

        # 3. Copied slowly, file by file, some with batch.toml first: never ingested before complete.
        slow = list(range(130, 200))
        sources = {i: build(i, outside) for i in slow}
        plans = {}
        for i in slow:
            files = sorted(p.relative_to(sources[i]) for p in sources[i].rglob("*") if p.is_file())
            manifest_first = i % 2 == 0
            files.sort(
                key=lambda rel: (rel.name != "batch.toml") if manifest_first else rel.name == "batch.toml"
            )
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
    text = settings_text(
        daemon__settle_seconds=1.5, daemon__rescan_seconds=2.0, daemon__training_window=NEVER
    )
    ws = new_workspace(tmp_path / "ws", text)
    outside = tmp_path / "outside"
    outside.mkdir()
    third = count // 3
    for i in range(third):  # dropped while no daemon runs
        tiny_batch(ws.inbox, i, kind="eval", n_train=2, n_val=0)
    sources = [tiny_batch(outside, i, kind="eval", n_train=2, n_val=0) for i in range(third, count)]
    # Three hostile folders in the burst: the real daemon rejects each with its report and goes on.
    shutil.copytree(ws.inbox / "b000", outside / "dup")
    tiny_batch(outside, 900, kind="eval", n_train=2, n_val=0).rename(outside / "trunc")
    image = outside / "trunc" / "images" / "0000.png"
    image.write_bytes(image.read_bytes()[:60])
    os.rename(tiny_batch(outside, 901, kind="eval", n_train=2, n_val=0), os.fsencode(outside) + b"/bad-\xff")
    hostile = {
        "dup": "identical to a batch accepted before",
        "trunc": "images/0000.png",
        "bad-\\xff": "UTF-8",
    }
    daemon = DaemonProcess(ws)

    def copy_slowly(folders: list[Path]) -> None:
        for number, folder in enumerate(folders):
            target = ws.inbox / folder.name
            files = sorted(p for p in folder.rglob("*") if p.is_file())
            if number % 2:  # manifest first: only settling protects the half-copied folder
                files.sort(key=lambda p: p.name != "batch.toml")
            else:
                files.sort(key=lambda p: p.name == "batch.toml")
            for file in files:
                (target / file.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(file, target / file.relative_to(folder))
                time.sleep(0.02)

    try:
        moved, slow = sources[: len(sources) // 2], sources[len(sources) // 2 :]
        copier = threading.Thread(target=copy_slowly, args=(slow,))
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


# --- 7. hostile and broken batches --------------------------------------------------------------------------


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` but holds almost no data (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    body = struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    idat = b"IDAT" + zlib.compress(b"\0" * 64)
    body += struct.pack(">I", len(idat) - 4) + idat + struct.pack(">I", zlib.crc32(idat))
    return (
        b"\x89PNG\r\n\x1a\n" + body + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    )


def _good(parent: Path, name: str, seed: int, classes: dict[int, str] | None = None) -> Path:
    return make_batch(parent, name, classes=classes or {1: f"class-{seed}"}, n_train=1, seed=seed)


def _hostile_cases(outside: Path) -> list[tuple[str | bytes, Callable[[Path], None], str]]:
    """(folder name, how to spoil a good batch folder in place, words the rejection must contain)."""

    def manifest(text: str | bytes) -> Callable[[Path], None]:
        def spoil(folder: Path) -> None:
            data = text.encode() if isinstance(text, str) else text
            (folder / "batch.toml").write_bytes(data)

        return spoil

    def mask_values(values: list[int], mode: str = "L") -> Callable[[Path], None]:
        def spoil(folder: Path) -> None:
            labels = np.zeros((16, 16), dtype=np.uint8)
            labels[: len(values)] = np.array(values, dtype=np.uint8)[:, None]
            write_mask(folder / "masks/0000.png", labels, mode)

        return spoil

    def replace(rel: str, data: bytes) -> Callable[[Path], None]:
        return lambda folder: (folder / rel).write_bytes(data)

    def truncate(rel: str) -> Callable[[Path], None]:
        def spoil(folder: Path) -> None:
            data = (folder / rel).read_bytes()
            (folder / rel).write_bytes(data[: len(data) * 2 // 3])

        return spoil

    def link(rel: str, target: str) -> Callable[[Path], None]:
        def spoil(folder: Path) -> None:
            (folder / rel).unlink(missing_ok=True)
            os.symlink(target, folder / rel)

        return spoil

    def fifo(folder: Path) -> None:
        os.mkfifo(folder / "images/0001.png")

    def non_utf8_file(folder: Path) -> None:
        for split in ("images", "masks"):
            os.rename(folder / f"{split}/0000.png", os.fsencode(folder / split) + b"/\xff\xfe.png")

    def rgb_mask(folder: Path) -> None:
        Image.new("RGB", (16, 16), (1, 1, 1)).save(folder / "masks/0000.png")

    def sixteen_bit_image(folder: Path) -> None:
        Image.fromarray(np.full((16, 16), 40000, dtype=np.uint16)).save(folder / "images/0000.png")

    def mismatched_size(folder: Path) -> None:
        write_image(folder / "images/0000.png", (24, 16))

    def too_many_files(folder: Path) -> None:
        for i in range(1, 30):
            shutil.copyfile(folder / "images/0000.png", folder / f"images/{i:04d}.png")
            shutil.copyfile(folder / "masks/0000.png", folder / f"masks/{i:04d}.png")

    def nested_folder(folder: Path) -> None:
        (folder / "images/extra").mkdir()

    def jpeg_mask(folder: Path) -> None:
        Image.open(folder / "masks/0000.png").convert("L").save(folder / "masks/0000.jpg")
        (folder / "masks/0000.png").unlink()

    def missing_mask(folder: Path) -> None:
        (folder / "masks/0000.png").unlink()

    secret = outside / "secret.txt"
    secret.write_text("not for the daemon")
    return [
        ("bad-toml", manifest("[classes\n1 = "), "is not valid TOML"),
        ("manifest-not-utf8", manifest(b"\xff\xfe[classes]"), "is not UTF-8 text"),
        ("manifest-huge", manifest("#" * (1024 * 1024 + 10)), "larger than 1 MiB"),
        ("no-classes", manifest('kind = "train"\n'), "has no [classes] table"),
        ("bad-kind", manifest('kind = "weights"\n[classes]\n1 = "x"\n'), "is not a batch kind"),
        ("value-0", manifest('[classes]\n0 = "void"\n'), "which is background"),
        ("value-300", manifest('[classes]\n300 = "big"\n'), "outside the 8-bit mask range"),
        ("unknown-key", manifest('exec = "rm -rf /"\n[classes]\n1 = "x"\n'), "unknown key"),
        ("undeclared-value", mask_values([1, 7]), "value 7 not declared"),
        ("rgb-mask", rgb_mask, "not a single-channel 8-bit mask"),
        ("jpeg-mask", jpeg_mask, "is a JPEG mask"),
        ("missing-mask", missing_mask, "has no mask"),
        ("size-mismatch", mismatched_size, "is 16x16 but images/0000.png is 24x16"),
        ("truncated-image", truncate("images/0000.png"), "damaged or truncated"),
        ("empty-image", replace("images/0000.png", b""), "not a PNG or JPEG image"),
        ("bomb-header", replace("images/0000.png", _png_header(60000, 60000)), "pixels in its header"),
        ("oversized", replace("images/0000.png", _png_header(4000, 4000)), "larger than the limit"),
        ("sixteen-bit", sixteen_bit_image, "(not 8-bit)"),
        ("link-outside", link("images/0000.png", str(secret)), "pointing outside the batch folder"),
        ("manifest-link", link("batch.toml", "/etc/passwd"), "symbolic link"),
        ("fifo", fifo, "not a regular file"),
        ("nested-folder", nested_folder, "is a folder inside images/"),
        ("too-many-files", too_many_files, "holds more than 40 files"),
        ("file-not-utf8", non_utf8_file, "is not valid UTF-8"),
        (b"folder-not-utf8-\xff\xfe", lambda folder: None, "is not valid UTF-8"),
        ("control\nchars", lambda folder: None, "contains control characters"),
    ]


def test_hostile_batches_are_rejected_with_their_reasons_and_the_daemon_carries_on(
    ws: Workspace, clock: FakeClock, daemon, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    _good(ws.inbox, "good-0", seed=0)
    settle(daemon, clock)
    assert accepted_names(ws) == ["good-0"]
    cases = _hostile_cases(outside)
    # The same content under another name, and an unfinished step's class taught again.
    shutil.copytree(ws.store / next(p.name for p in ws.store.iterdir()), outside / "duplicate")
    (outside / "duplicate" / ".ciss-submitted").unlink(missing_ok=True)
    cases.append(("duplicate", lambda folder: None, "identical to a batch accepted before"))
    cases.append(("same-class", lambda folder: None, '"class-0" (value 1) is already taught'))
    for number, (name, spoil, _) in enumerate(cases, start=1):
        raw = os.fsencode(ws.inbox) + b"/" + (name if isinstance(name, bytes) else name.encode())
        if name == "duplicate":
            shutil.copytree(outside / "duplicate", os.fsdecode(raw))
        elif name == "same-class":
            _good(outside, "same-class", seed=500, classes={1: "class-0"})
            shutil.move(outside / "same-class", os.fsdecode(raw))
        else:
            folder = _good(outside, f"case-{number}", seed=number)
            spoil(folder)
            os.rename(folder, raw)
    # A folder that is itself a link to data outside the inbox.
    _good(outside, "target-of-link", seed=900)
    os.symlink(outside / "target-of-link", ws.inbox / "folder-link")
    cases.append(("folder-link", lambda folder: None, "is a symbolic link"))
    settle(daemon, clock, rounds=3)

    found = rejections(ws)
    printable_names = {
        (name.decode("utf-8", "backslashreplace") if isinstance(name, bytes) else name) for name, *_ in cases
    }
    assert accepted_names(ws) == ["good-0"]
    assert inbox_names(ws) == []
    for name, _, words in cases:
        shown = name.decode("utf-8", "backslashreplace") if isinstance(name, bytes) else name
        stored = next((n for n in found if n == shown or n == shown.replace("\n", "\\n")), None)
        assert stored is not None, f"no rejection row for {shown!r}: {sorted(found)}"
        assert any(words in reason for reason in found[stored]), (shown, found[stored])
        folder = os.fsencode(ws.rejected) + b"/" + (name if isinstance(name, bytes) else name.encode())
        report = Path(os.fsdecode(folder)) / REJECTION_REPORT
        assert report.is_file(), f"no {REJECTION_REPORT} for {shown!r}"
        assert words in report.read_text(encoding="utf-8"), shown
    assert len(found) == len(printable_names)
    assert (outside / "secret.txt").read_text() == "not for the daemon"  # a link is never written through
    # Still alive and still accepting.
    _good(ws.inbox, "good-1", seed=1)
    settle(daemon, clock)
    assert accepted_names(ws) == ["good-0", "good-1"]
    assert integrity_problems(ws, at_rest=True) == []
    record_figure("hostile_batches", inputs=len(cases), rejected_correctly=len(cases))


# --- 7. fuzz -----------------------------------------------------------------------------------------------

_MASK_VALUES = ["1", "2", "3", "7", "254"]
_KEYS = st.one_of(
    st.sampled_from(_MASK_VALUES),
    st.sampled_from(_MASK_VALUES),  # twice: most tables declare values the masks can hold
    st.integers(-3, 300).map(str),
    st.sampled_from(["01", "x", "", "1.0", " 2", "0", "255"]),
)
_NAMES = st.one_of(
    st.from_regex(r"[a-z]{1,6}", fullmatch=True),
    st.sampled_from(["cat", "dog", "cat ", "", "a\tb", "bird", "élan", "a b"]),
    st.text(max_size=8),
    st.integers(0, 3),
    st.booleans(),
)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    text = str(value)
    escaped = "".join(
        c
        if c.isprintable() and c not in '"\\'
        else f"\\U{ord(c):08x}"
        if ord(c) > 0xFFFF
        else f"\\u{ord(c):04x}"
        for c in text
    )
    return f'"{escaped}"'


def _good_name(name: object) -> bool:
    return isinstance(name, str) and bool(name.strip()) and name == name.strip() and name.isprintable()


@st.composite
def _fuzz_batches(draw: st.DrawFn) -> tuple[str, str | None, dict[str, object], list[int]]:
    """(batch.toml text, kind or None when the text is not a manifest, its [classes], mask values).

    Half the batches start valid and get at most one spoiling change (a bad key or name, a value added
    to or missing from the masks, an unknown kind), so that both verdicts are exercised near the edge;
    the others are drawn wholly at random.
    """
    if draw(st.booleans()):
        keys = draw(st.lists(st.sampled_from(_MASK_VALUES), min_size=1, max_size=3, unique=True))
        names = draw(
            st.lists(st.from_regex(r"[a-z]{1,6}", fullmatch=True), min_size=len(keys), max_size=len(keys))
        )
        table: dict[str, object] = dict(zip(keys, names, strict=True))
        values = [0, 255, *(int(k) for k in keys)]
        kind: str | None = draw(st.sampled_from([None, "train", "eval"]))
        spoil = draw(st.sampled_from(["none", "none", "key", "name", "extra", "missing", "kind"]))
        if spoil == "key":
            table[draw(_KEYS)] = draw(st.from_regex(r"[a-z]{1,6}", fullmatch=True))
        elif spoil == "name":
            table[keys[0]] = draw(_NAMES)
        elif spoil == "extra":
            values.append(draw(st.integers(1, 254)))
        elif spoil == "missing":
            values.remove(int(keys[0]))
        elif spoil == "kind":
            kind = draw(st.sampled_from(["other", "Train", ""]))
    else:
        table = draw(st.dictionaries(_KEYS, _NAMES, max_size=4))
        values = draw(st.lists(st.sampled_from([0, 1, 2, 3, 7, 254, 255]), min_size=1, max_size=16))
        if draw(st.integers(0, 4)) == 0:
            return draw(st.text(max_size=60)), None, {}, values
        kind = draw(st.sampled_from([None, "train", "eval", "other"]))
    values = draw(st.permutations(values))
    lines = [f"kind = {_toml_value(kind)}"] if kind is not None else []
    lines.append("[classes]")
    lines += [f"{_toml_value(k)} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n", "train" if kind is None else kind, table, values


def _valid(kind: str | None, table: dict[str, object], values: list[int], reserved: set[str]) -> bool:
    """What validation must decide, from the rules of docs/product.md, computed independently."""
    if kind not in ("train", "eval") or not table:
        return False
    if not all(k.isdigit() and str(int(k)) == k and 0 < int(k) < 255 for k in table):
        return False
    names = list(table.values())
    if not all(_good_name(n) for n in names) or len(set(names)) != len(names):
        return False
    present = set(values) - {0, 255}
    if present != {int(k) for k in table}:  # every declared class labelled, nothing undeclared
        return False
    return kind == "eval" or not reserved & set(names)  # str names: checked by _good_name above


def test_fuzzed_manifests_and_masks_through_ingest_never_break_the_daemon(tmp_path: Path) -> None:
    text = settings_text(daemon__settle_seconds=0.0, daemon__training_window=NEVER)
    ws = new_workspace(tmp_path / "ws", text)
    clock = FakeClock(AFTERNOON)
    daemon = in_process_daemon(ws, clock)
    counter = {"n": 0, "accepted": 0, "rejected": 0}

    reserved: set[str] = set()  # class names of accepted training batches: pending, never taught again

    @settings(
        max_examples=int(os.environ.get("CISS_FUZZ_EXAMPLES", 40)),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(batch=_fuzz_batches())
    def ingest_one(batch: tuple[str, str | None, dict[str, object], list[int]]) -> None:
        text, kind, table, values = batch
        counter["n"] += 1
        name = f"fuzz-{counter['n']:04d}"
        folder = ws.inbox / name
        labels = np.resize(np.array(values, dtype=np.uint8), (8, 8))
        write_image(folder / "images/0000.png", (8, 8), seed=counter["n"])
        write_mask(folder / "masks/0000.png", labels)
        (folder / "batch.toml").write_text(text, encoding="utf-8", errors="surrogatepass")
        expected = _valid(kind, table, labels.ravel().tolist(), reserved)
        daemon.ingest(folder, clock.now)  # must never raise
        assert not folder.exists()
        accepted, rejected = name in accepted_names(ws), rejections(ws).get(name)
        assert accepted != (rejected is not None)
        assert accepted == expected, (text, values, rejected)
        if rejected is not None:
            counter["rejected"] += 1
            assert rejected and (ws.rejected / name / REJECTION_REPORT).is_file()
            return
        counter["accepted"] += 1
        if kind == "train":
            reserved.update(str(v) for v in table.values())

    try:
        ingest_one()
        daemon.tick(clock.now)  # the loop still works
    finally:
        daemon.shutdown()
    assert integrity_problems(ws, at_rest=True) == []
    assert counter["accepted"] + counter["rejected"] == counter["n"]
    record_figure(
        "fuzz_ingest", inputs=counter["n"], accepted=counter["accepted"], rejected=counter["rejected"]
    )
