"""The catalog's status snapshot (one consistent read, in a few queries on a long history), concurrent
readers and writers, and that the catalog's readers import neither torch nor alembic.

Every test runs on SQLite and on a real PostgreSQL server (see tests/helpers/postgres.py)."""

import datetime as dt
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from catalog_helpers import METRICS, T0, add_step, promoted, sha, train
from sqlalchemy import event, select
from sqlalchemy.orm import Session, sessionmaker

from ciss_daemon.catalog import connection, plain
from ciss_daemon.catalog import records as cat
from ciss_daemon.catalog.connection import session_reader
from ciss_daemon.catalog.snapshot import status_snapshot
from ciss_daemon.catalog.tables import Batch, Class, Event, ModelVersion, Rejection, Step

# --- status ----------------------------------------------------------------------------------------------


def test_status_snapshot_shows_model_job_queue_rejections_and_events(
    session: Session, tmp_path: Path, url: str
) -> None:
    promoted(session, add_step(session, "a", {1: "car", 2: "bus"}), tmp_path)
    running = add_step(session, "b", {1: "person"})
    queued = add_step(session, "c", {1: "tram"})
    job = cat.create_job(session=session, step=running, max_attempts=3, jobs_dir=tmp_path)
    waiting = cat.create_job(session=session, step=queued, max_attempts=3, jobs_dir=tmp_path)
    cat.start_job(session=session, job=job, pid=77, now=T0)
    cat.update_job_progress(
        session=session, job=job, progress={"iteration": 5, "total": 50, "eta_seconds": 90.0}, now=T0
    )
    for minute, name in enumerate(("old", "new")):
        cat.record_rejection(
            session=session,
            batch_name=name,
            reasons=[f"{name}: masks/1.png is missing", "second"],
            path=tmp_path / "rejected" / name,
            now=T0 + dt.timedelta(minutes=minute),
        )
    for minute in range(12):
        cat.log_event(
            session=session,
            kind="tick",
            message=f"event {minute}",
            step=running,
            now=T0 + dt.timedelta(minutes=minute),
        )
    snapshot = status_snapshot(session_reader(session), recent=10)
    json.dumps(snapshot)  # JSON-ready

    assert snapshot["current"] == {
        "version": "v0001",
        "step": 0,
        "promoted_at": snapshot["current"]["promoted_at"],
        "classes": [{"id": 1, "name": "car"}, {"id": 2, "name": "bus"}],
        "metrics": {"miou_all": 0.6, "miou_old": 0.7, "miou_new": 0.5, "hiou": 0.58, "paper": None},
    }
    assert [(s["index"], s["batch"], s["state"], s["classes"]) for s in snapshot["steps"]] == [
        (0, "a", "promoted", ["car", "bus"]),
        (1, "b", "training", ["person"]),
        (2, "c", "queued", ["tram"]),
    ]
    assert snapshot["counts"] == {"promoted": 1, "training": 1, "queued": 1}
    assert snapshot["running"]["job"] == job.id and snapshot["running"]["step"] == 1
    assert snapshot["running"]["pid"] == 77 and snapshot["running"]["eta_seconds"] == 90.0
    assert snapshot["running"]["progress"]["iteration"] == 5
    assert snapshot["queue"] == [{"job": waiting.id, "step": 2, "batch": "c", "attempts": 0}]
    assert [(r["batch"], r["reason"], r["n_reasons"]) for r in snapshot["rejections"]] == [
        ("new", "new: masks/1.png is missing", 2),
        ("old", "old: masks/1.png is missing", 2),
    ]
    assert [e["message"] for e in snapshot["events"]] == [f"event {m}" for m in range(11, 1, -1)]
    assert snapshot["events"][0]["step"] == 1
    assert snapshot["candidates"] == []

    session.commit()
    with plain.reading(url) as read:  # what `ciss status` reads: the driver itself, without SQLAlchemy
        assert status_snapshot(read, recent=10) == snapshot


def _write_a_thousand_steps(factory: sessionmaker[Session], states: tuple[str, ...]) -> None:
    """1,000 steps in turn in ``states``, 2 classes each, the current model at step 996, 1,000 rejections."""
    with connection.transaction(factory) as s:
        # Built directly: the catalog functions would work too, only slower.
        for i in range(1000):
            batch = Batch(
                name=f"b{i}",
                kind="train",
                sha256=sha(f"b{i}"),
                received_at=T0,
                store_path="s",
                class_names={"2": f"c{i}-1", "1": f"c{i}-0"},
                n_train=1,
                n_val=1,
            )
            step = Step(index=i, batch=batch, state=states[i % 4], created_at=T0, updated_at=T0)
            s.add_all([batch, step])
            s.add_all(
                Class(
                    id=2 * i + k + 1,
                    name=f"c{i}-{k}",
                    batch=batch,
                    step=step,
                    taught=i % 4 == 0,
                    created_at=T0,
                )
                for k in range(2)
            )
            if i == 996:
                s.add(
                    ModelVersion(
                        version="v0250",
                        step=step,
                        path="p",
                        metrics={"candidate": METRICS},
                        is_current=True,
                        state="promoted",
                        created_at=T0,
                        promoted_at=T0,
                    )
                )
            s.add(
                Rejection(
                    batch_name=f"r{i}",
                    reasons=[f"reason {i}"],
                    path="r",
                    created_at=T0 + dt.timedelta(seconds=i),
                )
            )


def test_status_snapshot_of_a_thousand_steps_in_a_few_queries(factory: sessionmaker[Session]) -> None:
    states = ("promoted", "failed", "discarded", "rolled_back")
    _write_a_thousand_steps(factory, states)
    statements: list[str] = []
    engine = factory.kw["bind"]
    event.listen(engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    with factory() as s:
        snapshot = status_snapshot(session_reader(s), recent=5)
    assert len(statements) <= 8, statements
    assert len(snapshot["steps"]) == 1000
    assert [x["index"] for x in snapshot["steps"]] == list(range(1000))
    assert snapshot["steps"][997] == {
        "index": 997,
        "batch": "b997",
        "state": "failed",
        "reason": None,
        "updated_at": T0.isoformat(),
        "classes": ["c997-0", "c997-1"],
    }
    assert snapshot["counts"] == {state: 250 for state in states}
    assert snapshot["current"]["version"] == "v0250" and snapshot["current"]["step"] == 996
    assert len(snapshot["current"]["classes"]) == 500
    assert [r["batch"] for r in snapshot["rejections"]] == ["r999", "r998", "r997", "r996", "r995"]
    assert snapshot["running"] is None and snapshot["queue"] == []


# --- concurrency -----------------------------------------------------------------------------------------


def test_reader_reads_while_a_writer_holds_a_write_transaction(url: str) -> None:
    writer_engine, reader_engine = connection.make_engine(url), connection.make_engine(url)
    writers, readers = connection.session_factory(writer_engine), connection.session_factory(reader_engine)
    with connection.transaction(writers) as w:
        cat.log_event(session=w, kind="first", message="committed")
    with writers() as w:
        w.connection(execution_options=connection.WRITE_OPTIONS)
        cat.log_event(session=w, kind="second", message="not yet committed")
        started = time.monotonic()
        with readers() as r:
            seen = [e["message"] for e in status_snapshot(session_reader(r))["events"]]
        assert time.monotonic() - started < 1.0  # did not wait out the busy timeout
        assert seen == ["committed"]
        w.commit()
    with readers() as r:
        assert len(status_snapshot(session_reader(r))["events"]) == 2
    writer_engine.dispose()
    reader_engine.dispose()


def test_a_second_writer_waits_for_the_first_instead_of_failing(url: str) -> None:
    first_engine, second_engine = connection.make_engine(url), connection.make_engine(url)
    first, second = connection.session_factory(first_engine), connection.session_factory(second_engine)
    errors: list[BaseException] = []
    done = threading.Event()

    def write_second() -> None:
        try:
            with connection.transaction(second) as s:
                # Read, then write: a plain deferred BEGIN would read a snapshot the first writer then
                # makes stale, and fail at once with "database is locked" instead of waiting.
                count = len(status_snapshot(session_reader(s))["events"])
                cat.log_event(session=s, kind="second", message=f"second writer after {count}")
        except BaseException as exc:  # reported to the test thread below
            errors.append(exc)
        done.set()

    with connection.transaction(first) as s:
        cat.log_event(session=s, kind="first", message="first writer")
        thread = threading.Thread(target=write_second)
        thread.start()
        assert not done.wait(0.5)  # blocked on the write lock while the first is open
    thread.join(timeout=10)
    assert errors == []
    with first() as s:
        assert sorted(s.scalars(select(Event.message))) == ["first writer", "second writer after 1"]
    first_engine.dispose()
    second_engine.dispose()


def test_status_readers_see_each_promotion_whole_while_steps_are_promoted(url: str, tmp_path: Path) -> None:
    # ciss status runs several queries; each read must see one committed state, never half of a promotion
    # (a step promoted but its class not yet taught, or the old model still current).
    writer_engine, reader_engine = connection.make_engine(url), connection.make_engine(url, read_only=True)
    writers, readers = connection.session_factory(writer_engine), connection.session_factory(reader_engine)
    done = threading.Event()
    errors: list[BaseException] = []

    def write() -> None:
        try:
            for i in range(30):
                with connection.transaction(writers) as s:
                    version = train(s, add_step(s, f"s{i}", {1: f"class{i}"}), tmp_path)
                with connection.transaction(writers) as s:
                    cat.promote_version(session=s, version=s.merge(version))
        except BaseException as exc:  # reported to the test thread below
            errors.append(exc)
        done.set()

    thread = threading.Thread(target=write)
    thread.start()
    reads, problems = 0, []
    while not done.is_set() or reads == 0:
        with readers() as r:
            snap = status_snapshot(session_reader(r))
        reads += 1
        promoted_classes = {c for st in snap["steps"] if st["state"] == "promoted" for c in st["classes"]}
        current = snap["current"]
        taught = {c["name"] for c in current["classes"]} if current else set()
        if taught != promoted_classes:
            problems.append(f"taught {sorted(taught)} but promoted steps teach {sorted(promoted_classes)}")
        states = {st["index"]: st["state"] for st in snap["steps"]}
        if current and states.get(current["step"]) != "promoted":
            problems.append(f"current model of step {current['step']} whose step is not promoted")
        if sum(snap["counts"].values()) != len(snap["steps"]):
            problems.append(f"counts {snap['counts']} for {len(snap['steps'])} steps")
    thread.join(timeout=60)
    writer_engine.dispose()
    reader_engine.dispose()
    assert errors == []
    assert problems == [], problems[:3]
    assert reads > 1


# --- imports ---------------------------------------------------------------------------------------------


def test_catalog_settings_and_workspace_do_not_import_torch(url: str) -> None:
    code = (
        "import sys\n"
        "from ciss_daemon import settings, workspace\n"
        "from ciss_daemon.catalog import connection, records, snapshot, tables\n"
        f"connection.check_catalog({url!r})\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert 'alembic' not in sys.modules, 'alembic imported by a reader'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parents[2],
    )
    assert result.returncode == 0, result.stderr
