"""Protocol runs on batch folders without the daemon: the engine demo and the ablation benchmark.

    python -m engine.experiment demo --out runs/demo          # base step + two incremental steps
    python -m engine.experiment ablation --out runs/ablation  # fine-tuning, KD, KD + DKD, full DKD

Both generate the synthetic dataset (``engine.synthetic``), train on the CPU (or the GPU when there is
one) and print the metrics table; ``ablation`` also writes ``results.json`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import platform
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from engine.ablation_table import ABLATION_METHODS, ablation_markdown, gap_closure
from engine.config import EngineConfig, LossConfig, ModelConfig, TrainConfig
from engine.data import read_manifest
from engine.evaluate import Metrics, paper_view
from engine.exceptions import EngineError
from engine.pretrain import backbone_file, cache_dir, synthetic_backbone
from engine.runner import BatchRef, StepData, StepRequest, run_step
from engine.synthetic import OBJECTS, generate_batches
from engine.train import Progress as TrainProgress


@dataclasses.dataclass(frozen=True)
class Protocol:
    """Batches of a protocol run in step order, with the global class ids their names received."""

    steps: list[BatchRef]  # one training batch per step
    evals: list[BatchRef]  # fully labelled evaluation batches
    class_names: dict[int, str]
    step_sizes: list[int]


def load_protocol(folders: Sequence[Path]) -> Protocol:
    """Assign global class ids in arrival order, as the daemon does, to a sequence of batch folders."""
    ids: dict[str, int] = {}
    steps, sizes, eval_folders = [], [], []
    for folder in folders:
        manifest = read_manifest(folder)
        if manifest.kind == "eval":
            eval_folders.append((folder, manifest))
            continue
        value_map = {}
        for value, name in sorted(manifest.classes.items()):
            ids[name] = len(ids) + 1
            value_map[value] = ids[name]
        steps.append(BatchRef(manifest.name, folder, value_map))
        sizes.append(len(value_map))
    evals = [
        BatchRef(m.name, f, {v: ids.get(n, 0) for v, n in m.classes.items()}, kind="eval")
        for f, m in eval_folders
    ]
    return Protocol(steps, evals, {i: n for n, i in ids.items()}, sizes)


def cpu_config(method: str = "dkd") -> EngineConfig:
    """Settings for generated 64x64 data on a CPU: a light backbone, pre-trained once, short schedules.

    Every rule of docs/method.md is kept; these values differ from the VOC reference, for minutes-long runs
    on a CPU (measured, see docs/benchmarks.md):
    - ResNet-18 at output stride 8 (64x64 images keep 8x8 features), its backbone pre-trained once on
      generated classes that no protocol uses (``model.pretrained = "synthetic"``, engine.pretrain), as the
      paper starts from ImageNet features: from scratch, new classes arrive into features that cannot
      separate them and distillation holds those features in place;
    - batch 4: four times the updates of batch 16 for the same compute (an incremental step is 256
      iterations here, against about a thousand in the paper's VOC steps); at t >= 1 BatchNorm is frozen,
      so a small batch costs nothing there, and at step 0 4 x 64 x 64 pixels still give stable statistics.
      Batch 1 at later steps (``batch_size_incremental = 1``, 12 epochs: 768 updates in about the same
      time) lifted KD and KD + DKD by 1 to 6 points of mIoU all on four seeds and DKD by 3 to 6 on three,
      but on the fourth DKD's step-1 heads took blue-triangle (old classes 83 % of the base model's), so
      it is not the default; for 16 epochs it kept every old class and put KD + DKD 1.9 points above KD,
      but DKD stayed 0.4 behind random heads, at almost twice the ablation's time;
    - base learning rate 1e-2 and BatchNorm momentum 0.1 (not 0.01), so the ASPP head and the BatchNorm
      statistics settle within a few hundred iterations;
    - incremental steps of 16 epochs at learning rate 1.2e-3 (12x the paper's) after a linear warm-up
      over their first 20 % (ADE20K's schedule; the base step has none): half the iterations of 32 epochs
      at 6e-4, which closed less of the gap to joint training on four seeds (74.8 % against 79.8 %), so
      that the ablation's two seeds fit in about 20 minutes on 2 cores. Without the warm-up, at pos_weight
      5, AC-initialised heads rose onto the most similar old class (blue-triangle under
      striped-blue-disc) before any negative pulled them back: old classes 84 % of the base model's;
    - incremental pos_weight 5 (VOC uses 1, ADE20K 35): new heads start as copies of the auxiliary
      classifier, whose logits the base step drives to about -12, and must rise within the step; at 32
      epochs 10 over-predicted new classes onto similar old ones, 2 and 1 learnt them less; at 16 epochs
      without warm-up 2 closed 63 % of the gap on one seed of four.
    """
    return EngineConfig(
        model=ModelConfig(backbone="resnet18", output_stride=8, pretrained="synthetic"),
        loss=LossConfig(pos_weight_incremental=5.0),
        train=TrainConfig(
            method=method,
            lr_base=1e-2,
            lr_incremental=1.2e-3,
            epochs_base=24,
            epochs_incremental=16,
            warmup_fraction_incremental=0.2,
            batch_size=4,
            crop_size=64,
            bn_momentum_base=0.1,
            amp=False,
            checkpoint_every=50,
        ),
    )


def run_protocol(
    protocol: Protocol,
    config: EngineConfig,
    workdir: Path,
    *,
    base_model: Path | None = None,
    console: Console | None = None,
    label: str = "",
    show_progress: bool = True,
) -> list[Metrics]:
    """Train every step in order (reusing ``base_model`` for step 0 when given); metrics after each step.

    ``show_progress=False`` draws no progress bar (runs in parallel processes would garble each other's).
    """
    console = console or Console()
    results: list[Metrics] = []
    previous = base_model
    first = 1 if base_model is not None else 0
    for index in range(first, len(protocol.steps)):
        sizes = protocol.step_sizes[: index + 1]
        known = sum(sizes)
        names = {k: v for k, v in protocol.class_names.items() if k <= known}
        evals = [
            BatchRef(e.name, e.folder, {v: (c if c <= known else 0) for v, c in e.value_map.items()}, "eval")
            for e in protocol.evals
        ]
        request = StepRequest(
            step_index=index,
            step_sizes=sizes,
            class_names=names,
            train_batches=[protocol.steps[index]],
            eval_batches=protocol.steps[: index + 1] + evals,
            teacher_dir=previous,
            workdir=workdir / f"step-{index:02d}" / "job",
            output_dir=workdir / f"step-{index:02d}" / "model",
            config=config,
            memory_batches=protocol.steps[:index],
            keep_checkpoint=False,
        )
        if show_progress:
            metrics = train_with_progress(request, f"{label}step {index}", console)
        else:
            result = run_step(request)
            assert result.metrics is not None  # run_step only returns unfinished when asked to stop
            metrics = result.metrics
        results.append(metrics)
        console.print(f"{label}step {index}: {format_metrics(metrics)}")
        previous = request.output_dir
    return results


def progress_bar(
    label: str, counts: str, clock: ProgressColumn, console: Console, *, transient: bool = False
) -> Progress:
    """A rich progress bar: ``label``, the bar, ``counts`` (a format of the task's fields) and ``clock``."""
    return Progress(
        TextColumn(label), BarColumn(), TextColumn(counts), clock, console=console, transient=transient
    )


def train_with_progress(
    request: StepRequest, label: str, console: Console, data: StepData | None = None
) -> Metrics:
    """``run_step`` with a progress bar (iterations, loss, time left); the step's metrics."""
    counts = "{task.completed}/{task.total} it  loss {task.fields[loss]:.4f}"
    with progress_bar(label, counts, TimeRemainingColumn(), console, transient=True) as bar:
        task = bar.add_task("train", total=None, loss=float("nan"))

        def report(p: TrainProgress) -> None:
            bar.update(task, completed=p.iteration, total=p.total_iterations, loss=p.losses["total"])

        result = run_step(request, progress=report, data=data)
    assert result.metrics is not None  # run_step only returns unfinished when asked to stop
    return result.metrics


def pretrain_with_progress(model: ModelConfig, console: Console) -> None:
    """Train the backbone that ``model.pretrained = "synthetic"`` names now, with a progress bar, unless
    it is cached or another setting is used (so that parallel runs, or a daemon, do not wait on it)."""
    if (
        model.pretrained != "synthetic"
        or backbone_file(model.backbone, model.output_stride, cache_dir()).is_file()
    ):
        return
    label = "pre-training the backbone on generated classes (once; cached)"
    with progress_bar(
        label, "{task.completed}/{task.total} it", TimeElapsedColumn(), console, transient=True
    ) as bar:
        task = bar.add_task("pretrain", total=None)
        path = synthetic_backbone(
            model.backbone,
            model.output_stride,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    console.print(f"pre-trained a {model.backbone} backbone on generated classes: {path}")


def format_metrics(m: Metrics) -> str:
    return f"mIoU all {pct(m.miou_all)}  old {pct(m.miou_old)}  new {pct(m.miou_new)}  hIoU {pct(m.hiou)}"


def pct(value: float | None) -> str:
    return "  -  " if value is None or value != value else f"{100 * value:5.2f}"


def metrics_table(title: str, rows: Sequence[tuple[str, Metrics]]) -> Table:
    table = Table(title=title)
    for column in ("", "mIoU old", "mIoU new", "mIoU all", "hIoU"):
        table.add_column(column, justify="right" if column else "left")
    for name, m in rows:
        table.add_row(name, pct(m.miou_old), pct(m.miou_new), pct(m.miou_all), pct(m.hiou))
    return table


def demo(out: Path, *, seed: int = 0) -> list[Metrics]:
    """Base step plus two incremental steps of DKD on generated data; prints the metrics after each step."""
    console = Console()
    data = AblationData()
    folders = generate_batches(
        out / "data",
        data.protocol,
        train_per_step=data.train_per_step,
        val_per_step=data.val_per_step,
        image_size=data.image_size,
        eval_batch=data.eval_images,
        seed=seed,
    )
    results = run_protocol(load_protocol(folders), cpu_config(), out / "runs", console=console)
    title = f"DKD on generated data ({data.protocol}), gate grouping"
    console.print(metrics_table(title, [(f"step {i}", m) for i, m in enumerate(results)]))
    return results


@dataclasses.dataclass(frozen=True)
class AblationData:
    """How the generated data of an ablation is made (per seed)."""

    protocol: str = "4-2-2"
    train_per_step: int = 64
    val_per_step: int = 12
    image_size: int = 64
    eval_images: int = 60
    objects: tuple[int, int] = OBJECTS  # least and most objects per image (engine.synthetic)


@dataclasses.dataclass(frozen=True)
class SeedRun:
    """The generated data of one seed of the ablation, and where its runs go."""

    seed: int
    out: Path
    protocol: Protocol  # labelled as the protocol's steps give them
    joint: Protocol  # the same images with every class labelled, as one step


def prepare_seed(out: Path, data: AblationData, seed: int) -> SeedRun:
    """Generate the protocol's batches and their fully labelled twins for joint training."""
    common: dict[str, Any] = dict(
        train_per_step=data.train_per_step,
        val_per_step=data.val_per_step,
        image_size=data.image_size,
        seed=seed,
        objects=data.objects,
    )
    folders = generate_batches(out / "data", data.protocol, eval_batch=data.eval_images, **common)
    joint_folders = generate_batches(
        out / "joint-data", data.protocol, full_labels=True, prefix="joint", **common
    )
    protocol = load_protocol(folders)
    total = sum(protocol.step_sizes)
    joint = Protocol(
        steps=[BatchRef("joint", f, {k: k for k in range(1, total + 1)}) for f in joint_folders],
        evals=protocol.evals,
        class_names=protocol.class_names,
        step_sizes=[total],
    )
    return SeedRun(seed, out, protocol, joint)


def paper_final(run: SeedRun, metrics: Metrics) -> Metrics:
    """Metrics after the last step (or of the base model) in the paper's grouping of ``run``'s protocol."""
    sizes = run.protocol.step_sizes
    return paper_view(metrics, range(1, sizes[0] + 1), range(sizes[0] + 1, sum(sizes) + 1))


def train_ablation_run(run: SeedRun, name: str, config: EngineConfig, quiet: bool) -> Metrics:
    """One row of one seed, after the protocol's last step: "base", "joint" or a method (after "base").

    ``quiet`` prints nothing (a worker process, whose lines would cut through the parent's progress bar).
    """
    console = Console(quiet=quiet)
    label = f"seed {run.seed} {name}: "
    if name == "joint":
        return paper_final(run, run_joint(run.joint, run.protocol, config, run.out / "joint", console, label))
    if name == "base":
        base_run = dataclasses.replace(run.protocol, steps=run.protocol.steps[:1])
        results = run_protocol(
            base_run, config, run.out / "base", console=console, label=label, show_progress=False
        )
        return paper_final(run, results[0])
    method_config = dataclasses.replace(config, train=dataclasses.replace(config.train, method=name))
    results = run_protocol(
        run.protocol,
        method_config,
        run.out / name,
        base_model=run.out / "base" / "step-00" / "model",
        console=console,
        label=label,
        show_progress=False,
    )
    return paper_final(run, results[-1])


def run_joint(
    joint: Protocol, protocol: Protocol, config: EngineConfig, workdir: Path, console: Console, label: str
) -> Metrics:
    """Joint training (docs/method.md): one step 0 over every class with full labels, step 0's schedule."""
    request = StepRequest(
        step_index=0,
        step_sizes=joint.step_sizes,
        class_names=joint.class_names,
        train_batches=joint.steps,
        eval_batches=protocol.steps + protocol.evals,
        teacher_dir=None,
        workdir=workdir / "job",
        output_dir=workdir / "model",
        config=config,
        keep_checkpoint=False,
    )
    result = run_step(request)
    assert result.metrics is not None
    console.print(f"{label}{format_metrics(result.metrics)}")
    return result.metrics


def _init_worker(threads: int) -> None:
    # Small 64 px convolutions scale poorly over threads: one run per core finishes the ablation sooner.
    torch.set_num_threads(threads)


def run_ablation_jobs(
    runs: Sequence[SeedRun],
    config: EngineConfig,
    methods: Sequence[str],
    workers: int,
    console: Console,
) -> dict[int, dict[str, Metrics]]:
    """Every row of every seed, ``workers`` runs at a time; a seed's methods start when its base is saved."""
    final: dict[int, dict[str, Metrics]] = {run.seed: {} for run in runs}
    by_seed = {run.seed: run for run in runs}
    total = len(runs) * (len(methods) + 2)
    with progress_bar("ablation", "{task.completed}/{task.total} runs", TimeElapsedColumn(), console) as bar:
        task = bar.add_task("runs", total=total)
        if workers <= 1:
            for run in runs:
                for name in ["base", *methods, "joint"]:
                    final[run.seed][name] = train_ablation_run(run, name, config, quiet=False)
                    bar.advance(task)
            return final
        pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(max(1, (os.cpu_count() or 1) // workers),),
        )
        with pool:
            pending = {
                pool.submit(train_ablation_run, run, "base", config, True): (run.seed, "base") for run in runs
            }
            pending |= {
                pool.submit(train_ablation_run, run, "joint", config, True): (run.seed, "joint")
                for run in runs
            }
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    seed, name = pending.pop(future)
                    final[seed][name] = future.result()
                    console.print(f"seed {seed} {name}: {format_metrics(final[seed][name])} (paper grouping)")
                    bar.advance(task)
                    if name == "base":
                        for method in methods:
                            job = pool.submit(train_ablation_run, by_seed[seed], method, config, True)
                            pending[job] = (seed, method)
    return final


def ablation(
    out: Path,
    *,
    data: AblationData = AblationData(),
    seeds: Sequence[int] = (0, 1),
    config: EngineConfig | None = None,
    workers: int | None = None,
) -> dict[int, dict[str, Metrics]]:
    """Fine-tuning, KD, KD + DKD with random new heads, full DKD and joint training, for each seed.

    Runs ``workers`` trainings at a time (default: one per CPU core, or one on a GPU). Writes
    ``results.json`` and ``results.md`` (the paper's grouping, gap closure, mean and spread over seeds)
    into ``out``.
    """
    console = Console()
    config = config or cpu_config()
    if workers is None:
        workers = 1 if torch.cuda.is_available() else os.cpu_count() or 1
    started = time.monotonic()
    pretrain_with_progress(config.model, console)
    runs = [prepare_seed(out / f"seed-{seed}", data, seed) for seed in seeds]
    final = run_ablation_jobs(runs, config, ABLATION_METHODS, workers, console)
    minutes = (time.monotonic() - started) / 60
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{workers} run(s) at a time, torch {torch.__version__}"
    )
    markdown = ablation_markdown(final, data, config)
    console.print(markdown, markup=False, highlight=False)
    summary = {
        "data": dataclasses.asdict(data),
        "config": config.to_dict(),
        "seeds": list(seeds),
        "minutes": round(minutes, 1),
        "machine": machine,
        "runs": {str(seed): {name: m.to_dict() for name, m in rows.items()} for seed, rows in final.items()},
        "gap_closure": {str(seed): gap_closure(rows) for seed, rows in final.items()},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    (out / "results.md").write_text(markdown + f"\n{minutes:.1f} minutes on {machine}\n")
    return final


def ablation_config(args: argparse.Namespace) -> EngineConfig:
    """cpu_config with the ablation command's changes (--pretrained and the incremental-step options)."""
    config = cpu_config()
    if args.pretrained is not None:
        pretrained = None if args.pretrained == "none" else args.pretrained
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, pretrained=pretrained))
    train = {
        name: value
        for name, value in (
            ("epochs_incremental", args.epochs_incremental),
            ("lr_incremental", args.lr_incremental),
            ("warmup_fraction_incremental", args.warmup_incremental),
            ("batch_size_incremental", args.batch_incremental),
        )
        if value is not None
    }
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, **train))
    if args.pos_weight is not None:
        loss = dataclasses.replace(config.loss, pos_weight_incremental=args.pos_weight)
        config = dataclasses.replace(config, loss=loss)
    return config


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m engine.experiment``."""
    parser = argparse.ArgumentParser(prog="python -m engine.experiment", description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("demo", "ablation"))
    parser.add_argument("--out", type=Path, required=True, help="folder for data, models and results")
    parser.add_argument("--protocol", default=AblationData.protocol, help="ablation protocol, e.g. 4-2-2")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="ablation seeds")
    parser.add_argument("--seed", type=int, default=0, help="demo seed")
    parser.add_argument(
        "--pretrained", default=None, help='model.pretrained instead of "synthetic": none, imagenet or a file'
    )
    parser.add_argument("--train-per-step", type=int, default=AblationData.train_per_step)
    parser.add_argument(
        "--objects",
        type=int,
        nargs=2,
        default=list(AblationData.objects),
        metavar=("LEAST", "MOST"),
        help="objects per generated image, the step's own among them (default: 2 5)",
    )
    parser.add_argument(
        "--epochs-incremental",
        type=int,
        default=None,
        help="epochs of each incremental step instead of cpu_config's",
    )
    parser.add_argument(
        "--lr-incremental",
        type=float,
        default=None,
        help="learning rate of each incremental step instead of cpu_config's",
    )
    parser.add_argument(
        "--warmup-incremental",
        type=float,
        default=None,
        metavar="FRACTION",
        help="share of each incremental step spent warming the learning rate up, instead of cpu_config's",
    )
    parser.add_argument(
        "--batch-incremental",
        type=int,
        default=None,
        help="batch of each incremental step instead of cpu_config's",
    )
    parser.add_argument(
        "--pos-weight",
        type=float,
        default=None,
        help="pos_weight of each incremental step instead of cpu_config's",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="trainings at a time (default: one per CPU core, 1 on a GPU)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """The command line; an engine error (a diverging step, a bad setting) ends it with one line."""
    args = build_parser().parse_args(argv)
    try:
        if args.what == "demo":
            demo(args.out, seed=args.seed)
        else:
            config = ablation_config(args)
            objects = (args.objects[0], args.objects[1])
            data = AblationData(protocol=args.protocol, train_per_step=args.train_per_step, objects=objects)
            ablation(args.out, data=data, seeds=args.seeds, config=config, workers=args.workers)
    except EngineError as error:
        raise SystemExit(f"Error: {error}") from None


if __name__ == "__main__":
    main()
