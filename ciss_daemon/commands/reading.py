"""``ciss status``, ``classes`` and ``models``: read the catalog only, never import torch."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer

from ciss_daemon.commands.common import (
    WorkspaceOption,
    app,
    catalog_reader,
    console,
    friendly,
    open_to_read,
)


@app.command()
@friendly
def status(
    workspace: WorkspaceOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the snapshot as JSON.")] = False,
    watch: Annotated[bool, typer.Option("--watch", help="Refresh every second until Ctrl-C.")] = False,
) -> None:
    """Show the daemon, the current model, every step, the running job and recent rejections.

    Example: ciss status --watch
    """
    from ciss_daemon import status as status_view
    from ciss_daemon import views
    from ciss_daemon.catalog.connection import reading

    ws, settings = open_to_read(workspace)
    factory = catalog_reader(ws, settings)

    def snapshot() -> dict[str, Any]:
        with reading(factory) as read:
            return status_view.snapshot(ws, read, settings=settings)

    if as_json:
        print(json.dumps(snapshot(), indent=2))
        return
    if not watch:
        console.print(views.render(snapshot(), ws))
        return
    from rich.live import Live

    with Live(console=console, auto_refresh=False) as live:
        try:
            while True:
                live.update(views.render(snapshot(), ws), refresh=True)
                time.sleep(1.0)
        except KeyboardInterrupt:
            pass


@app.command()
@friendly
def classes(
    workspace: WorkspaceOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """List every class: global id, name, the step that teaches it, and whether it is taught.

    Example: ciss classes --json
    """
    from ciss_daemon import views
    from ciss_daemon.catalog.listings import class_rows

    ws, settings = open_to_read(workspace)
    rows = class_rows(catalog_reader(ws, settings))
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    console.print(views.class_table(rows))


@app.command()
@friendly
def models(
    workspace: WorkspaceOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """List every model: version, step, state, when, mIoU in both groupings, which one is current and
    which ones `ciss rollback` accepts.

    Example: ciss models --json
    """
    from ciss_daemon import views
    from ciss_daemon.catalog.listings import model_rows

    ws, settings = open_to_read(workspace)
    rows = model_rows(catalog_reader(ws, settings))
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    console.print(views.model_table(rows))
