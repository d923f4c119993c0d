"""The ``status`` section: wall time of ``ciss status`` (and ``--json``) as a fresh process on a catalog of
1,000 steps, beside a bare interpreter start and ``import typer``; the in-process snapshot alone, whether
the command loads torch, and what its imports cost.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.catalog_builder import make_status_workspace
from benchmarks.measure import cli, loadavg, summary, timed_run
from ciss_daemon.catalog import plain
from ciss_daemon.catalog.snapshot import status_snapshot
from ciss_daemon.workspace import Workspace


def bench_status(workdir: Path, *, steps: int, runs: int) -> dict[str, Any]:
    """``ciss status`` and ``--json`` as fresh processes, interpreter baselines, the snapshot in-process."""
    ws, stats = make_status_workspace(workdir / "status-ws", steps=steps)
    result: dict[str, Any] = {
        "steps": stats.steps,
        "classes": stats.classes,
        "events": stats.events,
        "rejections": stats.rejections,
        "catalog_build_seconds": round(stats.seconds, 2),
        "catalog_bytes": stats.bytes,
        "runs": runs,
        "loadavg_before": loadavg(),
    }
    workspace = str(ws.root)
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        'python -c "import typer"': [sys.executable, "-c", "import typer"],
        'python -c "import ciss_daemon.cli"': [sys.executable, "-c", "import ciss_daemon.cli"],
        "ciss status": cli("status", "--workspace", workspace),
        "ciss status --json": cli("status", "--json", "--workspace", workspace),
    }
    processes: dict[str, Any] = {}
    for label, command in commands.items():
        first = timed_run(command)  # page cache and .pyc warm-up; kept apart from the runs
        processes[label] = {
            "first_run": round(first, 4),
            **summary([timed_run(command) for _ in range(runs)]),
        }
    result["processes"] = processes

    data = json.loads(subprocess.run(commands["ciss status --json"], capture_output=True, check=True).stdout)
    result["json_steps"] = len(data["steps"])
    result["json_bytes"] = len(json.dumps(data, indent=2))
    result["in_process"] = _in_process_snapshot(ws, runs)
    result["torch_imported_by_status"] = _status_imports_torch(workspace)
    result["imports"] = _top_imports(commands["ciss status"])
    result["loadavg_after"] = loadavg()
    return result


def _in_process_snapshot(ws: Workspace, runs: int) -> dict[str, Any]:
    """snapshot.status_snapshot alone (plain SQL through sqlite3, as ``ciss status`` reads), and with the
    rich rendering, in this process (modules already imported)."""
    import io

    from rich.console import Console

    from ciss_daemon import status as status_view
    from ciss_daemon import views

    url = f"sqlite:///{ws.catalog_path}"
    with plain.reading(url) as read:
        status_snapshot(read)  # page cache
    snapshot_times, render_times = [], []
    for _ in range(runs):
        start = time.perf_counter()
        with plain.reading(url) as read:
            status_snapshot(read)
        snapshot_times.append(time.perf_counter() - start)
    for _ in range(runs):
        start = time.perf_counter()
        console = Console(file=io.StringIO(), width=120)
        with plain.reading(url) as read:
            console.print(views.render(status_view.snapshot(ws, read), ws))
        render_times.append(time.perf_counter() - start)
    return {"status_snapshot": summary(snapshot_times), "snapshot_and_render": summary(render_times)}


def _status_imports_torch(workspace: str) -> bool:
    """Whether running ``ciss status`` loads torch (docs/product.md: it must not)."""
    code = (
        "import sys, io, contextlib\n"
        "from ciss_daemon.entry import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    main(['status', '--workspace', {workspace!r}])\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[-1] == "True"


def _top_imports(command: Sequence[str], top: int = 8) -> dict[str, Any]:
    """What imports cost ``command`` (``python -X importtime``, which adds its own overhead): the total over
    every import made at top level or inside a function, and the costliest ones, cumulative ms."""
    done = subprocess.run(
        [command[0], "-X", "importtime", *command[1:]], capture_output=True, text=True, check=True
    )
    rows = []
    for line in done.stderr.splitlines():
        # "import time: <self us> | <cumulative us> | <name>", nested imports indented under their parent.
        parts = line.split("|")
        if len(parts) != 3 or not parts[1].strip().isdigit():
            continue
        cumulative, name = int(parts[1]), parts[2]
        # Only modules imported at top level add up to the total; deeper ones are counted in them.
        if name.startswith("  "):
            continue
        rows.append({"module": name.strip(), "ms": round(cumulative / 1000, 1)})
    ranked = sorted(rows, key=lambda r: r["ms"], reverse=True)
    return {"total_ms": round(sum(r["ms"] for r in rows), 1), "top": ranked[:top]}
