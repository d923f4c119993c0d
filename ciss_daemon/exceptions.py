"""Errors the daemon raises on purpose; the CLI prints each as one line (``Error: ...``), exits non-zero."""


class CissError(Exception):
    """Base class of every error meant for the user."""


class WorkspaceError(CissError):
    """No workspace where one was expected, or a workspace folder is damaged."""


class SettingsError(CissError):
    """``ciss.toml`` has a bad value; the message names the key and the allowed values."""


class CatalogError(CissError):
    """The catalog cannot be opened, upgraded or read."""


class SchemaError(CatalogError):
    """The catalog's schema is newer than this version of ciss knows, or is not at the expected revision."""


class SubmitError(CissError):
    """``ciss submit`` could not hand a folder to the inbox."""


class DaemonRunningError(CissError):
    """Another daemon already holds this workspace's lock."""


class OperatorError(CissError):
    """An operator command (promote, discard, rollback) does not apply to the catalog's current state."""


class ClusterError(CissError):
    """The Ray cluster of ``daemon.launcher = "ray"`` cannot be used: Ray is missing or the head is down."""
