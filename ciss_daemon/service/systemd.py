"""What running under systemd needs: sd_notify messages, journald-friendly logs, the single-instance lock."""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import sys
import time
from logging.handlers import RotatingFileHandler
from pathlib import Path

from ciss_daemon.exceptions import DaemonRunningError
from ciss_daemon.workspace import cannot_write, read_pid

# syslog priorities journald reads from a "<N>" prefix on each stderr line.
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def notify(**fields: str | int) -> bool:
    """Send ``KEY=value`` lines to systemd's notify socket (READY, STATUS, WATCHDOG, STOPPING, ...).

    A no-op returning False when not started by systemd with Type=notify.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace socket
        address = "\0" + address[1:]
    message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(message, address)
        except OSError:
            return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings systemd expects (half of WatchdogSec), or None without a watchdog."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2_000_000


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"<{_PRIORITY.get(record.levelno, 6)}>{record.name}: {record.getMessage()}"


LOG_FILE_BYTES = 10 * 1024**2  # daemon.log is rotated at this size, keeping LOG_FILE_BACKUPS old files
LOG_FILE_BACKUPS = 3


def under_systemd() -> bool:
    return bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))


def setup_logging(level: str = "INFO", log_file: Path | None = None) -> None:
    """Log to stderr: with syslog priority prefixes under systemd (journald adds the time), else timed.

    Outside systemd the same lines also go to ``log_file`` (rotated), so a daemon started by hand leaves
    its history in the workspace; skipped when stderr already is that file, or it cannot be opened.
    """
    handler = logging.StreamHandler(sys.stderr)
    timed = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(_JournalFormatter() if under_systemd() else timed)
    handlers: list[logging.Handler] = [handler]
    if log_file is not None and not under_systemd() and not _is_stderr(log_file):
        try:
            to_file = RotatingFileHandler(log_file, maxBytes=LOG_FILE_BYTES, backupCount=LOG_FILE_BACKUPS)
        except OSError:
            pass  # a workspace we may not write: stderr still has every line, and the lock says why
        else:
            to_file.setFormatter(timed)
            handlers.append(to_file)
    root = logging.getLogger()
    root.handlers[:] = handlers
    root.setLevel(level)
    # Libraries narrate every migration step and timer run at INFO; the daemon logs what matters itself.
    for chatty in ("alembic", "apscheduler"):
        logging.getLogger(chatty).setLevel(max(logging.WARNING, root.level))


def _is_stderr(path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(sys.stderr.fileno()), os.stat(path))
    except (OSError, ValueError, AttributeError):  # no such file yet, or stderr is not a real file
        return False


class InstanceLock:
    """One daemon per workspace: an exclusive ``flock`` on ``daemon.lock`` holding the daemon's pid.

    The kernel drops the lock when the process dies, however it dies, so a stale lock never blocks a restart.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self, wait: float = 2.0) -> None:
        """Take the lock; ``wait`` covers readers (``ciss status``) that hold it shared for an instant."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise cannot_write(error) or error from None
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                os.close(fd)
                pid = read_pid(self.path) or "unknown"
                raise DaemonRunningError(
                    f"a ciss daemon (pid {pid}) already runs on {self.path.parent}; stop it first"
                ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
