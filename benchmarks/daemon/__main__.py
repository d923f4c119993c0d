"""Benchmarks of the daemon's own figures, measured on the machine that runs them.

``python -m benchmarks.daemon {status,ingest,idle,all} [--out DIR]`` (``make bench-daemon``):

- ``status``: wall time of ``ciss status`` (and ``--json``) as a fresh process on a catalog of 1,000 steps,
  beside a bare interpreter start and ``import typer``; the in-process snapshot alone.
- ``ingest``: seconds from a complete folder to a queued step, with a real ``ciss daemon`` whose training
  window never opens (so the step stays queued): ``ciss submit``, a folder copied in by hand, a folder
  renamed in whole.
- ``idle``: CPU seconds per minute and memory of a daemon with default settings on an empty workspace.

Results are printed and written to ``results.json`` and ``results.md`` in ``--out`` (default
``bench-out/daemon``); running one section merges it into the results already there. Timings on a shared
machine are noisy, so every run records the load average next to its figures.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.daemon.idle import bench_idle
from benchmarks.daemon.ingest import bench_ingest
from benchmarks.daemon.report import print_table, render_markdown
from benchmarks.daemon.status import bench_status
from benchmarks.measure import machine_info

SECTIONS = ("status", "ingest", "idle")
DEFAULT_OUT = Path("bench-out/daemon")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.daemon", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("section", choices=(*SECTIONS, "all"), help="Which figures to measure.")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Folder for results.json/.md.")
    parser.add_argument("--steps", type=int, default=1000, help="Steps in the status catalog.")
    parser.add_argument("--runs", type=int, default=10, help="Timed runs of each status command.")
    parser.add_argument("--reps", type=int, default=5, help="Drops per way of handing in a folder.")
    parser.add_argument("--idle-seconds", type=float, default=60.0, help="Idle measurement window.")
    parser.add_argument("--settle", type=float, default=5.0, help="Seconds to let the daemon settle.")
    parser.add_argument("--workdir", type=Path, default=None, help="Where workspaces go (default: temp).")
    parser.add_argument("--keep", action="store_true", help="Keep the workspaces afterwards.")
    args = parser.parse_args(argv)
    sections = SECTIONS if args.section == "all" else (args.section,)

    workdir = Path(tempfile.mkdtemp(prefix="ciss-bench-", dir=args.workdir)).resolve()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    # Sections run one by one merge into what an earlier run left, so `status` then `idle` adds up.
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.exists() else {}
    results |= {
        "command": " ".join(["python -m benchmarks.daemon", *(argv if argv is not None else sys.argv[1:])]),
        "taken_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(workdir),
    }
    try:
        for section in sections:
            print(f"measuring {section} ...", file=sys.stderr, flush=True)
            if section == "status":
                results["status"] = bench_status(workdir, steps=args.steps, runs=args.runs)
            elif section == "ingest":
                results["ingest"] = bench_ingest(workdir, reps=args.reps)
            else:
                results["idle"] = bench_idle(workdir, seconds=args.idle_seconds, settle=args.settle)
            # Each section keeps the command and time it was taken with: sections merge across runs.
            results[section] |= {"command": results["command"], "taken_at": results["taken_at"]}
            # Written after each section, so a later failure keeps what was measured.
            results_path.write_text(json.dumps(results, indent=2) + "\n")
            (out / "results.md").write_text(render_markdown(results))
    finally:
        if args.keep:
            print(f"workspaces kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print_table(results, sections)
    print(f"results in {results_path} and {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
