"""Setting a step up: everything a training step fixes before its first iteration.

The student as DDP sees it (:class:`StepModel`), the optimiser groups and the (warm-up) poly schedule of
docs/method.md, the BatchNorm and dropout modes and freezing of each step, the frozen teacher, the
autocast type, and :func:`prepare_step`, which puts them together into a :class:`StepRun` (what stays
fixed while the step trains) and a fresh :class:`~engine.training_state.TrainingState`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from engine.config import EngineConfig
from engine.fast import FastPaths, MicroBatchFallback
from engine.model import DKDSegmenter, SegOutput
from engine.training_state import TrainingState


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
    # fused: one kernel over every parameter instead of a Python loop of small ops per tensor; on a
    # 2-core CPU the update of ResNet-18 + ASPP (16M parameters) fell from about 105 ms to 26 ms.
    return torch.optim.SGD(groups, lr=lr, momentum=train.momentum, nesterov=train.nesterov, fused=True)


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
    warmup = train.warmup_fraction_base if step_index == 0 else train.warmup_fraction_incremental
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_poly(total_iterations, train.poly_power, warmup, train.warmup_factor)
    )
    amp_dtype = autocast_dtype(device, config, fast)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    # On CUDA OOM in the first iterations: halve the micro-batch, same effective batch. Single process only
    # (DDP ranks would disagree on their collectives); BatchNorm trains at step 0 and needs 2 images.
    fallback = MicroBatchFallback(
        train.step_batch_size(step_index),
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
