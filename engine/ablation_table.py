"""The ablation's results as figures and a table: the share of the fine-tuning-to-joint gap a method
closes, the mean and spread over seeds, and the Markdown of ``results.md`` (paper grouping).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from engine.config import EngineConfig
from engine.evaluate import Metrics

if TYPE_CHECKING:  # engine.experiment runs the ablation and imports this module
    from engine.experiment import AblationData

ABLATION_METHODS = ("finetune", "kd", "kd_dkd_randinit", "dkd")
METHOD_LABELS = {
    "base": "base model (step 0)",
    "joint": "joint training (every class at once)",
    "finetune": "fine-tuning (mBCE + AC)",
    "kd": "+ KD",
    "kd_dkd_randinit": "+ KD + DKD, random new-head init",
    "dkd": "DKD (KD + DKD + AC init)",
}


def gap_closure(final: Mapping[str, Metrics], method: str = "dkd") -> float:
    """The share of the gap from fine-tuning to joint training in mIoU all that ``method`` closes."""
    low, high = final["finetune"].miou_all, final["joint"].miou_all
    return (final[method].miou_all - low) / (high - low) if high != low else math.nan


def ablation_markdown(
    runs: Mapping[int, Mapping[str, Metrics]], data: AblationData, config: EngineConfig
) -> str:
    """The ablation table: mean and spread (min-max) over seeds of each figure, paper grouping."""
    names = ["base", *ABLATION_METHODS, "joint"]
    lines = [
        f"Protocol {data.protocol}, {data.train_per_step} training images per step at {data.image_size} px, "
        f"{data.eval_images}-image evaluation set, {data.objects[0]} to {data.objects[1]} objects an image; "
        f"seeds {', '.join(map(str, runs))}; after the last step; "
        "paper grouping (old = background + base classes, new = later classes); mean [min-max] over seeds.",
        "",
        "| method | mIoU old | mIoU new | mIoU all | hIoU |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        cells = []
        for field in ("miou_old", "miou_new", "miou_all", "hiou"):
            # mIoU all is the same in both groupings; old, new and hIoU are the paper's.
            values = [
                getattr(final[name] if field == "miou_all" else final[name].paper, field)
                for final in runs.values()
            ]
            cells.append(spread(values))
        lines.append(f"| {METHOD_LABELS.get(name, name)} | {' | '.join(cells)} |")
    closures = [gap_closure(final) for final in runs.values()]
    lines += [
        "",
        f"DKD closes {spread(closures)} % of the gap from fine-tuning to joint training (mIoU all).",
    ]
    return "\n".join(lines) + "\n"


def spread(values: Sequence[float]) -> str:
    """``mean [min-max]`` in percent, NaNs left out."""
    finite = [v for v in values if v == v]
    if not finite:
        return "-"
    mean = sum(finite) / len(finite)
    if len(finite) == 1:
        return f"{100 * mean:.1f}"
    return f"{100 * mean:.1f} [{100 * min(finite):.1f}-{100 * max(finite):.1f}]"
