"""Evaluation: the prediction rule, the confusion matrix, partial-label scoring and the summary numbers.

The prediction rule and the IoU formula are those of docs/method.md ("Prediction", "Evaluation"). The
partial-label scorer is docs/product.md's rule for batches labelled only for their own classes: a class
is scored on the held-out images of the batches that label it, and predictions of classes a batch does not
label are not counted against it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE = 255


def predict_labels(logits: Tensor) -> Tensor:
    """docs/method.md's label map: the most probable class if its probability exceeds 0.5, else background.

    ``logits`` is ``(N, 1 + K, H, W)``; channel 0 is the auxiliary classifier and is never predicted.
    Returns ``(N, H, W)`` int64 with values in ``0..K``.
    """
    class_logits = logits[:, 1:]  # (N, K, H, W)
    if class_logits.shape[1] == 0:
        return torch.zeros(logits.shape[0], *logits.shape[2:], dtype=torch.int64, device=logits.device)
    # sigmoid is monotonic and sigmoid(z) > 0.5 iff z > 0, so the rule is applied to the logits directly:
    # in half precision sigmoid saturates to 1.0 for large logits and would turn distinct scores into ties.
    best, index = class_logits.float().max(dim=1)  # (N, H, W) each
    return torch.where(best > 0, index + 1, torch.zeros_like(index))


def _all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over the ranks of the default process group; returns it unchanged without one."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    # NCCL only reduces CUDA tensors; counts are kept on the CPU between updates.
    device = (
        torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else tensor.device
    )
    buffer = tensor.to(device)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return buffer.to(tensor.device)


def _check_label_maps(target: Tensor, pred: Tensor) -> None:
    if target.shape != pred.shape or target.dim() != 3:
        raise ValueError(
            "target and pred must both be (N, H, W) label maps; "
            f"got {tuple(target.shape)} and {tuple(pred.shape)}"
        )


class ConfusionMatrix:
    """Pixel counts of (target class, predicted class) pairs over background and ``num_classes - 1`` classes.

    ``mat[i, j]`` counts pixels whose target is ``i`` and prediction ``j``. Counts live on the CPU as int64
    so that millions of pixels per image never overflow and merging across devices needs no care.
    """

    def __init__(self, num_classes: int) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 (background included), got {num_classes}")
        self.num_classes = num_classes
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64)  # (C, C)

    def update(self, target: Tensor, pred: Tensor, ignore_mask: Tensor | None = None) -> None:
        """Count the pixels of one batch; pixels with target 255 or ``ignore_mask`` True are skipped.

        ``target``, ``pred`` and ``ignore_mask`` are ``(N, H, W)``; target and pred hold class ids.
        """
        _check_label_maps(target, pred)
        keep = target != IGNORE  # (N, H, W)
        if ignore_mask is not None:
            keep &= ~ignore_mask.to(torch.bool)
        t = target[keep].long()  # (P,)
        p = pred[keep].long()  # (P,)
        c = self.num_classes
        if t.numel() and (t.min() < 0 or t.max() >= c or p.min() < 0 or p.max() >= c):
            raise ValueError(
                f"class ids must lie in 0..{c - 1} (or 255 in the target); got target "
                f"{int(t.min())}..{int(t.max())} and prediction {int(p.min())}..{int(p.max())}"
            )
        counts = torch.bincount(c * t + p, minlength=c * c)  # (C * C,)
        self.mat += counts.reshape(c, c).cpu()

    def merge(self, other: ConfusionMatrix) -> None:
        """Add the counts of ``other`` (same number of classes) to this matrix."""
        if other.num_classes != self.num_classes:
            raise ValueError(
                f"cannot merge a {other.num_classes}-class matrix into a {self.num_classes}-class one"
            )
        self.mat += other.mat

    def all_reduce(self) -> None:
        """Sum the counts over every rank when torch.distributed is initialised; no-op otherwise."""
        self.mat = _all_reduce_sum(self.mat)

    def iou(self) -> Tensor:
        """Per-class IoU ``TP / (TP + FP + FN)`` as ``(C,)`` float64; NaN where a class occurs nowhere."""
        mat = self.mat.double()
        tp = mat.diagonal()
        # 0 / 0 gives NaN for a class absent from both target and prediction, which the means skip.
        return tp / (mat.sum(dim=1) + mat.sum(dim=0) - tp)


class PartialLabelScorer:
    """IoU over evaluation groups (held-out sets of batches), each labelled for its own classes only.

    In a group labelling the set S:
    - a pixel of target 0 predicted as a class outside S is skipped: it may be an unlabelled object of
      that class, so it is neither a miss of background nor a false positive of the class;
    - a pixel of target k in S predicted as j outside S is a miss of k, never a false positive of j;
    - TP, FP and FN of class k come only from the groups that label k; background's come from every group.
    A fully labelled group (``labelled=None``, e.g. a ``kind = "eval"`` batch) labels every class.
    In every group, target ids >= ``num_classes`` (classes the scored model was not taught) count as
    background, the usual masking of unseen classes.

    Counts are kept as summed ``tp``, ``fp``, ``fn`` vectors ``(C,)``: IoU is a function of those sums only,
    so one confusion matrix per group need not be kept, and all_reduce is one small tensor.
    """

    def __init__(self, num_classes: int) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 (background included), got {num_classes}")
        self.num_classes = num_classes
        self.tp = torch.zeros(num_classes, dtype=torch.int64)  # (C,)
        self.fp = torch.zeros(num_classes, dtype=torch.int64)  # (C,)
        self.fn = torch.zeros(num_classes, dtype=torch.int64)  # (C,)
        self._groups: dict[str, frozenset[int] | None] = {}

    def _scored(self, labelled: Collection[int] | None) -> Tensor:
        """Boolean ``(C,)``: which classes a group with these labelled classes scores (background always)."""
        scored = torch.zeros(self.num_classes, dtype=torch.bool)
        if labelled is None:
            scored[:] = True
        else:
            ids = [k for k in labelled if k < self.num_classes]
            if any(k < 1 for k in ids):
                raise ValueError(
                    f"labelled classes must be ids >= 1 (0 is background); got {sorted(labelled)}"
                )
            scored[ids] = True
            scored[0] = True
        return scored

    def update(self, group: str, labelled: Collection[int] | None, target: Tensor, pred: Tensor) -> None:
        """Score one batch ``(N, H, W)`` of group ``group``, labelled for ``labelled`` (None: every class)."""
        _check_label_maps(target, pred)
        labelled_set = None if labelled is None else frozenset(int(k) for k in labelled)
        if self._groups.setdefault(group, labelled_set) != labelled_set:
            raise ValueError(
                f"group {group!r} was first scored as labelling {self._groups[group]} and now {labelled_set}"
            )
        scored = self._scored(labelled_set).to(target.device)  # (C,)
        target = target.long()
        pred = pred.long()
        # Unseen classes (ids the model was not taught) are background; 255 stays ignored.
        target = torch.where((target >= self.num_classes) & (target != IGNORE), 0, target)
        valid = target != IGNORE
        if bool((target < 0).any()):
            raise ValueError(f"group {group!r}: target ids must be >= 0 (or 255 for ignore)")
        if not bool(scored[target[valid]].all()):
            found = sorted(set(target[valid].unique().tolist()) - set(scored.nonzero().flatten().tolist()))
            raise ValueError(
                f"group {group!r} labels {sorted(labelled_set or [])} but its target contains {found}"
            )
        if pred.numel() and (pred.min() < 0 or pred.max() >= self.num_classes):
            raise ValueError(f"predictions must lie in 0..{self.num_classes - 1}")
        unknowable = (target == 0) & ~scored[pred]  # (N, H, W)
        matrix = ConfusionMatrix(self.num_classes)
        matrix.update(target, pred, ignore_mask=unknowable)
        mat = matrix.mat  # (C, C)
        tp = mat.diagonal()
        weight = scored.cpu().long()  # counts of unscored classes are not taken from this group
        self.tp += tp * weight
        self.fn += (mat.sum(dim=1) - tp) * weight
        self.fp += (mat.sum(dim=0) - tp) * weight

    def all_reduce(self) -> None:
        """Sum the counts over every rank when torch.distributed is initialised; no-op otherwise."""
        self.tp, self.fp, self.fn = _all_reduce_sum(torch.stack([self.tp, self.fp, self.fn])).unbind(0)

    def iou(self) -> Tensor:
        """Per-class IoU ``(C,)`` float64; NaN for a class with no pixel in any group that scores it."""
        tp = self.tp.double()
        return tp / (tp + self.fp + self.fn)


@dataclass
class Grouping:
    """mIoU of one split of the classes into old and new, and their harmonic mean."""

    miou_old: float
    miou_new: float
    hiou: float


@dataclass
class Metrics:
    """Per-class IoU and the summary numbers of docs/method.md; NaN marks a number that is undefined.

    Two groupings of the same IoUs: the fields ``miou_old``, ``miou_new`` and ``hiou`` are the gate's
    (old = background and every class before the step, new = the step's classes); ``paper`` is the
    paper's (old = background and the base classes C_0, new = every later class), which results compared
    with published figures must use. ``miou_all`` is the same in both.
    """

    iou: dict[int, float]  # class id (0 = background) -> IoU
    miou_old: float
    miou_new: float
    miou_all: float
    hiou: float
    paper: Grouping | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly form: class ids as strings, NaN as None; the paper grouping under "paper"."""
        data: dict[str, Any] = {
            "iou": {str(k): _clean(v) for k, v in self.iou.items()},
            "miou_old": _clean(self.miou_old),
            "miou_new": _clean(self.miou_new),
            "miou_all": _clean(self.miou_all),
            "hiou": _clean(self.hiou),
        }
        if self.paper is not None:
            data["paper"] = {name: _clean(value) for name, value in dataclasses.asdict(self.paper).items()}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Metrics:
        """The inverse of :meth:`to_dict` (metrics saved before the paper grouping existed have none)."""
        paper = data.get("paper")
        return cls(
            iou={int(k): _restore(v) for k, v in data["iou"].items()},
            miou_old=_restore(data["miou_old"]),
            miou_new=_restore(data["miou_new"]),
            miou_all=_restore(data["miou_all"]),
            hiou=_restore(data["hiou"]),
            paper=None if paper is None else Grouping(**{k: _restore(v) for k, v in paper.items()}),
        )


def _clean(value: float) -> float | None:
    return None if math.isnan(value) else value


def _restore(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _grouping(per_class: Mapping[int, float], old: Sequence[int], new: Sequence[int]) -> Grouping:
    """Means over ``old`` and ``new`` (NaN IoUs left out), and hIoU: NaN when either mean is NaN, 0 when
    both are 0."""
    miou_old = _nanmean([per_class[k] for k in old])
    miou_new = _nanmean([per_class[k] for k in new])
    if math.isnan(miou_old) or math.isnan(miou_new):
        hiou = math.nan
    elif miou_old + miou_new == 0:
        hiou = 0.0
    else:
        hiou = 2 * miou_old * miou_new / (miou_old + miou_new)
    return Grouping(miou_old, miou_new, hiou)


def summarize(
    iou: Tensor | Mapping[int, float],
    old_classes: Sequence[int],
    new_classes: Sequence[int],
    *,
    base_classes: Sequence[int] | None = None,
) -> Metrics:
    """mIoU over old, new and all classes, and their harmonic mean hIoU, in both groupings.

    ``iou`` maps class id to IoU (a ``(C,)`` tensor indexed by id, or a mapping). The gate's grouping:
    old is background plus ``old_classes``, new is ``new_classes``; the product passes every class before
    the current step as old and the step's classes as new. With ``base_classes`` (C_0) the paper's
    grouping is added too: old is background plus C_0, new every other class of ``old_classes`` and
    ``new_classes``. NaN IoUs (classes never seen in target nor prediction) are left out of the means. A
    mean over no defined value is NaN, and so is hIoU when either mean is NaN: at step 0 (no new classes)
    only the old and all means exist. hIoU is 0 when both means are 0.
    """
    old = [0, *old_classes]
    new = list(new_classes)
    ids = old + new
    if len(set(ids)) != len(ids) or any(k < 1 for k in ids[1:]):
        raise ValueError(f"old {list(old_classes)} and new {new} classes must be distinct ids >= 1")
    if base_classes is not None and not set(base_classes) <= set(ids[1:]):
        raise ValueError(f"base classes {list(base_classes)} must be among old and new classes {ids[1:]}")
    values = {int(k): float(v) for k, v in enumerate(iou.tolist())} if isinstance(iou, Tensor) else dict(iou)
    missing = [k for k in ids if k not in values]
    if missing:
        raise ValueError(f"no IoU given for classes {missing}")
    per_class = {k: float(values[k]) for k in sorted(ids)}
    gate = _grouping(per_class, old, new)
    paper = None
    if base_classes is not None:
        base = set(base_classes)
        paper = _grouping(per_class, [0, *sorted(base)], [k for k in sorted(ids[1:]) if k not in base])
    return Metrics(
        iou=per_class,
        miou_old=gate.miou_old,
        miou_new=gate.miou_new,
        miou_all=_nanmean(list(per_class.values())),
        hiou=gate.hiou,
        paper=paper,
    )


def paper_view(m: Metrics, base: Sequence[int], later: Sequence[int]) -> Metrics:
    """``m`` regrouped as the paper does after a protocol: old = background + ``base`` (C_0), new = ``later``.

    A class ``m`` has no IoU for (a model that was never taught it, e.g. the base model) scores 0.
    """
    iou = {k: m.iou.get(k, 0.0) for k in [0, *base, *later]}
    return summarize(iou, base, later, base_classes=base)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader_groups: Sequence[tuple[str, Collection[int] | None, Iterable]],
    num_classes: int,
    device: torch.device,
    *,
    autocast: bool = False,
) -> Tensor:
    """Per-class IoU ``(C,)`` of ``model`` over evaluation groups, scored with :class:`PartialLabelScorer`.

    Each group is ``(name, labelled classes or None for fully labelled, loader)``; a loader yields
    ``(images (N, 3, H, W), labels (N, H, W))`` pairs (further items are ignored). ``model(images)`` returns
    an object whose ``.logits`` is ``(N, 1 + K, h, w)``; they are upsampled to the label size before the
    prediction rule. Counts are summed over ranks under DDP. The model runs in eval mode and every
    submodule gets its own previous mode back afterwards (so BatchNorm layers frozen for training stay so).
    """
    modes = {module: module.training for module in model.modules()}
    model.eval()
    scorer = PartialLabelScorer(num_classes)
    try:
        for group, labelled, loader in loader_groups:
            for batch in loader:
                images = batch[0].to(device, non_blocking=True)  # (N, 3, H, W)
                labels = batch[1].to(device, non_blocking=True).long()  # (N, H, W)
                with torch.autocast(device_type=device.type, enabled=autocast):
                    logits = model(images).logits  # (N, 1 + K, h, w)
                logits = F.interpolate(
                    logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False
                )
                scorer.update(group, labelled, labels, predict_labels(logits))
    finally:
        for module, training in modes.items():
            module.training = training
    scorer.all_reduce()
    return scorer.iou()
