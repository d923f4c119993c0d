"""What every ``ciss`` command shares: the Typer app, the console, the workspace option, opening a
workspace and its catalog, and :func:`friendly`, which turns the errors meant for users into one line.

Library code raises :class:`~ciss_daemon.exceptions.CissError` (or the engine's ``EngineError``); this layer
prints one line, ``Error: ...``, and exits with code 1, never a traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from ciss_daemon.exceptions import CissError

app = typer.Typer(
    name="ciss",
    help="A continual-learning daemon for class-incremental semantic segmentation (DKD).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()

F = TypeVar("F", bound=Callable[..., Any])

WorkspaceOption = Annotated[
    Path | None,
    typer.Option(
        "--workspace",
        "-w",
        help="Workspace folder (default: $CISS_WORKSPACE, else the current folder).",
        show_default=False,
    ),
]


def friendly(func: F) -> F:
    """Turn the errors meant for users into one line on stderr and exit code 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except CissError as error:
            typer.echo(f"Error: {error}", err=True)
            raise typer.Exit(code=1) from None
        except OSError as error:
            from ciss_daemon.workspace import cannot_write

            translated = cannot_write(error)
            if translated is None:
                raise
            typer.echo(f"Error: {translated}", err=True)
            raise typer.Exit(code=1) from None
        except Exception as error:
            engine_error = _engine_error_type()
            if engine_error is not None and isinstance(error, engine_error):
                typer.echo(f"Error: {error}", err=True)
                raise typer.Exit(code=1) from None
            raise

    return wrapper  # type: ignore[return-value]


def _engine_error_type() -> type[Exception] | None:
    module = sys.modules.get("engine.exceptions")
    return getattr(module, "EngineError", None)


def open_workspace(workspace: Path | None) -> tuple[Any, Any]:
    from ciss_daemon.settings import load_settings
    from ciss_daemon.workspace import find_workspace

    ws = find_workspace(workspace)
    return ws, load_settings(ws.settings_path)


def open_to_read(workspace: Path | None) -> tuple[Any, Any]:
    """Like ``open_workspace``, for commands that only read the catalog: a ``ciss.toml`` that no longer
    loads is one warning line, not an error, since a running daemon keeps the settings it started with.

    Settings are then None and the catalog is the workspace's own SQLite file (``[catalog] url`` unknown).
    """
    from ciss_daemon.exceptions import SettingsError
    from ciss_daemon.settings import load_settings
    from ciss_daemon.workspace import find_workspace

    ws = find_workspace(workspace)
    try:
        return ws, load_settings(ws.settings_path)
    except SettingsError as error:
        from ciss_daemon.workspace import daemon_alive

        running = (
            "the running daemon keeps the settings it started with"
            if daemon_alive(ws.lock_path)
            else "`ciss daemon` will not start"
        )
        typer.echo(f"Warning: {error}; {running} until the file is fixed", err=True)
        return ws, None


def catalog_reader(ws: Any, settings: Any) -> Any:
    """A read-only session factory; never upgrades the catalog (the daemon does that)."""
    from ciss_daemon.catalog import connection
    from ciss_daemon.settings import Settings

    url = ws.catalog_url(settings or Settings())
    connection.check_catalog(url)
    return connection.session_factory(connection.make_engine(url, read_only=True))
