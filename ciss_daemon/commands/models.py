"""``ciss eval``, ``predict``, ``report`` and ``export``: what is made from a model version."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from ciss_daemon.commands.common import (
    WorkspaceOption,
    app,
    catalog_reader,
    console,
    friendly,
    open_workspace,
)
from ciss_daemon.exceptions import CissError


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

    ws, settings = open_workspace(workspace)
    factory = catalog_reader(ws, settings)
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

    ws, settings = open_workspace(workspace)
    factory = catalog_reader(ws, settings)
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

    ws, settings = open_workspace(workspace)
    with Status("predicting the sample images", console=Console(stderr=True)) as spinner:
        data = report_data(ws, catalog_reader(ws, settings), samples=samples)
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

    ws, settings = open_workspace(workspace)
    factory = catalog_reader(ws, settings)
    path = export_model(_model_dir(ws, factory, version), out, fmt, colours=class_colours(factory))
    console.print(f"Exported to {path}", markup=False, soft_wrap=True)
