"""validate_batch: a good batch passes; each rule's failure is reported with its exact words."""

import json
import os
import resource
import shutil
import struct
import tempfile
import time
import zlib
from pathlib import Path

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from batchmaker import make_batch, manifest_text, mask_array, write_image, write_mask
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from ciss_daemon.batch.validation import Problem, ValidationResult, validate_batch

EXAMPLE = 'e.g. kind = "train" and a [classes] table such as 1 = "bicycle"'
MANIFEST_TODO = f"write batch.toml last, after images/ and masks/ ({EXAMPLE})"
LINK_TODO = "replace the link with a copy of the file it points to; a batch may not contain links"


def problem_lines(folder: Path, **limits) -> list[str]:
    result = validate_batch(folder, **limits)
    assert result.batch is None and not result.ok
    return [str(problem) for problem in result.problems]


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims `width` x `height` 8-bit grey pixels; its data holds almost none."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def test_good_batch_validates(tmp_path: Path) -> None:
    folder = make_batch(tmp_path, "bikes", classes={1: "bicycle", 2: "car"}, n_train=3, n_val=2)
    result = validate_batch(folder)
    assert result.ok and result.problems == []
    batch = result.batch
    assert batch.name == "bikes" and batch.kind == "train"
    assert batch.classes == {1: "bicycle", 2: "car"}
    assert batch.train_stems == ["0000", "0001", "0002"] and batch.val_stems == ["0000", "0001"]
    per_mask = np.bincount(mask_array([1, 2]).ravel(), minlength=256)
    assert batch.pixel_counts == {1: 5 * int(per_mask[1]), 2: 5 * int(per_mask[2])}
    assert batch.total_bytes == sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    assert len(batch.sha256) == 64


def test_palette_masks_and_upper_case_jpeg_images_are_accepted(tmp_path: Path) -> None:
    folder = make_batch(tmp_path, image_suffix=".JPG", classes={3: "bicycle"})
    write_mask(folder / "masks/0000.png", mask_array([3]), mode="P")
    assert Image.open(folder / "masks/0000.png").mode == "P"
    result = validate_batch(folder)
    assert result.ok, result.problems
    assert result.batch.pixel_counts[3] == 2 * int((mask_array([3]) == 3).sum())


def test_eval_batch_needs_no_val_and_may_use_taught_names(tmp_path: Path) -> None:
    folder = make_batch(tmp_path, kind="eval", classes={1: "bicycle"})
    result = validate_batch(folder, taught_names={"bicycle"})
    assert result.ok, result.problems
    assert result.batch.kind == "eval"


def test_hash_ignores_folder_name_and_mtimes_but_not_content(tmp_path: Path) -> None:
    folder = make_batch(tmp_path, "bikes")
    copy = tmp_path / "bikes-copy"
    shutil.copytree(folder, copy)
    for path in copy.rglob("*"):
        os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    (copy / ".DS_Store").write_bytes(b"finder litter")
    first, second = validate_batch(folder).batch.sha256, validate_batch(copy).batch.sha256
    assert first == second
    labels = mask_array([1])
    labels[12, 12] = 0  # a class pixel turned background
    write_mask(copy / "masks/0001.png", labels)
    assert validate_batch(copy).batch.sha256 != first


def test_missing_manifest(tmp_path: Path) -> None:
    folder = make_batch(tmp_path)
    (folder / "batch.toml").unlink()
    assert problem_lines(folder) == [f"batch.toml: is missing — {MANIFEST_TODO}"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[classes]\n1 = bicycle\n", "Invalid value (at line 2, column 5)"),
        ('[classes]\n1 = "bicycle"\n1 = "car"\n', "Cannot overwrite a value (at line 3, column 10)"),
    ],
    ids=["unquoted", "duplicate-key"],
)
def test_bad_toml_names_the_line(tmp_path: Path, text: str, message: str) -> None:
    folder = make_batch(tmp_path)
    (folder / "batch.toml").write_text(text)
    assert problem_lines(folder) == [f"batch.toml: is not valid TOML: {message} — fix the syntax ({EXAMPLE})"]


@pytest.mark.parametrize(
    ("key", "line"),
    [
        ("0", "declares value 0, which is background — remove it; 0 is always background"),
        ("255", "declares value 255, which means ignore — remove it; 255 always means ignore"),
        ("300", "declares value 300, outside the 8-bit mask range — use values 1 to 254"),
        ("-2", "declares value -2, outside the 8-bit mask range — use values 1 to 254"),
        ("01", 'key "01" has leading zeros — write it as 1'),
        (
            "one",
            'key "one" is not a mask value — use the integer mask values 1 to 254 as keys, '
            'e.g. 1 = "bicycle"',
        ),
    ],
)
def test_bad_class_values(tmp_path: Path, key: str, line: str) -> None:
    folder = make_batch(tmp_path)
    (folder / "batch.toml").write_text(manifest_text({1: "bicycle", key: "other"}))
    assert problem_lines(folder) == [f"batch.toml: [classes] {line}"]


def test_bad_class_names(tmp_path: Path) -> None:
    folder = make_batch(tmp_path, classes={1: "bicycle", 2: "bike", 3: "car"})
    (folder / "batch.toml").write_text('[classes]\n1 = "bicycle"\n2 = "bicycle"\n3 = ""\n4 = 7\n5 = " car"\n')
    assert problem_lines(folder) == [
        'batch.toml: value 3 has an empty class name — give it a name, e.g. 3 = "bicycle"',
        "batch.toml: the class name for value 4 is not a string (it is 7) — write the name in quotes, e.g. "
        '4 = "bicycle"',
        "batch.toml: the class name ' car' for value 5 has spaces at its ends or control characters — write "
        "the name without them",
        'batch.toml: class name "bicycle" is given to values 1, 2 — a class appears once per batch: give '
        "each value its own name, or relabel to one value",
        # The masks use 3 (declared with a bad name, so not declared): reported once for both masks.
        "masks/0000.png, masks/0001.png (2 files): contains value 3 not declared in batch.toml [classes] — "
        "declare it in [classes], or set those pixels to 0 (background) or 255 (ignore)",
    ]


def test_manifest_shape_problems(tmp_path: Path) -> None:
    folder = make_batch(tmp_path)
    (folder / "batch.toml").write_text('kind = "test"\nname = "x"\nclass = 1\n')
    assert problem_lines(folder) == [
        'batch.toml: has unknown keys "class", "name" — remove it; batch.toml holds only kind, [classes] '
        "and [colors]",
        'batch.toml: kind = "test" is not a batch kind — write kind = "train" or kind = "eval", or leave '
        "kind out for a training batch",
        f"batch.toml: has no [classes] table — declare the classes ({EXAMPLE})",
    ]
    (folder / "batch.toml").write_text("[classes]\n")
    assert problem_lines(folder) == [
        'batch.toml: [classes] declares no classes — add one line per class: 1 = "bicycle"'
    ]


def test_unknown_mask_values_are_listed_per_file(tmp_path: Path) -> None:
    folder = make_batch(tmp_path)
    labels = mask_array([1])
    labels[3, 3], labels[4, 4] = 9, 7
    write_mask(folder / "masks/0001.png", labels)
    assert problem_lines(folder) == [
        "masks/0001.png: contains values 7, 9 not declared in batch.toml [classes] — declare them in "
        "[classes], or set those pixels to 0 (background) or 255 (ignore)"
    ]


def test_mask_of_wrong_size(tmp_path: Path) -> None:
    folder = make_batch(tmp_path)
    write_mask(folder / "masks/0001.png", mask_array([1], size=(16, 12)))
    assert problem_lines(folder) == [
        "masks/0001.png: is 16x12 but images/0001.png is 16x16 — resize the mask to its image"
    ]


def test_missing_and_orphan_masks(tmp_path: Path) -> None:
    folder = make_batch(tmp_path, n_val=1)
    (folder / "masks/0001.png").unlink()
    (folder / "val/masks/0000.png").rename(folder / "val/masks/0007.png")
    assert problem_lines(folder) == [
        "images/0001.png: has no mask — add masks/0001.png, or remove the image",
        "val/images/0000.png: has no mask — add val/masks/0000.png, or remove the image",
        "val/masks/0007.png: has no image with the same name in val/images/ — add val/images/0007.jpg or "
        ".png, or remove the mask",
    ]


def test_rgb_and_jpeg_masks(tmp_path: Path) -> None:
    folder = make_batch(tmp_path)
    Image.fromarray(np.stack([mask_array([1])] * 3, axis=-1), "RGB").save(folder / "masks/0001.png")
    Image.fromarray(mask_array([1]), "L").save(folder / "masks/0002.jpg")
    (folder / "masks/0000.png").rename(folder / "masks/0000.PNG")
    assert problem_lines(folder) == [
        "masks/0000.PNG: has an upper-case extension .PNG — rename it to end in .png",
        "masks/0002.jpg: is a JPEG mask — save masks as PNG: JPEG compression changes the label values",
        "images/0000.png: has no mask — add masks/0000.png, or remove the image",
        "masks/0001.png: is a RGB image, not a single-channel 8-bit mask — save it as a single-channel 8-bit "
        "PNG (mode L or P) whose pixel values are the class values",
    ]


def test_corrupt_and_truncated_images(tmp_path: Path) -> None:
    folder = make_batch(tmp_path, n_train=3)
    (folder / "images/0000.png").write_bytes(b"this is not an image at all")
    whole = (folder / "images/0001.png").read_bytes()
    (folder / "images/0001.png").write_bytes(whole[: len(whole) // 2])
    problems = validate_batch(folder).problems
    todo = "export it again from the original (a PNG or JPEG that opens in an image viewer)"
    assert problems[0] == Problem("images/0000.png", "is not a PNG or JPEG image", todo)
    assert problems[1].file == "images/0001.png" and problems[1].todo == todo
    assert problems[1].what.startswith("is damaged or truncated and cannot be decoded (")
    assert len(problems) == 2


@pytest.mark.parametrize("pillow_limit", [89_478_485, None], ids=["pillow-default", "pillow-limit-off"])
def test_decompression_bomb_header_is_refused_without_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pillow_limit: int | None
) -> None:
    # Whatever another module did to Pillow's global limit, our own header check must refuse it.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pillow_limit)
    folder = make_batch(tmp_path)
    (folder / "images/0000.png").write_bytes(png_claiming(100_000, 100_000))  # 10 GB if ever decoded
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    started = time.perf_counter()
    problems = validate_batch(folder).problems
    assert time.perf_counter() - started < 2.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 200 * 1024
    if pillow_limit:  # Pillow refuses it while reading the header
        expected = Problem(
            "images/0000.png",
            "claims more than 40000000 pixels in its header",
            "resize it to at most 40000000 pixels",
        )
    else:  # our own check refuses it right after the header
        expected = Problem(
            "images/0000.png",
            "is 100000x100000, larger than the limit of 8192 pixels a side and 40000000 pixels in all",
            "resize it (and its mask) to fit the limit",
        )
    assert problems == [expected]


def test_image_limits_apply_below_pillows(tmp_path: Path) -> None:
    folder = make_batch(tmp_path)
    (folder / "images/0000.png").write_bytes(png_claiming(7000, 7000))
    (folder / "images/0001.png").write_bytes(png_claiming(20, 1))
    assert problem_lines(folder, max_image_side=16) == [
        "images/0000.png: is 7000x7000, larger than the limit of 16 pixels a side and 40000000 pixels in all "
        "— resize it (and its mask) to fit the limit",
        "images/0001.png: is 20x1, larger than the limit of 16 pixels a side and 40000000 pixels in all "
        "— resize it (and its mask) to fit the limit",
    ]


def test_symlinks_are_refused_never_followed(tmp_path: Path) -> None:
    folder = make_batch(tmp_path)
    outside = tmp_path / "secret.png"
    write_image(outside)
    (folder / "images/0002.png").symlink_to("0000.png")
    (folder / "masks/0002.png").symlink_to("../../secret.png")
    (folder / "val").symlink_to(tmp_path, target_is_directory=True)
    outside_what = "is a symbolic link pointing outside the batch folder"
    assert validate_batch(folder).problems == [
        Problem("images/0002.png", "is a symbolic link", LINK_TODO),
        Problem("masks/0002.png", f"{outside_what} (to ../../secret.png)", LINK_TODO),
        Problem("val", f"{outside_what} (to {tmp_path})", LINK_TODO),
    ]


def test_batch_folder_that_is_a_link(tmp_path: Path) -> None:
    folder = make_batch(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(folder, target_is_directory=True)
    assert problem_lines(link) == [
        ".: is a symbolic link — put the folder itself in the inbox, not a link to it"
    ]


def test_special_file_is_refused_without_blocking(tmp_path: Path) -> None:
    folder = make_batch(tmp_path)
    os.mkfifo(folder / "images/0002.png")
    assert problem_lines(folder) == [
        "images/0002.png: is not a regular file (a device, pipe or socket) — remove it from the batch"
    ]


def test_non_utf8_file_name(tmp_path: Path) -> None:
    folder = make_batch(tmp_path)
    raw_name = os.fsencode(folder / "images") + b"/caf\xe9.png"
    with open(raw_name, "wb") as handle:
        handle.write((folder / "images/0000.png").read_bytes())
    problems = validate_batch(folder).problems
    assert problems == [
        Problem(
            "images/caf\\xe9.png",
            "its name is not valid UTF-8 (b'caf\\xe9.png')",
            "rename it using printable UTF-8 characters",
        )
    ]
    str(problems[0]).encode("utf-8")  # printable and writable into REJECTED.txt


def test_declared_class_without_pixels(tmp_path: Path) -> None:
    folder = make_batch(tmp_path, n_val=1)
    (folder / "batch.toml").write_text(manifest_text({1: "bicycle", 2: "car"}))
    write_mask(folder / "val/masks/0000.png", mask_array([1, 2]))  # val pixels do not teach a class
    assert problem_lines(folder) == [
        'batch.toml: class "car" (value 2) has no pixels in any mask under masks/ — label it in at least one '
        "mask, or remove it from [classes]"
    ]


def test_already_taught_class(tmp_path: Path) -> None:
    folder = make_batch(tmp_path, classes={1: "bicycle", 2: "car"})
    assert problem_lines(folder, taught_names={"car", "bus"}) == [
        'batch.toml: class "car" (value 2) is already taught, or waits to be in an earlier step — a '
        "training batch may only teach new classes: remove it from [classes] and set its pixels to 0 or "
        '255, rename it if it is a different class, or set kind = "eval" for an evaluation set'
    ]


def test_identical_batch_accepted_before(tmp_path: Path) -> None:
    folder = make_batch(tmp_path)
    sha = validate_batch(folder).batch.sha256
    line = (
        ".: is identical to a batch accepted before (same files, same content) — nothing to do, it is learnt "
        "or waiting to be; to teach new classes submit new data"
    )
    assert problem_lines(folder, known_hashes={sha}) == [line]
    assert problem_lines(folder, known_hashes=lambda digest: digest == sha) == [line]
    assert validate_batch(folder, known_hashes={"0" * 64}).ok


def test_size_limits(tmp_path: Path) -> None:
    folder = make_batch(tmp_path, n_train=3)
    total = validate_batch(folder).batch.total_bytes
    assert problem_lines(folder, max_batch_bytes=1000) == [
        f".: holds {total / 1024:.1f} KiB, more than the limit of 1000 bytes (contents were not checked) — "
        "split it into smaller batches"
    ]
    # batch.toml, images/, masks/ and three files in each: 9 entries.
    assert problem_lines(folder, max_files=8) == [
        ".: holds more than 8 files and folders (contents were not checked) — split it into batches of at "
        "most 8 files"
    ]
    assert validate_batch(folder, max_files=9).ok


def test_missing_or_empty_images_folder(tmp_path: Path) -> None:
    folder = make_batch(tmp_path)
    shutil.rmtree(folder / "images")
    (folder / "images").mkdir()
    (folder / "images/.DS_Store").write_bytes(b"litter is ignored")
    (folder / "images/notes.txt").write_text("not an image")
    (folder / "images/._0000.png").write_bytes(b"macOS resource fork, hidden")
    assert problem_lines(folder) == [
        "images/notes.txt: is not an image (.jpg, .jpeg or .png) — remove it from images/",
        "images/: holds no images — add the RGB images, or remove the folder",
        "masks/0000.png: has no image with the same name in images/ — add images/0000.jpg or .png, or remove "
        "the mask",
        "masks/0001.png: has no image with the same name in images/ — add images/0001.jpg or .png, or remove "
        "the mask",
    ]
    shutil.rmtree(folder / "images")
    assert problem_lines(folder) == ["images/: is missing — put the RGB images (.jpg, .jpeg or .png) in it"]


def test_every_problem_is_reported_together(tmp_path: Path) -> None:
    folder = make_batch(tmp_path, n_train=3, classes={1: "bicycle", 2: "car"})
    (folder / "batch.toml").write_text(manifest_text({1: "bicycle", 2: "car", 255: "void"}))
    (folder / "masks/0000.png").unlink()
    write_mask(folder / "masks/0001.png", mask_array([1, 2], size=(8, 8)))
    (folder / "images/0002.png").write_bytes(b"junk")
    (folder / "images/0003.png").symlink_to("0001.png")
    files = [problem.file for problem in validate_batch(folder, taught_names={"car"}).problems]
    assert files == [
        "batch.toml",  # value 255 declared
        "images/0003.png",  # link
        "images/0000.png",  # no mask
        "images/0002.png",  # not an image
        "masks/0001.png",  # wrong size
        "batch.toml",  # car already taught
    ]


def test_nothing_is_reported_for_a_missing_folder_but_that(tmp_path: Path) -> None:
    assert problem_lines(tmp_path / "absent") == [
        ".: cannot be read (No such file or directory) — check that the batch folder exists"
    ]


_mask_values = st.sampled_from([0, 1, 2, 7, 254, 255])
_keys = st.one_of(st.integers(-300, 600).map(str), st.text(max_size=4))
_names = st.one_of(st.text(max_size=8), st.integers(), st.booleans(), st.just(""))
_manifests = st.one_of(
    st.just('[classes]\n1 = "a"\n2 = "b"\n7 = "c"\n254 = "d"\n'),  # covers every mask value: often valid
    st.text(max_size=60),
    st.builds(
        lambda kind, classes: "".join(
            [f"kind = {json.dumps(kind)}\n" if kind is not None else "", "[classes]\n"]
            + [f"{json.dumps(key)} = {json.dumps(name)}\n" for key, name in classes.items()]
        ),
        st.one_of(st.none(), st.sampled_from(["train", "eval", "exam"]), st.integers()),
        st.dictionaries(_keys, _names, max_size=4),
    ),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    manifest=_manifests,
    masks=st.lists(
        hnp.arrays(np.uint8, (4, 4), elements=_mask_values, fill=st.nothing()), min_size=1, max_size=3
    ),
    image_bytes=st.one_of(st.none(), st.none(), st.binary(max_size=64)),
)
def test_random_input_never_raises(manifest: str, masks: list[np.ndarray], image_bytes: bytes | None) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "random"
        (folder / "images").mkdir(parents=True)
        for index, labels in enumerate(masks):
            write_image(folder / f"images/{index}.png", size=(4, 4))
            write_mask(folder / f"masks/{index}.png", labels)
        if image_bytes is not None:
            (folder / "images/raw.png").write_bytes(image_bytes)
        (folder / "batch.toml").write_text(manifest, encoding="utf-8", errors="surrogatepass")
        result = validate_batch(folder)
    assert isinstance(result, ValidationResult)
    assert all(isinstance(problem, Problem) and str(problem).isprintable() for problem in result.problems)
    assert result.ok == (not result.problems)
    event("valid" if result.ok else "rejected")
    if result.ok:
        # A batch that passes holds only declared values, background and ignore.
        seen = set(np.unique(np.concatenate([labels.ravel() for labels in masks])).tolist())
        assert seen <= {0, 255, *result.batch.classes}
        assert all(result.batch.pixel_counts[value] > 0 for value in result.batch.classes)


def test_batch_toml_may_give_class_colours(tmp_path: Path) -> None:
    from engine.batch_format import manifest_colours

    folder = make_batch(tmp_path, "plates", classes={1: "orange-plate", 2: "cup"})
    (folder / "batch.toml").write_text(
        manifest_text({1: "orange-plate", 2: "cup"}) + '\n[colors]\n1 = "#ff8800"\n', encoding="utf-8"
    )
    assert validate_batch(folder).ok
    assert manifest_colours(folder) == {"orange-plate": (255, 136, 0)}
    (folder / "batch.toml").write_text(
        manifest_text({1: "orange-plate", 2: "cup"}) + '\n[colors]\n1 = "orange"\n3 = "#000000"\n',
        encoding="utf-8",
    )
    assert [str(p) for p in validate_batch(folder).problems] == [
        'batch.toml: [colors] 1 = "orange" is not a colour — write [colors] then one line per class, e.g. '
        '1 = "#ff8800"',
        'batch.toml: [colors] key "3" is not a value declared in [classes] — write [colors] then one line '
        'per class, e.g. 1 = "#ff8800"',
    ]
