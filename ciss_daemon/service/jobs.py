"""Supervision of the training child process (``service/worker.py`` is its side of the protocol).

The child is a separate Python process started with ``subprocess`` (never ``fork``: the daemon has
threads), so a crash or a CUDA out-of-memory in training never takes the daemon down. It dies with the
daemon (parent-death signal), and it is stopped with SIGTERM, on which it writes a checkpoint and exits 75.

With several ranks (``service/launch.py``) the child is ``torch.distributed.run``, in a process group of its
own with its ranks. It forwards SIGTERM to every rank; the ranks agree to stop, rank 0 checkpoints, and
writes its exit code to ``exit.json``, since the launcher's own exit code does not carry it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ciss_daemon.service.launch import Launch, worker_command
from ciss_daemon.service.protocol import (
    CANDIDATE,
    ERROR,
    EXIT,
    EXIT_DONE,
    EXIT_FAILED,
    EXIT_RANK_LOST,
    EXIT_STOPPED,
    LOG,
    PROGRESS,
    REQUEST,
    RESULT,
    JobRequest,
    JobResult,
)
from engine.atomic import write_json


@dataclass(frozen=True)
class Outcome:
    """How a training child ended."""

    kind: str  # "done" | "stopped" | "failed" | "crashed"
    reason: str = ""
    result: JobResult | None = None
    timed_out: bool = False  # killed after daemon.stop_timeout_seconds without a checkpoint


def timeout_reason(timeout: float) -> str:
    return (
        f"training did not checkpoint within daemon.stop_timeout_seconds ({timeout:g} s) and was killed "
        "(raise the timeout above the time of one iteration)"
    )


def temp_files(job_dir: Path) -> list[Path]:
    """Half-written files of a job folder: checkpoints and candidate files are written as ``.*.tmp``."""
    return [*job_dir.glob(".*.tmp"), *job_dir.glob(f"{CANDIDATE}/.*.tmp")]


def remove_temp_files(job_dir: Path) -> int:
    """Delete what a killed worker was writing; returns how many files."""
    files = [p for p in temp_files(job_dir) if p.is_symlink() or p.is_file()]
    for path in files:
        path.unlink(missing_ok=True)
    return len(files)


class TrainingProcess:
    """One running training child for one job folder."""

    def __init__(self, job_dir: Path, process: subprocess.Popen[bytes], ranks: int = 1) -> None:
        self.job_dir = job_dir
        self.process = process
        self.ranks = ranks

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    def start(cls, job_dir: Path, request: JobRequest, launch: Launch | None = None) -> TrainingProcess:
        """Write ``request.json`` and start the worker(s); output goes to ``worker.log`` in the job dir.

        ``launch`` (default: one process on the request's device) says how many ranks train the step."""
        launch = launch or Launch(1, request.device)
        request = replace(request, device=launch.device, ranks=launch.ranks)
        job_dir.mkdir(parents=True, exist_ok=True)
        for stale in (RESULT, ERROR, EXIT):  # left over from an earlier attempt
            (job_dir / stale).unlink(missing_ok=True)
        # A candidate an earlier attempt began or finished but that was never recorded (a crash): this
        # attempt writes it again, and a half-written one must not be moved into models/ as a whole.
        shutil.rmtree(job_dir / CANDIDATE, ignore_errors=True)
        write_json(job_dir / REQUEST, request.to_json())
        command, extra = worker_command(job_dir, launch)
        env = {**os.environ, **extra, "CISS_PARENT_PID": str(os.getpid()), "PYTHONUNBUFFERED": "1"}
        with open(job_dir / LOG, "ab") as log:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                # Its own process group: a Ctrl-C in the daemon's terminal reaches the daemon, which then
                # stops the child with SIGTERM so that it checkpoints first.
                start_new_session=True,
            )
        return cls(job_dir, process, launch.ranks)

    def progress(self) -> dict[str, Any] | None:
        """The child's last progress report, or None before the first one."""
        return read_json(self.job_dir / PROGRESS)

    def poll(self) -> Outcome | None:
        """None while the child runs; its outcome once it has exited."""
        code = self.process.poll()
        if code is None:
            return None
        return outcome_of(self.job_dir, self._code(code))

    def stop(self, timeout: float) -> Outcome:
        """Ask the child to checkpoint and exit (SIGTERM); kill it after ``timeout`` seconds.

        A kill may come in the middle of a checkpoint: its temporary file is removed at once (the last
        whole checkpoint stays), and the outcome says the timeout, not an unexplained SIGKILL.
        """
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill()
                self.process.wait()
                remove_temp_files(self.job_dir)
                return Outcome("crashed", timeout_reason(timeout), timed_out=True)
        return outcome_of(self.job_dir, self._code(self.process.returncode))

    def _kill(self) -> None:
        if self.ranks == 1:
            self.process.kill()
            return
        try:  # the launcher and every rank: a rank left behind would hold its GPU
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _code(self, code: int) -> int:
        """The worker's exit code: the launcher's exit code of several ranks says only that one failed."""
        if self.ranks == 1 or code == 0:
            return code
        recorded = read_json(self.job_dir / EXIT)
        return int(recorded["code"]) if recorded and isinstance(recorded.get("code"), int) else code


def outcome_of(job_dir: Path, code: int) -> Outcome:
    """Interpret the exit code and the files the worker left."""
    if code == EXIT_DONE:
        result = read_json(job_dir / RESULT)
        if result is None:
            return Outcome("crashed", "the training process exited without writing its result")
        try:
            return Outcome("done", result=JobResult.from_json(result))
        except (KeyError, TypeError, ValueError) as error:
            return Outcome("crashed", f"the training process wrote a result that cannot be read ({error!r})")
    if code == EXIT_STOPPED:
        return Outcome("stopped", "stopped on request after a checkpoint")
    if code == EXIT_RANK_LOST:
        recorded = read_json(job_dir / EXIT) or {}
        return Outcome("crashed", str(recorded.get("reason") or "a training rank died or stopped answering"))
    error_file = job_dir / ERROR
    if code == EXIT_FAILED and error_file.exists():
        return Outcome("failed", error_file.read_text(encoding="utf-8", errors="replace").strip())
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        return Outcome("crashed", f"the training process was killed by {name}")
    return Outcome("crashed", f"the training process exited with code {code}; see {job_dir / LOG}")


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def stop_orphan(pid: int | None, job_dir: Path, timeout: float) -> None:
    """Stop a worker left by an earlier daemon (it normally dies with its parent; this covers the gap)."""
    if not pid or not _is_worker(pid, job_dir):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _is_worker(pid, job_dir):
        time.sleep(0.1)
    if _is_worker(pid, job_dir):
        os.kill(pid, signal.SIGKILL)
        while _is_worker(pid, job_dir):
            time.sleep(0.05)
        remove_temp_files(job_dir)


def _is_worker(pid: int, job_dir: Path) -> bool:
    """Whether ``pid`` is a live worker of ``job_dir`` (not a recycled pid of some other program)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z" and b"ciss_daemon.service.worker" in cmdline and os.fsencode(str(job_dir)) in cmdline
