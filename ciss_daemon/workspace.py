"""The workspace: one folder that holds the settings, inbox, catalog, data store, models and job folders."""

from __future__ import annotations

import errno
import fcntl
import os
import pwd
from dataclasses import dataclass
from pathlib import Path

from ciss_daemon.exceptions import WorkspaceError
from ciss_daemon.settings import Settings, default_settings_toml, parse_settings

ENV_VAR = "CISS_WORKSPACE"
SETTINGS_FILE = "ciss.toml"


@dataclass(frozen=True)
class Workspace:
    """Paths inside one workspace folder; ``root`` is absolute."""

    root: Path

    @property
    def settings_path(self) -> Path:
        return self.root / SETTINGS_FILE

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    @property
    def staging(self) -> Path:
        # Inside the inbox, so that `ciss submit` hands a folder over with one rename on the same filesystem.
        return self.inbox / ".staging"

    @property
    def catalog_path(self) -> Path:
        return self.root / "catalog.sqlite"

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def current(self) -> Path:
        return self.models / "current"

    @property
    def jobs(self) -> Path:
        return self.root / "jobs"

    @property
    def rejected(self) -> Path:
        return self.root / "rejected"

    @property
    def archive(self) -> Path:
        return self.root / "archive"

    @property
    def backups(self) -> Path:
        return self.root / "backups"

    @property
    def requests(self) -> Path:
        """Operator requests (promote, discard, rollback) the running daemon carries out."""
        return self.root / "requests"

    @property
    def log_path(self) -> Path:
        """The daemon's log when it runs outside systemd (journald keeps it otherwise)."""
        return self.root / "daemon.log"

    @property
    def lock_path(self) -> Path:
        return self.root / "daemon.lock"

    def catalog_url(self, settings: Settings) -> str:
        """The catalog's SQLAlchemy URL: ``[catalog] url`` when set, else the workspace's SQLite file."""
        return settings.catalog.url or f"sqlite:///{self.catalog_path}"

    def folders(self) -> tuple[Path, ...]:
        """Every folder a workspace needs, parents first."""
        return (
            self.inbox,
            self.staging,
            self.store,
            self.models,
            self.jobs,
            self.rejected,
            self.archive,
            self.backups,
            self.requests,
        )


def init_workspace(root: Path, *, settings_text: str | None = None) -> Workspace:
    """Create a workspace at ``root`` with its folders and a ``ciss.toml`` (the defaults unless given).

    The catalog is not created here: the caller upgrades it (``catalog.upgrade_catalog``) once settings are
    known, since ``[catalog] url`` may point elsewhere.
    """
    workspace = Workspace(root.expanduser().resolve())
    if workspace.settings_path.exists():
        raise _already_a_workspace(workspace.root)
    if workspace.root.exists() and not workspace.root.is_dir():
        raise WorkspaceError(f"cannot create a workspace at {workspace.root}: it is a file; choose a folder")
    text = default_settings_toml() if settings_text is None else settings_text
    # Check before creating anything, so a bad text leaves no half-made workspace behind.
    parse_settings(text)
    try:
        for folder in workspace.folders():
            folder.mkdir(parents=True, exist_ok=True)
        _write_new(workspace.settings_path, text)
    except FileExistsError as exc:
        if Path(exc.filename) == workspace.settings_path:
            raise _already_a_workspace(workspace.root) from None
        raise WorkspaceError(f"cannot create folder {exc.filename}: a file is in the way; move it") from None
    except OSError as exc:
        raise WorkspaceError(f"cannot create {exc.filename}: {exc.strerror}; check the permissions") from None
    return workspace


def _already_a_workspace(root: Path) -> WorkspaceError:
    return WorkspaceError(
        f"{root} is already a workspace ({SETTINGS_FILE} exists); edit that file or choose another folder"
    )


def _write_new(path: Path, text: str) -> None:
    # Exclusive create: a second `ciss init` racing this one fails instead of overwriting its file.
    with path.open("x", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def cannot_write(error: OSError) -> WorkspaceError | None:
    """One line for an ``OSError`` that means a path cannot be written (read-only or not ours), else None."""
    path = Path(os.fsdecode(error.filename)) if error.filename is not None else None
    where = f"cannot write {path}" if path is not None else "cannot write to the workspace"
    if error.errno == errno.EROFS:
        return WorkspaceError(
            f"{where}: the file system is read-only; remount it read-write or use a workspace on a "
            "writable disk"
        )
    if error.errno not in (errno.EACCES, errno.EPERM):
        return None
    me = _user_name(os.geteuid())
    owner = _user_name(_existing(path).stat().st_uid) if path is not None else None
    if owner is None or owner == me:
        return WorkspaceError(f"{where}: permission denied; give {me} write access to it")
    return WorkspaceError(
        f"{where}: permission denied for {me}; run the command as its owner "
        f"(`sudo -u {owner} ciss ...`) or give {me} write access"
    )


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def find_workspace(explicit: Path | None = None) -> Workspace:
    """The workspace at ``explicit``, else at ``$CISS_WORKSPACE``, else in the current folder."""
    if explicit is not None:
        root = explicit
    elif os.environ.get(ENV_VAR):
        root = Path(os.environ[ENV_VAR])
    else:
        root = Path.cwd()
    workspace = Workspace(root.expanduser().resolve())
    if not workspace.settings_path.is_file():
        raise WorkspaceError(
            f"no ciss workspace at {workspace.root}; run `ciss init {workspace.root}` or pass --workspace"
        )
    return workspace


def read_pid(path: Path) -> int | None:
    """The pid the daemon wrote into its lock file; None when there is none to read."""
    try:
        return int(path.read_text().strip() or 0) or None
    except (OSError, ValueError):
        return None


def daemon_alive(path: Path) -> bool:
    """Whether some process holds the workspace lock; works for readers who cannot write the workspace."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
