"""engine/batch_format.py: one set of manifest rules, read alike by the daemon's validation and the engine."""

from pathlib import Path

import pytest
from batchmaker import make_batch

from ciss_daemon.batch.validation import validate_batch
from engine.batch_format import BatchManifest, parse_manifest
from engine.data import read_manifest
from engine.exceptions import DataError

CLASS_TODO = 'use the integer mask values 1 to 254 as keys, e.g. 1 = "bicycle"'

# A manifest, and the first problem both readers report (the engine stops there, validation goes on).
BAD_MANIFESTS = [
    (
        'kinds = "train"\n[classes]\n1 = "a"\n',
        'batch.toml: has unknown key "kinds" — remove it; batch.toml holds only kind, [classes] and [colors]',
    ),
    (
        'kind = "test"\n[classes]\n1 = "a"\n',
        'batch.toml: kind = "test" is not a batch kind — write kind = "train" or kind = "eval", or leave '
        "kind out for a training batch",
    ),
    (
        'kind = "train"\n',
        'batch.toml: has no [classes] table — declare the classes (e.g. kind = "train" and a [classes] table '
        'such as 1 = "bicycle")',
    ),
    ("classes = 3\n", 'batch.toml: classes is not a table — write it as [classes] then 1 = "bicycle"'),
    ("[classes]\n", 'batch.toml: [classes] declares no classes — add one line per class: 1 = "bicycle"'),
    ('[classes]\nbike = "a"\n', f'batch.toml: [classes] key "bike" is not a mask value — {CLASS_TODO}'),
    ('[classes]\n01 = "a"\n', 'batch.toml: [classes] key "01" has leading zeros — write it as 1'),
    (
        '[classes]\n0 = "a"\n',
        "batch.toml: [classes] declares value 0, which is background — remove it; 0 is always background",
    ),
    (
        '[classes]\n255 = "a"\n',
        "batch.toml: [classes] declares value 255, which means ignore — remove it; 255 always means ignore",
    ),
    (
        '[classes]\n300 = "a"\n',
        "batch.toml: [classes] declares value 300, outside the 8-bit mask range — use values 1 to 254",
    ),
    (
        "[classes]\n1 = 5\n",
        "batch.toml: the class name for value 1 is not a string (it is 5) — write the name in quotes, "
        'e.g. 1 = "bicycle"',
    ),
    (
        '[classes]\n1 = "  "\n',
        'batch.toml: value 1 has an empty class name — give it a name, e.g. 1 = "bicycle"',
    ),
    (
        '[classes]\n1 = "car "\n',
        "batch.toml: the class name 'car ' for value 1 has spaces at its ends or control characters — write "
        "the name without them",
    ),
    (
        '[classes]\n1 = "a"\n2 = "a"\n',
        'batch.toml: class name "a" is given to values 1, 2 — a class appears once per batch: give each '
        "value its own name, or relabel to one value",
    ),
    (
        '[classes]\n1 = "a"\n[colors]\n1 = "red"\n',
        'batch.toml: [colors] 1 = "red" is not a colour — write [colors] then one line per class, e.g. 1 = '
        '"#ff8800"',
    ),
]


@pytest.mark.parametrize(("text", "first"), BAD_MANIFESTS)
def test_the_engine_and_validation_refuse_a_manifest_with_the_same_words(
    tmp_path: Path, text: str, first: str
) -> None:
    folder = make_batch(tmp_path, "b", classes={1: "a"})
    (folder / "batch.toml").write_text(text)
    with pytest.raises(DataError) as info:
        read_manifest(folder)
    assert str(info.value) == f"batch 'b': {first}"
    assert first in [str(problem) for problem in validate_batch(folder).problems]


def test_a_good_manifest_reads_the_same_in_both(tmp_path: Path) -> None:
    folder = make_batch(tmp_path, "bikes", classes={3: "car", 1: "bicycle"})
    (folder / "batch.toml").write_text('kind = "train"\n[classes]\n3 = "car"\n1 = "bicycle"\n')
    assert read_manifest(folder) == BatchManifest(
        name="bikes", kind="train", classes={1: "bicycle", 3: "car"}
    )
    validated = validate_batch(folder).batch
    assert validated is not None and validated.classes == {1: "bicycle", 3: "car"}


def test_parse_manifest_lists_every_problem_and_keeps_the_readable_classes() -> None:
    parsed = parse_manifest({"kind": "test", "classes": {"1": "a", "01": "b", "2": "c "}})
    assert parsed.kind == "train" and parsed.classes == {1: "a"}
    assert [problem.what.split(" ")[0] for problem in parsed.problems] == ["kind", "[classes]", "the"]
