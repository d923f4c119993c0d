"""Helpers for tests that run real daemons (and in-process ones) on temporary workspaces.

Import as `from daemon_helpers import ...` (pytest puts tests/ on sys.path). Real daemons run as
`python -m ciss_daemon.cli daemon` with tiny settings; `FAULTS_DIR` holds a `sitecustomize` that injects
pauses or ENOSPC into chosen file operations of those processes (see tests/helpers/faults/sitecustomize.py).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from batchmaker import make_batch

from ciss_daemon.catalog.connection import upgrade_catalog
from ciss_daemon.service import clock
from ciss_daemon.settings import load_settings
from ciss_daemon.workspace import Workspace, init_workspace

REPO = Path(__file__).resolve().parents[2]
FAULTS_DIR = Path(__file__).resolve().parent / "faults"

SETTINGS = """\
[daemon]
settle_seconds = 0.5
rescan_seconds = 1.0
dispatch_seconds = 0.2
device = "cpu"
max_attempts = {max_attempts}

[gate]
old_miou_budget = 1.0
new_miou_floor = {floor}

[model]
backbone = "resnet18"

[train]
epochs_base = {epochs}
epochs_incremental = 1
batch_size = 4
crop_size = 32
amp = false
checkpoint_every = 2
"""


def settings_text(**overrides: Any) -> str:
    """A tiny-model ciss.toml: ``overrides`` are ``section__key=value`` (e.g. ``daemon__max_attempts=5``)."""
    sections: dict[str, dict[str, Any]] = {
        "daemon": {
            "settle_seconds": 0.5,
            "rescan_seconds": 1.0,
            "dispatch_seconds": 0.2,
            "device": "cpu",
            "max_attempts": 3,
            "stop_timeout_seconds": 60.0,
        },
        "gate": {"old_miou_budget": 1.0, "new_miou_floor": 0.0},
        "model": {"backbone": "resnet18"},
        "train": {
            "epochs_base": 2,
            "epochs_incremental": 1,
            "batch_size": 4,
            "crop_size": 32,
            "amp": False,
            "checkpoint_every": 2,
        },
    }
    for key, value in overrides.items():
        section, name = key.split("__", 1)
        sections.setdefault(section, {})[name] = value
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{name} = {json.dumps(value)}" for name, value in values.items()]
        lines.append("")
    return "\n".join(lines)


def new_workspace(root: Path, text: str, *, catalog_url: str | None = None) -> Workspace:
    """A workspace with ``text`` as ciss.toml and its catalog created, as `ciss init` leaves it.

    ``catalog_url`` (e.g. a PostgreSQL database of the ``postgres`` fixture) becomes ``[catalog] url``;
    without it the catalog is the workspace's SQLite file."""
    if catalog_url is not None:
        text += f"\n[catalog]\nurl = {json.dumps(catalog_url)}\n"
    ws = init_workspace(root, settings_text=text)
    upgrade_catalog(workspace_catalog_url(ws), backup_dir=ws.backups)
    return ws


def workspace_catalog_url(ws: Workspace) -> str:
    return ws.catalog_url(load_settings(ws.settings_path))


# One engine per PostgreSQL catalog, for the polling helpers below (SQLite is opened per query).
_ENGINES: dict[str, Any] = {}


def _postgres(url: str) -> Any:
    if url not in _ENGINES:
        from sqlalchemy import create_engine
        from sqlalchemy.pool import NullPool

        _ENGINES[url] = create_engine(url, poolclass=NullPool)
    return _ENGINES[url]


def tiny_batch(
    parent: Path, index: int, *, kind: str | None = None, n_train: int = 8, n_val: int = 2
) -> Path:
    """A unique 32x32 batch ``b<index>`` teaching class ``c<index>`` (a different seed per index)."""
    return make_batch(
        parent,
        f"b{index:03d}",
        classes={1: f"c{index}"},
        n_train=n_train,
        n_val=n_val,
        size=(32, 32),
        kind=kind,
        seed=1000 * index,
    )


def ciss(ws: Workspace, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ciss_daemon.cli", *args, "--workspace", str(ws.root)],
        capture_output=True,
        text=True,
        check=check,
        timeout=120,
    )


def status(ws: Workspace) -> dict:
    return json.loads(ciss(ws, "status", "--json").stdout)


def states(ws: Workspace) -> list[str]:
    return [s["state"] for s in status(ws)["steps"]]


def job_progress(ws: Workspace, job: int) -> dict:
    """The last progress report of job ``job`` (its folder's progress.json); {} before the first one."""
    try:
        return json.loads((ws.jobs / str(job) / "progress.json").read_text())
    except (OSError, ValueError):
        return {}


def catalog_rows(ws: Workspace, query: str, params: tuple = ()) -> list[tuple]:
    """Rows of a plain SQL query on the catalog (cheaper than `ciss status` in a polling loop); ``?``
    marks the parameters on either backend."""
    url = workspace_catalog_url(ws)
    if url.startswith("postgresql"):
        with _postgres(url).connect() as connection:
            rows = connection.exec_driver_sql(query.replace("?", "%s"), params).fetchall()
        return [tuple(row) for row in rows]
    db = sqlite3.connect(f"file:{ws.catalog_path}?mode=ro", uri=True, timeout=10)
    try:
        return db.execute(query, params).fetchall()
    finally:
        db.close()


def step_states(ws: Workspace) -> list[str]:
    return [row[0] for row in catalog_rows(ws, 'SELECT state FROM steps ORDER BY "index"')]


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


class DaemonProcess:
    """`ciss daemon` as a child process; ``faults`` (rules for tests/helpers/faults) go in its environment."""

    def __init__(
        self,
        ws: Workspace,
        *,
        faults: list[dict[str, Any]] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.ws = ws
        self.log = open(ws.root / "daemon.log", "ab")  # noqa: SIM115 - closed in stop()
        environment = {**os.environ, **(env or {})}
        if faults:
            environment["CISS_FAULTS"] = json.dumps(faults)
            environment["PYTHONPATH"] = os.pathsep.join(
                [str(FAULTS_DIR), str(REPO), environment.get("PYTHONPATH", "")]
            )
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ciss_daemon.cli", "daemon", "--workspace", str(ws.root)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=environment,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.alive():
            self.process.send_signal(sig)
        code = self.process.wait(120)
        self.log.close()
        return code


def worker_pids(ws: Workspace) -> list[int]:
    """Live training children working in this workspace's job folders (found in /proc)."""
    marker = os.fsencode(str(ws.jobs))
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and b"ciss_daemon.service.worker" in cmdline and marker in cmdline:
            pids.append(int(entry))
    return pids


def kill_workers(ws: Workspace) -> int:
    """SIGKILL every training child of the workspace; returns how many were killed."""
    killed = 0
    for pid in worker_pids(ws):
        try:
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except ProcessLookupError:
            pass
    return killed


def wait_workers_gone(ws: Workspace, timeout: float = 60) -> None:
    wait_for(lambda: not worker_pids(ws), "the training children to exit", timeout=timeout)


def record_figure(test: str, **values: Any) -> None:
    """Append one line of figures to $CISS_RELIABILITY_FIGURES (JSON lines), for docs/reliability.md."""
    path = os.environ.get("CISS_RELIABILITY_FIGURES")
    if not path:
        return
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"test": test, **values}) + "\n")


def fault_rounds(default: int) -> int:
    """How many random fault moments a test tries: $CISS_FAULT_ROUNDS, else ``default``."""
    return max(1, int(os.environ.get("CISS_FAULT_ROUNDS", default)))


# --- integrity ---------------------------------------------------------------------------------------------

# Which step states each job state is consistent with (a job belongs to exactly one step).
JOB_STEP_STATES = {
    "queued": {"queued"},
    "running": {"training", "evaluating"},
    "done": {"promoted", "held", "discarded", "rolled_back"},
    "failed": {"failed"},
    "cancelled": {"discarded"},
}


def integrity_problems(ws: Workspace, *, at_rest: bool) -> list[str]:
    """Everything wrong with a workspace's catalog and model files; [] when it is sound.

    ``at_rest``: a daemon has started since the last crash, so ``models/current`` must name exactly the
    catalog's current version. Right after a crash the pointer may be one promotion ahead of the catalog
    (the swap happens before the commit); it must still name a whole model.
    """
    url = workspace_catalog_url(ws)
    # PostgreSQL enforces foreign keys on every write and has no integrity_check: its checks are SQLite's.
    postgres = url.startswith("postgresql")
    db: Any = _postgres(url).connect() if postgres else sqlite3.connect(ws.catalog_path, timeout=10)
    try:
        q = db.exec_driver_sql if postgres else db.execute
        problems: list[str] = []
        if not postgres and (check := q("PRAGMA integrity_check").fetchall()) != [("ok",)]:
            problems.append(f"integrity_check: {check}")
        if not postgres and (fk := q("PRAGMA foreign_key_check").fetchall()):
            problems.append(f"foreign_key_check: {fk}")
        current = q(
            "SELECT v.version, v.state, s.state FROM model_versions v JOIN steps s ON v.step_id = s.id "
            "WHERE v.is_current"
        ).fetchall()
        if len(current) > 1:
            problems.append(f"{len(current)} current versions: {current}")
        for version, v_state, s_state in current:
            if (v_state, s_state) != ("promoted", "promoted"):
                problems.append(f"current {version} is {v_state}, its step {s_state}")
        problems += _recorded_twice(q) + _state_problems(q)
        versions = q("SELECT version, state, path, files FROM model_versions").fetchall()
        current_version = current[0][0] if current else None
    finally:
        db.close()
    return problems + _model_file_problems(versions) + _pointer_problems(ws, current_version, at_rest=at_rest)


def _recorded_twice(q: Callable[[str], Any]) -> list[str]:
    """Rows the catalog must hold once: a step index, a batch's step, a live batch's hash and name, a
    promoted model per step, an active job per step."""
    problems = []
    live = (
        "(SELECT b.* FROM batches b LEFT JOIN steps s ON s.batch_id = b.id "
        "WHERE s.state IS NULL OR s.state NOT IN ('failed', 'discarded', 'rolled_back')) AS live"
    )
    for what, query in (
        ("step index", 'SELECT "index", count(*) FROM steps GROUP BY "index" HAVING count(*) > 1'),
        (
            "batch in two steps",
            "SELECT batch_id, count(*) FROM steps GROUP BY batch_id HAVING count(*) > 1",
        ),
        # Among live batches only: the batch of a failed, discarded or rolled-back step may come back.
        ("batch hash", f"SELECT sha256, count(*) FROM {live} GROUP BY sha256 HAVING count(*) > 1"),
        ("batch name", f"SELECT name, count(*) FROM {live} GROUP BY name HAVING count(*) > 1"),
        (
            "promoted model per step",
            "SELECT step_id, count(*) FROM model_versions WHERE state IN ('promoted', 'retired') "
            "GROUP BY step_id HAVING count(*) > 1",
        ),
        (
            "active job per step",
            "SELECT step_id, count(*) FROM jobs WHERE state IN ('queued', 'running') "
            "GROUP BY step_id HAVING count(*) > 1",
        ),
    ):
        if twice := q(query).fetchall():
            problems.append(f"recorded twice ({what}): {twice}")
    return problems


def _state_problems(q: Callable[[str], Any]) -> list[str]:
    """Jobs, steps and classes whose states disagree: more than one job running, a job and its step, an
    unfinished step without a job, a class taught by a step that is not promoted (or the reverse)."""
    problems = []
    if (running := q("SELECT count(*) FROM jobs WHERE state = 'running'").fetchone()[0]) > 1:
        problems.append(f"{running} jobs running at once")
    for job, j_state, s_index, s_state in q(
        'SELECT j.id, j.state, s."index", s.state FROM jobs j JOIN steps s ON j.step_id = s.id'
    ):
        if s_state not in JOB_STEP_STATES[j_state]:
            problems.append(f"job {job} is {j_state} but its step {s_index} is {s_state}")
    for s_index, s_state in q(
        "SELECT s.\"index\", s.state FROM steps s WHERE s.state IN ('queued', 'training', 'evaluating') "
        "AND NOT EXISTS (SELECT 1 FROM jobs j "
        "WHERE j.step_id = s.id AND j.state IN ('queued', 'running'))"
    ):
        problems.append(f"step {s_index} is {s_state} without a queued or running job")
    for name, taught, s_state in q(
        "SELECT c.name, c.taught, s.state FROM classes c LEFT JOIN steps s ON c.step_id = s.id"
    ):
        if bool(taught) != (s_state == "promoted"):
            problems.append(f"class {name} taught={bool(taught)} but its step is {s_state}")
    return problems


def _model_file_problems(versions: list[Any]) -> list[str]:
    """Recorded model files that are missing or differ from their sha256 (discarded versions aside)."""
    from engine.checkpoint import file_sha256

    problems = []
    for version, v_state, path, files in versions:
        if v_state == "discarded":
            continue
        for name, digest in (files if isinstance(files, dict) else json.loads(files)).items():
            file = Path(path) / name
            if not file.is_file():
                problems.append(f"{version} ({v_state}): {name} is missing")
            elif file_sha256(file) != digest:
                problems.append(f"{version} ({v_state}): {name} does not match its recorded sha256")
    return problems


def _pointer_problems(ws: Workspace, current_version: str | None, *, at_rest: bool) -> list[str]:
    """``models/current``: a symbolic link to a whole model, the catalog's current one when ``at_rest``."""
    from engine.checkpoint import load_model_files
    from engine.exceptions import CheckpointError

    problems = []
    pointer = ws.current
    target = os.readlink(pointer) if os.path.islink(pointer) else None
    if os.path.lexists(pointer) and target is None:
        problems.append("models/current is not a symbolic link")
    if target is not None:
        try:
            load_model_files(ws.models / target)
        except CheckpointError as error:
            problems.append(f"models/current -> {target} is not a whole model: {error}")
    if at_rest and target != current_version:
        problems.append(f"models/current -> {target} but the catalog's current version is {current_version}")
    return problems


# --- in-process daemons ------------------------------------------------------------------------------------


class FakeClock:
    """A clock tests move by hand, so that settling and timers never need real sleeps.

    It reads what ``ciss_daemon.service.clock.now`` reads: an aware UTC datetime, by default the real now.
    """

    def __init__(self, now: dt.datetime | None = None) -> None:
        self.now = clock.now() if now is None else now

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> dt.datetime:
        self.now += dt.timedelta(seconds=seconds)
        return self.now


def in_process_daemon(ws: Workspace, clock: FakeClock, *, watch: bool = False) -> Any:
    """A started ``Daemon`` on ``ws`` driven by ``tick(clock.now)``; call ``shutdown()`` when done."""
    from ciss_daemon.service.daemon import Daemon
    from ciss_daemon.settings import load_settings

    daemon = Daemon(ws, load_settings(ws.settings_path), clock=clock, watch=watch)
    daemon.start()
    return daemon


def inbox_names(ws: Workspace) -> list[str]:
    """What is left in the inbox, hidden staging folder aside."""
    return sorted(os.fsdecode(n) for n in os.listdir(os.fsencode(ws.inbox)) if not n.startswith(b"."))
