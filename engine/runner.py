"""One incremental step from stored batch folders to a saved, evaluated candidate model.

This is the engine's entry point for the daemon's training jobs, the demo and the benchmarks: it builds the
student (from the teacher's files for t >= 1, with the new heads initialised from the auxiliary classifier),
the step's training set (label rule, overlap filter, optional DKD-M memory), trains with ``train_step``,
evaluates on the held-out data of every step so far, and saves the model with its settings and class map.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from engine.checkpoint import load_model_files, save_model
from engine.config import EngineConfig
from engine.data import SegmentationFiles, batch_dataset, filter_indices, label_sets
from engine.evaluate import Metrics, evaluate, summarize
from engine.exceptions import CheckpointError, ConfigError, DataError
from engine.exemplar_memory import build_memory, pseudo_label
from engine.model import DKDSegmenter, build_model, upsample
from engine.step_setup import new_class_ids
from engine.train import Progress, TrainResult, train_step
from engine.transforms import EvalTransform, TrainTransform

EvalGroup = tuple[str, set[int] | None, SegmentationFiles]  # (name, labelled classes or None: all, dataset)


@dataclass(frozen=True)
class BatchRef:
    """A stored batch folder and how its mask values map to global class ids (0: to background)."""

    name: str
    folder: Path
    value_map: dict[int, int]
    kind: str = "train"  # "train": held-out data in val/; "eval": fully labelled, images/ and masks/

    @property
    def labelled(self) -> set[int] | None:
        """Classes this batch labels; None for a fully labelled evaluation batch."""
        if self.kind == "eval":
            return None
        return {c for c in self.value_map.values() if c > 0}


@dataclass(frozen=True)
class StepRequest:
    """Everything needed to train and evaluate step ``step_index``."""

    step_index: int
    step_sizes: list[int]  # number of classes of every step up to and including this one
    class_names: dict[int, str]  # global id -> name, every class up to this step
    train_batches: list[BatchRef]  # this step's training data
    eval_batches: list[BatchRef]  # held-out data of every step so far, and "eval" batches
    teacher_dir: Path | None  # the promoted model of step t - 1; None at step 0
    workdir: Path  # the checkpoint lives here
    output_dir: Path  # the candidate model is written here
    config: EngineConfig
    device: str = "auto"
    memory_batches: list[BatchRef] = field(default_factory=list)  # earlier training batches, for DKD-M
    # Classes of later steps, where known (protocol runs): the disjoint setting drops images showing one.
    future_classes: list[int] = field(default_factory=list)
    # Evaluation images resized so the short side is this, then centre-cropped square (paper protocols).
    eval_crop: int | None = None
    # Protocol runs resume from the saved model once a step is done, so they drop its checkpoint (the model
    # twice: 122 MB for ResNet-18, 470 MB for ResNet-101); the daemon prunes by daemon.keep_checkpoints.
    keep_checkpoint: bool = True


@dataclass
class StepResult:
    finished: bool
    metrics: Metrics | None = None
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256 of the saved model
    history: list[dict[str, float]] = field(default_factory=list)
    train_images: int = 0


def resolve_device(name: str) -> torch.device:
    """``auto`` picks the first GPU when there is one; ``cuda`` without a GPU is a configuration error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"daemon.device: {name!r} but no CUDA device is visible; use 'auto' or 'cpu'")
    return torch.device(name)


def load_model(directory: Path, device: torch.device | str = "cpu") -> tuple[DKDSegmenter, dict[str, Any]]:
    """Rebuild a saved model (weights, settings, class map) from ``directory``."""
    state, meta = load_model_files(directory)
    config = EngineConfig.from_dict(meta["config"])
    # The file already holds trained weights: never fetch ImageNet weights to build the skeleton.
    model_config = type(config.model)(**{**config.model.__dict__, "pretrained": None})
    model = build_model(model_config, meta["step_sizes"])
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(
            f"{directory}: weights do not fit the saved settings ({error}); re-export it"
        ) from None
    return model.to(device), meta


def save_trained_model(
    model: DKDSegmenter,
    directory: Path,
    *,
    config: EngineConfig,
    class_names: dict[int, str],
    step_index: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Save weights (safetensors) and metadata (settings, class map, step sizes); returns file hashes."""
    steps = [s for s, n in enumerate(model.step_sizes) for _ in range(n)]
    meta = {
        "config": config.to_dict(),
        "step_sizes": list(model.step_sizes),
        "step_index": step_index,
        "classes": [
            {"id": k, "name": class_names[k], "step": steps[k - 1]} for k in range(1, model.num_classes + 1)
        ],
        **(extra or {}),
    }
    return save_model(directory, model.state_dict(), meta)


@dataclass
class StepData:
    """The datasets of one step, when they do not come from the request's batch folders.

    Protocol runs on PASCAL VOC or ADE20K (``engine.reproduce``) build them from the standard layouts.
    """

    train: SegmentationFiles  # this step's training images, labels of C_t only (others background)
    evaluation: list[EvalGroup]
    # DKD-M candidates: earlier training images, as (ground truth without augmentation, training view).
    memory_pool: tuple[SegmentationFiles, SegmentationFiles] | None = None


def training_dataset(
    request: StepRequest, teacher: DKDSegmenter | None, device: torch.device
) -> SegmentationFiles:
    """The step's training set: labels outside C_t become background, images without C_t are dropped.

    The overlap setting keeps every image with a pixel of a new class; the disjoint setting also drops
    images with a pixel of ``request.future_classes`` (a batch labels only its own classes, so only
    labels can show a future class: protocol runs know them, the daemon does not). With ``memory_size``
    > 0 a class-balanced DKD-M memory of earlier training images is added.
    """
    train = request.config.train
    new = new_class_ids(request.step_sizes)
    transform = TrainTransform(train.crop_size, train.scale_min, train.scale_max)
    refs = [(b.folder, b.value_map) for b in request.train_batches]
    # Label sets with every declared class visible, so that future classes can be seen.
    present = label_sets(batch_dataset(refs, "train", transform))
    kept = filter_indices(present, new, request.future_classes, train.setting)
    if not kept:
        raise DataError(
            f"step {request.step_index}: no training image contains a pixel of the new classes {new}"
            + (" without a future class (disjoint setting)" if train.setting == "disjoint" else "")
        )
    dataset = batch_dataset(refs, "train", transform, keep=new).subset(kept)
    if request.memory_batches:
        memory_refs = [(b.folder, b.value_map) for b in request.memory_batches]
        pool = (
            batch_dataset(memory_refs, "train", EvalTransform()),
            batch_dataset(memory_refs, "train", transform, keep=new),
        )
        dataset = with_memory(dataset, pool, request, teacher, device)
    return dataset


def with_memory(
    dataset: SegmentationFiles,
    pool: tuple[SegmentationFiles, SegmentationFiles],
    request: StepRequest,
    teacher: DKDSegmenter | None,
    device: torch.device,
) -> SegmentationFiles:
    """``dataset`` plus the DKD-M memory chosen from ``pool`` when ``train.memory_size`` > 0."""
    if request.config.train.memory_size == 0 or teacher is None or not len(pool[0]):
        return dataset
    memory = memory_dataset(pool, request, teacher, device)
    if memory is None:
        return dataset
    return SegmentationFiles(dataset.pairs + memory.pairs, dataset.luts + memory.luts, dataset.transform)


def memory_dataset(
    pool: tuple[SegmentationFiles, SegmentationFiles],
    request: StepRequest,
    teacher: DKDSegmenter,
    device: torch.device,
) -> SegmentationFiles | None:
    """DKD-M: choose ``memory_size`` earlier training images balanced over old classes (docs/method.md).

    ``pool`` is the candidates twice: as ground truth without augmentation, and as the training view
    (labels of the new classes only). An image's classes are its ground truth plus, from step 2 on, the
    teacher's confident pseudo-labels (background pixels whose top sigmoid score is >= 0.9).
    """
    plain, training_view = pool
    candidates = label_sets(plain)
    if request.step_index >= 2:
        teacher.eval()
        with torch.no_grad():
            for i in range(len(plain)):
                image, label = plain[i]
                logits = upsample(teacher(image[None].to(device)).logits, tuple(label.shape))
                found = pseudo_label(label[None].to(device), logits).unique().tolist()
                candidates[i] |= set(found) - {0, 255}
    new = new_class_ids(request.step_sizes)
    old = list(range(1, new[0]))
    generator = torch.Generator().manual_seed(request.config.train.seed + request.step_index)
    chosen = build_memory(candidates, old, request.config.train.memory_size, generator)
    return training_view.subset(chosen) if chosen else None


def eval_groups(
    batches: Sequence[BatchRef], *, max_size: int | None = None, crop: int | None = None
) -> list[EvalGroup]:
    """One evaluation group per batch: held-out images of a training batch, or a whole "eval" batch."""
    groups = []
    transform = EvalTransform(max_size=max_size, crop=crop)
    for ref in batches:
        split = "train" if ref.kind == "eval" else "val"
        dataset = batch_dataset([(ref.folder, ref.value_map)], split, transform)
        if len(dataset):
            groups.append((ref.name, ref.labelled, dataset))
    return groups


def evaluate_model(
    model: DKDSegmenter,
    groups: Sequence[EvalGroup],
    *,
    num_classes: int,
    old_classes: Sequence[int],
    new_classes: Sequence[int],
    device: torch.device,
    base_classes: Sequence[int] | None = None,
) -> Metrics:
    """IoU per class and mIoU old/new/all and hIoU of ``model`` on evaluation ``groups`` (for batch
    folders, :func:`eval_groups` makes them).

    ``num_classes`` counts every class taught so far (without background); a model that knows fewer
    classes (the current model, when scoring a candidate) simply never predicts the others. With
    ``base_classes`` the paper's grouping is reported too. Evaluation runs in float32 (docs/method.md).
    """
    loaders = [
        (name, labelled, DataLoader(dataset, batch_size=1, num_workers=0))
        for name, labelled, dataset in groups
    ]
    iou = evaluate(model, loaders, num_classes + 1, device)
    return summarize(iou, old_classes, new_classes, base_classes=base_classes)


def _step_models(request: StepRequest, device: torch.device) -> tuple[DKDSegmenter, DKDSegmenter | None]:
    """The student and the teacher of a step: a new model and none at step 0; at t >= 1 the previous model
    twice, the student with the step's classifier added."""
    if request.step_index == 0:
        return build_model(request.config.model, request.step_sizes), None
    if request.teacher_dir is None:
        raise ConfigError(f"step {request.step_index} needs the previous model (teacher_dir)")
    teacher, _ = load_model(request.teacher_dir, device)
    if teacher.step_sizes != request.step_sizes[:-1]:
        raise CheckpointError(
            f"{request.teacher_dir}: the model has steps {teacher.step_sizes}, "
            f"but step {request.step_index} expects {request.step_sizes[:-1]}"
        )
    model, _ = load_model(request.teacher_dir, device)
    model.add_step(request.step_sizes[-1], init_from_aux=request.config.train.init_from_aux)
    return model, teacher


def _step_datasets(
    request: StepRequest, data: StepData | None, teacher: DKDSegmenter | None, device: torch.device
) -> tuple[SegmentationFiles, list[EvalGroup]]:
    """The training set (with its DKD-M memory) and the evaluation groups: from the request's batch
    folders, or from ``data`` when given."""
    if data is None:
        return training_dataset(request, teacher, device), eval_groups(
            request.eval_batches, crop=request.eval_crop
        )
    dataset = data.train
    if data.memory_pool is not None:
        dataset = with_memory(dataset, data.memory_pool, request, teacher, device)
    return dataset, data.evaluation


def run_step(
    request: StepRequest,
    *,
    progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    data: StepData | None = None,
) -> StepResult:
    """Train step ``request.step_index``, evaluate it and save it to ``request.output_dir``.

    The data come from the request's batch folders, or from ``data`` when given. Resumes from the
    checkpoint in ``request.workdir`` when there is one. Returns ``finished=False`` (with the
    checkpoint written) when ``should_stop()`` turned true.
    """
    device = resolve_device(request.device)
    torch.manual_seed(request.config.train.seed + request.step_index)
    model, teacher = _step_models(request, device)
    dataset, evaluation = _step_datasets(request, data, teacher, device)
    request.workdir.mkdir(parents=True, exist_ok=True)
    result: TrainResult = train_step(
        model=model,
        teacher=teacher,
        dataset=dataset,
        config=request.config,
        step_index=request.step_index,
        device=device,
        checkpoint_path=request.workdir / "checkpoint.pt",
        progress=progress,
        should_stop=should_stop,
    )
    if not result.finished:
        return StepResult(finished=False, history=result.history, train_images=len(dataset))
    new = new_class_ids(request.step_sizes)
    metrics = evaluate_model(
        model,
        evaluation,
        num_classes=model.num_classes,
        old_classes=list(range(1, new[0])) if request.step_index else new,
        new_classes=new if request.step_index else [],
        device=device,
        base_classes=list(range(1, request.step_sizes[0] + 1)),
    )
    files: dict[str, str] = {}
    # Under torch.distributed every rank holds the same weights; rank 0 alone writes them.
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        files = save_trained_model(
            model,
            request.output_dir,
            config=request.config,
            class_names=request.class_names,
            step_index=request.step_index,
            extra={"history": result.history, "metrics": metrics.to_dict()},
        )
        if not request.keep_checkpoint:
            (request.workdir / "checkpoint.pt").unlink(missing_ok=True)
    return StepResult(
        finished=True, metrics=metrics, files=files, history=result.history, train_images=len(dataset)
    )
