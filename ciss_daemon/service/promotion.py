"""The promotion gate and the atomic ``models/current`` pointer.

``models/<version>/`` folders are immutable once written. ``models/current`` is a symbolic link to one of
them, swapped with ``rename`` (atomic on POSIX), then the folder is fsynced, so after a power cut it points at
the old version or the new one, whole. Readers resolve the link once (``resolve_current``) and read every
file of the model from the folder it names, so a swap between two reads never mixes versions.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.atomic import fsync_dir

CURRENT = "current"


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str  # plain words, shown by `ciss status` and recorded in the catalog


def _value(metrics: dict[str, Any] | None, key: str) -> float:
    value = (metrics or {}).get(key)
    return math.nan if value is None else float(value)


def gate(
    candidate: dict[str, Any],
    current: dict[str, Any] | None,
    *,
    old_miou_budget: float,
    new_miou_floor: float,
    step_index: int,
) -> GateDecision:
    """Promote when old-class mIoU falls at most ``old_miou_budget`` below the current model's and the new
    classes reach ``new_miou_floor``. At step 0 there is no current model and every class is new: the base
    classes' mIoU (``miou_old`` at step 0: background and C_0) must reach the floor.
    """
    if step_index == 0 or current is None:
        base = _value(candidate, "miou_old")
        if not base >= new_miou_floor:
            return GateDecision(False, f"base mIoU {base:.3f} is below the floor {new_miou_floor:.3f}")
        return GateDecision(True, f"base mIoU {base:.3f} reaches the floor {new_miou_floor:.3f}")
    old, old_now, new = (
        _value(candidate, "miou_old"),
        _value(current, "miou_old"),
        _value(candidate, "miou_new"),
    )
    if not old >= old_now - old_miou_budget:
        return GateDecision(
            False,
            f"old-class mIoU {old:.3f} falls more than {old_miou_budget:.3f} below the current {old_now:.3f}",
        )
    if not new >= new_miou_floor:
        return GateDecision(False, f"new-class mIoU {new:.3f} is below the floor {new_miou_floor:.3f}")
    return GateDecision(True, f"old-class mIoU {old:.3f} (current {old_now:.3f}), new-class mIoU {new:.3f}")


def swap_current(models: Path, version: str) -> None:
    """Point ``models/current`` at ``models/<version>`` atomically and durably."""
    if not (models / version).is_dir():
        raise FileNotFoundError(f"{models / version} does not exist")
    tmp = models / f".{CURRENT}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(version, tmp)  # relative target: the workspace can move as a whole
    os.replace(tmp, models / CURRENT)
    fsync_dir(models)


def current_target(models: Path) -> str | None:
    """The version ``models/current`` names, or None when there is none yet."""
    try:
        return os.readlink(models / CURRENT)
    except (FileNotFoundError, OSError):
        return None


def resolve_current(models: Path) -> Path | None:
    """The folder of the current model, resolved once; read every file of the model from it."""
    target = current_target(models)
    return None if target is None else models / target
