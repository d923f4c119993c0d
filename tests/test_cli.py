"""The command line: help texts, one-line errors, status without torch, and the demo end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ciss_daemon.cli import app

runner = CliRunner()
COMMANDS = [
    "init",
    "daemon",
    "submit",
    "check",
    "status",
    "classes",
    "models",
    "promote",
    "discard",
    "rollback",
    "prune",
    "eval",
    "predict",
    "report",
    "export",
    "demo",
    "experiment",
    "web",
]


def test_every_command_has_help_with_an_example() -> None:
    registered = sorted(c.name or c.callback.__name__ for c in app.registered_commands)  # type: ignore[union-attr]
    assert registered == sorted(COMMANDS)
    for command in COMMANDS:
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0, command
        assert "Example: ciss " + command in " ".join(result.output.split()), command


def test_init_then_status_on_an_empty_workspace(tmp_path: Path) -> None:
    result = runner.invoke(app, ["init", str(tmp_path / "ws")])
    assert result.exit_code == 0
    assert (tmp_path / "ws" / "ciss.toml").exists() and (tmp_path / "ws" / "catalog.sqlite").exists()
    data = json.loads(runner.invoke(app, ["status", "--json", "-w", str(tmp_path / "ws")]).output)
    assert data["current"] is None and data["steps"] == [] and data["daemon"]["alive"] is False
    again = runner.invoke(app, ["init", str(tmp_path / "ws")])
    assert again.exit_code == 1


def run_ciss(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ciss_daemon", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def test_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    result = run_ciss("status", "--workspace", str(tmp_path / "nowhere"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"Error: no ciss workspace at {tmp_path / 'nowhere'}; run `ciss init {tmp_path / 'nowhere'}` "
        "or pass --workspace"
    ]
    run_ciss("init", str(tmp_path / "ws"))
    missing = run_ciss("submit", str(tmp_path / "no-such-batch"), "--workspace", str(tmp_path / "ws"))
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert missing.stderr.startswith("Error: ") and len(missing.stderr.strip().splitlines()) == 1
    nothing = run_ciss("predict", str(tmp_path), "--workspace", str(tmp_path / "ws"))
    ws = tmp_path / "ws"
    assert nothing.stderr.strip() == (
        f"Error: no model has been promoted yet in {ws}; drop a batch into {ws / 'inbox'} first"
    )


def test_status_never_imports_torch(tmp_path: Path) -> None:
    run_ciss("init", str(tmp_path / "ws"))
    script = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from ciss_daemon.cli import app\n"
        f"ws = {str(tmp_path / 'ws')!r}\n"
        "for args in (['status', '-w', ws], ['classes', '-w', ws]):\n"
        "    assert CliRunner().invoke(app, args).exit_code == 0\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)


@pytest.mark.slow
def test_demo_runs_the_whole_loop(tmp_path: Path) -> None:
    result = run_ciss("demo", "--quick", "--dir", str(tmp_path / "demo"))
    assert result.returncode == 0, result.stderr
    assert "Done in" in result.stdout
    ws = tmp_path / "demo" / "workspace"
    data = json.loads(run_ciss("status", "--json", "-w", str(ws)).stdout)
    assert [s["state"] for s in data["steps"]] == ["promoted"] * 3
    assert data["rejections"][0]["batch"] == "shapes-broken"
    assert (ws / "rejected" / "shapes-broken" / "REJECTED.txt").exists()
    report = tmp_path / "demo" / "report"
    html = (report / "report.html").read_text()
    assert all(
        (report / name).exists() and name in html for name in ("miou.png", "class_iou.png", "losses.png")
    )
