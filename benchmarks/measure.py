"""What every benchmark measures with: summaries of timed runs, the machine and its load while they ran,
``ciss`` commands as fresh processes, new workspaces, and the ``results.json`` of a run of alternating kinds.
Timings on a shared machine are noisy, so every figure is written next to the load average it was taken at.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ciss_daemon.catalog import connection
from ciss_daemon.workspace import Workspace, init_workspace


def summary(values: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and mean of ``values`` (seconds), rounded for reading, with the raw values."""
    return {
        "n": len(values),
        "median": round(statistics.median(values), 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
        "mean": round(statistics.fmean(values), 4),
        "values": [round(v, 4) for v in values],
    }


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages: the other work on the machine while a figure was taken."""
    return [round(v, 2) for v in os.getloadavg()]


def cli(*args: str) -> list[str]:
    """A ``ciss`` command run by this interpreter through the installed script's entry point."""
    return [sys.executable, "-m", "ciss_daemon", *args]


def timed_run(command: Sequence[str]) -> float:
    """Wall seconds of one fresh process, from spawn to exit; a failure raises with its stderr."""
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()}")
    return elapsed


def machine_info(workdir: Path) -> dict[str, Any]:
    """What the figures depend on: CPU, cores, Python, SQLite and the file system of the workspaces."""
    import sqlalchemy

    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_model": model,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "sqlalchemy": sqlalchemy.__version__,
        "platform": platform.platform(),
        "workdir": str(workdir),
        "workdir_fs": _filesystem_type(workdir),
        "loadavg_at_start": loadavg(),
        **_code_version(),
    }


def _code_version() -> dict[str, Any]:
    """The commit measured and the files that differed from it (read-only git; empty outside a checkout)."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
        # rstrip only: porcelain lines start with a status column that may be a space.
        return done.stdout.rstrip() if done.returncode == 0 else ""

    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = git("rev-parse", "--short", "HEAD")
        if head:
            changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
            return {"git_head": head, "git_modified": changed}
    return {}


def _filesystem_type(path: Path) -> str:
    # The longest mount point that holds `path` names its file system (fsync costs differ by type).
    best, kind = "", "unknown"
    with contextlib.suppress(OSError):
        resolved = str(path.resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) >= 3 and resolved.startswith(fields[1]) and len(fields[1]) > len(best):
                best, kind = fields[1], fields[2]
    return kind


def new_workspace(root: Path, settings_text: str | None = None) -> Workspace:
    """A workspace with its catalog at schema head, as ``ciss init`` leaves it."""
    ws = init_workspace(root, settings_text=settings_text)
    connection.upgrade_catalog(f"sqlite:///{ws.catalog_path}", backup_dir=ws.backups)
    return ws


def medians(runs: list[dict[str, Any]], value: str, by: str, groups: Sequence[Any]) -> dict[str, float]:
    """The median of ``value`` over the runs of each group (the runs whose ``by`` is that group), by the
    group's name."""
    return {str(group): statistics.median(r[value] for r in runs if r[by] == group) for group in groups}


def report_results(
    args: argparse.Namespace,
    runs: list[dict[str, Any]],
    medians: tuple[str, dict[str, float]],
    loads: tuple[list[float], list[float]],
    machine: dict[str, Any],
    line: Callable[[str, float], str],
) -> None:
    """``results.json`` in ``args.out``: the settings, every run, the medians (under their name), the load
    average before and after the runs, and the machine. Then prints ``line`` of each median and the load."""
    name, values = medians
    result = {
        "settings": vars(args) | {"out": str(args.out)},
        "runs": runs,
        name: values,
        "loadavg_before": loads[0],
        "loadavg_after": loads[1],
        "machine": machine,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    for group, value in values.items():
        print(line(group, value))
    print(f"load average {loads[0]} -> {loads[1]}")
