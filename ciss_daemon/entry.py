"""The ``ciss`` command's entry point: ``ciss status`` is answered before Typer is even imported.

Typer, SQLAlchemy's ORM and rich together take most of a second to import on a small machine, longer
than people and monitoring scripts should wait for a status line. So ``ciss status`` and
``ciss status --json`` (with ``-w``/``--workspace``) read the catalog here with plain SQL
(``catalog/plain.py``), draw with rich only when the screen is asked for, and import nothing else.
Anything unusual (other options, ``--help``, ``--watch``, a ``ciss.toml`` that does not load, a catalog
that is missing, older or newer, an unusual catalog URL) goes to the full command in ``cli.py``, which
answers it and words every error; nothing is printed here before the snapshot is complete.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    """Run ``ciss`` with ``argv`` (default: the process's arguments)."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["status"]:
        options = status_options(args[1:])
        if options is not None and quick_status(*options):
            return
    from ciss_daemon.cli import app

    app(args=args, prog_name="ciss")


def status_options(args: list[str]) -> tuple[Path | None, bool] | None:
    """``(workspace, as_json)`` when ``args`` hold only ``--json`` and a workspace option; else None."""
    workspace: Path | None = None
    as_json = False
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        if arg == "--json":
            as_json = True
        elif arg in ("-w", "--workspace") and rest and not rest[0].startswith("-"):
            workspace = Path(rest.pop(0))
        elif arg.startswith("--workspace="):
            workspace = Path(arg.removeprefix("--workspace="))
        else:
            return None
    return workspace, as_json


def quick_status(workspace: Path | None, as_json: bool) -> bool:
    """Print the status as ``ciss status`` would and return True; False, having printed nothing, when
    the full command must answer (see the module's docstring)."""
    from ciss_daemon import status
    from ciss_daemon.catalog import plain
    from ciss_daemon.catalog.states import SCHEMA_HEAD
    from ciss_daemon.exceptions import CissError
    from ciss_daemon.settings import load_settings
    from ciss_daemon.workspace import find_workspace

    try:
        ws = find_workspace(workspace)
        settings = load_settings(ws.settings_path)
        with plain.reading(ws.catalog_url(settings)) as read:
            if plain.schema_revision(read) != SCHEMA_HEAD:
                return False
            data = status.snapshot(ws, read, settings=settings)
    except (CissError, OSError, plain.NotPlain):
        return False
    if as_json:
        import json

        print(json.dumps(data, indent=2))
    else:
        from rich.console import Console

        from ciss_daemon import views

        Console().print(views.render(data, ws))
    return True
