"""deploy/check-unit.sh: the systemd unit verifies cleanly and keeps its security exposure score."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
SKIPPED = 77  # check-unit.sh: this machine cannot run the checks

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")


def _check(unit: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["bash", str(DEPLOY / "check-unit.sh"), str(unit)], capture_output=True, text=True, timeout=120
    )
    if result.returncode == SKIPPED:
        pytest.skip(result.stderr.strip())
    return result


def test_unit_passes() -> None:
    result = _check(DEPLOY / "ciss.service")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Overall exposure level for ciss.service" in result.stdout


def test_weaker_sandbox_fails(tmp_path: Path) -> None:
    weaker = tmp_path / "ciss.service"
    text = (DEPLOY / "ciss.service").read_text()
    assert "\nProtectHome=yes\n" in text
    weaker.write_text(text.replace("\nProtectHome=yes\n", "\nProtectHome=no\n"))
    result = _check(weaker)
    assert result.returncode == 1
    assert "exposure is above" in result.stderr


def test_misspelt_setting_fails(tmp_path: Path) -> None:
    broken = tmp_path / "ciss.service"
    broken.write_text((DEPLOY / "ciss.service").read_text().replace("KillMode=mixed", "KillMode=mixd"))
    result = _check(broken)
    assert result.returncode == 1
    assert "kill mode" in result.stderr
