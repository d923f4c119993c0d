"""The ``ingest`` section: seconds from a complete folder to a queued step, with a real ``ciss daemon`` whose
training window never opens (so the step stays queued): ``ciss submit``, a folder copied in by hand, a
folder renamed in whole.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import shutil
import sqlite3
import subprocess
import threading
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.daemon.process import running_daemon
from benchmarks.measure import cli, loadavg, new_workspace, summary
from ciss_daemon.workspace import Workspace

# Feb 29 at 00:00 UTC: the window opens for one minute every four years, so a queued step stays queued.
NEVER_WINDOW = "0 0 29 2 *"


def check_window_closed(ws: Workspace, expression: str) -> dict[str, Any]:
    """Run the daemon's own ``window_open`` on ``expression``: closed now, open at its next fire time.

    The second check proves the test can tell open from closed, so "closed now" is not a vacuous pass.
    """
    from apscheduler.triggers.cron import CronTrigger

    from ciss_daemon.service.daemon import Daemon
    from ciss_daemon.settings import load_settings

    daemon = Daemon(ws, load_settings(ws.settings_path), watch=False)
    daemon.window = CronTrigger.from_crontab(expression, timezone=dt.UTC)
    now = dt.datetime.now(dt.UTC)
    fire = daemon.window.get_next_fire_time(None, now)
    inside = fire + dt.timedelta(seconds=30) if fire is not None else None
    return {
        "expression": expression,
        "open_now": daemon.window_open(now),
        "next_opening": None if fire is None else fire.isoformat(),
        "open_30s_after_next_opening": None if inside is None else daemon.window_open(inside),
    }


def make_batch(root: Path, name: str, seed: int) -> Path:
    """A small generated training batch named ``name`` whose class names are unique to it.

    Class names taught or pending in the catalog are refused, and every step of this benchmark stays
    queued (pending), so each batch renames the generator's classes.
    """
    from engine.synthetic import generate_batches

    (folder,) = generate_batches(
        root / name, "2", train_per_step=4, val_per_step=2, image_size=32, seed=seed, prefix=name
    )
    # The generator names its folder <prefix>-00-base; the batch takes the folder's name.
    folder = folder.rename(folder.parent / name)
    manifest = folder / "batch.toml"
    classes = tomllib.loads(manifest.read_text())["classes"]
    lines = ['kind = "train"', "", "[classes]"] + [f'{v} = "{n}-{name}"' for v, n in classes.items()]
    staged = folder / ".batch.toml.tmp"
    staged.write_text("\n".join(lines) + "\n")
    os.replace(staged, manifest)
    return folder


def _catalog_step(db: sqlite3.Connection, name: str) -> tuple[str | None, float | None, bool]:
    """(state, created_at as a Unix time, rejected?) of the step learning batch ``name``."""
    row = db.execute(
        "SELECT s.state, s.created_at FROM steps s JOIN batches b ON s.batch_id = b.id WHERE b.name = ?",
        (name,),
    ).fetchone()
    rejected = db.execute("SELECT 1 FROM rejections WHERE batch_name = ?", (name,)).fetchone() is not None
    if row is None:
        return None, None, rejected
    created = dt.datetime.fromisoformat(row[1])
    created = created.replace(tzinfo=dt.UTC) if created.tzinfo is None else created
    return row[0], created.timestamp(), rejected


def wait_queued(db: sqlite3.Connection, name: str, timeout: float = 120) -> tuple[float, float, str]:
    """Poll the catalog every 20 ms until batch ``name`` is a step: (time seen, step created_at, state)."""
    deadline = time.monotonic() + timeout
    while True:
        state, created, rejected = _catalog_step(db, name)
        if state is not None and created is not None:
            return time.time(), created, state
        if rejected:
            raise RuntimeError(f"batch {name} was rejected; see rejected/{name}/REJECTED.txt")
        if time.monotonic() > deadline:
            raise RuntimeError(f"batch {name} not in the catalog after {timeout} s")
        time.sleep(0.02)


def bench_ingest(workdir: Path, *, reps: int) -> dict[str, Any]:
    """Seconds from a complete folder to a queued step, three ways, with a daemon that never trains."""
    ws = new_workspace(workdir / "ingest-ws", f'[daemon]\ntraining_window = "{NEVER_WINDOW}"\n')
    from ciss_daemon.settings import load_settings

    settings = load_settings(ws.settings_path).daemon
    outside = ws.root / "outside-inbox"  # same file system as the inbox, for the rename case
    outside.mkdir()
    result: dict[str, Any] = {
        "settings": {
            "settle_seconds": settings.settle_seconds,
            "rescan_seconds": settings.rescan_seconds,
            "dispatch_seconds": settings.dispatch_seconds,
            "training_window": settings.training_window,
        },
        "window_check": check_window_closed(ws, NEVER_WINDOW),
        "loadavg_before": loadavg(),
    }
    modes: dict[str, Callable[[Path], float]] = {
        # Each returns the wall time at which the folder became complete in the inbox.
        "submit": lambda folder: _submit(ws, folder),
        "copytree": lambda folder: _copy_in(ws, folder),
        "rename": lambda folder: _rename_in(ws, folder, outside),
    }
    with running_daemon(ws) as daemon:
        result["daemon_ready_seconds"] = round(daemon.wait_ready(), 3)
        db = sqlite3.connect(ws.catalog_path, timeout=5)
        try:
            samples, states = _drop_all(db, workdir / "ingest-src", modes, reps)
            final = db.execute(
                "SELECT s.state, count(*), max(j.attempts) FROM steps s JOIN jobs j ON j.step_id = s.id "
                "GROUP BY s.state"
            ).fetchall()
        finally:
            db.close()
        result["daemon_alive_at_end"] = daemon.process.poll() is None
    result["final_states"] = [{"state": s, "steps": n, "max_attempts_used": a} for s, n, a in final]
    result["modes"] = {
        mode: {key: summary([s[key] for s in rows]) for key in rows[0]}
        | {"states_seen": sorted(states[mode])}
        for mode, rows in samples.items()
    }
    result["loadavg_after"] = loadavg()
    return result


def _drop_all(
    db: sqlite3.Connection, sources: Path, modes: dict[str, Callable[[Path], float]], reps: int
) -> tuple[dict[str, list[dict[str, float]]], dict[str, set[str]]]:
    """``reps`` rounds of one new batch dropped each way in turn: the seconds of each drop by mode, and the
    states its steps were seen in."""
    jitter = random.Random(1)
    samples: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
    states: dict[str, set[str]] = {mode: set() for mode in modes}
    seed = 100
    for rep in range(reps):
        for mode, drop in modes.items():
            seed += 1
            name = f"{mode}-{rep}"
            folder = make_batch(sources, name, seed)
            # The daemon ticks every dispatch_seconds: a random pause spreads drops over its phase.
            time.sleep(jitter.uniform(0.5, 2.5))
            began = time.time()
            complete = drop(folder)
            seen, created, state = wait_queued(db, name)
            samples[mode].append(
                {
                    "total": seen - began,
                    "from_complete": seen - complete,
                    "until_accepting_tick": created - complete,
                    "ingest": seen - created,
                }
            )
            states[mode].add(state)
    return samples, states


def _submit(ws: Workspace, folder: Path) -> float:
    """Run ``ciss submit`` as a user does; return when its folder appeared in the inbox.

    The folder is complete the moment the command renames it in, which is before the command exits (and
    the daemon may already be ingesting it), so a thread watches for it every 2 ms rather than taking the
    command's return as the moment.
    """
    target = ws.inbox / folder.name
    appeared: list[float] = []
    done_event = threading.Event()

    def watch() -> None:
        while not done_event.is_set():
            if os.path.lexists(target):
                appeared.append(time.time())
                return
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        done = subprocess.run(
            cli("submit", str(folder), "--workspace", str(ws.root)),
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        done_event.set()
        watcher.join()
    if done.returncode != 0:
        raise RuntimeError(f"ciss submit {folder} failed: {done.stderr.strip()}")
    # Not seen only if the daemon took the folder out within one poll: the return is then an upper bound.
    return appeared[0] if appeared else time.time()


def _copy_in(ws: Workspace, folder: Path) -> float:
    # A copy by hand (cp -r): complete once the last file is written; the daemon must see it settle.
    shutil.copytree(folder, ws.inbox / folder.name)
    return time.time()


def _rename_in(ws: Workspace, folder: Path, outside: Path) -> float:
    # Prepared beside the inbox on the same file system, then moved in whole with one rename.
    prepared = outside / folder.name
    shutil.copytree(folder, prepared)
    os.rename(prepared, ws.inbox / folder.name)
    return time.time()
