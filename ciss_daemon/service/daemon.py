"""The daemon: inbox -> catalog -> training job -> gate -> promoted model.

One loop in the main thread does all the work (it is the catalog's only writer). Watcher events and
APScheduler's interval timers only set flags and wake the loop; each iteration catches, logs and carries
on, so one bad batch or a failed job never stops the service. ``tick(now)`` takes the time (an aware UTC
datetime, ``service/clock.py``) as an argument so tests drive it without sleeping.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from ciss_daemon.batch.inbox import (
    CompletenessTracker,
    InboxWatcher,
)
from ciss_daemon.catalog import connection
from ciss_daemon.catalog import records as catalog
from ciss_daemon.catalog.tables import Job, JobState, StepState
from ciss_daemon.exceptions import CissError
from ciss_daemon.profiles import cpu_mismatch, nvidia_gpu_visible
from ciss_daemon.service import clock as service_clock
from ciss_daemon.service import intake, launch, recovery, systemd, training
from ciss_daemon.service.jobs import Outcome, TrainingProcess
from ciss_daemon.service.notify import Notifier, last_event_id, new_events
from ciss_daemon.service.operator import apply_requests
from ciss_daemon.service.planning import build_request
from ciss_daemon.service.retention import CHECKPOINT, prune_checkpoints
from ciss_daemon.service.window import next_opening, training_window
from ciss_daemon.settings import Settings
from ciss_daemon.workspace import Workspace

log = logging.getLogger("ciss.daemon")

# Seconds between tries to record a finished job whose recording failed (see Daemon.outcome_failed).
OUTCOME_RETRY_SECONDS = 10.0
# How often a running job's progress report is copied into the catalog.
PROGRESS_WRITE_INTERVAL = dt.timedelta(seconds=2)
# Earlier than any time the clock reads: the first progress write and a first retry are due at once.
NEVER = dt.datetime.min.replace(tzinfo=dt.UTC)


class Daemon:
    """The service of one workspace. ``run()`` is ``ciss daemon``; tests call ``start()``/``tick()``."""

    def __init__(
        self,
        workspace: Workspace,
        settings: Settings,
        *,
        clock: Callable[[], dt.datetime] = service_clock.now,
        watch: bool = True,
    ) -> None:
        self.ws = workspace
        self.settings = settings
        self.clock = clock
        self.watch = watch
        self.tracker = CompletenessTracker(settings.daemon.settle_seconds)
        self.wakeup = threading.Event()
        self.stopping = threading.Event()
        self.rescan_due = True
        self.retention_due = True
        self.pending: set[Path] = set()  # inbox folders seen but not yet settled
        self.process: TrainingProcess | None = None
        self.process_job_id: int | None = None
        self.last_progress_write = NEVER
        self.slow_jobs_warned: set[int] = set()
        self.resume_logged: tuple[int, int] | None = None  # (job id, attempt) whose resume was logged
        # After recording a finished job failed (e.g. a full disk): when to try again, and the last error.
        self.outcome_retry_at = NEVER
        self.outcome_error: str | None = None
        self.lock = systemd.InstanceLock(workspace.lock_path)
        # One daemon per catalog too: two hosts may point at one PostgreSQL catalog.
        self.lease = connection.DaemonLease(workspace.catalog_url(settings))
        self.watcher: InboxWatcher | None = None
        self.scheduler: Any = None
        self.factory: sessionmaker[Session] | None = None
        self.window: Any = None
        self.notifier: Notifier | None = None
        self.notify_cursor = 0  # id of the last catalog event handed to the notifier
        self.web: Any = None  # the dashboard's server thread, when [web] enabled
        self.launch: launch.Launch | None = None

    # --- life cycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        """Take the lock, upgrade the catalog (after a backup), repair what a crash left, start the timers."""
        self.lock.acquire()
        try:
            self.lease.acquire()
            self._start_locked()
        except BaseException:
            self.lease.release()  # a failed start must not keep the workspace or the catalog locked
            self.lock.release()
            raise

    def _start_locked(self) -> None:
        self.launch = launch.plan_launch(self.settings.daemon, ray=self.settings.ray)
        url = self.ws.catalog_url(self.settings)
        backup = connection.upgrade_catalog(url, backup_dir=self.ws.backups)
        if backup is not None:
            log.info("catalog upgraded; the previous one is saved at %s", backup)
        log.info("each step trains with %s", self.launch.describe())
        self.factory = connection.session_factory(connection.make_engine(url))
        self.window = training_window(self.settings.daemon.training_window)
        recovery.recover(self.ws, self.settings, self.session, now=self.clock())
        self._start_extras()
        # Once started (a daemon that cannot start has a better thing to say).
        mismatch = cpu_mismatch(self.settings, gpu_visible=nvidia_gpu_visible())
        if mismatch is not None:
            log.warning("%s", mismatch)
        if self.watch:
            self.watcher = InboxWatcher(self.ws.inbox, on_change=self.wakeup.set)
            try:
                self.watcher.start()
            except OSError as error:  # e.g. the inotify watch limit: periodic rescans still find everything
                log.warning(
                    "inbox watcher unavailable (%s); relying on rescans every %.0f s",
                    error,
                    self.settings.daemon.rescan_seconds,
                )
                self.watcher = None
        self._start_timers()

    def _start_extras(self) -> None:
        """Notifications and the dashboard, when ``[notify]`` has webhooks and ``[web] enabled`` is set."""
        if self.settings.notify.webhooks:
            assert self.factory is not None  # _start_locked opened the catalog
            with self.factory() as s:
                self.notify_cursor = last_event_id(session=s)
            self.notifier = Notifier(self.settings.notify, workspace=str(self.ws.root))
        if self.settings.web.enabled:
            from ciss_daemon.web import serve_in_thread

            try:
                self.web = serve_in_thread(self.ws, self.settings)
            except CissError as error:  # the service goes on without its dashboard; `ciss web` can serve it
                log.error("no dashboard: %s", error)
                return
            log.info("dashboard at http://%s:%d/", self.settings.web.host, self.settings.web.port)

    def _start_timers(self) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler

        d = self.settings.daemon
        self.scheduler = BackgroundScheduler(timezone=dt.UTC)
        self.scheduler.add_job(self._flag_rescan, "interval", seconds=d.rescan_seconds, id="rescan")
        self.scheduler.add_job(self.wakeup.set, "interval", seconds=d.dispatch_seconds, id="dispatch")
        self.scheduler.add_job(self._flag_retention, "interval", hours=1, id="retention")
        self.scheduler.start()

    def _flag_rescan(self) -> None:
        self.rescan_due = True
        self.wakeup.set()

    def _flag_retention(self) -> None:
        self.retention_due = True
        self.wakeup.set()

    def request_stop(self, *_: Any) -> None:
        """Signal handler: only sets a flag; the loop does the stopping."""
        self.stopping.set()
        self.wakeup.set()

    def run(self) -> int:
        """``ciss daemon``: serve until SIGTERM or SIGINT, then checkpoint the running job and exit 0."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        self.start()
        systemd.notify(READY=1, STATUS="watching the inbox")
        log.info("ciss daemon started on %s (pid %d)", self.ws.root, os.getpid())
        watchdog = systemd.watchdog_interval()
        try:
            while not self.stopping.is_set():
                try:
                    self.tick(self.clock())
                except Exception:  # one bad iteration must never end the service
                    log.exception("daemon iteration failed; carrying on")
                if watchdog:
                    systemd.notify(WATCHDOG=1)
                timeout = self.settings.daemon.dispatch_seconds
                if self.process is not None:
                    timeout = min(timeout, 1.0)
                if watchdog:
                    timeout = min(timeout, watchdog)
                self.wakeup.wait(timeout)
                self.wakeup.clear()
        finally:
            systemd.notify(STOPPING=1, STATUS="stopping: checkpointing the running job")
            self.shutdown()
        return 0

    def shutdown(self) -> None:
        """Stop the training child (it checkpoints), requeue its job, stop timers and watcher, unlock."""
        if self.process is not None:
            outcome = self.process.stop(self.settings.daemon.stop_timeout_seconds)
            if outcome.timed_out:
                log.warning("job %s: %s", self.process_job_id, outcome.reason)
            try:
                self.handle_outcome(outcome, self.clock(), stopping=True)
            except Exception:
                log.exception("could not record the stopped job; it resumes at the next start")
            self.process = None
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
        if self.watcher is not None:
            self.watcher.stop()
        if self.web is not None:
            self.web.stop()
        if self.notifier is not None:
            self.notify()  # the outcome of the stopped job, if it was one
            self.notifier.close()
        self.lease.release()
        self.lock.release()
        log.info("ciss daemon stopped")

    # --- one iteration -------------------------------------------------------------------------------

    def tick(self, now: dt.datetime) -> None:
        """One pass: operator requests, inbox, the running job, the next job, housekeeping."""
        apply_requests(self.ws, self.session, now=now)
        changed = self.watcher is not None and self.watcher.changed.is_set()
        if changed or self.rescan_due or self.pending:
            if self.watcher is not None:
                self.watcher.changed.clear()
            self.rescan_due = False
            self.scan_inbox(now)
        self.poll_job(now)
        self.dispatch(now)
        if self.retention_due:
            self.retention_due = False
            self.retention()
        self.notify()

    def notify(self) -> None:
        """Hand the outcomes recorded since the last call (promoted, held, failed, rejected) to webhooks."""
        if self.notifier is None:
            return
        assert self.factory is not None
        with self.factory() as s:
            events = new_events(session=s, after=self.notify_cursor, kinds=self.settings.notify.events)
        for event in events:
            self.notifier.send(event)
            self.notify_cursor = event["id"]

    def session(self) -> Any:
        """A write transaction on the catalog (commits on success)."""
        assert self.factory is not None, "start() first"
        return connection.transaction(self.factory)

    # --- inbox --------------------------------------------------------------------------------------

    def scan_inbox(self, now: dt.datetime) -> None:
        intake.scan_inbox(
            self.ws, self.settings, self.session, tracker=self.tracker, pending=self.pending, now=now
        )

    def ingest(self, folder: Path, now: dt.datetime) -> None:
        intake.ingest(folder, self.ws, self.settings, self.session, now=now)

    # --- jobs ---------------------------------------------------------------------------------------

    def dispatch(self, now: dt.datetime) -> None:
        """Start the next queued step when nothing trains and the training window is open."""
        if self.process is not None or self.stopping.is_set() or not self.window_open(now):
            return
        with self.session() as s:
            step = catalog.next_runnable_step(session=s)
            if step is None:
                return
            job = s.scalar(
                select(Job).where(Job.step_id == step.id, Job.state == JobState.QUEUED).order_by(Job.id)
            )
            if job is None:
                return
            # A job whose attempts are spent never comes back to the queue: end_attempt fails its step.
            # Built in the same transaction as start_job: class ids of waiting steps may still move.
            request = build_request(s, step, job, self.settings)
            # A checkpoint means a resume; the worker's first progress report says at which iteration.
            verb = "resumes from its checkpoint" if Path(job.workdir, CHECKPOINT).exists() else "started"
            process = TrainingProcess.start(Path(job.workdir), request, self.launch)
            catalog.start_job(session=s, job=job, pid=process.pid, now=now)
            catalog.log_event(
                session=s,
                kind="training",
                message=f"step {step.index} training {verb} (attempt {job.attempts} of {job.max_attempts})",
                step=step,
                now=now,
            )
        self.process, self.process_job_id = process, job.id
        systemd.notify(STATUS=f"training step {step.index}")
        log.info("step %d: training %s (job %d, pid %d)", step.index, verb, job.id, process.pid)

    def window_open(self, now: dt.datetime) -> bool:
        return next_opening(self.window, now) is None

    def poll_job(self, now: dt.datetime) -> None:
        """Copy the child's progress into the catalog; handle its end."""
        if self.process is None:
            return
        outcome = self.process.poll()
        if outcome is None:
            if now - self.last_progress_write >= PROGRESS_WRITE_INTERVAL:
                self.record_progress(now)
            return
        if now < self.outcome_retry_at:
            return
        try:
            self.record_progress(now)
            self.handle_outcome(outcome, now)
        except Exception as error:
            self.outcome_failed(error, now)
            return
        self.process, self.outcome_error, self.outcome_retry_at = None, None, NEVER
        self.retention_due = True  # a finished job's checkpoint may go now, not within the hour
        systemd.notify(STATUS="watching the inbox")

    def outcome_failed(self, error: Exception, now: dt.datetime) -> None:
        """Recording a finished job failed (a full disk while the candidate moves or the pointer swaps).

        The transaction rolled back, so the catalog still shows the job running; the outcome is kept and
        recorded again later (the candidate stays in place, see ``finish_training``), and no other job
        starts meanwhile. ``models/current`` may already name the new model: it is put back in line with
        the catalog, so readers never use a model the catalog does not call current.
        """
        message = f"{type(error).__name__}: {error}"
        self.outcome_retry_at = now + dt.timedelta(seconds=OUTCOME_RETRY_SECONDS)
        first = message != self.outcome_error
        self.outcome_error = message
        if first:
            log.exception(
                "could not record the end of job %s; retrying every %.0f s",
                self.process_job_id,
                OUTCOME_RETRY_SECONDS,
            )
        if first:
            try:
                with self.session() as s:
                    job = s.get(Job, self.process_job_id)
                    catalog.log_event(
                        session=s,
                        kind="error",
                        level="error",
                        message=f"could not record the trained model ({message}); retrying every "
                        f"{OUTCOME_RETRY_SECONDS:.0f} s",
                        step=job.step if job is not None else None,
                        now=now,
                    )
            except Exception:  # the catalog's disk may be the full one: the log above says it all
                log.warning("could not record the error in the catalog either; see the log above")
        try:
            with self.session() as s:
                recovery.reconcile_current(s, self.ws, now=now)
        except Exception as again:
            log.warning("could not check models/current against the catalog (%s); retrying later", again)

    def record_progress(self, now: dt.datetime) -> None:
        assert self.process is not None
        progress = self.process.progress()
        if progress is None:
            return
        self.last_progress_write = now
        with self.session() as s:
            job = s.get(Job, self.process_job_id)
            if job is None or job.state != JobState.RUNNING:
                return
            catalog.update_job_progress(session=s, job=job, progress=progress, now=now)
            self.warn_if_stop_would_kill(s, job, progress, now)
            resumed = progress.get("resumed_at")
            if resumed and self.resume_logged != (job.id, job.attempts):
                self.resume_logged = (job.id, job.attempts)
                message = f"step {job.step.index} training resumed at iteration {resumed}"
                log.info("%s", message)
                catalog.log_event(session=s, kind="training", message=message, step=job.step, now=now)
            if progress.get("phase") == "evaluating" and job.step.state == StepState.TRAINING:
                catalog.set_step_state(session=s, step=job.step, state=StepState.EVALUATING, now=now)

    def warn_if_stop_would_kill(
        self, s: Session, job: Job, progress: dict[str, Any], now: dt.datetime
    ) -> None:
        """Once per job: say when one iteration outlasts the stop timeout, so a stop would kill training."""
        rate = progress.get("images_per_second") or 0.0
        timeout = self.settings.daemon.stop_timeout_seconds
        if job.id in self.slow_jobs_warned or rate <= 0:
            return
        seconds = self.settings.engine.train.step_batch_size(job.step.index) / rate
        if seconds <= timeout:
            return
        self.slow_jobs_warned.add(job.id)
        message = (
            f"step {job.step.index}: one iteration takes about {seconds:.0f} s, longer than "
            f"daemon.stop_timeout_seconds ({timeout:g} s): a stop would kill training and lose the work "
            "since its last checkpoint; raise the timeout (and the unit's TimeoutStopSec) or train with "
            "smaller settings"
        )
        log.warning("%s", message)
        catalog.log_event(session=s, kind="slow", level="warning", message=message, step=job.step, now=now)

    def handle_outcome(self, outcome: Outcome, now: dt.datetime, *, stopping: bool = False) -> None:
        with self.session() as s:
            job = s.get(Job, self.process_job_id)
            if job is None or job.state != JobState.RUNNING:
                return
            if outcome.kind == "done" and outcome.result is not None:
                training.finish_training(s, job, outcome.result, self.ws, self.settings, now=now)
            elif outcome.kind == "stopped":
                training.end_attempt(s, job, "training stopped with the daemon", now=now, counted=False)
            elif outcome.kind == "failed":
                training.fail_job(s, job, outcome.reason, now=now)
            else:
                training.end_attempt(s, job, outcome.reason, now=now, counted=not stopping)

    def retention(self) -> None:
        """Delete checkpoints of finished jobs beyond ``daemon.keep_checkpoints``; log what it freed."""
        with self.session() as s:
            freed = prune_checkpoints(s, keep=self.settings.daemon.keep_checkpoints)
        if freed.count:
            log.info("retention: %s", freed.words("checkpoint"))


def run_daemon(workspace: Workspace, settings: Settings) -> int:
    """Entry point of ``ciss daemon``."""
    systemd.setup_logging(settings.daemon.log_level, workspace.log_path)
    try:
        return Daemon(workspace, settings).run()
    except CissError as error:
        log.error("%s", error)
        return 1
