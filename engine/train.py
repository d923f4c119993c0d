"""Training of one step: base step (t = 0) and incremental step (t >= 1) as plain functions.

``train_step`` runs the whole optimisation of docs/method.md for one step: SGD with Nesterov momentum, poly
decay per iteration, 10x learning rate on the head and classifiers, the weight-decay rule, BatchNorm momentum
0.01 at step 0 and frozen BatchNorm and dropout afterwards, the frozen teacher, mixed precision on CUDA. It
writes atomic checkpoints that hold everything needed to resume bit-for-bit (model, optimiser, scheduler,
scaler, RNG states, position in the epoch) and resumes from one. Under ``torchrun`` it shards the data, uses
SyncBatchNorm where BatchNorm trains, and only rank 0 writes.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from engine.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from engine.config import EngineConfig
from engine.exceptions import DataError
from engine.fast import (  # GPU fast paths (issue: GPU speed and scale)
    FastPaths,
    MicroBatchFallback,
    accumulate_gradients,
    default_fast_paths,
    device_batches,
)
from engine.losses import ac_loss, dkd_loss, kd_loss, mbce_loss, target_entropy, weighted_total
from engine.model import DKDSegmenter, SegOutput, upsample
from engine.sampling import StepSampler

CHECKPOINT_FORMAT = 1
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


class StepModel(nn.Module):
    """The student as DDP sees it: one forward that also returns the reasoning scores of the old classes.

    Computing z+ and z- inside ``forward`` keeps every use of the classifier weights inside the module that
    DistributedDataParallel wraps, so its gradient hooks see them.
    """

    def __init__(self, model: DKDSegmenter, num_old: int) -> None:
        super().__init__()
        self.model = model
        self.num_old = num_old

    def forward(self, images: Tensor) -> tuple[SegOutput, Tensor | None, Tensor | None]:
        out = self.model(images)
        if self.num_old == 0:
            return out, None, None
        pos, neg = self.model.reasoning_scores(out.features, self.num_old)  # (N, num_old, h, w) each
        return out, pos, neg


def new_class_ids(step_sizes: list[int]) -> list[int]:
    """Global ids of the classes the last step of ``step_sizes`` introduces."""
    first = sum(step_sizes[:-1]) + 1
    return list(range(first, first + step_sizes[-1]))


def build_optimizer(model: DKDSegmenter, config: EngineConfig, step_index: int) -> torch.optim.SGD:
    """SGD with the learning-rate and weight-decay groups of docs/method.md.

    Backbone at the base rate; ASPP head and every classifier at ``head_lr_mult`` times it. Weight decay on
    everything at step 0; at t >= 1 only on the new classifier g_t, and every BatchNorm weight and bias
    stays out of the optimiser (as the step t - 1 left them; :func:`freeze_batchnorm_affine` also stops
    their gradients).
    """
    train = config.train
    lr = train.lr_base if step_index == 0 else train.lr_incremental
    decay = train.weight_decay if step_index == 0 else 0.0
    backbone, head, newest = model.parameter_groups(freeze_bn_affine=step_index > 0)
    groups = [
        {"params": backbone, "lr": lr, "weight_decay": decay},
        {"params": head, "lr": lr * train.head_lr_mult, "weight_decay": decay},
        {"params": newest, "lr": lr * train.head_lr_mult, "weight_decay": train.weight_decay},
    ]
    return torch.optim.SGD(groups, lr=lr, momentum=train.momentum, nesterov=train.nesterov)


def set_step_mode(model: DKDSegmenter, step_index: int, config: EngineConfig) -> None:
    """Put the student in the training mode of its step.

    Step 0: everything trains, backbone BatchNorm with momentum ``bn_momentum_base``. Step t >= 1: every
    BatchNorm in eval mode (its affine parameters are frozen once by :func:`freeze_batchnorm_affine`) and
    dropout off.
    """
    model.train()
    if step_index == 0:
        for module in model.backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = config.train.bn_momentum_base
        return
    for module in model.modules():
        if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.Dropout)):
            module.eval()


def freeze_batchnorm_affine(model: nn.Module) -> None:
    """Stop the gradients of every BatchNorm weight and bias (t >= 1, as the reference does).

    Called before DistributedDataParallel wraps the model, which registers only parameters that need
    gradients.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.requires_grad_(False)


def freeze_teacher(teacher: DKDSegmenter) -> DKDSegmenter:
    """The previous step's model, frozen: eval mode and no gradients."""
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


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


def autocast_dtype(device: torch.device, config: EngineConfig, fast: FastPaths) -> torch.dtype | None:
    """The autocast type of training: ``train.amp_dtype`` on CUDA (float16 with a gradient scaler, as
    the reference; bfloat16 where chosen and supported); on the CPU bfloat16 only when
    ``fast.bf16_autocast`` asks (tests of the mixed-precision path), else none."""
    if not config.train.amp:
        return None
    if device.type != "cuda":
        return torch.bfloat16 if fast.bf16_autocast else None
    if config.train.amp_dtype == "bfloat16" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def warmup_poly(
    total: int, power: float, warmup_fraction: float, warmup_factor: float
) -> Callable[[int], float]:
    """The learning-rate factor at iteration ``i`` of ``total``: poly decay ``(1 - i / total) ** power``,
    times a linear warm-up from ``warmup_factor`` to 1 over the first ``warmup_fraction`` of the
    iterations (the reference's WarmupPolyLR; no warm-up when the fraction is 0)."""
    warmup = warmup_fraction * total

    def factor(i: int) -> float:
        ramp = warmup_factor + (1 - warmup_factor) * i / warmup if i < warmup else 1.0
        return ramp * max(0.0, 1 - i / total) ** power

    return factor


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _StopRequested(Exception):
    """``should_stop()`` turned true between two micro-batches of an iteration, before its optimizer step."""


@dataclass
class TrainingState:
    """What a step's training carries from one iteration to the next: what a checkpoint holds.

    The model, the optimiser, the learning-rate schedule, the gradient scaler, the position in the step
    (epoch, batches done in it, iterations) and the loss sums; :meth:`save` and :meth:`restore` write and
    read it, with every random generator, so a resumed step goes on bit for bit.
    """

    model: DKDSegmenter
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    epoch: int = 0
    done_in_epoch: int = 0  # batches of the current epoch already trained
    iteration: int = 0  # iterations done in this step
    history: list[dict[str, float]] = field(default_factory=list)  # mean loss terms per finished epoch
    sums: dict[str, float] = field(default_factory=dict)  # loss sums of the current epoch, "_count" too

    def save(self, path: Path, *, config: EngineConfig, meta: Mapping[str, Any] | None = None) -> None:
        state = {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "position": {"epoch": self.epoch, "batch": self.done_in_epoch, "iteration": self.iteration},
            "history": self.history,
            "epoch_sums": self.sums,
            "rng": rng_state(),
            "config": config.to_dict(),
            "step_sizes": list(self.model.step_sizes),
            "meta": dict(meta or {}),
        }
        save_checkpoint(path, state)

    def restore(self, path: Path, device: torch.device) -> None:
        state = load_checkpoint(path, map_location=device)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        position = state["position"]
        self.epoch, self.done_in_epoch, self.iteration = (
            int(position[k]) for k in ("epoch", "batch", "iteration")
        )
        self.history = [dict(h) for h in state["history"]]
        self.sums = dict(state["epoch_sums"])
        set_rng_state(state["rng"])

    def record(self, values: Mapping[str, float]) -> None:
        """Count one finished iteration and add its loss terms to the epoch's sums."""
        self.iteration += 1
        self.done_in_epoch += 1
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.sums["_count"] = self.sums.get("_count", 0.0) + 1.0

    def end_epoch(self) -> None:
        count = self.sums.pop("_count", 1.0)
        self.history.append({name: value / count for name, value in self.sums.items()})
        self.sums = {}
        self.epoch, self.done_in_epoch = self.epoch + 1, 0


@dataclass
class StepRun:
    """What stays fixed while one step trains: the student and teacher as they run, and the loss rules."""

    student: nn.Module  # StepModel, inside DDP with several ranks, compiled with the fast path
    teacher: DKDSegmenter | None  # frozen, compiled with the fast path
    config: EngineConfig
    fast: FastPaths
    device: torch.device
    step_index: int
    new_classes: list[int]
    pos_weight: float
    amp_dtype: torch.dtype | None
    fallback: MicroBatchFallback  # micro-batches after a CUDA OOM in the first iterations


def prepare_step(
    *,
    model: DKDSegmenter,
    teacher: DKDSegmenter | None,
    config: EngineConfig,
    step_index: int,
    device: torch.device,
    fast: FastPaths,
    total_iterations: int,
    world_size: int = 1,
) -> tuple[StepRun, TrainingState]:
    """Everything a step sets up before its first iteration: frozen teacher and BatchNorm affine, memory
    format, DDP and compilation, optimiser groups, the (warm-up) poly schedule, autocast and scaler."""
    train = config.train
    if teacher is not None:
        freeze_teacher(teacher)
    model.to(device)
    if step_index > 0:
        freeze_batchnorm_affine(model)
    # Before DDP, whose gradient buckets take the parameters' strides.
    fast.apply_memory_format(model, teacher)
    new_classes = new_class_ids(model.step_sizes)
    student: nn.Module = StepModel(model, num_old=new_classes[0] - 1 if teacher is not None else 0)
    if world_size > 1:
        # BatchNorm trains only at step 0 (later steps freeze it). SyncBatchNorm needs GPUs; CPU processes
        # (gloo) keep per-process statistics, which DDP's buffer broadcast keeps equal to rank 0's.
        if step_index == 0 and device.type == "cuda":
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        student = nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = build_optimizer(model, config, step_index)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_poly(total_iterations, train.poly_power, train.warmup_fraction, train.warmup_factor)
    )
    amp_dtype = autocast_dtype(device, config, fast)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    # On CUDA OOM in the first iterations: halve the micro-batch, same effective batch. Single process only
    # (DDP ranks would disagree on their collectives); BatchNorm trains at step 0 and needs 2 images.
    fallback = MicroBatchFallback(
        train.batch_size,
        min_size=2 if step_index == 0 else 1,
        window=fast.oom_window,
        enabled=fast.oom_fallback and world_size == 1,
    )
    run = StepRun(
        student=fast.compiled(student),
        teacher=fast.compiled(teacher),
        config=config,
        fast=fast,
        device=device,
        step_index=step_index,
        new_classes=new_classes,
        pos_weight=config.loss.pos_weight_base if step_index == 0 else config.loss.pos_weight_incremental,
        amp_dtype=amp_dtype,
        fallback=fallback,
    )
    return run, TrainingState(model, optimizer, scheduler, scaler)


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
    fast, optimizer, scaler = run.fast, state.optimizer, state.scaler

    def batch_loss(x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted total to back-propagate, and the terms to record: distillation terms as KL."""
        floors: dict[str, Tensor] = {}
        with torch.autocast(
            run.device.type, dtype=run.amp_dtype or torch.float32, enabled=run.amp_dtype is not None
        ):
            terms = loss_terms(
                run.student,
                run.teacher,
                x,
                y,
                new_classes=run.new_classes,
                pos_weight=run.pos_weight,
                config=run.config,
                fast=fast,
                floors=floors,
            )
        loss = weighted_total(terms, run.config.loss)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"step {run.step_index}: the loss became {loss.item()} at iteration {state.iteration}; "
                "lower the learning rate in [train]"
            )
        return loss, {name: term.detach() - floors.get(name, 0.0) for name, term in terms.items()}

    def between_micro_batches() -> None:
        # A stop need not wait for the rest of a batch that runs in several micro-batches.
        if should_stop is not None and should_stop():
            raise _StopRequested

    def forward_backward(x: Tensor, y: Tensor, micro_batch: int) -> tuple[Tensor, dict[str, Tensor]]:
        with fast.step_context():
            return accumulate_gradients(
                x,
                y,
                micro_batch,
                batch_loss,
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
    scaler.step(optimizer)
    scaler.update()
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
    every epoch end and when ``should_stop()`` turns true; with ``resume`` an existing checkpoint there is
    loaded first and training continues from its position. Returns when the step is done or stopped.
    ``fast`` (default: ``default_fast_paths(device)``, all on for CUDA) chooses how the step runs on the
    GPU without changing what it computes; with channels_last the model and teacher are left in that layout.
    """
    train = config.train
    fast = default_fast_paths(device) if fast is None else fast
    rank, world_size = _distributed()
    epochs = train.epochs_base if step_index == 0 else train.epochs_incremental
    n_images = len(cast(Sized, dataset))  # every dataset a step trains on is a map-style one with a length
    if step_index == 0 and n_images < 2 * world_size:
        # BatchNorm trains at step 0 and cannot normalise a batch of one image.
        raise DataError(f"step 0 has {n_images} training image(s); it needs at least {2 * world_size}")
    sampler = StepSampler(n_images, train.batch_size, seed=train.seed, rank=rank, world_size=world_size)
    per_epoch = sampler.batches_per_epoch()
    total = epochs * per_epoch
    run, state = prepare_step(
        model=model,
        teacher=teacher,
        config=config,
        step_index=step_index,
        device=device,
        fast=fast,
        total_iterations=total,
        world_size=world_size,
    )
    if checkpoint_path is not None and resume and checkpoint_path.exists():
        state.restore(checkpoint_path, device)
        log.info(
            "step %d: resuming from %s at epoch %d, iteration %d",
            step_index,
            checkpoint_path,
            state.epoch,
            state.iteration,
        )

    def write_checkpoint() -> None:
        if checkpoint_path is not None and rank == 0:
            state.save(checkpoint_path, config=config, meta=checkpoint_meta)

    def stopped() -> TrainResult:
        write_checkpoint()
        return TrainResult(
            finished=False,
            iterations=state.iteration,
            history=state.history,
            micro_batch=run.fallback.micro_batch,
        )

    loader = _step_loader(
        dataset, sampler, train.batch_size, train.seed, train.loader_workers(device.type), device
    )
    log.info("step %d: %s", step_index, fast)
    started, first_iteration = time.monotonic(), state.iteration
    while state.epoch < epochs:
        sampler.set_epoch(state.epoch, start=state.done_in_epoch * train.batch_size)
        set_step_mode(model, step_index, config)
        for images, labels in device_batches(loader, device, fast):
            if should_stop is not None and should_stop():
                return stopped()
            try:
                values = train_iteration(run, state, images, labels, should_stop=should_stop)
            except _StopRequested:
                # Its optimizer step never ran: the checkpoint holds the last completed iteration's weights
                # and position (at step 0 BatchNorm statistics have seen part of the abandoned batch).
                return stopped()
            if progress is not None:
                elapsed = time.monotonic() - started
                rate = (state.iteration - first_iteration) / elapsed if elapsed > 0 else 0.0
                progress(
                    Progress(
                        step_index=step_index,
                        epoch=state.epoch,
                        epochs=epochs,
                        iteration=state.iteration,
                        total_iterations=total,
                        losses=values,
                        lr=state.optimizer.param_groups[0]["lr"],
                        images_per_second=rate * images.shape[0] * world_size,
                        eta_seconds=(total - state.iteration) / rate if rate > 0 else math.inf,
                        micro_batch=run.fallback.micro_batch,
                    )
                )
            if state.iteration % train.checkpoint_every == 0 and state.done_in_epoch < per_epoch:
                write_checkpoint()
        state.end_epoch()
        write_checkpoint()
    return TrainResult(
        finished=True, iterations=state.iteration, history=state.history, micro_batch=run.fallback.micro_batch
    )


def _step_loader(
    dataset: Dataset, sampler: StepSampler, batch_size: int, seed: int, workers: int, device: torch.device
) -> DataLoader:
    """One loader for the whole step: the sampler is re-read at every epoch's iter(), and workers persist."""
    # A dedicated generator keeps the loader from drawing on the global RNG (dropout's), so resuming in
    # the middle of an epoch replays exactly the same random numbers as an uninterrupted run.
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(seed),
        drop_last=False,
        persistent_workers=workers > 0,
    )
