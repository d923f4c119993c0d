"""The ``idle`` section: CPU seconds per minute and memory of a daemon with default settings on an empty
workspace, read from /proc (the daemon's own time, that of its reaped children and of its live ones).
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

from benchmarks.daemon.process import running_daemon
from benchmarks.measure import loadavg, new_workspace


def _proc_cpu(pid: int) -> tuple[float, float]:
    """(own utime + stime, reaped children's cutime + cstime) of ``pid``, in seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()  # the command name may hold spaces; skip past it
    tick = os.sysconf("SC_CLK_TCK")
    # After the name: state is field 3 of the man page, utime 14, stime 15, cutime 16, cstime 17.
    utime, stime, cutime, cstime = (int(fields[i - 3]) for i in (14, 15, 16, 17))
    return (utime + stime) / tick, (cutime + cstime) / tick


def _children(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (through each thread's ``children`` list)."""
    found: list[int] = []
    pending = [pid]
    while pending:
        parent = pending.pop()
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{parent}/task").iterdir():
                with contextlib.suppress(OSError):
                    kids = [int(k) for k in (task / "children").read_text().split()]
                    found += kids
                    pending += kids
    return found


def _status_fields(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (kB) and Threads from /proc/<pid>/status."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            values[key] = int(rest.split()[0])
    return values


def _cpu_total(pid: int) -> dict[str, float]:
    own, reaped = _proc_cpu(pid)
    live = 0.0
    for child in _children(pid):
        with contextlib.suppress(OSError, ValueError):
            live += _proc_cpu(child)[0]
    return {"own": own, "children": reaped + live}


def bench_idle(workdir: Path, *, seconds: float, settle: float) -> dict[str, Any]:
    """CPU and memory of ``ciss daemon`` with default settings on an empty workspace, once settled."""
    ws = new_workspace(workdir / "idle-ws")
    result: dict[str, Any] = {
        "window_seconds": seconds,
        "settle_seconds": settle,
        "loadavg_before": loadavg(),
    }
    with running_daemon(ws) as daemon:
        result["daemon_ready_seconds"] = round(daemon.wait_ready(), 3)
        time.sleep(settle)
        pid = daemon.pid
        first = _cpu_total(pid)
        start = time.monotonic()
        series = []
        while (elapsed := time.monotonic() - start) < seconds:
            time.sleep(min(5.0, seconds - elapsed))
            now = _cpu_total(pid)
            series.append(
                {
                    "t": round(time.monotonic() - start, 2),
                    "own": round(now["own"] - first["own"], 3),
                    "children": round(now["children"] - first["children"], 3),
                }
            )
        window = time.monotonic() - start
        last = _cpu_total(pid)
        memory = _status_fields(pid)
        maps = Path(f"/proc/{pid}/maps").read_text()
        result["children_at_end"] = len(_children(pid))
        result["torch_loaded"] = "libtorch" in maps
        result["daemon_alive_at_end"] = daemon.process.poll() is None
    used = (last["own"] - first["own"]) + (last["children"] - first["children"])
    result |= {
        "measured_seconds": round(window, 2),
        "cpu_seconds": round(used, 3),
        "cpu_seconds_own": round(last["own"] - first["own"], 3),
        "cpu_seconds_children": round(last["children"] - first["children"], 3),
        "cpu_seconds_per_minute": round(used / window * 60, 3),
        "percent_of_one_core": round(100 * used / window, 3),
        "clock_tick_seconds": round(1 / os.sysconf("SC_CLK_TCK"), 4),
        "rss_mib": round(memory.get("VmRSS", 0) / 1024, 1),
        "peak_rss_mib": round(memory.get("VmHWM", 0) / 1024, 1),
        "threads": memory.get("Threads"),
        "series": series,
        "loadavg_after": loadavg(),
    }
    return result
