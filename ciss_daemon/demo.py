"""``ciss demo``: the whole loop on generated data on a CPU, in a few minutes.

It makes a workspace, starts ``ciss daemon`` as a child process, submits a fully labelled evaluation
batch, a broken batch (to show a rejection), a base batch and incremental batches one after the other,
waits for each step to be promoted while showing the training progress, then stops the daemon and prints
the status table, writes the report, and says where to look.
"""

from __future__ import annotations

import dataclasses
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text
from sqlalchemy.orm import Session, sessionmaker

from ciss_daemon import status, views
from ciss_daemon.batch.inbox import submit_folder
from ciss_daemon.catalog import connection
from ciss_daemon.exceptions import CissError
from ciss_daemon.service.operator import run_action
from ciss_daemon.settings import DaemonSettings, GateSettings, Settings, load_settings, settings_toml
from ciss_daemon.workspace import Workspace, init_workspace


@dataclass(frozen=True)
class DemoPlan:
    protocol: str
    image_size: int
    train_per_step: int
    val_per_step: int
    eval_images: int
    settings: str


def demo_settings(*, quick: bool) -> str:
    """The demo's ``ciss.toml``: the CPU settings of ``engine.experiment.cpu_config`` (those the ablation
    measures; its docstring says why each differs from the paper's VOC values), a daemon that reacts
    within a second, and a lenient gate (these are minutes-long runs). ``quick`` is the tests' version:
    tiny epochs and crops, no pre-trained backbone."""
    from engine.experiment import cpu_config

    engine = cpu_config()
    if quick:
        engine = dataclasses.replace(
            engine,
            model=dataclasses.replace(engine.model, output_stride=16, pretrained=None),
            train=dataclasses.replace(
                engine.train, epochs_base=2, epochs_incremental=1, batch_size=4, crop_size=32
            ),
        )
    settings = Settings(
        daemon=DaemonSettings(settle_seconds=1.0, rescan_seconds=2.0, dispatch_seconds=0.5, device="cpu"),
        gate=GateSettings(old_miou_budget=0.25, new_miou_floor=0.05),
        engine=dataclasses.replace(engine, train=dataclasses.replace(engine.train, checkpoint_every=20)),
    )
    return settings_toml(
        settings, profile="ciss demo: a small model and short schedules for generated data on a CPU"
    )


def plan(*, incremental: int, quick: bool) -> DemoPlan:
    """The demo's data and settings: the ablation's protocol shape (4 base classes, then steps of 2)."""
    if quick:
        return DemoPlan(
            "-".join(["3"] + ["2"] * incremental), 32, 8, 2, 3 + 2 * incremental, demo_settings(quick=True)
        )
    protocol = "-".join(["4"] + ["2"] * incremental)
    return DemoPlan(protocol, 64, 64, 12, 60, demo_settings(quick=False))


def run_demo(
    directory: Path, *, incremental: int = 2, quick: bool = False, console: Console | None = None
) -> None:
    """Run the demo in ``directory`` (which must not exist yet, or be empty)."""
    from engine.experiment import pretrain_with_progress
    from engine.synthetic import generate_batches

    console = console or Console()
    if incremental < 2:
        raise CissError(f"--steps {incremental}: the demo needs at least 2 incremental batches")
    if directory.exists() and any(directory.iterdir()):
        raise CissError(f"{directory} is not empty; remove it or pass another --dir")
    p = plan(incremental=incremental, quick=quick)
    started = time.monotonic()
    console.print(
        f"[bold]ciss demo[/] in {directory}: protocol {p.protocol} on generated {p.image_size}px images"
    )
    folders = generate_batches(
        directory / "data",
        p.protocol,
        train_per_step=p.train_per_step,
        val_per_step=p.val_per_step,
        image_size=p.image_size,
        eval_batch=p.eval_images,
        prefix="shapes",
    )
    *train_batches, eval_batch = folders
    broken = _broken_copy(train_batches[0], directory / "data" / "shapes-broken")
    ws = init_workspace(directory / "workspace", settings_text=p.settings)
    settings = load_settings(ws.settings_path)
    pretrain_with_progress(settings.engine.model, console)
    log_path = ws.root / "daemon.log"
    with open(log_path, "ab") as log:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "ciss_daemon.cli", "daemon", "--workspace", str(ws.root)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        factory = _submit_all(ws, settings, daemon, log_path, [eval_batch, broken], train_batches, console)
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(60)
            except subprocess.TimeoutExpired:
                daemon.kill()
    console.print(views.render(_snapshot(ws, factory), ws))
    _where_to_look(ws, factory, directory, eval_batch, log_path, started, console)


def _submit_all(
    ws: Workspace,
    settings: Settings,
    daemon: subprocess.Popen[bytes],
    log_path: Path,
    first: list[Path],
    train_batches: list[Path],
    console: Console,
) -> sessionmaker[Session]:
    """Once the daemon is up, submit the ``first`` folders (the evaluation and the broken batch), then each
    training batch once the step before it is promoted; returns the catalog's session factory."""
    url = ws.catalog_url(settings)
    _wait_for(
        lambda: ws.catalog_path.exists() and _catalog_ready(url), daemon, log_path, "the daemon to start"
    )
    factory = connection.session_factory(connection.make_engine(url))
    console.print("daemon started; submitting an evaluation batch and a broken batch")
    for folder in first:
        submit_folder(folder, ws.inbox)
    for index, folder in enumerate(train_batches):
        submit_folder(folder, ws.inbox)
        console.print(f"submitted [bold]{folder.name}[/] (step {index})")
        _follow_step(ws, factory, url, index, daemon, log_path, console)
    _wait_for(lambda: bool(_snapshot(ws, factory)["rejections"]), daemon, log_path, "the rejection")
    return factory


def _where_to_look(
    ws: Workspace,
    factory: sessionmaker[Session],
    directory: Path,
    eval_batch: Path,
    log_path: Path,
    started: float,
    console: Console,
) -> None:
    """Write the report into ``directory/report`` and print where each result lies."""
    from ciss_daemon.outputs.report import build_report
    from ciss_daemon.service.planning import report_data

    page = build_report(report_data(ws, factory), directory / "report")
    minutes = (time.monotonic() - started) / 60
    console.print(f"\n[bold]Done in {minutes:.1f} minutes.[/] Where to look:")
    console.print(f"  report:            {page}")
    console.print(
        f"  current model:     {ws.current}  (try `ciss predict {eval_batch / 'images'} -w {ws.root}`)"
    )
    console.print(f"  rejected batch:    {ws.rejected}  (REJECTED.txt says why)")
    console.print(f"  status:            ciss status -w {ws.root}")
    console.print(f"  daemon log:        {log_path}")


def _snapshot(ws: Workspace, factory: sessionmaker[Session]) -> dict[str, Any]:
    with connection.reading(factory) as read:
        return status.snapshot(ws, read)


def _broken_copy(source: Path, target: Path) -> Path:
    """A copy of a batch with one mask removed and an undeclared class in the manifest, to be rejected."""
    shutil.copytree(source, target)
    next((target / "masks").glob("*.png")).unlink()
    manifest = target / "batch.toml"
    manifest.write_text(manifest.read_text(encoding="utf-8") + '254 = "unicorn"\n', encoding="utf-8")
    return target


def _catalog_ready(url: str) -> bool:
    try:
        connection.check_catalog(url)
    except CissError:
        return False
    return True


def _wait_for(
    ready: Callable[[], bool],
    daemon: subprocess.Popen[bytes],
    log_path: Path,
    what: str,
    timeout: float = 600,
) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if daemon.poll() is not None:
            raise CissError(
                f"the daemon exited (code {daemon.returncode}) while waiting for {what}; see {log_path}"
            )
        if time.monotonic() > deadline:
            raise CissError(f"gave up waiting for {what} after {timeout:.0f} s; see {log_path}")
        time.sleep(0.3)


def _follow_step(
    ws: Workspace,
    factory: sessionmaker[Session],
    url: str,
    index: int,
    daemon: subprocess.Popen[bytes],
    log_path: Path,
    console: Console,
) -> None:
    """Show the step's training progress until it is promoted; promote it as an operator if it is held."""
    with Progress(
        TextColumn(f"  step {index}"),
        TextColumn("{task.fields[phase]:<10}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} it  loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("step", total=None, phase="queued", loss="-")
        deadline = time.monotonic() + 1800
        while True:
            data = _snapshot(ws, factory)
            step = next((s for s in data["steps"] if s["index"] == index), {"state": "waiting"})
            state = step["state"]
            running = data.get("running")
            if running and running["step"] == index:
                p = running.get("progress") or {}
                loss = (p.get("losses") or {}).get("total")
                bar.update(
                    task,
                    completed=p.get("iteration") or 0,
                    total=p.get("total"),
                    phase=p.get("phase", "starting"),
                    loss="-" if loss is None else f"{loss:.3f}",
                )
            if state == "promoted":
                break
            if state == "held":
                console.print(f"  step {index} held: {step['reason']}; promoting it as an operator would")
                run_action(ws, url, "promote", str(index))
                continue
            if state in ("failed", "discarded"):
                raise CissError(f"step {index} {state}: {step['reason']}; see {log_path}")
            if daemon.poll() is not None:
                raise CissError(f"the daemon exited (code {daemon.returncode}); see {log_path}")
            if time.monotonic() > deadline:
                raise CissError(f"step {index} did not finish in 30 minutes; see {log_path}")
            time.sleep(0.5)
    current = _snapshot(ws, factory)["current"]
    m = current["metrics"]
    console.print(f"  step {index} promoted as {current['version']}:")
    console.print(Text(views.summary_lines(m)), style="dim")
