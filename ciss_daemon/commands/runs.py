"""``ciss demo`` and ``ciss experiment``: the whole loop on generated data, and the paper's protocols."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ciss_daemon.commands.common import (
    app,
    console,
    friendly,
)
from ciss_daemon.exceptions import CissError


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
