"""The benchmarks' catalog builder: a small catalog that readers and the catalog functions accept.

No timings are asserted here: timed tests flake on shared machines; `make bench-daemon` measures.
"""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from benchmarks.catalog_builder import make_status_workspace
from benchmarks.daemon.report import render_markdown
from benchmarks.measure import summary
from ciss_daemon.catalog import connection
from ciss_daemon.catalog import records as catalog
from ciss_daemon.catalog.connection import session_reader
from ciss_daemon.catalog.snapshot import status_snapshot
from ciss_daemon.cli import app


def test_built_catalog_shows_every_step_promoted(tmp_path: Path) -> None:
    ws, stats = make_status_workspace(tmp_path / "ws", steps=50)
    assert (stats.steps, stats.classes, stats.rejections) == (50, 150, 2)
    url = f"sqlite:///{ws.catalog_path}"
    connection.check_catalog(url)  # at schema head, as `ciss status` requires
    engine = connection.make_engine(url)
    factory = connection.session_factory(engine)
    try:
        with factory() as session:
            data = status_snapshot(session_reader(session))
            class_ids = [cid for cid, _, _ in catalog.class_map(session=session, upto_step=49)]
            assert catalog.next_runnable_step(session=session) is None
    finally:
        engine.dispose()
    assert [s["index"] for s in data["steps"]] == list(range(50))
    assert {s["state"] for s in data["steps"]} == {"promoted"}
    assert data["counts"] == {"promoted": 50}
    assert data["current"]["version"] == "v0050" and data["current"]["step"] == 49
    assert [c["id"] for c in data["current"]["classes"]] == list(range(1, 151))
    assert class_ids == list(range(1, 151))
    assert set(data["current"]["metrics"]) == {*catalog.METRIC_KEYS, "paper"}
    assert data["queue"] == [] and data["running"] is None and data["candidates"] == []
    assert len(data["rejections"]) == 2 and len(data["events"]) == 10


def test_the_daemon_carries_on_from_a_built_catalog(tmp_path: Path) -> None:
    # The next batch through the real catalog functions gets the next step and class ids: the builder kept
    # the invariants the daemon relies on (contiguous ids in step order, nothing to renumber).
    ws, _ = make_status_workspace(tmp_path / "ws", steps=5)
    engine = connection.make_engine(f"sqlite:///{ws.catalog_path}")
    try:
        with connection.transaction(connection.session_factory(engine)) as session:
            batch = catalog.record_batch(
                session=session,
                name="next",
                kind="train",
                sha256="0" * 64,
                store_path=ws.store / "next",
                class_names={1: "newcomer", 2: "another"},
                n_train=4,
                n_val=1,
            )
            step = catalog.create_step(session=session, batch=batch)
            assert step.index == 5
            assert [c.id for c in batch.classes] == [16, 17]
            assert [c.id for c in step.classes] == [16, 17]
    finally:
        engine.dispose()


def test_status_command_reads_the_built_catalog(tmp_path: Path) -> None:
    ws, _ = make_status_workspace(tmp_path / "ws", steps=30)
    result = CliRunner().invoke(app, ["status", "--workspace", str(ws.root)])
    assert result.exit_code == 0, result.output
    assert "steps (30)" in result.output and "v0030" in result.output


def test_results_markdown_from_a_summary() -> None:
    s = summary([0.3, 0.1, 0.2])
    assert (s["median"], s["min"], s["max"], s["n"]) == (0.2, 0.1, 0.3, 3)
    machine = {
        "cpu_model": "test CPU",
        "usable_cpus": 1,
        "logical_cpus": 1,
        "python": "3.11",
        "sqlite": "3.40",
        "sqlalchemy": "2",
        "platform": "linux",
        "workdir_fs": "ext4",
        "loadavg_at_start": [0, 0, 0],
    }
    text = render_markdown(
        {"command": "python -m benchmarks.daemon idle", "taken_at": "now", "machine": machine}
    )
    assert "test CPU" in text and "python -m benchmarks.daemon idle" in text
