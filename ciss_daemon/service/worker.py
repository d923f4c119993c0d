"""The training child process: ``python -m ciss_daemon.service.worker JOB_DIR``.

The daemon writes ``request.json`` into the job folder and starts this process; the worker trains the step
with the engine, evaluates the candidate and the current model, and saves the candidate. It never touches
the catalog (the daemon is its only writer); it talks back through the files of ``service/protocol.py``.
A crash (killed, segfault) leaves neither result nor error; the daemon retries from the checkpoint.

Under ``torch.distributed.run`` (``service/launch.py``) every rank runs this module: ``train.batch_size``
(after step 0 ``train.batch_size_incremental`` where set) is the total batch, split evenly over the ranks;
the ranks agree at every iteration whether to stop, so that all of them stop at the same one and rank 0
writes a single checkpoint; rank 0 alone writes progress, result, error and the model, and records its
exit code in ``exit.json`` (76: another rank died or did not answer within ``daemon.rank_timeout_seconds``;
the daemon retries the attempt from the checkpoint).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ciss_daemon.service.protocol import (
    ERROR,
    EXIT,
    EXIT_DONE,
    EXIT_FAILED,
    EXIT_RANK_LOST,
    EXIT_STOPPED,
    PROGRESS,
    REQUEST,
    RESULT,
    BatchSpec,
    JobRequest,
    JobResult,
)
from engine.atomic import write_json

log = logging.getLogger("ciss.worker")


def _finite(value: float) -> float | None:
    return value if value == value and value not in (float("inf"), float("-inf")) else None


class ProgressWriter:
    """Rewrites progress.json at most once a second (and at phase changes).

    Progress is what `ciss status` shows, not the job's outcome (the exit code and result.json are), so a
    write that fails (a full disk) is logged once and training goes on; the next write tries again.
    """

    def __init__(
        self,
        path: Path,
        interval: float = 1.0,
        *,
        ranks: int = 1,
        enabled: bool = True,
        cluster: dict[str, Any] | None = None,
    ) -> None:
        self.path = path
        self.interval = interval
        self.last = 0.0
        self.failing = False
        self.ranks = ranks  # reported so that `ciss status` shows how many processes train the step
        self.enabled = enabled  # rank 0 of several reports for the whole job; the others stay silent
        self.resumed_at: int | None = None  # the iteration this attempt started from (0: a fresh start)
        # Where the ranks run when not on this box (Ray: address, nodes), for `ciss status`.
        self.where = {"cluster": cluster} if cluster else {}

    def phase(self, phase: str, **fields: Any) -> None:
        self.last = time.monotonic()
        if not self.enabled:
            return
        try:
            write_json(
                self.path,
                {"phase": phase, "updated_at": time.time(), "ranks": self.ranks, **self.where, **fields},
            )
        except OSError as error:
            if not self.failing:
                log.warning(
                    "could not write %s (%s); training goes on without progress reports", self.path, error
                )
            self.failing = True
            return
        if self.failing:
            log.info("progress reports resumed in %s", self.path)
        self.failing = False

    def __call__(self, p: Any) -> None:
        if self.resumed_at is None:
            self.resumed_at = p.iteration - 1  # called after each iteration: the first one ends here
        if time.monotonic() - self.last < self.interval and p.iteration < p.total_iterations:
            return
        self.phase(
            "training",
            resumed_at=self.resumed_at,
            iteration=p.iteration,
            total=p.total_iterations,
            epoch=p.epoch,
            epochs=p.epochs,
            losses={k: _finite(v) for k, v in p.losses.items()},
            lr=p.lr,
            images_per_second=round(p.images_per_second, 2),
            eta_seconds=_finite(round(p.eta_seconds, 1)),
        )


def step_request(request: JobRequest) -> Any:
    """The engine's StepRequest for a job's request."""
    from engine.config import EngineConfig
    from engine.runner import BatchRef, StepRequest

    def refs(specs: list[BatchSpec]) -> list[BatchRef]:
        return [BatchRef(spec.name, Path(spec.folder), spec.value_map, spec.kind) for spec in specs]

    return StepRequest(
        step_index=request.step_index,
        step_sizes=list(request.step_sizes),
        class_names=dict(request.class_names),
        train_batches=refs(request.train_batches),
        eval_batches=refs(request.eval_batches),
        memory_batches=refs(request.memory_batches),
        teacher_dir=Path(request.teacher_dir) if request.teacher_dir else None,
        workdir=Path(request.workdir),
        output_dir=Path(request.output_dir),
        config=EngineConfig.from_dict(request.config),
        device=request.device,
    )


def run(job_dir: Path) -> int:
    """Train, evaluate and save one step; returns the exit code."""
    stop = {"requested": False}

    # A handler only sets a flag (docs/architecture.md, "The daemon loop").
    def on_term(signum: int, frame: Any) -> None:
        stop["requested"] = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    # Under torch.distributed.run the daemon is the launcher's parent; on Ray (service/ray_launch.py) a
    # rank's parent is the agent that started it, and the agent dies with the daemon's supervisor.
    launched = world > 1 and os.environ.get("CISS_LAUNCHER") != "ray"
    daemon_gone = _watch_daemon(int(os.environ.get("CISS_PARENT_PID", "0")), launched=launched)
    _die_with_parent()

    def local_stop() -> bool:
        # A daemon killed with SIGKILL cannot stop its child: the child notices it was re-parented and
        # stops itself after a checkpoint, so a restarted daemon never finds two trainers on one job.
        return stop["requested"] or daemon_gone()

    progress = ProgressWriter(job_dir / PROGRESS, ranks=world, enabled=rank == 0, cluster=_cluster())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    code, reason = EXIT_FAILED, None
    try:
        job = JobRequest.from_json(json.loads((job_dir / REQUEST).read_text(encoding="utf-8")))
        should_stop = _join_ranks(job, world, local_stop) if world > 1 else local_stop
        code = _train(job_dir, job, progress, should_stop, write=rank == 0)
    except KeyboardInterrupt:
        code = EXIT_STOPPED
    except Exception as error:  # every failure becomes one line for the catalog
        if world > 1 and _rank_lost(error):
            code, reason = EXIT_RANK_LOST, _rank_lost_reason(error, world)
            print(f"error: {reason}", file=sys.stderr)
        else:
            message = _describe(error, torch_module=sys.modules.get("torch"), engine_error=_engine_error())
            if rank == 0:
                (job_dir / ERROR).write_text(message + "\n", encoding="utf-8")
            print(f"error: {message}", file=sys.stderr)
        import traceback

        traceback.print_exc()  # the full story goes to the job's log file
        code = code if code == EXIT_RANK_LOST else EXIT_FAILED
    if world > 1 and rank == 0:
        write_json(job_dir / EXIT, {"code": code, "reason": reason})
    return code


def _train(
    job_dir: Path,
    job: JobRequest,
    progress: ProgressWriter,
    should_stop: Callable[[], bool],
    *,
    write: bool,
) -> int:
    """Train, evaluate and (``write``: rank 0) save the step of ``job``; returns the exit code."""
    from engine.runner import eval_groups, evaluate_model, load_model, resolve_device, run_step
    from engine.step_setup import new_class_ids

    request = step_request(job)
    progress.phase("starting")
    result = run_step(request, progress=progress, should_stop=should_stop)
    if not result.finished:
        progress.phase("stopped")
        return EXIT_STOPPED
    current = None
    if request.teacher_dir is not None:
        progress.phase("evaluating")
        device = resolve_device(request.device)
        teacher, _ = load_model(request.teacher_dir, device)
        new = new_class_ids(request.step_sizes)
        current = evaluate_model(
            teacher,
            eval_groups(request.eval_batches),
            num_classes=sum(request.step_sizes),
            old_classes=list(range(1, new[0])),
            new_classes=new,
            device=device,
            base_classes=list(range(1, request.step_sizes[0] + 1)),
        )
    assert result.metrics is not None
    if write:
        answer = JobResult(
            step_index=request.step_index,
            metrics=result.metrics.to_dict(),
            current_metrics=current.to_dict() if current else None,
            files=result.files,
            history=result.history,
            train_images=result.train_images,
        )
        write_json(job_dir / RESULT, answer.to_json())
    progress.phase("done")
    return EXIT_DONE


def _watch_daemon(parent: int, *, launched: bool) -> Callable[[], bool]:
    """Whether the daemon that started this job is gone. Under torch.distributed.run the daemon is the
    launcher's parent, not ours; a dead launcher counts as a dead daemon."""
    if parent == 0:
        return lambda: False
    if not launched:
        return lambda: os.getppid() != parent
    launcher = os.getppid()

    def gone() -> bool:
        if os.getppid() != launcher:
            return True
        try:
            stat = Path(f"/proc/{launcher}/stat").read_text()
        except OSError:
            return True
        return int(stat.rsplit(")", 1)[1].split()[1]) != parent  # the launcher's parent pid

    return gone


def _cluster() -> dict[str, Any] | None:
    """Where this job's ranks run, as the Ray supervisor put it in ``CISS_CLUSTER`` (None on one box)."""
    try:
        found = json.loads(os.environ.get("CISS_CLUSTER", "null"))
    except ValueError:
        return None
    return found if isinstance(found, dict) else None


def split_batch(job: JobRequest, world: int) -> None:
    """Set this rank's share of the batch the step trains with in ``job.config``: ``train.batch_size``,
    or after step 0 ``train.batch_size_incremental`` where set. ConfigError when it does not split."""
    from engine.config import EngineConfig
    from engine.exceptions import ConfigError

    key = EngineConfig.from_dict(job.config).train.step_batch_key(job.step_index)
    train = job.config["train"]
    total = int(train[key])
    if total % world:
        raise ConfigError(
            f"train.{key}: {total} does not split evenly over {world} training processes; "
            f"use a multiple of {world}"
        )
    train[key] = total // world


def _join_ranks(job: JobRequest, world: int, local_stop: Callable[[], bool]) -> Callable[[], bool]:
    """Join the other ranks: split the batch, pick this rank's device; returns the agreed stop test.

    ``job`` is changed in place: the per-rank batch of this step (:func:`split_batch`) and ``device``.
    """
    import torch
    import torch.distributed as dist

    split_batch(job, world)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = job.device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
        job.device = f"cuda:{local}"
    else:
        job.device = "cpu"
    timeout = float(os.environ.get("CISS_RANK_TIMEOUT", "300"))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=dt.timedelta(seconds=timeout))
    flag_device = torch.device("cuda", local) if cuda else torch.device("cpu")

    def agreed_stop() -> bool:
        # Called once per iteration on every rank: a stop seen by any rank stops all of them at the same
        # iteration, so no rank waits in a collective for one that left.
        flag = torch.tensor([1.0 if local_stop() else 0.0], device=flag_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    return agreed_stop


def _rank_lost(error: Exception) -> bool:
    """Whether ``error`` is a collective that failed because another rank died or hung."""
    import torch.distributed as dist

    text = str(error)
    return isinstance(error, dist.DistError) or any(marker in text for marker in _RANK_LOST_MARKERS)


# What gloo raises when a peer is gone: a dead peer closes or resets the connection; a silent one makes
# the waiting rank time out, which gloo words as "Timed out waiting ..." or, when the timeout fires on
# the connection itself, "Application timeout caused pair closure" (which of the two depends on timing).
_RANK_LOST_MARKERS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Timed out",
    "timeout caused pair closure",
)


def _rank_lost_reason(error: Exception, world: int) -> str:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    first = re.sub(r"^\[[^\]]*\]\s*", "", first)  # gloo's "[.../pair.cc:545]" source location
    return f"one of the {world} training processes of this step died or stopped answering ({first[:200]})"


def _die_with_parent() -> None:
    """Ask Linux to send SIGTERM when the daemon dies (prctl PR_SET_PDEATHSIG); elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


def _engine_error() -> type[Exception]:
    from engine.exceptions import EngineError

    return EngineError


def _describe(error: Exception, *, torch_module: Any, engine_error: type[Exception]) -> str:
    if torch_module is not None and isinstance(error, torch_module.cuda.OutOfMemoryError):
        return "CUDA out of memory; lower train.batch_size or train.crop_size in ciss.toml"
    if isinstance(error, engine_error):
        return str(error)
    return f"{type(error).__name__}: {error}"


def main() -> None:
    if len(sys.argv) != 2:
        print("usage: python -m ciss_daemon.service.worker JOB_DIR", file=sys.stderr)
        sys.exit(2)
    sys.exit(run(Path(sys.argv[1])))


if __name__ == "__main__":
    main()
