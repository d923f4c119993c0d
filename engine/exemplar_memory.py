"""DKD-M, the optional exemplar memory (docs/method.md): a class-balanced choice of old images, and the
teacher's pseudo-labels that fill their background with confidently predicted old classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def build_memory(
    candidates: Sequence[set[int]], old_classes: Sequence[int], size: int, generator: torch.Generator
) -> list[int]:
    """Indices of a class-balanced exemplar memory (DKD-M, docs/method.md).

    Round-robin over a random order of the old classes; each turn takes one not yet chosen candidate that
    contains the class (candidates visited in a random order), until ``size`` are chosen or none is left.
    """
    class_order = [old_classes[i] for i in torch.randperm(len(old_classes), generator=generator).tolist()]
    visit = torch.randperm(len(candidates), generator=generator).tolist()
    queues = {c: [i for i in visit if c in candidates[i]] for c in class_order}
    heads = dict.fromkeys(class_order, 0)
    chosen: list[int] = []
    taken: set[int] = set()
    progress = True
    while len(chosen) < size and progress:
        progress = False
        for c in class_order:
            queue = queues[c]
            while heads[c] < len(queue) and queue[heads[c]] in taken:
                heads[c] += 1
            if heads[c] < len(queue):
                taken.add(queue[heads[c]])
                chosen.append(queue[heads[c]])
                progress = True
                if len(chosen) == size:
                    break
    return chosen


def pseudo_label(label: Tensor, teacher_logits: Tensor, threshold: float = 0.9) -> Tensor:
    """Fill background with the teacher's confident classes (DKD-M candidate sets, docs/method.md).

    label: (H, W) or (N, H, W) int64. teacher_logits: (1 + K, H, W) or (N, 1 + K, H, W) at full
    resolution, channel 0 the auxiliary classifier. A background pixel (label 0) whose top sigmoid score
    over classes 1..K is >= ``threshold`` takes the teacher's argmax class; other pixels keep their label.
    """
    batched = label.dim() == 3
    labels = label if batched else label.unsqueeze(0)  # (N, H, W)
    logits = teacher_logits if batched else teacher_logits.unsqueeze(0)  # (N, 1 + K, H, W)
    if logits.dim() != 4 or logits.shape[0] != labels.shape[0] or logits.shape[2:] != labels.shape[1:]:
        raise ValueError(
            f"pseudo_label: logits {tuple(teacher_logits.shape)} do not fit labels {tuple(label.shape)}"
        )
    if logits.shape[1] < 2:
        return label.clone()
    scores, best = torch.sigmoid(logits[:, 1:].float()).max(dim=1)  # (N, H, W) each
    filled = torch.where((labels == 0) & (scores >= threshold), best + 1, labels)
    return filled if batched else filled.squeeze(0)
