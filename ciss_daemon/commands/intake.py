"""``ciss init``, ``daemon``, ``submit`` and ``check``: making a workspace, running the service, handing
batches in."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from ciss_daemon.commands.common import (
    WorkspaceOption,
    app,
    catalog_reader,
    console,
    friendly,
    open_to_read,
    open_workspace,
)
from ciss_daemon.exceptions import CissError


@app.command()
@friendly
def init(
    directory: Annotated[
        Path | None,
        typer.Argument(
            help="Folder to make a workspace in (default: --workspace, else the current folder).",
            show_default=False,
        ),
    ] = None,
    workspace: WorkspaceOption = None,
    profile: Annotated[
        str, typer.Option(help="Settings for: auto (gpu when a CUDA device is found), gpu or cpu.")
    ] = "auto",
) -> None:
    """Create a workspace: ciss.toml (commented), inbox/, catalog, store/, models/, jobs/, ...

    On a machine with a GPU, ciss.toml holds the paper's settings (ResNet-101 from ImageNet weights);
    without one, the CPU settings of `ciss demo`.

    Example: ciss init /srv/ciss
    """
    from ciss_daemon.catalog import connection
    from ciss_daemon.profiles import choose_profile
    from ciss_daemon.settings import load_settings
    from ciss_daemon.workspace import ENV_VAR, init_workspace

    if directory is not None and workspace is not None and directory.resolve() != workspace.resolve():
        raise CissError(f"two folders given, {directory} and --workspace {workspace}; give one")
    chosen = directory or workspace or Path(os.environ.get(ENV_VAR) or ".")
    settings_profile = choose_profile(profile)
    ws = init_workspace(chosen, settings_text=settings_profile.settings_text())
    settings = load_settings(ws.settings_path)
    connection.upgrade_catalog(ws.catalog_url(settings), backup_dir=ws.backups)
    console.print(f"Workspace ready at {ws.root}")
    console.print(f"  settings: {ws.settings_path}")
    console.print(f"    {settings_profile.description}", highlight=False, soft_wrap=True)
    console.print(f"  drop batch folders into: {ws.inbox}")
    console.print(f"  start the service: ciss daemon --workspace {ws.root}")


@app.command()
@friendly
def daemon(workspace: WorkspaceOption = None) -> None:
    """Run the service in the foreground (what systemd runs). Stop it with Ctrl-C or SIGTERM.

    Example: ciss daemon --workspace /srv/ciss
    """
    from ciss_daemon.service.daemon import run_daemon

    ws, settings = open_workspace(workspace)
    raise typer.Exit(code=run_daemon(ws, settings))


@app.command()
@friendly
def submit(
    folder: Annotated[Path, typer.Argument(help="A batch folder with batch.toml, images/ and masks/.")],
    workspace: WorkspaceOption = None,
) -> None:
    """Copy a batch folder into the inbox (staged, then renamed in, so it is complete at once).

    Example: ciss submit ./bicycles-2026-11
    """
    from ciss_daemon.batch.inbox import submit_folder

    ws, _ = open_workspace(workspace)
    target = submit_folder(folder, ws.inbox)
    console.print(f"Submitted {folder} as {target}; follow it with `ciss status -w {ws.root}`", markup=False)


@app.command()
@friendly
def check(
    folder: Annotated[Path, typer.Argument(help="A batch folder with batch.toml, images/ and masks/.")],
    workspace: WorkspaceOption = None,
) -> None:
    """Validate a batch folder without submitting it; print what REJECTED.txt would say, exit 1 if so.

    With a workspace (--workspace, $CISS_WORKSPACE or the current folder) its limits, taught class names
    and earlier batches are checked too; without one, the folder alone.

    Example: ciss check ./bicycles-2026-11
    """
    import dataclasses

    from ciss_daemon.batch.inbox import rejection_report
    from ciss_daemon.batch.listing import printable
    from ciss_daemon.batch.validation import validate_batch
    from ciss_daemon.catalog import records as catalog
    from ciss_daemon.exceptions import WorkspaceError
    from ciss_daemon.settings import Settings

    settings: Any = Settings()
    taught: set[str] = set()
    known: set[str] = set()
    try:
        ws, loaded = open_to_read(workspace)
    except WorkspaceError:
        if workspace is not None:
            raise
        console.print(
            "no workspace here: checking the folder alone (not against taught classes)", markup=False
        )
    else:
        settings = loaded or settings
        with catalog_reader(ws, loaded)() as s:
            taught = catalog.unavailable_class_names(session=s)
            known = catalog.live_batch_hashes(session=s)
    # Every [limits] setting is a keyword of validate_batch of the same name.
    result = validate_batch(
        folder, taught_names=taught, known_hashes=known, **dataclasses.asdict(settings.limits)
    )
    name = printable(Path(os.path.abspath(folder)).name)
    if result.batch is None:
        typer.echo(rejection_report(name, result.problems, None), nl=False)
        raise typer.Exit(code=1)
    b = result.batch
    classes = ", ".join(f"{value} = {n}" for value, n in sorted(b.classes.items()))
    console.print(
        f"Batch {name!r} would be accepted ({b.kind}): {len(b.train_stems)} images, "
        f"{len(b.val_stems)} held out; classes {classes}",
        markup=False,
        soft_wrap=True,
    )
