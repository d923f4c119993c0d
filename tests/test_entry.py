"""``ciss status`` answered by the entry point with plain SQL: the same output as the full command, fast
imports, and every unusual case handed to the full command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from status_helpers import add_steps, runner

from ciss_daemon.cli import app
from ciss_daemon.entry import status_options
from ciss_daemon.workspace import Workspace, find_workspace

IMPORTS = "import sys; from ciss_daemon.entry import main; main(sys.argv[1:]); print(sorted(sys.modules))"


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    assert runner.invoke(app, ["init", str(tmp_path / "ws"), "--profile", "cpu"]).exit_code == 0
    ws = find_workspace(tmp_path / "ws")
    add_steps(ws, "promoted", "held", "queued", "requeued")
    return ws


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    env = {"COLUMNS": "200", "PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}
    return subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("options", [["--json"], []], ids=["json", "screen"])
def test_the_quick_status_prints_what_the_full_command_prints(ws: Workspace, options: list[str]) -> None:
    quick = _run("-m", "ciss_daemon", "status", *options, "-w", str(ws.root))
    full = _run("-m", "ciss_daemon.cli", "status", *options, "--workspace", str(ws.root))
    assert quick.returncode == full.returncode == 0, quick.stderr + full.stderr
    assert quick.stdout == full.stdout and quick.stderr == full.stderr == ""
    if options:
        assert [step["state"] for step in json.loads(quick.stdout)["steps"]] == [
            "promoted",
            "held",
            "queued",
            "queued",
        ]


def test_the_quick_status_imports_neither_typer_nor_sqlalchemy_nor_torch(ws: Workspace) -> None:
    done = _run("-c", IMPORTS, "status", "--json", "--workspace", str(ws.root))
    assert done.returncode == 0, done.stderr
    modules = eval(done.stdout.strip().splitlines()[-1])  # the list printed last
    assert not {m.split(".")[0] for m in modules} & {
        "typer",
        "click",
        "sqlalchemy",
        "torch",
        "rich",
        "pydantic",
    }


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], (None, False)),
        (["--json"], (None, True)),
        (["-w", "a", "--json"], (Path("a"), True)),
        (["--workspace=a"], (Path("a"), False)),
        (["--watch"], None),
        (["--help"], None),
        (["-w"], None),
        (["-w", "--json"], None),
        (["--json", "extra"], None),
    ],
)
def test_only_plain_status_options_take_the_quick_path(
    args: list[str], expected: tuple[Path | None, bool] | None
) -> None:
    assert status_options(args) == expected


def test_what_the_quick_path_cannot_answer_is_answered_by_the_full_command(ws: Workspace) -> None:
    good = ws.settings_path.read_text(encoding="utf-8")
    ws.settings_path.write_text("[daemon\n", encoding="utf-8")  # a warning, then the status
    done = _run("-m", "ciss_daemon", "status", "--json", "-w", str(ws.root))
    assert done.returncode == 0 and done.stderr.startswith("Warning: ciss.toml: not valid TOML")
    assert len(json.loads(done.stdout)["steps"]) == 4
    ws.settings_path.write_text(good, encoding="utf-8")
    ws.catalog_path.unlink()  # the error, in one line
    done = _run("-m", "ciss_daemon", "status", "-w", str(ws.root))
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("Error: no catalog at ") and len(done.stderr.splitlines()) == 1
    done = _run("-m", "ciss_daemon", "status", "--help")
    assert done.returncode == 0 and "--watch" in done.stdout
