"""The README says what a new user meets: its service install works as deploy/README.md's, every command."""

from __future__ import annotations

import re
from pathlib import Path

from ciss_daemon.cli import app

ROOT = Path(__file__).resolve().parent.parent


def test_the_short_service_install_matches_deploy_and_creates_the_workspace() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    deploy = (ROOT / "deploy" / "README.md").read_text(encoding="utf-8")
    short = readme[readme.index("## The service") :]
    useradd = re.search(r"useradd [^\n]+", deploy)
    assert useradd is not None and useradd.group(0) in short
    init = short.index("ciss init /var/lib/ciss")
    assert init < short.index("systemctl enable --now ciss")  # else the unit restarts on "no workspace"


def test_the_command_table_lists_every_command() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"^\| `ciss (\w+)", readme, flags=re.M))
    registered = {c.name or c.callback.__name__.rstrip("_") for c in app.registered_commands}  # type: ignore[union-attr]
    assert listed == registered
