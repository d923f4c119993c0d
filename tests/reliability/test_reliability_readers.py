"""Readers while the daemon works: model loads during promotions, `ciss status` many times a second.

A reader of ``models/current`` resolves the link once and reads every file from the folder it names
(``promotion.resolve_current`` then ``checkpoint.load_model_files``, which checks the weights against the
hash in model.json), so a promotion between two reads can never mix two models. `ciss status` reads the
catalog only; in WAL mode it never waits for the daemon, and it works for a user who cannot write the
workspace, whether the daemon runs or not. The status test runs on both catalog backends, SQLite and
PostgreSQL (tests/helpers/postgres.py).
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from daemon_helpers import (
    DaemonProcess,
    fault_rounds,
    new_workspace,
    record_figure,
    settings_text,
    step_states,
    tiny_batch,
    wait_for,
)

from ciss_daemon.batch.inbox import submit_folder
from ciss_daemon.service.promotion import resolve_current, swap_current
from engine.checkpoint import load_model_files, save_model
from engine.exceptions import CheckpointError

STATUS_LOOP = Path(__file__).resolve().parents[1] / "helpers" / "status_loop.py"

_SWAPPER = """
import sys, time
from pathlib import Path
from ciss_daemon.service.promotion import swap_current
models, versions, seconds = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
count, deadline = 0, time.monotonic() + seconds
while time.monotonic() < deadline:
    swap_current(models, f"v{count % versions + 1:04d}")
    count += 1
print(count)
"""


def test_readers_never_see_a_torn_or_mixed_model_during_promotions(tmp_path: Path) -> None:
    models = tmp_path / "models"
    versions = 6
    for number in range(1, versions + 1):
        # 4 MiB of weights each, so a load takes long enough for swaps to land in the middle of it.
        weights = {"w": torch.full((1024, 1024), float(number)), "b": torch.full((16,), float(number))}
        save_model(models / f"v{number:04d}", weights, {"version": f"v{number:04d}"})
    swap_current(models, "v0001")
    seconds = 2.0 * fault_rounds(1)
    swapper = subprocess.Popen(
        [sys.executable, "-c", _SWAPPER, str(models), str(versions), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    loads, failures, switches, last, seen = 0, [], 0, None, set()
    while swapper.poll() is None:
        folder = resolve_current(models)
        try:
            assert folder is not None, "models/current vanished"
            state, meta = load_model_files(folder)
            number = float(meta["version"][1:])
            assert meta["version"] == folder.name, (meta["version"], folder.name)
            assert bool((state["w"] == number).all()) and bool((state["b"] == number).all()), "mixed weights"
        except (AssertionError, CheckpointError, OSError) as error:
            failures.append(f"{type(error).__name__}: {error}")
            continue
        loads += 1
        seen.add(meta["version"])
        switches += meta["version"] != last
        last = meta["version"]
    swaps = int(swapper.communicate()[0])
    assert swapper.returncode == 0
    assert failures == [], failures[:5]
    assert loads > 20 and len(seen) == versions and swaps > loads  # promotions landed during loads
    record_figure(
        "promotion_readers", promotions=swaps, loads=loads, switches_seen=switches, torn=len(failures)
    )


def _nobody_available() -> bool:
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        return False
    return os.geteuid() == 0


def _status_loop(ws: Path, seconds: float, *, as_nobody: Path | None = None) -> subprocess.Popen[str]:
    command = [sys.executable, str(STATUS_LOOP), str(ws), str(seconds), "20"]
    if as_nobody is not None:
        command += ["--as-nobody", str(as_nobody)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")


def _result(process: subprocess.Popen[str]) -> dict:
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-2000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture
def world_readable_root() -> Iterator[Path]:
    """A folder every user may enter (pytest's own temporary folders are private to their owner)."""
    root = Path(tempfile.mkdtemp(prefix="ciss-readers-"))
    root.chmod(0o755)
    yield root
    import shutil

    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_status_20_times_a_second_as_owner_and_as_a_stranger_never_meets_a_lock(
    world_readable_root: Path, workspace_catalog: str | None
) -> None:
    text = settings_text(train__epochs_base=4)
    ws = new_workspace(world_readable_root / "ws", text, catalog_url=workspace_catalog)
    warm = new_workspace(world_readable_root / "warm", text, catalog_url=workspace_catalog)
    stranger = warm.root if _nobody_available() else None
    seconds = 6.0 * fault_rounds(1)
    daemon = DaemonProcess(ws)
    try:
        submit_folder(tiny_batch(world_readable_root / "data", 0), ws.inbox)
        wait_for(lambda: step_states(ws) == ["training"], "training to start", timeout=120)
        readers = [_status_loop(ws.root, seconds)]
        if stranger is not None:
            readers.append(_status_loop(ws.root, seconds, as_nobody=stranger))

        def drop_batches() -> None:  # the daemon also ingests while it trains and is read
            for i in range(1, 9):
                submit_folder(
                    tiny_batch(world_readable_root / "data", i, kind="eval", n_train=1, n_val=0), ws.inbox
                )
                time.sleep(seconds / 10)

        dropper = threading.Thread(target=drop_batches)
        dropper.start()
        working = [_result(reader) for reader in readers]
        dropper.join()
        wait_for(lambda: step_states(ws) == ["promoted"], "the step", timeout=240)
    finally:
        assert daemon.stop() == 0
    log = (ws.root / "daemon.log").read_text()
    assert "database is locked" not in log and "Traceback" not in log
    assert not ws.catalog_path.with_name("catalog.sqlite-wal").exists()  # the stopped daemon removed it
    if workspace_catalog is not None:
        assert not ws.catalog_path.exists()  # the catalog is the server's, nothing in the workspace
    stopped = [_status_loop(ws.root, 1.5)]
    if stranger is not None:
        stopped.append(_status_loop(ws.root, 1.5, as_nobody=stranger))
    idle = [_result(reader) for reader in stopped]
    for result in working + idle:
        assert result["failures"] == 0 and result["locked"] == 0, result["messages"]
    for result in working:
        # 20 a second is asked for; a loaded machine gets fewer, but never a handful.
        assert result["reads"] >= seconds * 20 * 0.25 and result["alive"] == result["reads"]
    for result in idle:
        assert result["reads"] > 0 and result["alive"] == 0
    record_figure(
        "status_readers",
        reads=sum(r["reads"] for r in working + idle),
        stranger_reads=sum(r["reads"] for r in (working[1:] + idle[1:])) if stranger else 0,
        lock_errors=sum(r["locked"] for r in working + idle),
        failures=sum(r["failures"] for r in working + idle),
    )
    if stranger is None:
        pytest.skip("status ran as the owner only: dropping to user nobody needs root")
