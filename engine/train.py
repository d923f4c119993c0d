"""Training of one step: base step (t = 0) and incremental step (t >= 1) as plain functions.

``train_step`` runs the whole optimisation of docs/method.md for one step: SGD with Nesterov momentum, poly
decay per iteration, 10x learning rate on the head and classifiers, the weight-decay rule, BatchNorm momentum
0.01 at step 0 and frozen BatchNorm and dropout afterwards, the frozen teacher, mixed precision on CUDA. It
writes atomic checkpoints that hold everything needed to resume bit-for-bit (model, optimiser, scheduler,
scaler, RNG states, position in the epoch) and resumes from one. Under ``torchrun`` it shards the data, uses
SyncBatchNorm where BatchNorm trains, and only rank 0 writes. The set-up of a step is in
``engine.step_setup``, the state it carries and checkpoints in ``engine.training_state``; here are the loss
terms, one iteration (:func:`train_iteration`) and the loop over the epochs (:func:`train_step`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from engine.config import EngineConfig, TrainConfig
from engine.exceptions import DataError, DivergedError
from engine.fast import FastPaths, accumulate_gradients, default_fast_paths, device_batches
from engine.losses import ac_loss, dkd_loss, kd_loss, mbce_loss, target_entropy, weighted_total
from engine.model import DKDSegmenter, upsample
from engine.sampling import StepSampler
from engine.step_setup import StepRun, prepare_step, set_step_mode
from engine.training_state import TrainingState

log = logging.getLogger("ciss.engine.train")


@dataclass
class Progress:
    """What a progress callback receives after every iteration."""

    step_index: int
    epoch: int
    epochs: int
    iteration: int  # iterations done so far in this step
    total_iterations: int
    losses: dict[str, float]  # loss terms and "total" of the last iteration
    lr: float  # backbone learning rate
    images_per_second: float
    eta_seconds: float
    micro_batch: int | None = None  # images per forward pass: below the batch size after an OOM fallback


@dataclass
class TrainResult:
    """Outcome of ``train_step``: finished, or stopped early on request after writing a checkpoint."""

    finished: bool
    iterations: int
    # Mean loss terms per finished epoch, for the report's loss curves.
    history: list[dict[str, float]] = field(default_factory=list)
    micro_batch: int | None = None  # images per forward pass: below the batch size after an OOM fallback


def loss_terms(
    student: nn.Module,
    teacher: DKDSegmenter | None,
    images: Tensor,
    labels: Tensor,
    *,
    new_classes: list[int],
    pos_weight: float,
    config: EngineConfig,
    fast: FastPaths | None = None,
    floors: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Every loss term of docs/method.md for one batch; the weighted total is ``losses.weighted_total``.

    When ``floors`` is given it receives each distillation term's floor (``losses.target_entropy``), so
    that the caller can record the terms as KL divergences.

    ``student`` is a :class:`StepModel` (possibly inside DDP). images (N, 3, H, W); labels (N, H, W) with the
    step's label rule already applied (values not in C_t are 0, 255 is ignore). ``fast`` picks the
    upsampling and the teacher's grad mode; the terms are the same either way.
    """
    out, s_pos, s_neg = student(images)
    size = (labels.shape[-2], labels.shape[-1])
    up = upsample if fast is None else fast.upsample
    logits = up(out.logits, size)  # (N, 1 + K, H, W)
    terms = {
        "mbce": mbce_loss(logits, labels, new_classes, pos_weight),
        "ac": ac_loss(logits[:, :1]),
    }
    if teacher is None or not config.train.use_kd:
        return terms
    num_old = new_classes[0] - 1
    with torch.no_grad() if fast is None else fast.teacher_context():
        t_out = teacher(images)
        t_logits = up(t_out.logits, size)  # (N, 1 + num_old, H, W)
        if config.train.use_dkd:
            t_pos, t_neg = teacher.reasoning_scores(t_out.features, num_old)  # (N, num_old, h, w)
    terms["kd"] = kd_loss(logits[:, 1 : num_old + 1], t_logits[:, 1 : num_old + 1])
    if config.train.use_dkd:
        terms["dkd_pos"] = dkd_loss(s_pos, t_pos)
        terms["dkd_neg"] = dkd_loss(s_neg, t_neg)
    if floors is not None:
        floors["kd"] = target_entropy(t_logits[:, 1 : num_old + 1])
        if config.train.use_dkd:
            floors["dkd_pos"] = target_entropy(t_pos)
            floors["dkd_neg"] = target_entropy(t_neg)
    return terms


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _StopRequested(Exception):
    """``should_stop()`` turned true between two micro-batches of an iteration, before its optimizer step."""


def batch_loss(
    run: StepRun, images: Tensor, labels: Tensor, iteration: int
) -> tuple[Tensor, dict[str, Tensor]]:
    """The weighted total to back-propagate for one (micro-)batch, and the terms to record: distillation
    terms as KL. ``iteration`` (iterations done so far) only names the place in the error on a non-finite
    loss."""
    floors: dict[str, Tensor] = {}
    with torch.autocast(
        run.device.type, dtype=run.amp_dtype or torch.float32, enabled=run.amp_dtype is not None
    ):
        terms = loss_terms(
            run.student,
            run.teacher,
            images,
            labels,
            new_classes=run.new_classes,
            pos_weight=run.pos_weight,
            config=run.config,
            fast=run.fast,
            floors=floors,
        )
    loss = weighted_total(terms, run.config.loss)
    if not torch.isfinite(loss):
        rate = "lr_base" if run.step_index == 0 else "lr_incremental"
        raise DivergedError(
            f"step {run.step_index}: the loss became {loss.item()} at iteration {iteration}; "
            f"lower train.{rate} (now {getattr(run.config.train, rate):g})"
        )
    return loss, {name: term.detach() - floors.get(name, 0.0) for name, term in terms.items()}


def train_iteration(
    run: StepRun,
    state: TrainingState,
    images: Tensor,
    labels: Tensor,
    *,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, float]:
    """One iteration on one batch (images (N, 3, H, W), labels (N, H, W)): forward and backward, in
    micro-batches after an OOM fallback, then the optimiser, scaler and schedule steps; ``state`` counts it.

    Returns the loss terms and "total". A stop seen between two micro-batches raises before the optimiser
    step, leaving ``state`` as the last completed iteration left it (gradients cleared).
    """
    optimizer, scaler = state.optimizer, state.scaler

    def between_micro_batches() -> None:
        # A stop need not wait for the rest of a batch that runs in several micro-batches.
        if should_stop is not None and should_stop():
            raise _StopRequested

    def forward_backward(x: Tensor, y: Tensor, micro_batch: int) -> tuple[Tensor, dict[str, Tensor]]:
        with run.fast.step_context():
            return accumulate_gradients(
                x,
                y,
                micro_batch,
                lambda xs, ys: batch_loss(run, xs, ys, state.iteration),
                lambda loss: scaler.scale(loss).backward(),
                between=between_micro_batches,
            )

    optimizer.zero_grad(set_to_none=True)
    try:
        _, terms = run.fallback.run(
            images, labels, forward_backward, reset=lambda: optimizer.zero_grad(set_to_none=True)
        )
    except _StopRequested:
        optimizer.zero_grad(set_to_none=True)
        raise
    return _optimizer_step(run, state, terms)


def _optimizer_step(run: StepRun, state: TrainingState, terms: Mapping[str, Tensor]) -> dict[str, float]:
    """The optimiser, scaler and schedule steps after the gradients of a whole batch; the recorded terms."""
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.scheduler.step()
    values = {name: float(term) for name, term in terms.items()}
    # The recorded total is the weighted sum of the recorded terms (the back-propagated one less the
    # weighted floors, a constant for the student), so that the two curves agree.
    values["total"] = float(weighted_total(terms, run.config.loss))
    state.record(values)
    return values


def train_step(
    *,
    model: DKDSegmenter,
    teacher: DKDSegmenter | None,
    dataset: Dataset,
    config: EngineConfig,
    step_index: int,
    device: torch.device,
    checkpoint_path: Path | None = None,
    resume: bool = True,
    progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    checkpoint_meta: Mapping[str, Any] | None = None,
    fast: FastPaths | None = None,
) -> TrainResult:
    """Train ``model`` for one step on ``dataset`` (items: (image (3, H, W), label (H, W)) with step labels).

    The model must already have its classifier for this step (``add_step`` done for t >= 1). With
    ``checkpoint_path`` set, a checkpoint is written every ``config.train.checkpoint_every`` iterations, at
    the step's end and when ``should_stop()`` turns true; with ``resume`` an existing checkpoint there is
    loaded first and training continues from its position. Returns when the step is done or stopped.
    ``fast`` (default: ``default_fast_paths(device)``, all on for CUDA) chooses how the step runs on the
    GPU without changing what it computes; with channels_last the model and teacher are left in that layout.
    """
    train = config.train
    fast = default_fast_paths(device) if fast is None else fast
    rank, world_size = _distributed()
    epochs = train.epochs_base if step_index == 0 else train.epochs_incremental
    sampler = _step_sampler(dataset, config, step_index, rank, world_size)
    clock = _StepClock(step_index, epochs, sampler.batches_per_epoch(), world_size)
    run, state = prepare_step(
        model=model,
        teacher=teacher,
        config=config,
        step_index=step_index,
        device=device,
        fast=fast,
        total_iterations=clock.total,
        world_size=world_size,
    )
    if checkpoint_path is not None and resume and checkpoint_path.exists():
        _resume(state, checkpoint_path, device, step_index)

    saved_at = state.iteration

    def write_checkpoint() -> None:
        nonlocal saved_at
        saved_at = state.iteration
        if checkpoint_path is not None and rank == 0:
            state.save(checkpoint_path, config=config, meta=checkpoint_meta)

    loader = _step_loader(dataset, sampler, train, device)
    log.info("step %d: %s", step_index, fast)
    clock.start(state.iteration)
    while state.epoch < epochs:
        sampler.set_epoch(state.epoch, start=state.done_in_epoch * sampler.batch_size)
        set_step_mode(model, step_index, config)
        batches = device_batches(loader, device, fast)
        if not _train_epoch(run, state, batches, clock, should_stop, progress, write_checkpoint):
            return _result(run, state, finished=False)
        state.end_epoch()
        # Not at every epoch end: epochs of a few iterations (small batch folders) made saving a large
        # share of a step. A multiple of checkpoint_every that falls on an epoch's last batch is saved
        # here, so no more than checkpoint_every iterations are ever unsaved.
        if state.epoch == epochs or state.iteration - saved_at >= train.checkpoint_every:
            write_checkpoint()
    return _result(run, state, finished=True)


def _train_epoch(
    run: StepRun,
    state: TrainingState,
    batches: Iterable[tuple[Tensor, Tensor]],
    clock: _StepClock,
    should_stop: Callable[[], bool] | None,
    progress: Callable[[Progress], None] | None,
    write_checkpoint: Callable[[], None],
) -> bool:
    """The rest of an epoch from where ``state`` stands, checkpointing every ``train.checkpoint_every``
    iterations but at its end; False when stopped (its checkpoint written)."""
    for images, labels in batches:  # (N, 3, H, W), (N, H, W) on the device
        try:
            if should_stop is not None and should_stop():
                raise _StopRequested
            values = train_iteration(run, state, images, labels, should_stop=should_stop)
        except _StopRequested:
            # An interrupted iteration's optimizer step never ran: the checkpoint holds the last completed
            # iteration's weights and position (at step 0 BatchNorm statistics have seen part of the
            # abandoned batch).
            write_checkpoint()
            return False
        if progress is not None:
            progress(clock.progress(run, state, values, images.shape[0]))
        if state.iteration % run.config.train.checkpoint_every == 0 and state.done_in_epoch < clock.per_epoch:
            write_checkpoint()
    return True


def _step_sampler(
    dataset: Dataset, config: EngineConfig, step_index: int, rank: int, world_size: int
) -> StepSampler:
    """This rank's sampler over the step's dataset; :class:`DataError` when step 0 has too few images."""
    n_images = len(cast(Sized, dataset))  # every dataset a step trains on is a map-style one with a length
    if step_index == 0 and n_images < 2 * world_size:
        # BatchNorm trains at step 0 and cannot normalise a batch of one image.
        raise DataError(f"step 0 has {n_images} training image(s); it needs at least {2 * world_size}")
    return StepSampler(
        n_images,
        config.train.step_batch_size(step_index),
        seed=config.train.seed,
        rank=rank,
        world_size=world_size,
    )


def _resume(state: TrainingState, checkpoint_path: Path, device: torch.device, step_index: int) -> None:
    state.restore(checkpoint_path, device)
    log.info(
        "step %d: resuming from %s at epoch %d, iteration %d",
        step_index,
        checkpoint_path,
        state.epoch,
        state.iteration,
    )


@dataclass
class _StepClock:
    """The step's length, and its speed since training (re)started, for the progress callback."""

    step_index: int
    epochs: int
    per_epoch: int  # iterations (batches) of one epoch on this rank
    world_size: int
    started: float = 0.0
    first_iteration: int = 0  # iterations already done when training (re)started

    @property
    def total(self) -> int:
        """Iterations of the whole step."""
        return self.epochs * self.per_epoch

    def start(self, iteration: int) -> None:
        self.started, self.first_iteration = time.monotonic(), iteration

    def progress(self, run: StepRun, state: TrainingState, values: dict[str, float], images: int) -> Progress:
        """What the callback receives after an iteration on a batch of ``images`` images on this rank."""
        elapsed = time.monotonic() - self.started
        rate = (state.iteration - self.first_iteration) / elapsed if elapsed > 0 else 0.0
        return Progress(
            step_index=self.step_index,
            epoch=state.epoch,
            epochs=self.epochs,
            iteration=state.iteration,
            total_iterations=self.total,
            losses=values,
            lr=state.optimizer.param_groups[0]["lr"],
            images_per_second=rate * images * self.world_size,
            eta_seconds=(self.total - state.iteration) / rate if rate > 0 else math.inf,
            micro_batch=run.fallback.micro_batch,
        )


def _result(run: StepRun, state: TrainingState, *, finished: bool) -> TrainResult:
    return TrainResult(
        finished=finished,
        iterations=state.iteration,
        history=state.history,
        micro_batch=run.fallback.micro_batch,
    )


def _step_loader(
    dataset: Dataset, sampler: StepSampler, train: TrainConfig, device: torch.device
) -> DataLoader:
    """One loader for the whole step: the sampler is re-read at every epoch's iter(), and workers persist."""
    workers = train.loader_workers(device.type)
    # A dedicated generator keeps the loader from drawing on the global RNG (dropout's), so resuming in
    # the middle of an epoch replays exactly the same random numbers as an uninterrupted run.
    return DataLoader(
        dataset,
        batch_size=sampler.batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(train.seed),
        drop_last=False,
        persistent_workers=workers > 0,
    )
