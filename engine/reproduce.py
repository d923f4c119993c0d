"""One command that reproduces a published protocol on PASCAL VOC 2012 or ADE20K.

    ciss experiment voc --protocol 15-1 --root VOCdevkit/VOC2012 --out runs/voc-15-1
    python -m engine.reproduce ade --protocol 100-10 --root ADEChallengeData2016 --out runs/ade --memory

It trains DKD (and DKD-M with ``--memory``), fine-tuning and joint training over every step of the
protocol with the reference settings of docs/method.md (:func:`reference_config`, changed by ``--config``),
evaluates each step on the validation set resized to 512 on the short side and centre-cropped, and
writes ``results.json``, ``results.md`` (the paper's table: measured beside published figures, paper
grouping) and ``miou.png``. A step whose model is saved is not trained again, and an unfinished step
resumes from its checkpoint, so the command picks up where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from engine.config import EngineConfig, LossConfig, ModelConfig, TrainConfig
from engine.data import SegmentationFiles, identity_lut, label_sets
from engine.evaluate import Metrics, paper_view
from engine.exceptions import ConfigError, EngineError
from engine.experiment import train_with_progress
from engine.runner import EvalGroup, StepData, StepRequest
from engine.standard_datasets import DATASET_CLASSES, dataset_pairs, protocol_dataset, protocol_steps
from engine.transforms import EvalTransform, TrainTransform

METHODS = ("dkd", "dkd_m", "finetune", "joint")
METHOD_LABELS = {
    "dkd": "DKD",
    "dkd_m": "DKD-M",
    "finetune": "fine-tuning",
    "joint": "joint training (upper bound)",
}
MEMORY_SIZE = {"voc": 100, "ade": 300}

# Published figures, overlapped setting, ResNet-101 (docs/method.md: the reference implementation's README
# and the paper's joint-training rows). (mIoU all, hIoU) for DKD and DKD-M; (old, new, all) for joint.
PUBLISHED: dict[tuple[str, str], dict[str, tuple[float, ...]]] = {
    ("voc", "19-1"): {"dkd": (76.13, 56.95), "dkd_m": (77.04, 68.14)},
    ("voc", "15-5"): {"dkd": (73.95, 67.17), "dkd_m": (74.84, 68.96)},
    ("voc", "15-1"): {"dkd": (70.50, 57.46), "dkd_m": (72.95, 64.09), "joint": (79.48, 71.52, 77.58)},
    ("voc", "10-1"): {"dkd": (60.43, 57.21), "dkd_m": (66.20, 64.89)},
    ("voc", "5-3"): {"dkd": (58.98, 61.32), "dkd_m": (63.32, 65.02)},
    ("ade", "100-50"): {"dkd": (35.55, 29.42)},
    ("ade", "100-10"): {"dkd": (34.53, 26.79), "joint": (43.16, 30.03, 38.81)},
    ("ade", "50-50"): {"dkd": (34.39, 34.77)},
}


def reference_config(dataset: str) -> EngineConfig:
    """The reference's settings (docs/method.md, "Optimisation"): VOC or ADE20K."""
    model = ModelConfig(backbone="resnet101", output_stride=16, pretrained="imagenet")
    if dataset == "voc":
        return EngineConfig(
            model=model,
            loss=LossConfig(pos_weight_base=2.0, pos_weight_incremental=1.0),
            train=TrainConfig(
                lr_base=1e-3, lr_incremental=1e-4, batch_size=32, epochs_base=60, epochs_incremental=60
            ),
        )
    if dataset == "ade":
        return EngineConfig(
            model=model,
            loss=LossConfig(pos_weight_base=35.0, pos_weight_incremental=35.0),
            train=TrainConfig(
                lr_base=2.5e-3,
                lr_incremental=2.5e-4,
                batch_size=24,
                epochs_base=100,
                epochs_incremental=100,
                warmup_fraction_base=0.2,
                warmup_fraction_incremental=0.2,
            ),
        )
    raise ConfigError(f"dataset: {dataset!r} is not one of voc, ade")


def load_config(dataset: str, path: Path | None) -> EngineConfig:
    """The reference settings, with the [model], [loss] and [train] tables of a TOML file on top."""
    config = reference_config(dataset)
    if path is None:
        return config
    try:
        overrides = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(
            f"{path}: cannot be read as TOML ({error}); fix the file or leave out --config"
        ) from None
    unknown = sorted(set(overrides) - {"model", "loss", "train"})
    if unknown:
        raise ConfigError(f"{path}: unknown table [{unknown[0]}]; allowed: [model], [loss], [train]")
    merged = config.to_dict()
    for section, values in overrides.items():
        merged[section] = {**merged[section], **values}
    return EngineConfig.from_dict(merged)


@dataclass(frozen=True)
class Run:
    """One reproduction: a protocol of a dataset, where its files are and where results go."""

    dataset: str
    protocol: str
    root: Path
    out: Path
    config: EngineConfig
    methods: tuple[str, ...] = ("dkd", "finetune", "joint")
    eval_crop: int = 512
    device: str = "auto"

    @property
    def steps(self) -> list[list[int]]:
        return protocol_steps(self.dataset, self.protocol)


class ProtocolData:
    """The protocol's datasets; every training mask is read once (label sets cached in the output folder)."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.num_classes = len(DATASET_CLASSES[run.dataset])
        cache = run.out / "train-label-sets.json"
        pairs = dataset_pairs(run.dataset, run.root, "train")
        key = [str(p[1]) for p in pairs]
        cached = json.loads(cache.read_text()) if cache.is_file() else None
        if cached is not None and cached["masks"] == key:
            self.present = [set(s) for s in cached["sets"]]
        else:
            self.present = label_sets(
                SegmentationFiles(pairs, identity_lut(self.num_classes), EvalTransform())
            )
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps({"masks": key, "sets": [sorted(s) for s in self.present]}))

    def step(self, t: int, train: TrainConfig) -> SegmentationFiles:
        transform = TrainTransform(train.crop_size, train.scale_min, train.scale_max)
        run = self.run
        return protocol_dataset(
            run.dataset,
            run.root,
            run.protocol,
            t,
            "train",
            transform,
            setting=train.setting,
            present=self.present,
        )

    def evaluation(self, t: int) -> list[EvalGroup]:
        run = self.run
        val = protocol_dataset(
            run.dataset, run.root, run.protocol, t, "val", EvalTransform(crop=run.eval_crop)
        )
        return [("val", None, val)]

    def memory_pool(self, t: int, train: TrainConfig) -> tuple[SegmentationFiles, SegmentationFiles]:
        """Earlier steps' training images: ground truth of their own step, and the step-t training view."""
        earlier = [self.step(s, train) for s in range(t)]
        plain = SegmentationFiles(
            [p for d in earlier for p in d.pairs], [lut for d in earlier for lut in d.luts], EvalTransform()
        )
        transform = TrainTransform(train.crop_size, train.scale_min, train.scale_max)
        view = SegmentationFiles(plain.pairs, identity_lut(self.num_classes, self.run.steps[t]), transform)
        return plain, view

    def joint(self, train: TrainConfig) -> SegmentationFiles:
        """Every training image with every class labelled (joint training)."""
        transform = TrainTransform(train.crop_size, train.scale_min, train.scale_max)
        pairs = dataset_pairs(self.run.dataset, self.run.root, "train")
        return SegmentationFiles(pairs, identity_lut(self.num_classes), transform)


def method_config(run: Run, method: str) -> EngineConfig:
    train = run.config.train
    if method == "dkd_m":
        train = dataclasses.replace(
            train, method="dkd", memory_size=train.memory_size or MEMORY_SIZE[run.dataset]
        )
    elif method in ("dkd", "finetune"):
        train = dataclasses.replace(train, method=method, memory_size=0)
    else:
        train = dataclasses.replace(train, method="dkd", memory_size=0)
    return dataclasses.replace(run.config, train=train)


def run_method(run: Run, data: ProtocolData, method: str, console: Console) -> list[Metrics]:
    """Every step of one method (joint: one step over every class); metrics after each step."""
    config = method_config(run, method)
    class_names = {k: n for k, n in enumerate(DATASET_CLASSES[run.dataset], start=1)}
    steps = run.steps
    results: list[Metrics] = []
    indices = [len(steps) - 1] if method == "joint" else list(range(len(steps)))
    previous: Path | None = None
    for t in indices:
        # Step 0 (mBCE + AC on the base classes) is the same for every incremental method: trained once.
        folder = run.out / ("base" if t == 0 and method != "joint" else method) / f"step-{t:02d}"
        sizes = [sum(len(s) for s in steps)] if method == "joint" else [len(s) for s in steps[: t + 1]]
        saved = folder / "model" / "model.json"
        if saved.is_file():
            metrics = Metrics.from_dict(json.loads(saved.read_text())["metrics"])
            console.print(f"{METHOD_LABELS[method]} step {t}: done before, {format_row(metrics)}")
        else:
            request = StepRequest(
                step_index=0 if method == "joint" else t,
                step_sizes=sizes,
                class_names={k: class_names[k] for k in range(1, sum(sizes) + 1)},
                train_batches=[],
                eval_batches=[],
                teacher_dir=previous,
                workdir=folder / "job",
                output_dir=folder / "model",
                config=config,
                device=run.device,
                keep_checkpoint=False,
            )
            if method == "joint":
                step_data = StepData(train=data.joint(config.train), evaluation=data.evaluation(t))
            else:
                pool = data.memory_pool(t, config.train) if t and config.train.memory_size else None
                step_data = StepData(
                    train=data.step(t, config.train), evaluation=data.evaluation(t), memory_pool=pool
                )
            metrics = train_with_progress(request, f"{METHOD_LABELS[method]} step {t}", console, step_data)
            console.print(f"{METHOD_LABELS[method]} step {t}: {format_row(metrics)}")
        seen = [c for s in steps[: t + 1] for c in s]
        results.append(paper_view(metrics, steps[0], seen[len(steps[0]) :]))
        previous = folder / "model"
    return results


def format_row(m: Metrics) -> str:
    return f"mIoU all {pct(m.miou_all)}  (gate grouping: old {pct(m.miou_old)}, new {pct(m.miou_new)})"


def pct(value: float | None) -> str:
    return "-" if value is None or value != value else f"{100 * value:.2f}"


def results_markdown(run: Run, results: dict[str, list[Metrics]]) -> str:
    """The paper's table: mIoU old / new / all and hIoU after the last step, published figures beside."""
    published = PUBLISHED.get((run.dataset, run.protocol), {})
    setting = run.config.train.setting
    lines = [
        f"{run.dataset.upper()} {run.protocol} ({setting}), after the last step; paper grouping "
        "(old = background + base classes, new = every later class); published figures: overlapped "
        "setting, ResNet-101.",
        "",
        "| method | mIoU old | mIoU new | mIoU all | hIoU | published mIoU all | published hIoU |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, per_step in results.items():
        m = per_step[-1]
        assert m.paper is not None
        paper = published.get(method, ()) if setting == "overlap" else ()
        if method == "joint" and paper:
            all_, hiou = f"{paper[2]:.2f}", "-"
        else:
            all_, hiou = (f"{paper[0]:.2f}", f"{paper[1]:.2f}") if paper else ("-", "-")
        lines.append(
            f"| {METHOD_LABELS[method]} | {pct(m.paper.miou_old)} | {pct(m.paper.miou_new)} | "
            f"{pct(m.miou_all)} | {pct(m.paper.hiou)} | {all_} | {hiou} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict[str, list[Metrics]], path: Path, title: str) -> None:
    """mIoU all, old and new (paper grouping) after every step, one colour per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(12, 3.6), sharey=True)
    for method, per_step in results.items():
        steps = list(range(len(per_step))) if method != "joint" else [len(results.get("dkd", per_step)) - 1]
        for axis, name in zip(axes, ("all", "old", "new"), strict=True):
            values = [
                100 * (m.miou_all if name == "all" else getattr(m.paper, f"miou_{name}")) for m in per_step
            ]
            marker = "*" if method == "joint" else "o"
            axis.plot(steps, values, marker=marker, label=METHOD_LABELS[method])
            axis.set_title(f"mIoU {name}")
            axis.set_xlabel("step")
    axes[0].set_ylabel("%")
    axes[0].legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def reproduce(run: Run, console: Console | None = None) -> dict[str, list[Metrics]]:
    """Run every method of ``run`` (resuming), write results.json, results.md and miou.png; return metrics."""
    console = console or Console()
    unknown = [m for m in run.methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"methods: {unknown[0]!r} is not one of {', '.join(METHODS)}")
    data = ProtocolData(run)  # checks the dataset's files before anything is written
    run.out.mkdir(parents=True, exist_ok=True)
    results = {method: run_method(run, data, method, console) for method in run.methods}
    summary = {
        "dataset": run.dataset,
        "protocol": run.protocol,
        "config": run.config.to_dict(),
        "eval_crop": run.eval_crop,
        "results": {method: [m.to_dict() for m in per_step] for method, per_step in results.items()},
        "published": {k: list(v) for k, v in PUBLISHED.get((run.dataset, run.protocol), {}).items()},
    }
    (run.out / "results.json").write_text(json.dumps(summary, indent=2))
    table = results_markdown(run, results)
    (run.out / "results.md").write_text(table)
    plot(results, run.out / "miou.png", f"{run.dataset.upper()} {run.protocol}")
    console.print(table)
    return results


def plan_run(
    dataset: str,
    protocol: str,
    root: Path,
    out: Path,
    *,
    memory: bool = False,
    setting: str = "overlap",
    config_path: Path | None = None,
    eval_crop: int = 512,
    device: str = "auto",
) -> Run:
    """A :class:`Run` from command-line choices: reference settings, ``config_path`` changes, the setting."""
    if dataset not in ("voc", "ade"):
        raise ConfigError(f"dataset: {dataset!r} is not one of voc, ade")
    protocol_steps(dataset, protocol)  # names the allowed protocols when this one is unknown
    config = load_config(dataset, config_path)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, setting=setting))
    methods = ("dkd", "dkd_m", "finetune", "joint") if memory else ("dkd", "finetune", "joint")
    return Run(dataset, protocol, root, out, config, methods, eval_crop, device)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m engine.reproduce", description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=("voc", "ade"))
    parser.add_argument("--protocol", required=True, help="e.g. 15-1 (voc) or 100-10 (ade)")
    parser.add_argument("--root", type=Path, required=True, help="VOCdevkit/VOC2012 or ADEChallengeData2016")
    parser.add_argument("--out", type=Path, required=True, help="results folder (resumes when it exists)")
    parser.add_argument("--memory", action="store_true", help="also run DKD-M (exemplar memory)")
    parser.add_argument("--setting", choices=("overlap", "disjoint"), default="overlap")
    parser.add_argument("--config", type=Path, help="TOML with [model], [loss], [train] changes")
    parser.add_argument("--eval-crop", type=int, default=512)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    options = {
        "memory": args.memory,
        "setting": args.setting,
        "eval_crop": args.eval_crop,
        "device": args.device,
    }
    try:
        reproduce(
            plan_run(args.dataset, args.protocol, args.root, args.out, config_path=args.config, **options)
        )
    except EngineError as error:  # a diverging step, a bad setting or dataset: one line, no traceback
        raise SystemExit(f"Error: {error}") from None


if __name__ == "__main__":
    main()
