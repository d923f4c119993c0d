"""What ``ciss status`` and ``ciss classes`` show: read from the catalog only, never importing torch."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from ciss_daemon.catalog import records as catalog
from ciss_daemon.catalog.snapshot import status_snapshot
from ciss_daemon.catalog.tables import Class, ModelVersion, Step
from ciss_daemon.service import systemd
from ciss_daemon.service.planning import next_opening, training_window
from ciss_daemon.settings import Settings
from ciss_daemon.workspace import Workspace

STATE_STYLES = {
    "promoted": "green",
    "held": "yellow",
    "failed": "red",
    "training": "cyan",
    "evaluating": "cyan",
    "queued": "blue",
    "accepted": "blue",
    "discarded": "dim",
    "rolled_back": "magenta",
}


def snapshot(
    ws: Workspace,
    factory: sessionmaker[Session],
    *,
    settings: Settings | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """The catalog's status snapshot plus whether a daemon holds the workspace and why the queue waits.

    ``settings`` (for the training window) may be None when ``ciss.toml`` does not load: the window is
    then not judged. A queued step's note is why it waits now, not what ended its last attempt.
    """
    with factory() as s:
        data = status_snapshot(session=s)
    alive = systemd.daemon_alive(ws.lock_path)
    data["daemon"] = {"alive": alive, "pid": systemd.read_pid(ws.lock_path) if alive else None}
    data["workspace"] = str(ws.root)
    window = settings.daemon.training_window if settings is not None else ""
    data["waiting"] = wait_reason(data, ws, window, time.time() if now is None else now)
    for step in data["steps"]:
        if step["state"] == "queued" and data["waiting"]:
            # What ended the last attempt ("killed by SIGKILL") is history, kept apart from the note.
            step["last_attempt"], step["reason"] = step["reason"], data["waiting"]
    return data


def wait_reason(data: dict[str, Any], ws: Workspace, window: str, now: float) -> str | None:
    """Why the queued steps do not train yet, in words; None when nothing is queued or one trains."""
    if not data["queue"] or data["running"]:
        return None
    first = data["queue"][0]["step"]
    blocking = next(
        (st for st in data["steps"] if st["index"] < first and st["state"] not in catalog.SETTLED_STATES),
        None,
    )
    if blocking is not None and blocking["state"] == "held":
        i = blocking["index"]
        return f"waits for held step {i}: `ciss promote {i}` or `ciss discard {i}` lets the queue go on"
    if blocking is not None:
        return f"waits for step {blocking['index']} ({blocking['state']})"
    if not data["daemon"]["alive"]:
        return f"waits for the daemon, which is not running: start it with `ciss daemon -w {ws.root}`"
    opening = next_opening(training_window(window), now)
    if opening is not None:
        when = "never" if opening.year == dt.MAXYEAR else opening.astimezone().strftime("%Y-%m-%d %H:%M")
        return f"waits for the training window {window!r} (UTC), which opens next at {when}"
    return "starts at the daemon's next check"


def pct(value: float | None) -> str:
    return "-" if value is None or value != value else f"{100 * value:.1f}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def render(data: dict[str, Any], ws: Workspace) -> Group:
    """The status screen: daemon, current model, running job, steps, queue, rejections, events."""
    parts: list[Any] = []
    daemon = data["daemon"]
    head = Text()
    head.append("daemon ")
    head.append(
        f"running (pid {daemon['pid']})" if daemon["alive"] else "not running",
        style="green" if daemon["alive"] else "red",
    )
    head.append(f"   workspace {data['workspace']}")
    parts.append(head)

    current = data.get("current")
    if current:
        m = current["metrics"]
        names = ", ".join(c["name"] for c in current["classes"])
        body = Text()
        body.append(current["version"], style="bold")
        body.append(f" (step {current['step']}), {len(current['classes'])} classes: {names}\n")
        body.append(summary_lines(m))
        parts.append(Panel(body, title="current model", expand=False))
    else:
        parts.append(Text(f"no model promoted yet; drop a batch folder into {ws.inbox}"))

    running = data.get("running")
    if running:
        p = running.get("progress") or {}
        done, total = p.get("iteration"), p.get("total")
        line = (
            f"training step {running['step']} ({running['batch']}), attempt {running['attempts']}/"
            f"{running['max_attempts']}: {p.get('phase', 'starting')}"
        )
        if done is not None and total:
            loss = (p.get("losses") or {}).get("total")
            line += (
                f", {done}/{total} it, epoch {(p.get('epoch') or 0) + 1}/{p.get('epochs', '?')}, loss "
                f"{'-' if loss is None else f'{loss:.4f}'}, ETA {duration(running.get('eta_seconds'))}"
            )
        if (p.get("ranks") or 1) > 1:
            line += f", on {p['ranks']} processes"
        cluster = p.get("cluster") or {}
        if cluster.get("launcher") == "ray":
            nodes = ", ".join(cluster.get("nodes") or []) or "?"
            line += f", on the Ray cluster at {cluster.get('address')} (nodes {nodes})"
        parts.append(Text(line, style="cyan"))

    steps = data["steps"]
    if steps:
        table = Table(title=f"steps ({len(steps)})", title_justify="left")
        for column in ("step", "batch", "classes", "state", "note"):
            table.add_column(column)
        shown = steps if len(steps) <= 20 else steps[-20:]
        for st in shown:
            style = STATE_STYLES.get(st["state"], "")
            classes = ", ".join(st["classes"])
            # Text, never a markup string: names and reasons are the users' and may hold "[...]".
            table.add_row(
                str(st["index"]),
                Text(st["batch"]),
                Text(classes if len(classes) < 40 else classes[:37] + "..."),
                Text(st["state"], style=style),
                Text(st.get("reason") or ""),
            )
        if len(steps) > 20:
            table.caption = f"last 20 of {len(steps)} steps; `ciss status --json` lists all"
        parts.append(table)
    if data["queue"]:
        queue = ", ".join(f"step {q['step']} ({q['batch']})" for q in data["queue"])
        waiting = f"; {data['waiting']}" if data.get("waiting") else ""
        parts.append(Text(f"queue: {queue}{waiting}"))
    if data["rejections"]:
        table = Table(title="recent rejections", title_justify="left")
        for column in ("batch", "when", "first reason", "more"):
            table.add_column(column)
        for r in data["rejections"][:5]:
            table.add_row(Text(r["batch"]), _when(r["at"]), Text(r["reason"] or ""), str(r["n_reasons"] - 1))
        parts.append(table)
    if data["events"]:
        table = Table(title="recent events", title_justify="left")
        table.add_column("when")
        table.add_column("event")
        for e in data["events"][:8]:
            table.add_row(_when(e["at"]), Text(e["message"], style="red" if e["level"] == "error" else ""))
        parts.append(table)
    return Group(*parts)


def _when(iso: str | None) -> str:
    if not iso:
        return "-"
    at = dt.datetime.fromisoformat(iso)
    return at.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def class_rows(factory: sessionmaker[Session]) -> list[dict[str, Any]]:
    """Every class: id, name, step index and state, taught."""
    with factory() as s:
        rows = s.execute(
            select(Class.id, Class.name, Class.taught, Step.index, Step.state)
            .outerjoin(Step, Class.step_id == Step.id)
            .order_by(Class.id)
        )
        return [
            {"id": cid, "name": name, "taught": taught, "step": index, "step_state": state}
            for cid, name, taught, index, state in rows
        ]


def class_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title=f"classes ({sum(r['taught'] for r in rows)} taught)", title_justify="left")
    for column in ("id", "name", "step", "taught"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            str(r["id"]),
            Text(r["name"]),
            "-" if r["step"] is None else f"{r['step']} ({r['step_state']})",
            Text("yes", style="green") if r["taught"] else Text("no", style="dim"),
        )
    return table


def model_rows(factory: sessionmaker[Session]) -> list[dict[str, Any]]:
    """Every model version, oldest first: step, state, when, mIoU in both groupings, current, rollback.

    ``rollback``: whether ``ciss rollback`` accepts it now (promoted, still in the history, older than
    the current model). mIoU ``old``/``new`` are the gate's grouping (old = every class before the
    model's step); ``paper`` the paper's (old = background and the base classes), when it was recorded.
    """
    with factory() as s:
        current = catalog.current_version(session=s)
        current_index = current.step.index if current is not None else -1
        rows = []
        for version, index, step_state in s.execute(
            select(ModelVersion, Step.index, Step.state)
            .join(Step, ModelVersion.step_id == Step.id)
            .order_by(ModelVersion.id)
        ):
            m = (version.metrics or {}).get("candidate") or {}
            paper = m.get("paper") or {}
            pruned = not Path(version.path).is_dir()
            rows.append(
                {
                    "version": version.version,
                    "step": index,
                    "state": version.state,
                    "current": version.is_current,
                    "pruned": pruned,
                    "rollback": not version.is_current
                    and not pruned
                    and version.promoted_at is not None
                    and step_state == "promoted"
                    and index < current_index,
                    "created_at": version.created_at.isoformat(),
                    "promoted_at": version.promoted_at.isoformat() if version.promoted_at else None,
                    "miou_all": m.get("miou_all"),
                    "miou_old": m.get("miou_old"),
                    "miou_new": m.get("miou_new"),
                    "paper_miou_old": paper.get("miou_old"),
                    "paper_miou_new": paper.get("miou_new"),
                }
            )
        return rows


def model_table(rows: list[dict[str, Any]]) -> Table:
    """``ciss models``: one row per model version, the current one marked."""
    table = Table(title=f"models ({len(rows)})", title_justify="left")
    for column in ("version", "step", "state", "when", "mIoU all", "old", "new", "paper old", "paper new"):
        table.add_column(column, justify="right" if column[0] in "mopn" else "left")
    for r in rows:
        state = r["state"] + (
            ", current"
            if r["current"]
            else ", can roll back"
            if r["rollback"]
            else ", pruned"
            if r["pruned"]
            else ""
        )
        table.add_row(
            r["version"],
            str(r["step"]),
            Text(state, style="green bold" if r["current"] else ""),
            _when(r["promoted_at"] or r["created_at"]),
            *(pct(r[k]) for k in ("miou_all", "miou_old", "miou_new", "paper_miou_old", "paper_miou_new")),
        )
    table.caption = "old/new: the gate's grouping (old = classes before the step); paper: old = base classes"
    return table


def metrics_table(metrics: Any, names: dict[int, str]) -> Group:
    """IoU per class and the mIoU summary of ``ciss eval`` (``metrics``: engine.evaluate.Metrics)."""
    table = Table(title="IoU per class", title_justify="left")
    table.add_column("id")
    table.add_column("class")
    table.add_column("IoU", justify="right")
    for cid, value in sorted(metrics.iou.items()):
        table.add_row(str(cid), Text("background" if cid == 0 else names.get(cid, "?")), pct(value))
    return Group(table, Text(summary_lines(metrics.to_dict())))


def summary_lines(metrics: dict[str, Any]) -> str:
    """mIoU all, and old/new/hIoU in the gate's grouping and, when recorded, the paper's (``metrics``:
    ``engine.evaluate.Metrics.to_dict()``)."""
    old, new, hiou = (pct(metrics.get(key)) for key in ("miou_old", "miou_new", "hiou"))
    text = (
        f"mIoU all {pct(metrics.get('miou_all'))}   gate grouping (old = classes before the step): "
        f"old {old}  new {new}  hIoU {hiou}"
    )
    paper = metrics.get("paper")
    if paper:
        text += (
            f"\n{' ' * 15}paper grouping (old = base classes): old {pct(paper.get('miou_old'))}  "
            f"new {pct(paper.get('miou_new'))}  hIoU {pct(paper.get('hiou'))}"
        )
    return text
