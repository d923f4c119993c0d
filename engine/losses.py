"""Every loss term of docs/method.md, side by side, and their weighted total.

Each term is binary cross-entropy with logits, averaged over (N, H, W) per channel and summed over the
channels it covers, i.e. the elementwise BCE summed and divided by N * H * W. Terms are computed in float32
whatever the input dtype, because mixed-precision training hands in float16 logits. Teacher tensors are
detached here, so a caller cannot let gradients reach the teacher by mistake.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.config import LossConfig

LOSS_TERMS = ("mbce", "kd", "dkd_pos", "dkd_neg", "ac")
# Terms whose target is a teacher's sigmoid: their BCE cannot fall below the target's own entropy.
DISTILLATION_TERMS = ("kd", "dkd_pos", "dkd_neg")


def _bce_per_pixel(logits: Tensor, targets: Tensor, pos_weight: Tensor | None = None) -> Tensor:
    """logits, targets (N, C, H, W) -> BCE summed over channels, averaged over N, H and W (scalar)."""
    n, _, h, w = logits.shape
    total = F.binary_cross_entropy_with_logits(
        logits.float(), targets.float(), pos_weight=pos_weight, reduction="sum"
    )
    return total / (n * h * w)


def _check_same_shape(name: str, student: Tensor, teacher: Tensor) -> None:
    if student.dim() != 4 or student.shape != teacher.shape:
        raise ValueError(
            f"{name}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} "
            "must both be (N, C, H, W) with the same shape"
        )


def mbce_loss(logits: Tensor, labels: Tensor, new_classes: Sequence[int], pos_weight: float) -> Tensor:
    """mBCE over the channels of the classes learnt in this step, at full resolution.

    logits (N, 1 + K, H, W), labels (N, H, W) int64, new_classes the class ids of C_t (channels of logits).
    The target of channel k is 1 where label == k and 0 elsewhere: background, other classes and the ignore
    value 255 are all negatives. ``pos_weight`` multiplies the positive term.
    """
    if logits.dim() != 4 or labels.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"mbce_loss: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} must be "
            "(N, 1 + K, H, W) and (N, H, W); upsample the logits to the label size first"
        )
    if not new_classes or not all(1 <= k < logits.shape[1] for k in new_classes):
        raise ValueError(
            f"mbce_loss: new_classes {list(new_classes)} must be class ids in 1..{logits.shape[1] - 1}"
        )
    class_ids = torch.as_tensor(list(new_classes), device=logits.device)  # (C_t,)
    targets = labels.unsqueeze(1) == class_ids.view(1, -1, 1, 1)  # (N, C_t, H, W)
    weight = torch.tensor(pos_weight, dtype=torch.float32, device=logits.device)
    return _bce_per_pixel(logits[:, class_ids], targets, pos_weight=weight)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """KD on old classes, full resolution: student and teacher (N, C_old, H, W), target sigmoid(teacher)."""
    _check_same_shape("kd_loss", student_logits, teacher_logits)
    return _bce_per_pixel(student_logits, torch.sigmoid(teacher_logits.detach().float()))


def dkd_loss(student_scores: Tensor, teacher_scores: Tensor) -> Tensor:
    """DKD+ or DKD- at feature resolution: student z+ (or z-) (N, C_old, h, w), target sigmoid(teacher's)."""
    _check_same_shape("dkd_loss", student_scores, teacher_scores)
    return _bce_per_pixel(student_scores, torch.sigmoid(teacher_scores.detach().float()))


def target_entropy(teacher_logits: Tensor) -> Tensor:
    """The floor of a distillation term: the binary entropy of sigmoid(teacher), averaged as the terms are.

    teacher_logits (N, C, H, W) -> scalar, no gradient. A distillation term minus its floor is the binary KL
    divergence KL(sigmoid(teacher) || sigmoid(student)): zero when the student matches, with the same
    gradient as the BCE. Training curves show that difference, because the BCE of a confident-but-unsure
    teacher sits near its floor (about 2.6 of a total near 16 for DKD+) and looks flat while it converges.
    """
    target = teacher_logits.detach().float()
    return _bce_per_pixel(target, torch.sigmoid(target))


def ac_loss(aux_logits: Tensor) -> Tensor:
    """AC on the auxiliary channel at full resolution: aux_logits (N, 1, H, W), target 0 at every pixel."""
    return _bce_per_pixel(aux_logits, torch.zeros_like(aux_logits, dtype=torch.float32))


def weighted_total(terms: Mapping[str, Tensor], weights: LossConfig) -> Tensor:
    """The loss of docs/method.md; a term absent from ``terms`` (step 0, ablations) counts as 0."""
    unknown = sorted(set(terms) - set(LOSS_TERMS))
    if not terms or unknown:
        raise ValueError(f"weighted_total: terms {sorted(terms)} must be a non-empty subset of {LOSS_TERMS}")
    zero = next(iter(terms.values())).new_zeros((), dtype=torch.float32)
    mbce, kd, dkd_pos, dkd_neg, ac = (terms.get(name, zero) for name in LOSS_TERMS)
    w = weights
    return w.mbce * mbce + w.kd * kd + w.dkd_pos * dkd_pos + w.dkd_neg * dkd_neg + w.ac * ac
