"""``ciss status`` on 1,000 steps, PostgreSQL against SQLite, measured side by side.

    python benchmarks/status_backends.py --out bench-out/status-backends [--steps 1000] [--runs 10]

Builds the same catalog twice with the benchmarks' ``build_catalog`` (1,000 promoted steps with full
metrics, events and rejections): once in a workspace's SQLite file, once in a PostgreSQL database of a
throwaway server on 127.0.0.1 (``tests/helpers/postgres.py``: ``CISS_TEST_POSTGRES_URL`` names an existing one
instead). Then times ``ciss status`` and ``ciss status --json`` as fresh processes, alternating the two
backends run by run so that both see the same machine load, and ``snapshot.status_snapshot`` in-process.
Writes ``results.json`` into ``--out`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "helpers"))  # the throwaway PostgreSQL server of the tests

from postgres import postgres_server  # noqa: E402

from benchmarks import measure as bench  # noqa: E402
from benchmarks.catalog_builder import build_catalog  # noqa: E402
from ciss_daemon.catalog import connection, plain  # noqa: E402
from ciss_daemon.catalog.snapshot import status_snapshot  # noqa: E402
from ciss_daemon.workspace import init_workspace  # noqa: E402


def _in_process(url: str, runs: int) -> dict[str, Any]:
    """The snapshot as ``ciss status`` reads it: a fresh driver connection and six plain queries."""
    with plain.reading(url) as read:
        status_snapshot(read)  # page cache, server-side caches
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        with plain.reading(url) as read:
            status_snapshot(read)
        times.append(time.perf_counter() - started)
    return bench.summary(times)


def run(workdir: Path, *, steps: int, runs: int) -> dict[str, Any]:
    with postgres_server() as server:
        url = server.new_database()
        sqlite_ws = bench.new_workspace(workdir / "sqlite-ws")
        pg_ws = init_workspace(workdir / "pg-ws", settings_text=f"[catalog]\nurl = {json.dumps(url)}\n")
        connection.upgrade_catalog(url, backup_dir=None)
        built = {
            "sqlite": build_catalog(sqlite_ws, steps=steps),
            "postgresql": build_catalog(pg_ws, steps=steps, url=url),
        }
        workspaces = {"sqlite": sqlite_ws, "postgresql": pg_ws}
        commands = {
            (backend, label): bench.cli(*args, "--workspace", str(ws.root))
            for backend, ws in workspaces.items()
            for label, args in (("ciss status", ["status"]), ("ciss status --json", ["status", "--json"]))
        }
        for command in commands.values():
            bench.timed_run(command)  # page cache and .pyc warm-up, not counted
        samples: dict[tuple[str, str], list[float]] = {key: [] for key in commands}
        load_before = bench.loadavg()
        for _ in range(runs):  # alternate: each round runs every command once
            for key, command in commands.items():
                samples[key].append(bench.timed_run(command))
        load_after = bench.loadavg()
        in_process = {
            "sqlite": _in_process(f"sqlite:///{sqlite_ws.catalog_path}", runs),
            "postgresql": _in_process(url, runs),
        }
        with connection.session_factory(connection.make_engine(url))() as session:
            server_version = session.connection().exec_driver_sql("SHOW server_version").scalar()
    return {
        "steps": steps,
        "runs": runs,
        "build_seconds": {backend: round(stats.seconds, 2) for backend, stats in built.items()},
        "processes": {f"{label} [{backend}]": bench.summary(v) for (backend, label), v in samples.items()},
        "in_process_status_snapshot": in_process,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "postgresql_server": server_version,
        "machine": bench.machine_info(workdir),
    }


def markdown(result: dict[str, Any]) -> str:
    lines = ["| command | median s | min s | max s |", "|---|---|---|---|"]
    for label, s in result["processes"].items():
        lines.append(f"| `{label}` | {s['median']:.3f} | {s['min']:.3f} | {s['max']:.3f} |")
    for backend, s in result["in_process_status_snapshot"].items():
        lines.append(
            f"| in process: `snapshot.status_snapshot` [{backend}] | {s['median']:.3f} | {s['min']:.3f} | "
            f"{s['max']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="ciss-status-backends-"))
    try:
        result = run(workdir, steps=args.steps, runs=args.runs)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    print(markdown(result))
    print(f"load average {result['loadavg_before']} -> {result['loadavg_after']}")


if __name__ == "__main__":
    main()
