"""The daemon benchmarks' results as ``results.md`` (tables, with the machine and the command of each
section) and as a table on the terminal.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any


def _row(label: str, s: dict[str, Any]) -> str:
    return f"| {label} | {s['median']:.3f} | {s['min']:.3f} | {s['max']:.3f} | {s['n']} |"


def _taken(section: dict[str, Any]) -> list[str]:
    if "command" not in section:
        return []
    return ["", f"Command: `{section['command']}`, taken {section['taken_at']}."]


def render_markdown(results: dict[str, Any]) -> str:
    """``results.md``: the figures as tables, with the machine and the command."""
    m = results["machine"]
    lines = [
        "# Daemon benchmarks",
        "",
        f"Last command: `{results['command']}`, taken {results['taken_at']}.  ",
        f"Machine: {m['cpu_model']}, {m['usable_cpus']} usable of {m['logical_cpus']} logical CPUs; "
        f"Python {m['python']}; SQLite {m['sqlite']}; SQLAlchemy {m['sqlalchemy']}; {m['platform']}; "
        f"workspaces on {m['workdir_fs']}. Load average at start {m['loadavg_at_start']}.",
    ]
    if m.get("git_head"):
        modified = ", ".join(m.get("git_modified") or []) or "none"
        lines[-1] += f"  \nCode: commit {m['git_head']}; files modified since: {modified}."
    sections = (("status", _status_lines), ("ingest", _ingest_lines), ("idle", _idle_lines))
    for key, section_lines in sections:
        if results.get(key):
            lines += section_lines(results[key])
    return "\n".join(lines) + "\n"


def _status_lines(st: dict[str, Any]) -> list[str]:
    """The ``status`` section: the catalog, the fresh processes, the in-process figures, the imports."""
    lines = [
        "",
        f"## `ciss status` with {st['steps']} steps",
        *_taken(st),
        "",
        f"Catalog: {st['steps']} promoted steps, {st['classes']} classes, {st['events']} events, "
        f"{st['rejections']} rejections, full metrics per model version; "
        f"{st['catalog_bytes'] / 2**20:.1f} MiB, built in {st['catalog_build_seconds']} s. "
        f"`--json` lists {st['json_steps']} steps ({st['json_bytes'] / 1024:.0f} KiB). "
        f"Load average {st['loadavg_before']} -> {st['loadavg_after']}.",
        "",
        "Fresh process, wall seconds (one warm-up run not counted):",
        "",
        "| command | median | min | max | runs |",
        "|---|---|---|---|---|",
    ]
    lines += [_row(f"`{label}`", s) for label, s in st["processes"].items()]
    ip = st["in_process"]
    lines += [
        "",
        "In process (catalog already open):",
        "",
        "| what | median | min | max | runs |",
        "|---|---|---|---|---|",
        _row("`snapshot.status_snapshot`", ip["status_snapshot"]),
        _row("snapshot + rich render", ip["snapshot_and_render"]),
        "",
        f"torch imported by `ciss status`: {'yes' if st['torch_imported_by_status'] else 'no'}. "
        f"Imports of one `ciss status` (`-X importtime`, which inflates them): "
        f"{st['imports']['total_ms']:.0f} ms in all; costliest, cumulative ms: "
        + ", ".join(f"{r['module']} {r['ms']}" for r in st["imports"]["top"])
        + ".",
    ]
    return lines


def _ingest_lines(ing: dict[str, Any]) -> list[str]:
    """The ``ingest`` section: the settings and window check, then the seconds of each way in."""
    s, w = ing["settings"], ing["window_check"]
    lines = [
        "",
        "## Complete folder to queued step",
        *_taken(ing),
        "",
        f'`ciss daemon` with default settings except `training_window = "{s["training_window"]}"` '
        f"(settle_seconds {s['settle_seconds']}, dispatch_seconds {s['dispatch_seconds']}, "
        f"rescan_seconds {s['rescan_seconds']}). Window check with `Daemon.window_open`: open now "
        f"{w['open_now']}, open 30 s after its next opening ({w['next_opening']}) "
        f"{w['open_30s_after_next_opening']}. Steps at the end: "
        + ", ".join(
            f"{r['steps']} {r['state']} (most attempts {r['max_attempts_used']})" for r in ing["final_states"]
        )
        + f". Daemon ready {ing['daemon_ready_seconds']} s after spawn.",
        "",
        "Seconds from the folder being complete in the inbox to the step visible as queued in the "
        "catalog (polled every 20 ms). Complete means: submit, the renamed folder appeared in the inbox "
        "(watched every 2 ms); copytree, the copy returned; rename, `os.rename` returned. `until tick` "
        "is up to the start of the daemon iteration that accepted it (the step's created_at), `ingest` "
        "is validation, store copy and commit.",
        "",
        "| how | median | min | max | each run | until tick (median) | ingest (median) |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, r in ing["modes"].items():
        fc = r["from_complete"]
        lines.append(
            f"| {mode} | {fc['median']:.2f} | {fc['min']:.2f} | {fc['max']:.2f} | "
            f"{', '.join(f'{v:.2f}' for v in fc['values'])} | "
            f"{r['until_accepting_tick']['median']:.2f} | {r['ingest']['median']:.2f} |"
        )
    sub = ing["modes"].get("submit")
    if sub:
        lines.append(
            f"\n`ciss submit` including the command itself (spawn, copy, fsync, rename): median "
            f"{sub['total']['median']:.2f} s (min {sub['total']['min']:.2f}, "
            f"max {sub['total']['max']:.2f})."
        )
    return lines


def _idle_lines(idle: dict[str, Any]) -> list[str]:
    """The ``idle`` section: CPU and memory of the settled daemon."""
    return [
        "",
        "## Idle daemon",
        *_taken(idle),
        "",
        f"Default settings, empty workspace, {idle['settle_seconds']} s to settle after start-up "
        f"(ready {idle['daemon_ready_seconds']} s after spawn), then {idle['measured_seconds']} s "
        f"measured from /proc (clock tick {idle['clock_tick_seconds']} s).",
        "",
        "| figure | value |",
        "|---|---|",
        f"| CPU seconds per minute | {idle['cpu_seconds_per_minute']:.3f} |",
        f"| percent of one core | {idle['percent_of_one_core']:.3f} % |",
        f"| CPU seconds (own / children) | {idle['cpu_seconds_own']:.2f} / "
        f"{idle['cpu_seconds_children']:.2f} |",
        f"| RSS / peak RSS | {idle['rss_mib']} MiB / {idle['peak_rss_mib']} MiB |",
        f"| threads / child processes | {idle['threads']} / {idle['children_at_end']} |",
        f"| torch loaded | {'yes' if idle['torch_loaded'] else 'no'} |",
    ]


def print_table(results: dict[str, Any], sections: Sequence[str]) -> None:
    """The figures of this run on the terminal."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="ciss daemon benchmarks", title_justify="left")
    for column in ("figure", "median", "min", "max", "n"):
        table.add_column(column)

    def add(label: str, s: dict[str, Any], unit: str = "s") -> None:
        table.add_row(label, f"{s['median']:.3f} {unit}", f"{s['min']:.3f}", f"{s['max']:.3f}", str(s["n"]))

    if "status" in sections:
        st = results["status"]
        for label, s in st["processes"].items():
            add(f"{label} ({st['steps']} steps)" if "status" in label else label, s)
        add("in-process status_snapshot", st["in_process"]["status_snapshot"])
    if "ingest" in sections:
        for mode, r in results["ingest"]["modes"].items():
            add(f"complete folder -> queued: {mode}", r["from_complete"])
    if "idle" in sections:
        idle = results["idle"]
        table.add_row(
            "idle daemon CPU",
            f"{idle['cpu_seconds_per_minute']:.3f} s/min ({idle['percent_of_one_core']:.2f} % core)",
            "",
            "",
            f"{idle['measured_seconds']:.0f} s",
        )
        table.add_row("idle daemon RSS", f"{idle['rss_mib']} MiB", "", "", "")
    # Piped output (make, CI logs) would wrap at 80 columns; a terminal keeps its own width.
    Console(width=None if sys.stdout.isatty() else 110).print(table)
