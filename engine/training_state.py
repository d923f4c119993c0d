"""The training state of one step: what a step carries from one iteration to the next, and what its
checkpoint holds.

:class:`TrainingState` holds the model, the optimiser, the learning-rate schedule, the gradient scaler, the
position in the step (epoch, batches done in it, iterations) and the loss sums; it saves and restores
itself, with every random generator, so that a resumed step goes on bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from engine.config import EngineConfig
from engine.model import DKDSegmenter

CHECKPOINT_FORMAT = 1


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
