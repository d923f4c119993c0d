"""Images/s of one training step on several CPU ranks (gloo, ``torch.distributed.run``) against 1 process.

    python benchmarks/ranks.py --out bench-out/ranks [--ranks 2] [--images 32] [--size 64] [--batch 8]
                               [--epochs 2] [--repeats 2] [--threads N]

Starts the daemon's own worker commands (``service.launch.worker_command``: what the daemon runs with
``daemon.cpu_ranks`` = 1 and = N) on one generated step-0 batch, with the same total batch, and reads the
worker's progress reports: images/s is the training rate the worker reports for the whole job (iterations
since training began, times the total batch), so start-up and evaluation are not counted. The runs
alternate (1, N, 1, N, ...) so that both see the same machine load. Writes ``results.json`` into ``--out``.

Threads: ``torch.distributed.run`` gives each rank ``OMP_NUM_THREADS=1`` unless it is set, while a single
process uses every core; ``--threads N`` sets ``OMP_NUM_THREADS`` for all runs alike.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.measure import loadavg, machine_info, medians, report_results
from ciss_daemon.service.launch import Launch, worker_command
from ciss_daemon.service.protocol import CANDIDATE, REQUEST, BatchSpec, JobRequest
from engine.config import EngineConfig
from engine.synthetic import generate_batches


def make_request(root: Path, *, images: int, size: int, batch: int, epochs: int) -> JobRequest:
    """request.json of a step 0 on a generated batch of ``images`` training images, ResNet-18."""
    (folder,) = generate_batches(
        root / "data", "2", train_per_step=images, val_per_step=2, image_size=size, seed=0, prefix="bench"
    )
    classes = tomllib.loads((folder / "batch.toml").read_text())["classes"]
    config = EngineConfig.from_dict(
        {
            "model": {"backbone": "resnet18"},
            "train": {
                "epochs_base": epochs,
                "batch_size": batch,
                "crop_size": size,
                "amp": False,
                "num_workers": 0,
                "checkpoint_every": 10_000,
            },
        }
    )
    value_map = {v: int(v) for v in classes}  # mask value -> global class id: the same at step 0
    ref = BatchSpec(folder.name, str(folder), value_map, "train")
    return JobRequest(
        step_index=0,
        step_sizes=[len(classes)],
        class_names={int(v): name for v, name in classes.items()},
        train_batches=[ref],
        eval_batches=[ref],
        memory_batches=[],
        teacher_dir=None,
        workdir="",  # set per run
        output_dir="",
        config=config.to_dict(),
        device="cpu",
    )


def run_once(root: Path, request: JobRequest, ranks: int, threads: int | None) -> dict[str, Any]:
    """One worker run with ``ranks`` processes; the last training report and the wall time."""
    job = Path(tempfile.mkdtemp(prefix=f"job-{ranks}-", dir=root))
    run = replace(request, workdir=str(job), output_dir=str(job / CANDIDATE), ranks=ranks)
    (job / REQUEST).write_text(json.dumps(run.to_json()))
    command, extra = worker_command(job, Launch(ranks, "cpu"))
    if threads is not None:
        extra["OMP_NUM_THREADS"] = str(threads)
    started = time.perf_counter()
    with open(job / "worker.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **extra})
        last: dict[str, Any] = {}
        while process.poll() is None:
            try:
                report = json.loads((job / "progress.json").read_text())
            except (OSError, ValueError):
                report = {}
            if report.get("phase") == "training":
                last = report
            time.sleep(0.1)
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"the worker with {ranks} rank(s) failed; see {job / 'worker.log'}")
    return {
        "ranks": ranks,
        "images_per_second": last.get("images_per_second"),
        "iterations": last.get("iteration"),
        "wall_seconds": round(wall, 2),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8, help="the total batch, split over the ranks")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of every process")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="ciss-ranks-bench-"))
    try:
        request = make_request(root, images=args.images, size=args.size, batch=args.batch, epochs=args.epochs)
        before = loadavg()
        order = [ranks for _ in range(args.repeats) for ranks in (1, args.ranks)]
        runs = [run_once(root, request, ranks, args.threads) for ranks in order]
        after = loadavg()
        machine = machine_info(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    summary = medians(runs, "images_per_second", "ranks", (1, args.ranks))
    report_results(
        args,
        runs,
        ("median_images_per_second", summary),
        (before, after),
        machine,
        lambda ranks, rate: f"{ranks} process(es): {rate:.2f} images/s (median of {args.repeats})",
    )


if __name__ == "__main__":
    main()
