"""Catalog functions: class ids, steps and their lifecycle, jobs, promotion and rollback, the status
snapshot, concurrent readers and writers, one daemon per catalog, and that none of it imports torch.

Every test runs on SQLite and on a real PostgreSQL server (see tests/helpers/postgres.py)."""

import datetime as dt
import hashlib
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from postgres import PostgresServer
from sqlalchemy import event, select
from sqlalchemy.orm import Session, sessionmaker

from ciss_daemon.catalog import connection, plain
from ciss_daemon.catalog import records as cat
from ciss_daemon.catalog.connection import session_reader
from ciss_daemon.catalog.snapshot import status_snapshot
from ciss_daemon.catalog.tables import Batch, Class, Event, Job, ModelVersion, Rejection, Step
from ciss_daemon.exceptions import CatalogError, OperatorError

T0 = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.UTC)
METRICS = {"miou_all": 0.6, "miou_old": 0.7, "miou_new": 0.5, "hiou": 0.58, "per_class": {"1": 0.7}}


@pytest.fixture(scope="module")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Upgraded once; each test works on its own copy.
    path = tmp_path_factory.mktemp("template") / "catalog.sqlite"
    connection.upgrade_catalog(f"sqlite:///{path}", backup_dir=None)
    return path


@pytest.fixture(scope="module")
def postgres_template(postgres: PostgresServer) -> str:
    # Upgraded once; each test gets a database copied from it (CREATE DATABASE ... TEMPLATE).
    url = postgres.new_database()
    connection.upgrade_catalog(url, backup_dir=None)
    return url.rpartition("/")[2]


@pytest.fixture
def url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if backend == "postgresql":
        postgres: PostgresServer = request.getfixturevalue("postgres")
        return postgres.new_database(template=request.getfixturevalue("postgres_template"))
    path = tmp_path / "catalog.sqlite"
    shutil.copy(request.getfixturevalue("sqlite_template"), path)
    return f"sqlite:///{path}"


@pytest.fixture
def factory(url: str) -> Iterator[sessionmaker[Session]]:
    engine = connection.make_engine(url)
    yield connection.session_factory(engine)
    engine.dispose()


@pytest.fixture
def session(factory: sessionmaker[Session]) -> Iterator[Session]:
    with factory() as s:
        yield s


def sha(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def add_batch(session: Session, name: str, classes: dict[int, str], kind: str = "train") -> Batch:
    return cat.record_batch(
        session=session,
        name=name,
        kind=kind,
        sha256=sha(name),
        store_path=f"store/{name}",
        class_names=classes,
        n_train=4,
        n_val=2,
        now=T0,
    )


def add_step(session: Session, name: str, classes: dict[int, str]) -> Step:
    return cat.create_step(session=session, batch=add_batch(session, name, classes), now=T0)


def train(session: Session, step: Step, tmp_path: Path) -> ModelVersion:
    """Queue, train and evaluate a step; returns its candidate model."""
    job = cat.create_job(session=session, step=step, max_attempts=3, jobs_dir=tmp_path / "jobs")
    cat.start_job(session=session, job=job, pid=4242)
    cat.set_step_state(session=session, step=step, state="evaluating")
    cat.finish_job(session=session, job=job, state="done")
    return cat.record_model_version(
        session=session,
        step=step,
        models_dir=tmp_path / "models",
        files={"model.safetensors": "ab" * 32},
        metrics={"candidate": METRICS, "current": None},
    )


def promoted(session: Session, step: Step, tmp_path: Path) -> ModelVersion:
    version = train(session, step, tmp_path)
    cat.promote_version(session=session, version=version)
    return version


def ids(session: Session) -> dict[str, int]:
    return dict(session.execute(select(Class.name, Class.id)).all())


def taught(session: Session) -> set[str]:
    """Names of the classes the current model knows (the ``taught`` flag the catalog keeps)."""
    return set(session.scalars(select(Class.name).where(Class.taught)))


def running(session: Session) -> Job | None:
    return session.scalar(select(Job).where(Job.state == "running"))


# --- batches and classes ---------------------------------------------------------------------------------


def test_class_ids_follow_mask_values_and_continue_across_batches(session: Session) -> None:
    first = add_batch(session, "vehicles", {2: "car", 1: "bus"})
    second = add_batch(session, "people", {7: "rider", 3: "person"})
    assert ids(session) == {"bus": 1, "car": 2, "person": 3, "rider": 4}
    assert first.value_map == {"1": 1, "2": 2}
    assert second.value_map == {"3": 3, "7": 4}
    assert cat.batch_value_map(session=session, batch=second) == {3: 3, 7: 4}


def test_step_indexes_start_at_zero_and_eval_sets_are_not_steps(session: Session) -> None:
    assert add_step(session, "a", {1: "car"}).index == 0
    evaluation = add_batch(session, "full", {1: "car"}, kind="eval")
    with pytest.raises(ValueError, match="is an evaluation set"):
        cat.create_step(session=session, batch=evaluation)
    assert add_step(session, "b", {1: "bus"}).index == 1
    assert [c.name for c in session.get(Step, 2).classes] == ["bus"]


def test_a_released_batch_may_be_accepted_again_with_its_hash(session: Session, tmp_path: Path) -> None:
    promoted(session, add_step(session, "a", {1: "car"}), tmp_path)
    failed = add_step(session, "b", {1: "bus"})
    add_batch(session, "full", {1: "car"}, kind="eval")
    assert cat.live_batch_hashes(session=session) == {sha("a"), sha("b"), sha("full")}
    job = cat.create_job(session=session, step=failed, max_attempts=1, jobs_dir=tmp_path / "jobs")
    cat.start_job(session=session, job=job, pid=4242)
    cat.finish_job(session=session, job=job, state="failed", error="disk full")
    assert failed.state == "failed"
    assert cat.live_batch_hashes(session=session) == {sha("a"), sha("full")}
    # The same content again (the failed step's folder, resubmitted): a new batch and a new step.
    again = cat.create_step(session=session, batch=add_batch(session, "b", {1: "bus"}), now=T0)
    assert (again.index, [c.name for c in again.classes]) == (2, ["bus"])
    assert ids(session) == {"car": 1, "bus": 2}
    assert again.batch.sha256 == sha("b")
    assert cat.live_batch_hashes(session=session) == {sha("a"), sha("b"), sha("full")}


def test_eval_set_is_mapped_to_the_classes_known_at_each_look(session: Session, tmp_path: Path) -> None:
    promoted(session, add_step(session, "a", {1: "car"}), tmp_path)
    evaluation = add_batch(session, "full", {1: "car", 2: "tram"}, kind="eval")
    assert evaluation.value_map == {"1": 1}  # tram is not a class yet
    assert ids(session) == {"car": 1}  # an eval set adds no class
    add_step(session, "b", {5: "tram"})
    assert cat.batch_value_map(session=session, batch=evaluation) == {1: 1, 2: 2}


def test_taught_and_pending_names_are_refused(session: Session, tmp_path: Path) -> None:
    promoted(session, add_step(session, "a", {1: "car"}), tmp_path)
    add_step(session, "b", {1: "bus"})
    assert taught(session) == {"car"}
    with pytest.raises(CatalogError) as caught:
        add_batch(session, "c", {1: "car"})
    assert str(caught.value) == "batch 'c': class 'car' is already taught (id 1)"
    with pytest.raises(CatalogError) as caught:
        add_batch(session, "d", {1: "bus"})
    assert str(caught.value) == (
        "batch 'd': class 'bus' is already being taught by step 1 (accepted); "
        "wait for that step to finish or discard it"
    )


# --- lifecycle -------------------------------------------------------------------------------------------


def test_lifecycle_accepts_the_legal_path(session: Session) -> None:
    step = add_step(session, "a", {1: "car"})
    later = T0 + dt.timedelta(hours=1)
    for state in (
        "queued",
        "training",
        "queued",
        "training",
        "evaluating",
        "held",
        "promoted",
        "rolled_back",
    ):
        cat.set_step_state(session=session, step=step, state=state, reason=f"now {state}", now=later)
        assert step.state == state and step.reason == f"now {state}"
    assert step.updated_at == later and step.created_at == T0


@pytest.mark.parametrize(
    ("path", "target", "message"),
    [
        ((), "promoted", "step 0 is accepted; it cannot become promoted (allowed: queued, discarded)"),
        (
            ("queued",),
            "evaluating",
            "step 0 is queued; it cannot become evaluating (allowed: training, discarded)",
        ),
        (
            ("queued", "training"),
            "held",
            "step 0 is training; it cannot become held (allowed: evaluating, queued, failed)",
        ),
        (
            ("queued", "training", "failed"),
            "queued",
            "step 0 is failed; it cannot become queued (allowed: none, it is final)",
        ),
        (
            ("discarded",),
            "queued",
            "step 0 is discarded; it cannot become queued (allowed: none, it is final)",
        ),
        (
            ("queued", "training", "evaluating", "held"),
            "failed",
            "step 0 is held; it cannot become failed (allowed: promoted, discarded)",
        ),
    ],
)
def test_lifecycle_refuses_illegal_moves(
    session: Session, path: tuple[str, ...], target: str, message: str
) -> None:
    step = add_step(session, "a", {1: "car"})
    for state in path:
        cat.set_step_state(session=session, step=step, state=state)
    with pytest.raises(OperatorError) as caught:
        cat.set_step_state(session=session, step=step, state=target)
    assert str(caught.value) == message
    assert step.state == (path[-1] if path else "accepted")


def test_unknown_state_is_a_programming_error(session: Session) -> None:
    step = add_step(session, "a", {1: "car"})
    with pytest.raises(ValueError, match="step state 'done' is not one of"):
        cat.set_step_state(session=session, step=step, state="done")


def test_later_steps_wait_for_earlier_ones(session: Session, tmp_path: Path) -> None:
    steps = [add_step(session, name, {1: name + "-class"}) for name in ("a", "b", "c")]
    assert cat.next_runnable_step(session=session) is None  # accepted, not queued yet
    jobs = [
        cat.create_job(session=session, step=s, max_attempts=3, jobs_dir=tmp_path) for s in reversed(steps)
    ]
    assert cat.next_runnable_step(session=session) is steps[0]
    cat.start_job(session=session, job=jobs[2], pid=1)
    assert cat.next_runnable_step(session=session) is None  # one job at a time
    cat.set_step_state(session=session, step=steps[0], state="evaluating")
    cat.finish_job(session=session, job=jobs[2], state="done")
    cat.set_step_state(session=session, step=steps[0], state="held")
    assert cat.next_runnable_step(session=session) is None  # a held step blocks the steps after it
    cat.discard_step(session=session, step=steps[0])
    assert cat.next_runnable_step(session=session) is steps[1]
    cat.start_job(session=session, job=jobs[1], pid=2)
    cat.finish_job(session=session, job=jobs[1], state="failed", error="CUDA out of memory")
    assert steps[1].state == "failed" and steps[1].reason == "CUDA out of memory"
    assert cat.next_runnable_step(session=session) is steps[2]


def test_jobs_count_attempts_and_report_progress(session: Session, tmp_path: Path) -> None:
    step = add_step(session, "a", {1: "car"})
    job = cat.create_job(session=session, step=step, max_attempts=2, jobs_dir=tmp_path / "jobs", now=T0)
    assert job.workdir == str(tmp_path / "jobs" / str(job.id))
    assert (job.state, step.state, running(session)) == ("queued", "queued", None)
    cat.start_job(session=session, job=job, pid=99, now=T0)
    assert (job.state, job.attempts, job.pid, step.state) == ("running", 1, 99, "training")
    assert running(session) is job
    beat = T0 + dt.timedelta(minutes=3)
    cat.update_job_progress(session=session, job=job, progress={"iteration": 10, "total": 100}, now=beat)
    assert job.progress == {"iteration": 10, "total": 100} and job.heartbeat_at == beat
    cat.requeue_job(session=session, job=job, error="daemon restarted")
    assert (job.state, job.pid, step.state, step.reason) == ("queued", None, "queued", "daemon restarted")
    with pytest.raises(ValueError, match="only a running job can be requeued"):
        cat.requeue_job(session=session, job=job, error="again")
    cat.start_job(session=session, job=job, pid=100)
    assert job.attempts == 2
    cat.finish_job(session=session, job=job, state="failed", error="killed by signal 9")
    assert (job.state, job.pid, step.state) == ("failed", None, "failed")
    with pytest.raises(ValueError, match="already failed"):
        cat.finish_job(session=session, job=job, state="done")


def test_discarding_a_queued_step_cancels_its_job(session: Session, tmp_path: Path) -> None:
    step = add_step(session, "a", {1: "car"})
    job = cat.create_job(session=session, step=step, max_attempts=3, jobs_dir=tmp_path)
    cat.discard_step(session=session, step=step, reason="operator")
    assert (step.state, job.state) == ("discarded", "cancelled")
    assert job.finished_at is not None


# --- versions, promotion, rollback -----------------------------------------------------------------------


def test_versions_are_numbered_in_order(session: Session, tmp_path: Path) -> None:
    first = train(session, add_step(session, "a", {1: "car"}), tmp_path)
    assert (first.version, first.path, first.state) == (
        "v0001",
        str(tmp_path / "models" / "v0001"),
        "candidate",
    )
    cat.set_step_state(session=session, step=first.step, state="held")
    cat.discard_step(session=session, step=first.step)
    assert first.state == "discarded"
    assert train(session, add_step(session, "b", {1: "bus"}), tmp_path).version == "v0002"
    assert cat.find_version(session=session, version="v0002").step.index == 1
    with pytest.raises(OperatorError) as caught:
        cat.find_version(session=session, version="v0009")
    assert str(caught.value) == "no model version 'v0009' in the catalog; `ciss models` lists them"


def test_promotion_makes_current_retires_the_previous_and_teaches(session: Session, tmp_path: Path) -> None:
    v1 = promoted(session, add_step(session, "a", {1: "car", 2: "bus"}), tmp_path)
    assert cat.current_version(session=session) is v1
    assert (v1.state, v1.is_current, v1.step.state) == ("promoted", True, "promoted")
    assert taught(session) == {"car", "bus"}
    step = add_step(session, "b", {1: "person"})
    v2 = train(session, step, tmp_path)
    assert taught(session) == {"car", "bus"}  # not before promotion
    cat.promote_version(session=session, version=v2, reason="gate passed")
    assert cat.current_version(session=session) is v2
    assert (v1.state, v1.is_current) == ("retired", False)
    assert step.reason == "gate passed"
    assert taught(session) == {"car", "bus", "person"}
    with pytest.raises(OperatorError) as caught:
        cat.promote_version(session=session, version=v1)
    assert str(caught.value) == "model v0001 is retired; only a candidate can be promoted"
    assert cat.class_map(session=session, upto_step=1) == [(1, "car", 0), (2, "bus", 0), (3, "person", 1)]
    assert cat.class_map(session=session, upto_step=0) == [(1, "car", 0), (2, "bus", 0)]


def test_rollback_untaught_later_classes_and_retires_their_models(session: Session, tmp_path: Path) -> None:
    v1 = promoted(session, add_step(session, "a", {1: "car"}), tmp_path)
    v2 = promoted(session, add_step(session, "b", {1: "bus"}), tmp_path)
    v3 = promoted(session, add_step(session, "c", {1: "tram"}), tmp_path)
    rolled = cat.rollback_to(session=session, version=v1)
    assert [s.index for s in rolled] == [1, 2]
    assert cat.current_version(session=session) is v1
    assert [(v.state, v.is_current) for v in (v1, v2, v3)] == [
        ("promoted", True),
        ("retired", False),
        ("retired", False),
    ]
    assert [s.state for s in session.scalars(select(Step).order_by(Step.index))] == [
        "promoted",
        "rolled_back",
        "rolled_back",
    ]
    assert v2.step.reason == "rolled back to v0001"
    assert taught(session) == {"car"}
    with pytest.raises(OperatorError) as caught:
        cat.rollback_to(session=session, version=v3)
    assert str(caught.value) == (
        "model v0003 is not a model that was promoted and is still in the history; "
        "`ciss models` lists the models you can roll back to"
    )
    with pytest.raises(OperatorError) as caught:
        cat.rollback_to(session=session, version=v1)
    assert str(caught.value) == "model v0001 is already the current model; nothing to roll back"


def test_rollback_waits_for_held_and_resumable_steps(session: Session, tmp_path: Path) -> None:
    v1 = promoted(session, add_step(session, "a", {1: "car"}), tmp_path)
    promoted(session, add_step(session, "b", {1: "bus"}), tmp_path)
    held = train(session, add_step(session, "c", {1: "tram"}), tmp_path)
    cat.set_step_state(session=session, step=held.step, state="held")
    with pytest.raises(OperatorError) as caught:
        cat.rollback_to(session=session, version=v1)
    assert str(caught.value) == "step 2 is held; promote or discard it first, then roll back"
    cat.discard_step(session=session, step=held.step)
    step = add_step(session, "d", {1: "bike"})
    job = cat.create_job(session=session, step=step, max_attempts=3, jobs_dir=tmp_path)
    cat.start_job(session=session, job=job, pid=5)
    cat.requeue_job(session=session, job=job, error="daemon restarted")
    with pytest.raises(OperatorError) as caught:
        cat.rollback_to(session=session, version=v1)
    assert str(caught.value) == (
        "step 3 has a partly trained job waiting to resume; let it finish or discard it, then roll back"
    )


def test_released_classes_leave_no_gap_in_the_ids(session: Session, tmp_path: Path) -> None:
    promoted(session, add_step(session, "a", {1: "car", 2: "bus"}), tmp_path)
    failing = add_step(session, "b", {1: "person", 2: "rider"})
    waiting = add_step(session, "c", {4: "tram"})
    assert ids(session)["tram"] == 5
    job = cat.create_job(session=session, step=failing, max_attempts=1, jobs_dir=tmp_path)
    cat.start_job(session=session, job=job, pid=3)
    cat.finish_job(session=session, job=job, state="failed", error="diverged")
    # The waiting step trains on the model of step 0, which knows ids 1..2: its class becomes id 3.
    assert ids(session) == {"car": 1, "bus": 2, "tram": 3, "person": 4, "rider": 5}
    assert waiting.batch.value_map == {"4": 3}
    assert failing.batch.value_map == {"1": 4, "2": 5}
    assert cat.class_map(session=session, upto_step=2) == [(1, "car", 0), (2, "bus", 0), (3, "tram", 2)]


def test_a_rolled_back_class_can_be_taught_again(session: Session, tmp_path: Path) -> None:
    v1 = promoted(session, add_step(session, "a", {1: "car"}), tmp_path)
    promoted(session, add_step(session, "b", {1: "bus", 2: "tram"}), tmp_path)
    cat.rollback_to(session=session, version=v1)
    step = add_step(session, "c", {1: "tram"})
    assert [(c.id, c.name) for c in step.classes] == [(2, "tram")]
    assert ids(session) == {"car": 1, "tram": 2, "bus": 3}
    promoted(session, step, tmp_path)
    assert taught(session) == {"car", "tram"}
    steps = status_snapshot(session_reader(session))["steps"]
    assert [(s["state"], s["classes"]) for s in steps] == [
        ("promoted", ["car"]),
        ("rolled_back", ["bus", "tram"]),  # as its batch declared them
        ("promoted", ["tram"]),
    ]
    assert cat.class_map(session=session, upto_step=2) == [(1, "car", 0), (2, "tram", 2)]


def test_times_are_stored_as_utc(factory: sessionmaker[Session]) -> None:
    eastern = dt.timezone(dt.timedelta(hours=-5))
    with connection.transaction(factory) as s:
        cat.log_event(session=s, kind="test", message="hello", now=dt.datetime(2026, 5, 1, 7, tzinfo=eastern))
    with factory() as s:
        at = s.scalars(select(Event.at)).one()
    assert at == T0 and at.tzinfo == dt.UTC
    with pytest.raises(Exception, match="naive datetime"), connection.transaction(factory) as s:
        cat.log_event(session=s, kind="test", message="naive", now=dt.datetime(2026, 5, 1, 12))


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


def test_status_snapshot_of_a_thousand_steps_in_a_few_queries(factory: sessionmaker[Session]) -> None:
    states = ("promoted", "failed", "discarded", "rolled_back")
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
