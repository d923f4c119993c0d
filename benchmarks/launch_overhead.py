"""Seconds from the start of a step's training child to its first training iteration: on this box against a
Ray cluster (``daemon.launcher = "ray"``).

    python benchmarks/launch_overhead.py --out bench-out/launch [--address HOST:PORT] [--repeats 3]

Starts the daemon's own commands (``ciss_daemon.service.launch.worker_command``) on one generated step-0 batch
(ResNet-18, 8 images of 32 x 32, total batch 4, 8 iterations), four ways: 1 local process, 2 local CPU ranks
(``torch.distributed.run``), 1 Ray worker and 2 Ray workers (1 CPU each, gloo). Each run is timed from the
start of the command to the end of the first training iteration (from the first progress report of the
``training`` phase, see :func:`first_iteration_end`), then stopped with SIGTERM as the daemon stops it.
The four kinds alternate so that they see the same load; every process has one thread (``OMP_NUM_THREADS=1``,
what the ranks get anyway). For Ray runs, the supervisor's log also gives the seconds until the ranks
started (joined the cluster, workers reserved and placed). Without ``--address`` it starts a Ray head on
127.0.0.1 (2 CPUs, 100 MB object store, as the tests do, tests/helpers/rayhead.py) and stops it at the end.
Writes ``results.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from ranks import make_request

from benchmarks.measure import loadavg, machine_info, medians, report_results
from ciss_daemon.service.launch import Launch, worker_command
from ciss_daemon.service.protocol import CANDIDATE, REQUEST, JobRequest
from ciss_daemon.service.ray_launch import RayPlan

REPO = Path(__file__).resolve().parents[1]
KINDS = ("local 1", "local 2", "ray 1", "ray 2")


def launch_of(kind: str, address: str) -> Launch:
    where, count = kind.split()
    ranks = int(count)
    if where == "local":
        return Launch(ranks, "cpu")
    return Launch(ranks, "cpu", None, 60.0, RayPlan(address, ranks, 0, 1.0, "pack", 120.0))


def run_once(root: Path, request: JobRequest, kind: str, address: str) -> dict[str, Any]:
    """One run of ``kind``: seconds to the first training iteration."""
    launch = launch_of(kind, address)
    job = Path(tempfile.mkdtemp(prefix=f"job-{kind.replace(' ', '-')}-", dir=root))
    run = replace(request, workdir=str(job), output_dir=str(job / CANDIDATE), ranks=launch.ranks)
    (job / REQUEST).write_text(json.dumps(run.to_json()))
    command, extra = worker_command(job, launch)
    env = {
        **os.environ,
        **extra,
        # One thread per process, as torch.distributed.run and Ray give each rank (Ray: the CPUs of its
        # worker), so that the single process is not slowed by a second thread on a loaded box.
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    started = time.time()
    first: float | None = None
    with open(job / "worker.log", "wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        while process.poll() is None and first is None:
            try:
                report = json.loads((job / "progress.json").read_text())
            except (OSError, ValueError):
                report = {}
            if report.get("phase") == "training" and report.get("images_per_second"):
                first = first_iteration_end(report, request.config["train"]["batch_size"]) - started
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)  # checkpoint and exit, as the daemon stops a step
        code = process.wait(300)
    if first is None:
        raise SystemExit(f"{kind}: no training iteration (exit {code}); see {job / 'worker.log'}")
    run = {"kind": kind, "seconds_to_first_iteration": round(first, 2), "exit_code": code}
    placed = ranks_started(job / "worker.log")
    if placed is not None:  # Ray: joined the cluster, reserved the workers, about to start the ranks
        run["seconds_to_ranks_started"] = round(placed - started, 2)
    return run


def ranks_started(log: Path) -> float | None:
    """When the Ray supervisor logged where its first worker runs (wall clock), None for local runs."""
    for line in log.read_text(errors="replace").splitlines():
        if "ciss.ray: worker 0 on " in line:
            stamp = dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")  # logging's local time
            return stamp.timestamp()
    return None


def first_iteration_end(report: dict[str, Any], batch: int) -> float:
    """When the first iteration ended (wall clock), from a later training report.

    Reports come at most once a second, so the first one may be after iteration 2 or 3; images/s is the
    rate since training began, so each iteration took ``batch / rate`` seconds and the first ended
    ``(iteration - 1)`` of them before the report.
    """
    seconds_per_iteration = batch / report["images_per_second"]
    return report["updated_at"] - (report["iteration"] - 1) * seconds_per_iteration


@contextlib.contextmanager
def head(address: str | None) -> Iterator[str]:
    if address:
        yield address
        return
    sys.path.insert(0, str(REPO / "tests" / "helpers"))
    from rayhead import ray_head  # the tests' throwaway head: `ray start --head --block` on 127.0.0.1

    with ray_head() as started:
        yield started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--address", default=None, help="a running Ray head; default: start one")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="ciss-launch-bench-"))
    try:
        request = make_request(root, images=8, size=32, batch=4, epochs=4)
        with head(args.address) as address:
            before = loadavg()
            runs = [run_once(root, request, kind, address) for _ in range(args.repeats) for kind in KINDS]
            after = loadavg()
        machine = machine_info(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    summary = medians(runs, "seconds_to_first_iteration", "kind", KINDS)
    report_results(
        args,
        runs,
        ("median_seconds_to_first_iteration", summary),
        (before, after),
        machine,
        lambda kind, seconds: f"{kind}: {seconds:.1f} s to the first iteration (median of {args.repeats})",
    )


if __name__ == "__main__":
    main()
