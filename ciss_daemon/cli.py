"""The ``ciss`` command line: a thin Typer layer over the daemon's modules.

Library code raises :class:`~ciss_daemon.exceptions.CissError` (or the engine's ``EngineError``); this layer
prints one line, ``Error: ...``, and exits with code 1, never a traceback. Commands that read the catalog
only (``status``, ``classes``) never import torch, so they answer in a fraction of a second.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from ciss_daemon.exceptions import CissError

app = typer.Typer(
    name="ciss",
    help="A continual-learning daemon for class-incremental semantic segmentation (DKD).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()

F = TypeVar("F", bound=Callable[..., Any])

WorkspaceOption = Annotated[
    Path | None,
    typer.Option(
        "--workspace",
        "-w",
        help="Workspace folder (default: $CISS_WORKSPACE, else the current folder).",
        show_default=False,
    ),
]


def friendly(func: F) -> F:
    """Turn the errors meant for users into one line on stderr and exit code 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except CissError as error:
            typer.echo(f"Error: {error}", err=True)
            raise typer.Exit(code=1) from None
        except OSError as error:
            from ciss_daemon.workspace import cannot_write

            translated = cannot_write(error)
            if translated is None:
                raise
            typer.echo(f"Error: {translated}", err=True)
            raise typer.Exit(code=1) from None
        except Exception as error:
            engine_error = _engine_error_type()
            if engine_error is not None and isinstance(error, engine_error):
                typer.echo(f"Error: {error}", err=True)
                raise typer.Exit(code=1) from None
            raise

    return wrapper  # type: ignore[return-value]


def _engine_error_type() -> type[Exception] | None:
    module = sys.modules.get("engine.exceptions")
    return getattr(module, "EngineError", None)


def _open(workspace: Path | None) -> tuple[Any, Any]:
    from ciss_daemon.settings import load_settings
    from ciss_daemon.workspace import find_workspace

    ws = find_workspace(workspace)
    return ws, load_settings(ws.settings_path)


def _open_to_read(workspace: Path | None) -> tuple[Any, Any]:
    """Like ``_open``, for commands that only read the catalog: a ``ciss.toml`` that no longer loads is
    one warning line, not an error, since a running daemon keeps the settings it started with.

    Settings are then None and the catalog is the workspace's own SQLite file (``[catalog] url`` unknown).
    """
    from ciss_daemon.exceptions import SettingsError
    from ciss_daemon.settings import load_settings
    from ciss_daemon.workspace import find_workspace

    ws = find_workspace(workspace)
    try:
        return ws, load_settings(ws.settings_path)
    except SettingsError as error:
        from ciss_daemon.workspace import daemon_alive

        running = (
            "the running daemon keeps the settings it started with"
            if daemon_alive(ws.lock_path)
            else "`ciss daemon` will not start"
        )
        typer.echo(f"Warning: {error}; {running} until the file is fixed", err=True)
        return ws, None


def _reader(ws: Any, settings: Any) -> Any:
    """A read-only session factory; never upgrades the catalog (the daemon does that)."""
    from ciss_daemon.catalog import connection
    from ciss_daemon.settings import Settings

    url = ws.catalog_url(settings or Settings())
    connection.check_catalog(url)
    return connection.session_factory(connection.make_engine(url, read_only=True))


# --- init, daemon, submit ------------------------------------------------------------------------------


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

    ws, settings = _open(workspace)
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

    ws, _ = _open(workspace)
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
        ws, loaded = _open_to_read(workspace)
    except WorkspaceError:
        if workspace is not None:
            raise
        console.print(
            "no workspace here: checking the folder alone (not against taught classes)", markup=False
        )
    else:
        settings = loaded or settings
        with _reader(ws, loaded)() as s:
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


# --- status, classes --------------------------------------------------------------------------------------


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

    ws, settings = _open_to_read(workspace)
    factory = _reader(ws, settings)

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

    ws, settings = _open_to_read(workspace)
    rows = class_rows(_reader(ws, settings))
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

    ws, settings = _open_to_read(workspace)
    rows = model_rows(_reader(ws, settings))
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    console.print(views.model_table(rows))


# --- operator ----------------------------------------------------------------------------------------------


def _operate(workspace: Path | None, action: str, target: str | None) -> None:
    from ciss_daemon.service.operator import run_action

    ws, settings = _open(workspace)
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
    ws, settings = _open(workspace)
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


# --- models: eval, predict, report, export ---------------------------------------------------------------


def _model_dir(ws: Any, factory: Any, version: str | None) -> Path:
    """The folder of the named version, or of models/current resolved once (never a mix of two models)."""
    from ciss_daemon.catalog import records as catalog
    from ciss_daemon.service.promotion import resolve_current

    if version:
        with factory() as s:
            path = Path(catalog.find_version(session=s, version=version).path)
        if not path.is_dir():
            raise CissError(
                f"model {version} was pruned (its folder is gone); `ciss models` lists the others"
            )
        return path
    current = resolve_current(ws.models)
    if current is None:
        raise CissError(f"no model has been promoted yet in {ws.root}; drop a batch into {ws.inbox} first")
    return current


@app.command("eval")
@friendly
def eval_(
    version: Annotated[str | None, typer.Option("--model", help="Model version; default: current.")] = None,
    folder: Annotated[
        Path | None,
        typer.Option("--folder", help="A batch folder to evaluate on instead of the steps' held-out sets."),
    ] = None,
    workspace: WorkspaceOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """Evaluate a model on the held-out images of every step and every evaluation batch, or on one folder.

    Example: ciss eval --model v0002
    """
    from rich.status import Status

    from ciss_daemon import views
    from ciss_daemon.service.planning import evaluate_version

    ws, settings = _open(workspace)
    factory = _reader(ws, settings)
    with Status("loading the model", console=Console(stderr=True)) as spinner:
        metrics, names, scope = evaluate_version(
            factory,
            _model_dir(ws, factory, version),
            settings,
            folder=folder,
            starting=lambda words: spinner.update(words),
        )
    if as_json:
        print(json.dumps({**scope, **metrics.to_dict()}, indent=2))
        return
    console.print(
        f"{scope['model']} on {scope['images']} images: "
        + ", ".join(f"{name} ({n})" for name, n in scope["sets"].items()),
        markup=False,
        highlight=False,
    )
    console.print(views.metrics_table(metrics, names))


@app.command()
@friendly
def predict(
    images: Annotated[list[Path], typer.Argument(help="Images or folders of images.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the PNGs.")] = Path("predictions"),
    version: Annotated[str | None, typer.Option("--model", help="Model version; default: current.")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "auto",
    workspace: WorkspaceOption = None,
) -> None:
    """Write per image a class-index PNG, a colour mask with a legend, and an overlay.

    Example: ciss predict photos/ --out predictions/
    """
    from rich.progress import Progress

    from ciss_daemon.outputs.predict import expand_inputs, predict_images
    from ciss_daemon.service.planning import class_colours
    from engine.exceptions import ConfigError
    from engine.runner import resolve_device

    ws, settings = _open(workspace)
    factory = _reader(ws, settings)
    model_dir = _model_dir(ws, factory, version)
    try:
        resolve_device(device)
    except ConfigError:
        raise CissError(f"--device {device}: no CUDA device is visible; use --device auto or cpu") from None
    files = expand_inputs(images)
    errors = Console(stderr=True)
    with Progress(console=errors, transient=True, disable=not errors.is_terminal) as bar:
        task = bar.add_task("predicting", total=len(files))
        results = predict_images(
            model_dir,
            files,
            out,
            device=device,
            progress=lambda done, total: bar.update(task, completed=done),
            class_colours=class_colours(factory),
        )
    failed = [r for r in results if not r.ok]
    for r in failed:
        typer.echo(f"skipped {r.error}", err=True)  # the error names the file
    for r in results:
        if r.labels is not None and r.labels.name != f"{r.image.stem}.labels.png":
            stem = r.labels.name.removesuffix(".labels.png")
            typer.echo(f"{r.image} is written as {stem}.*: another input is also named {r.image.stem}")
    done = len(results) - len(failed)
    where = f"into {out}" if done else "(nothing written)"
    console.print(f"{done} of {len(results)} images predicted {where}", markup=False, soft_wrap=True)
    if failed:
        raise typer.Exit(code=1)


@app.command()
@friendly
def report(
    out: Annotated[Path, typer.Option("--out", help="Folder for report.html and the PNG plots.")] = Path(
        "report"
    ),
    samples: Annotated[int, typer.Option(help="Held-out images shown with predictions.")] = 4,
    workspace: WorkspaceOption = None,
) -> None:
    """Write an HTML report: mIoU per step, IoU per class over steps, loss curves, sample predictions.

    Example: ciss report --out report/
    """
    from rich.status import Status

    from ciss_daemon.outputs.report import build_report
    from ciss_daemon.service.planning import report_data

    ws, settings = _open(workspace)
    with Status("predicting the sample images", console=Console(stderr=True)) as spinner:
        data = report_data(ws, _reader(ws, settings), samples=samples)
        page = build_report(data, out, progress=spinner.update)
    console.print(f"Report written to {page}", markup=False, soft_wrap=True)


@app.command()
@friendly
def export(
    out: Annotated[Path, typer.Argument(help="File to write, e.g. model.onnx or model.pt.")],
    fmt: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="onnx or torchscript; default: from the extension (.onnx, .pt).",
            show_default=False,
        ),
    ] = None,
    version: Annotated[str | None, typer.Option("--model", help="Model version; default: current.")] = None,
    workspace: WorkspaceOption = None,
) -> None:
    """Export a model as a file another program loads without ciss (class names and palette inside).

    Example: ciss export model.onnx
    """
    from ciss_daemon.outputs.export import export_model
    from ciss_daemon.service.planning import class_colours

    ws, settings = _open(workspace)
    factory = _reader(ws, settings)
    path = export_model(_model_dir(ws, factory, version), out, fmt, colours=class_colours(factory))
    console.print(f"Exported to {path}", markup=False, soft_wrap=True)


# --- demo ---------------------------------------------------------------------------------------------------


@app.command()
@friendly
def demo(
    directory: Annotated[Path, typer.Option("--dir", help="Folder for the demo workspace and data.")] = Path(
        "demo-workspace"
    ),
    steps: Annotated[int, typer.Option(help="Incremental batches after the base batch (at least 2).")] = 2,
    quick: Annotated[bool, typer.Option(help="Tiny data and epochs (what the tests run).")] = False,
) -> None:
    """Run the whole loop on generated data on a CPU: workspace, daemon, batches, promotions, report.

    Example: ciss demo --dir /tmp/ciss-demo
    """
    from ciss_daemon.demo import run_demo

    run_demo(directory, incremental=steps, quick=quick, console=console)


@app.command()
@friendly
def experiment(
    dataset: Annotated[str, typer.Argument(help="voc (PASCAL VOC 2012) or ade (ADE20K).")],
    protocol: Annotated[
        str,
        typer.Option(help="voc: 19-1, 15-5, 15-1, 10-1 or 5-3; ade: 100-50, 100-10 or 50-50."),
    ],
    root: Annotated[Path, typer.Option(help="VOCdevkit/VOC2012 or ADEChallengeData2016.")],
    out: Annotated[Path, typer.Option(help="Results folder; running again resumes where it stopped.")] = Path(
        "experiment-results"
    ),
    memory: Annotated[
        bool, typer.Option(help="Also run DKD-M (exemplar memory: VOC 100, ADE20K 300 images).")
    ] = False,
    setting: Annotated[str, typer.Option(help="overlap or disjoint.")] = "overlap",
    config: Annotated[
        Path | None,
        typer.Option(help="TOML file of [model], [loss], [train] changes to the reference settings."),
    ] = None,
    eval_crop: Annotated[
        int, typer.Option(help="Evaluation: short side resized to this, centre crop.")
    ] = 512,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
) -> None:
    """Reproduce a published protocol: DKD (and DKD-M), fine-tuning and joint training, the paper's table.

    Trains every step with the reference settings of the paper, evaluates on the validation set, and writes
    results.md (measured beside published figures, paper grouping), results.json and miou.png into --out.

    Example: ciss experiment voc --protocol 15-1 --root data/VOCdevkit/VOC2012 --out runs/voc-15-1
    """
    from engine.reproduce import plan_run, reproduce

    if setting not in ("overlap", "disjoint"):
        raise CissError(f"--setting {setting!r}: choose overlap or disjoint")
    options: dict[str, Any] = {"memory": memory, "setting": setting, "eval_crop": eval_crop, "device": device}
    reproduce(plan_run(dataset, protocol, root, out, config_path=config, **options), console=console)


if __name__ == "__main__":  # python -m ciss_daemon.cli: always the full command, without entry.py's fast path
    app()
