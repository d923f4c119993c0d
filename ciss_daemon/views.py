"""The terminal screens of the read commands, drawn with rich: ``ciss status``, ``classes``, ``models``,
``eval``."""

from __future__ import annotations

import datetime as dt
from typing import Any

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ciss_daemon.workspace import Workspace

# Class names listed in the current model's panel: a long history would otherwise fill the screen (and
# wrapping thousands of names is most of the time `ciss status` takes to draw).
CLASSES_SHOWN = 40

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
    parts: list[Any] = [_daemon_line(data), _current_part(data.get("current"), ws)]
    if data.get("running"):
        parts.append(_running_line(data["running"]))
    if data["steps"]:
        parts.append(_steps_table(data["steps"]))
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


def _daemon_line(data: dict[str, Any]) -> Text:
    daemon = data["daemon"]
    head = Text()
    head.append("daemon ")
    head.append(
        f"running (pid {daemon['pid']})" if daemon["alive"] else "not running",
        style="green" if daemon["alive"] else "red",
    )
    head.append(f"   workspace {data['workspace']}")
    return head


def _current_part(current: dict[str, Any] | None, ws: Workspace) -> Panel | Text:
    if not current:
        return Text(f"no model promoted yet; drop a batch folder into {ws.inbox}")
    names = ", ".join(c["name"] for c in current["classes"][:CLASSES_SHOWN])
    if len(current["classes"]) > CLASSES_SHOWN:
        names += f", and {len(current['classes']) - CLASSES_SHOWN} more (`ciss classes` lists them)"
    body = Text()
    body.append(current["version"], style="bold")
    body.append(f" (step {current['step']}), {len(current['classes'])} classes: {names}\n")
    body.append(summary_lines(current["metrics"]))
    return Panel(body, title="current model", expand=False)


def _running_line(running: dict[str, Any]) -> Text:
    """One line: the step, the attempt, the phase, and while training iterations, epoch, loss and ETA."""
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
    return Text(line, style="cyan")


def _steps_table(steps: list[dict[str, Any]]) -> Table:
    """The last 20 steps (``--json`` lists all)."""
    table = Table(title=f"steps ({len(steps)})", title_justify="left")
    for column in ("step", "batch", "classes", "state", "note"):
        table.add_column(column)
    for st in steps[-20:]:
        classes = ", ".join(st["classes"])
        # Text, never a markup string: names and reasons are the users' and may hold "[...]".
        table.add_row(
            str(st["index"]),
            Text(st["batch"]),
            Text(classes if len(classes) < 40 else classes[:37] + "..."),
            Text(st["state"], style=STATE_STYLES.get(st["state"], "")),
            Text(st.get("reason") or ""),
        )
    if len(steps) > 20:
        table.caption = f"last 20 of {len(steps)} steps; `ciss status --json` lists all"
    return table


def _when(iso: str | None) -> str:
    if not iso:
        return "-"
    at = dt.datetime.fromisoformat(iso)
    return at.astimezone().strftime("%Y-%m-%d %H:%M:%S")


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
