"""Catalog functions: class ids, steps and their lifecycle, jobs, promotion and rollback, and times in UTC.
The status snapshot, concurrent readers and writers and the catalog's imports are in test_catalog_snapshot.py.

Every test runs on SQLite and on a real PostgreSQL server (see tests/helpers/postgres.py)."""

import datetime as dt
from pathlib import Path

import pytest
from catalog_helpers import T0, add_batch, add_step, promoted, sha, train
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from ciss_daemon.catalog import connection
from ciss_daemon.catalog import records as cat
from ciss_daemon.catalog.connection import session_reader
from ciss_daemon.catalog.snapshot import status_snapshot
from ciss_daemon.catalog.tables import Class, Event, Job, Step
from ciss_daemon.exceptions import CatalogError, OperatorError


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
