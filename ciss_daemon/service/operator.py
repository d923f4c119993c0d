"""Operator actions: ``ciss promote``, ``ciss discard``, ``ciss rollback``, ``ciss prune``.

The daemon is the catalog's only writer, so while it runs the CLI hands it a request file in
``requests/`` and waits for the answer; when no daemon runs, the CLI takes the daemon's lock (so none can
start meanwhile) and carries the action out itself. Both paths run ``do_action``.

Order of a promotion or rollback: the catalog change is made (not yet committed), the ``models/current``
pointer is swapped atomically, then the catalog commits. A crash in between leaves the pointer ahead of
the catalog, which the daemon settles at its next start (``Daemon.reconcile_current``).
"""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from ciss_daemon.catalog import connection
from ciss_daemon.catalog import records as catalog
from ciss_daemon.catalog.tables import ModelVersion, Step, StepState, VersionState
from ciss_daemon.exceptions import CissError, OperatorError
from ciss_daemon.service import clock, systemd
from ciss_daemon.service.promotion import swap_current
from ciss_daemon.service.retention import prune
from ciss_daemon.workspace import Workspace, daemon_alive
from engine.atomic import write_json

ACTIONS = ("promote", "discard", "rollback", "prune")


def promote(ws: Workspace, s: Session, version: ModelVersion, *, reason: str, now: dt.datetime) -> None:
    """Make ``version`` current: catalog change, pointer swap; the caller's transaction then commits."""
    catalog.promote_version(session=s, version=version, reason=reason, now=now)
    swap_current(ws.models, version.version)
    catalog.log_event(
        session=s,
        kind="promoted",
        message=f"step {version.step.index}: {version.version} promoted ({reason})",
        step=version.step,
        now=now,
    )


def _held_candidate(s: Session, target: str | None) -> ModelVersion:
    """The candidate a promote or discard is about: named, or the one held step's."""
    if target:
        if target.isdigit():
            step = s.scalar(select(Step).where(Step.index == int(target)))
            if step is None:
                raise OperatorError(f"no step {target} in the catalog; `ciss status` lists the steps")
            versions = [v for v in step.versions if v.state == VersionState.CANDIDATE]
            if not versions:
                raise OperatorError(f"step {target} is {step.state} and has no candidate model waiting")
            return versions[-1]
        return catalog.find_version(session=s, version=target)
    held = list(s.scalars(select(Step).where(Step.state == StepState.HELD).order_by(Step.index)))
    if not held:
        raise OperatorError("no step is held for the operator; `ciss status` shows each step's state")
    versions = [v for v in held[0].versions if v.state == VersionState.CANDIDATE]
    if not versions:
        raise OperatorError(f"step {held[0].index} is held but has no candidate model")
    return versions[-1]


def do_action(ws: Workspace, s: Session, action: str, target: str | None, *, now: dt.datetime) -> str:
    """Carry out one operator action in the open transaction ``s``; returns what was done, in words."""
    if action == "promote":
        version = _held_candidate(s, target)
        if version.step.state != StepState.HELD:
            raise OperatorError(
                f"step {version.step.index} is {version.step.state}; only a held step is promoted"
            )
        promote(ws, s, version, reason="promoted by the operator", now=now)
        return f"{version.version} (step {version.step.index}) is now the current model"
    if action == "discard":
        if target and target.isdigit():
            step = s.scalar(select(Step).where(Step.index == int(target)))
            if step is None:
                raise OperatorError(f"no step {target} in the catalog; `ciss status` lists the steps")
        else:
            step = _held_candidate(s, target).step
        catalog.discard_step(session=s, step=step, reason="discarded by the operator", now=now)
        catalog.log_event(
            session=s,
            kind="discarded",
            message=f"step {step.index} discarded by the operator",
            step=step,
            now=now,
        )
        return f"step {step.index} ({step.batch.name}) discarded; its classes may be taught again"
    if action == "rollback":
        if not target:
            raise OperatorError("name the model to roll back to, e.g. `ciss rollback v0002`")
        version = catalog.find_version(session=s, version=target)
        if not Path(version.path).is_dir():
            raise OperatorError(
                f"model {version.version} was pruned (its folder is gone); "
                "`ciss models` lists the models you can roll back to"
            )
        steps = catalog.rollback_to(session=s, version=version, now=now)
        swap_current(ws.models, version.version)
        names = ", ".join(c.name for st in steps for c in st.classes) or "none"
        catalog.log_event(
            session=s,
            kind="rolled_back",
            level="warning",
            message=f"rolled back to {version.version}; untaught classes: {names}",
            now=now,
        )
        return f"{version.version} is the current model again; classes no longer taught: {names}"
    if action == "prune":
        message = prune(s, target)
        catalog.log_event(session=s, kind="pruned", message=message, now=now)
        return message
    raise OperatorError(f"unknown action {action!r}; one of {', '.join(ACTIONS)}")


def apply_requests(
    ws: Workspace, transaction: Callable[[], AbstractContextManager[Session]], *, now: dt.datetime
) -> None:
    """Daemon side: answer every request file in ``requests/`` (``<id>.json`` -> ``<id>.answer``)."""
    if not ws.requests.is_dir():
        return
    for path in sorted(ws.requests.glob("*.json")):
        try:
            request = json.loads(path.read_text(encoding="utf-8"))
            with transaction() as s:
                message = do_action(ws, s, request["action"], request.get("target"), now=now)
            answer = {"ok": True, "message": message}
        except CissError as error:
            answer = {"ok": False, "message": str(error)}
        except (ValueError, KeyError, OSError) as error:
            answer = {"ok": False, "message": f"unreadable request {path.name}: {error}"}
        write_json(path.with_suffix(".answer"), answer)
        path.unlink(missing_ok=True)


def run_action(
    ws: Workspace,
    url: str,
    action: str,
    target: str | None,
    *,
    timeout: float = 60.0,
) -> str:
    """CLI side: through the running daemon, or directly under the daemon's lock when none runs."""
    if daemon_alive(ws.lock_path):
        ws.requests.mkdir(exist_ok=True)
        request = ws.requests / f"{uuid.uuid4().hex}.json"
        write_json(request, {"action": action, "target": target})
        answer_path = request.with_suffix(".answer")
        deadline = time.monotonic() + timeout
        while not answer_path.exists():
            if time.monotonic() > deadline:
                request.unlink(missing_ok=True)
                raise OperatorError(
                    f"the daemon did not answer within {timeout:.0f} s; check `journalctl -u ciss` and retry"
                )
            time.sleep(0.1)
        answer = json.loads(answer_path.read_text(encoding="utf-8"))
        answer_path.unlink(missing_ok=True)
        if not answer["ok"]:
            raise OperatorError(answer["message"])
        return str(answer["message"])
    lock = systemd.InstanceLock(ws.lock_path)
    lock.acquire()
    try:
        connection.check_catalog(url)
        factory = connection.session_factory(connection.make_engine(url))
        with connection.transaction(factory) as s:
            return do_action(ws, s, action, target, now=clock.now())
    finally:
        lock.release()
