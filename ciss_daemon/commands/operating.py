"""``ciss promote``, ``discard``, ``rollback``, ``web`` and ``prune``: an operator's decisions, through
the running daemon when there is one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ciss_daemon.commands.common import (
    WorkspaceOption,
    app,
    console,
    friendly,
    open_workspace,
)


def _operate(workspace: Path | None, action: str, target: str | None) -> None:
    from ciss_daemon.service.operator import run_action

    ws, settings = open_workspace(workspace)
    console.print(run_action(ws, ws.catalog_url(settings), action, target), markup=False, soft_wrap=True)


@app.command()
@friendly
def promote(
    target: Annotated[
        str | None, typer.Argument(help="Model version (v0003) or step index; default: the held step.")
    ] = None,
    workspace: WorkspaceOption = None,
) -> None:
    """Promote a held candidate model to models/current.

    Example: ciss promote v0003
    """
    _operate(workspace, "promote", target)


@app.command()
@friendly
def discard(
    target: Annotated[
        str | None, typer.Argument(help="Model version or step index; default: the held step.")
    ] = None,
    workspace: WorkspaceOption = None,
) -> None:
    """Discard a held (or not yet trained) step; its classes may be taught again by a later batch.

    Example: ciss discard 4
    """
    _operate(workspace, "discard", target)


@app.command()
@friendly
def rollback(
    version: Annotated[str, typer.Argument(help="An earlier promoted model version, e.g. v0002.")],
    workspace: WorkspaceOption = None,
) -> None:
    """Make an earlier model current again; the classes it does not know become untaught.

    Example: ciss rollback v0002
    """
    _operate(workspace, "rollback", version)


@app.command()
@friendly
def web(
    workspace: WorkspaceOption = None,
    host: Annotated[
        str | None, typer.Option(help="Address to listen on (default: [web] host, 127.0.0.1).")
    ] = None,
    port: Annotated[int | None, typer.Option(help="TCP port (default: [web] port, 8470).")] = None,
) -> None:
    """Serve the live dashboard and /metrics until Ctrl-C (needs the extra: pip install 'ciss[web]').

    Example: ciss web --workspace /srv/ciss --port 8470
    """
    from ciss_daemon.web import require, serve

    require()
    ws, settings = open_workspace(workspace)
    host, port = host or settings.web.host, port or settings.web.port
    console.print(
        f"Dashboard of {ws.root} at http://{host}:{port}/ (metrics at /metrics); Ctrl-C stops it",
        markup=False,
    )
    if not settings.web.token:
        console.print(
            "Read-only: set [web] token in ciss.toml to allow promote, discard and rollback here",
            markup=False,
        )
    serve(ws, settings, host=host, port=port)


@app.command()
@friendly
def prune(
    depth: Annotated[
        int, typer.Option(help="Rollback targets to keep: the newest models `ciss rollback` accepts.")
    ] = 2,
    workspace: WorkspaceOption = None,
) -> None:
    """Remove model folders that are neither current, nor waiting for a decision, nor within the rollback
    depth; say what was freed. The catalog keeps their metrics. Old checkpoints go by daemon.keep_checkpoints.

    Example: ciss prune --depth 1
    """
    _operate(workspace, "prune", str(depth))
