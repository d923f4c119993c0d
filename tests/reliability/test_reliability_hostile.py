"""Reliability of the inbox against hostile and broken batches: each is rejected with its reasons and a
report, nothing outside the batch folder is read or written, and the daemon carries on; fuzzed manifests
and masks through ingest never break it, and its verdict is the one the rules give.

The daemon runs in-process with a clock moved by hand (``tick(now)``); training never starts: the training
window "0 0 29 2 *" opens only at midnight on 29 February.
"""

from __future__ import annotations

import os
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from batchmaker import make_batch, write_image, write_mask
from daemon_helpers import (
    FakeClock,
    in_process_daemon,
    inbox_names,
    integrity_problems,
    record_figure,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from inbox_helpers import AFTERNOON, accepted_names, never_training_workspace, rejections, settle
from PIL import Image

from ciss_daemon.batch.inbox import REJECTION_REPORT
from ciss_daemon.workspace import Workspace


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


# How to spoil a good batch folder in place, one way each.


def _manifest(text: str | bytes) -> Callable[[Path], None]:
    def spoil(folder: Path) -> None:
        data = text.encode() if isinstance(text, str) else text
        (folder / "batch.toml").write_bytes(data)

    return spoil


def _mask_values(values: list[int], mode: str = "L") -> Callable[[Path], None]:
    def spoil(folder: Path) -> None:
        labels = np.zeros((16, 16), dtype=np.uint8)
        labels[: len(values)] = np.array(values, dtype=np.uint8)[:, None]
        write_mask(folder / "masks/0000.png", labels, mode)

    return spoil


def _replace(rel: str, data: bytes) -> Callable[[Path], None]:
    return lambda folder: (folder / rel).write_bytes(data)


def _truncate(rel: str) -> Callable[[Path], None]:
    def spoil(folder: Path) -> None:
        data = (folder / rel).read_bytes()
        (folder / rel).write_bytes(data[: len(data) * 2 // 3])

    return spoil


def _link(rel: str, target: str) -> Callable[[Path], None]:
    def spoil(folder: Path) -> None:
        (folder / rel).unlink(missing_ok=True)
        os.symlink(target, folder / rel)

    return spoil


def _fifo(folder: Path) -> None:
    os.mkfifo(folder / "images/0001.png")


def _non_utf8_file(folder: Path) -> None:
    for split in ("images", "masks"):
        os.rename(folder / f"{split}/0000.png", os.fsencode(folder / split) + b"/\xff\xfe.png")


def _rgb_mask(folder: Path) -> None:
    Image.new("RGB", (16, 16), (1, 1, 1)).save(folder / "masks/0000.png")


def _sixteen_bit_image(folder: Path) -> None:
    Image.fromarray(np.full((16, 16), 40000, dtype=np.uint16)).save(folder / "images/0000.png")


def _mismatched_size(folder: Path) -> None:
    write_image(folder / "images/0000.png", (24, 16))


def _too_many_files(folder: Path) -> None:
    for i in range(1, 30):
        shutil.copyfile(folder / "images/0000.png", folder / f"images/{i:04d}.png")
        shutil.copyfile(folder / "masks/0000.png", folder / f"masks/{i:04d}.png")


def _nested_folder(folder: Path) -> None:
    (folder / "images/extra").mkdir()


def _jpeg_mask(folder: Path) -> None:
    Image.open(folder / "masks/0000.png").convert("L").save(folder / "masks/0000.jpg")
    (folder / "masks/0000.png").unlink()


def _missing_mask(folder: Path) -> None:
    (folder / "masks/0000.png").unlink()


def _hostile_cases(outside: Path) -> list[tuple[str | bytes, Callable[[Path], None], str]]:
    """(folder name, how to spoil a good batch folder in place, words the rejection must contain)."""
    secret = outside / "secret.txt"
    secret.write_text("not for the daemon")
    return [
        ("bad-toml", _manifest("[classes\n1 = "), "is not valid TOML"),
        ("manifest-not-utf8", _manifest(b"\xff\xfe[classes]"), "is not UTF-8 text"),
        ("manifest-huge", _manifest("#" * (1024 * 1024 + 10)), "larger than 1 MiB"),
        ("no-classes", _manifest('kind = "train"\n'), "has no [classes] table"),
        ("bad-kind", _manifest('kind = "weights"\n[classes]\n1 = "x"\n'), "is not a batch kind"),
        ("value-0", _manifest('[classes]\n0 = "void"\n'), "which is background"),
        ("value-300", _manifest('[classes]\n300 = "big"\n'), "outside the 8-bit mask range"),
        ("unknown-key", _manifest('exec = "rm -rf /"\n[classes]\n1 = "x"\n'), "unknown key"),
        ("undeclared-value", _mask_values([1, 7]), "value 7 not declared"),
        ("rgb-mask", _rgb_mask, "not a single-channel 8-bit mask"),
        ("jpeg-mask", _jpeg_mask, "is a JPEG mask"),
        ("missing-mask", _missing_mask, "has no mask"),
        ("size-mismatch", _mismatched_size, "is 16x16 but images/0000.png is 24x16"),
        ("truncated-image", _truncate("images/0000.png"), "damaged or truncated"),
        ("empty-image", _replace("images/0000.png", b""), "not a PNG or JPEG image"),
        ("bomb-header", _replace("images/0000.png", _png_header(60000, 60000)), "pixels in its header"),
        ("oversized", _replace("images/0000.png", _png_header(4000, 4000)), "larger than the limit"),
        ("sixteen-bit", _sixteen_bit_image, "(not 8-bit)"),
        ("link-outside", _link("images/0000.png", str(secret)), "pointing outside the batch folder"),
        ("manifest-link", _link("batch.toml", "/etc/passwd"), "symbolic link"),
        ("fifo", _fifo, "not a regular file"),
        ("nested-folder", _nested_folder, "is a folder inside images/"),
        ("too-many-files", _too_many_files, "holds more than 40 files"),
        ("file-not-utf8", _non_utf8_file, "is not valid UTF-8"),
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
    ws = never_training_workspace(tmp_path / "ws", daemon__settle_seconds=0.0)
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
