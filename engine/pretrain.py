"""A backbone pre-trained once on generated classes and cached: the CPU stand-in for ImageNet weights.

The paper starts every run from an ImageNet-pretrained backbone, so new classes arrive into features
that already separate shapes, colours and textures; a backbone trained from scratch on a few base
classes does not, and distillation then holds those poor features in place (docs/benchmarks.md).
``model.pretrained = "synthetic"`` gives the CPU settings the same footing without a download: the
backbone is trained once on :data:`engine.synthetic.PRETRAINING_CLASSES` (the same primitives as the
generated protocol classes, in combinations none of them uses) and cached. Later runs load the file.

The cache folder is ``$CISS_CACHE_DIR``, else ``$XDG_CACHE_HOME/ciss``, else ``~/.cache/ciss``.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from engine.config import EngineConfig, LossConfig, ModelConfig, TrainConfig
from engine.data import batch_dataset
from engine.exceptions import CheckpointError
from engine.synthetic import PRETRAINING_CLASSES, generate_pretraining_batch
from engine.transforms import TrainTransform

if TYPE_CHECKING:  # engine.model reads the cached backbone from here
    from engine.model import DKDSegmenter

log = logging.getLogger("ciss.engine.pretrain")


@dataclass(frozen=True)
class PretrainRecipe:
    """How the cached backbone is trained: a base step of docs/method.md on the pre-training classes."""

    images: int = 256
    image_size: int = 64
    epochs: int = 12
    batch_size: int = 16
    lr: float = 1e-2
    seed: int = 0


def cache_dir() -> Path:
    """Where pre-trained backbones are kept (see the module docstring)."""
    if os.environ.get("CISS_CACHE_DIR"):
        return Path(os.environ["CISS_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ciss"


def backbone_file(
    backbone: str, output_stride: int, cache: Path, recipe: PretrainRecipe | None = None
) -> Path:
    """The cache file of one backbone, named by everything that changes its weights."""
    recipe = recipe or PretrainRecipe()
    key = json.dumps(
        {
            "backbone": backbone,
            "output_stride": output_stride,
            "recipe": dataclasses.asdict(recipe),
            "classes": [c.name for c in PRETRAINING_CLASSES],
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache / "backbones" / f"synthetic-{backbone}-os{output_stride}-{digest}.pt"


def pretrain_config(backbone: str, output_stride: int, recipe: PretrainRecipe) -> EngineConfig:
    """Step-0 settings of the pre-training run: those of a randomly initialised backbone on a CPU."""
    return EngineConfig(
        model=ModelConfig(backbone=backbone, output_stride=output_stride, pretrained=None),
        loss=LossConfig(),
        train=TrainConfig(
            lr_base=recipe.lr,
            epochs_base=recipe.epochs,
            batch_size=recipe.batch_size,
            crop_size=recipe.image_size,
            bn_momentum_base=0.1,
            amp=False,
            seed=recipe.seed,
        ),
    )


def synthetic_backbone(
    backbone: str,
    output_stride: int,
    *,
    recipe: PretrainRecipe | None = None,
    cache: Path | None = None,
    device: torch.device | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """The path of the backbone state dict pre-trained on generated classes; trains it on first use.

    Concurrent callers wait on a lock file, so the backbone is trained once. ``progress(done, total)``
    is called after every iteration of that training.
    """
    recipe = recipe or PretrainRecipe()
    cache = cache or cache_dir()
    target = backbone_file(backbone, output_stride, cache, recipe)
    if target.is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = open(target.with_suffix(".lock"), "w")  # noqa: SIM115 (held until the file is written)
    except OSError as error:
        raise CheckpointError(
            f"{target.parent}: cannot write the pre-trained backbone cache ({error.strerror}); "
            "set CISS_CACHE_DIR to a writable folder"
        ) from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file():  # another process trained it while this one waited
            return target
        device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        log.info(
            "pre-training a %s backbone on %d generated classes, once; cached in %s",
            backbone,
            len(PRETRAINING_CLASSES),
            target,
        )
        model = _pretrain(pretrain_config(backbone, output_stride, recipe), recipe, device, progress)
        staged = target.with_suffix(".tmp")
        torch.save({k: v.cpu() for k, v in model.backbone.state_dict().items()}, staged)
        os.replace(staged, target)
    return target


def _pretrain(
    config: EngineConfig,
    recipe: PretrainRecipe,
    device: torch.device,
    progress: Callable[[int, int], None] | None,
) -> DKDSegmenter:
    """A model trained as step 0 on a generated batch of :data:`PRETRAINING_CLASSES` (in a scratch folder)."""
    from engine.model import build_model
    from engine.train import train_step

    with tempfile.TemporaryDirectory(prefix="ciss-pretrain-") as scratch:
        folder = generate_pretraining_batch(
            Path(scratch), images=recipe.images, image_size=recipe.image_size, seed=recipe.seed
        )
        classes = {k: k for k in range(1, len(PRETRAINING_CLASSES) + 1)}
        dataset = batch_dataset([(folder, classes)], "train", TrainTransform(recipe.image_size))
        torch.manual_seed(recipe.seed)
        model = build_model(config.model, [len(PRETRAINING_CLASSES)])
        train_step(
            model=model,
            teacher=None,
            dataset=dataset,
            config=config,
            step_index=0,
            device=device,
            progress=None if progress is None else lambda p: progress(p.iteration, p.total_iterations),
        )
    return model
