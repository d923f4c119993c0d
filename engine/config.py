"""Typed settings of the engine, checked once at construction and saved with every checkpoint and model.

Each component has one frozen dataclass. ``from_dict`` validates a plain mapping (from TOML or JSON)
and raises :class:`~engine.exceptions.ConfigError` naming the field and the allowed values.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, TypeVar

from engine.exceptions import ConfigError

BACKBONES = ("resnet101", "resnet50", "resnet18", "mobilenet_v3_large")
METHODS = ("dkd", "finetune", "kd", "kd_dkd_randinit")
SETTINGS = ("overlap", "disjoint")
AMP_DTYPES = ("float16", "bfloat16")

T = TypeVar("T")


def _check_choice(section: str, name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{section}.{name}: {value!r} is not one of {', '.join(map(str, allowed))}")


def _check_range(section: str, name: str, value: float, low: float, high: float | None = None) -> None:
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"between {low} and {high}"
        raise ConfigError(f"{section}.{name}: {value!r} must be {bound}")


@dataclass(frozen=True)
class ModelConfig:
    """The network: backbone, output stride and where backbone weights come from."""

    backbone: str = "resnet101"
    output_stride: int = 16
    # None (or "none" in a settings file): random init; "imagenet": torchvision's weight enum (needs a
    # download or a warm cache); "synthetic": pre-trained once on generated classes and cached
    # (engine.pretrain; the CPU settings);
    # any other string: path to a local backbone state-dict file loaded with weights_only=True.
    pretrained: str | None = None
    head_dropout: float = 0.1

    def __post_init__(self) -> None:
        _check_choice("model", "backbone", self.backbone, BACKBONES)
        _check_choice("model", "output_stride", self.output_stride, (8, 16))
        _check_range("model", "head_dropout", self.head_dropout, 0.0, 1.0)


@dataclass(frozen=True)
class LossConfig:
    """Weights of the loss terms of docs/method.md (1 mBCE + 5 KD + 5 DKD+ + 5 DKD- + 1 AC)."""

    mbce: float = 1.0
    kd: float = 5.0
    dkd_pos: float = 5.0
    dkd_neg: float = 5.0
    ac: float = 1.0
    pos_weight_base: float = 2.0  # VOC: 2 at step 0; ADE20K: 35
    pos_weight_incremental: float = 1.0  # VOC: 1 after step 0; ADE20K: 35

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_range("loss", f.name, getattr(self, f.name), 0.0)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and data settings of one step (reference values: PASCAL VOC)."""

    # dkd: full method; finetune: mBCE + AC only; kd: + KD; kd_dkd_randinit: KD + DKD, random new heads.
    method: str = "dkd"
    lr_base: float = 1e-3
    lr_incremental: float = 1e-4
    head_lr_mult: float = 10.0  # ASPP head and classifiers get this times the backbone rate
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    # The learning rate rises linearly from warmup_factor x over the first fraction of a step's iterations:
    # warmup_fraction_base at step 0, warmup_fraction_incremental later. ADE20K: 0.2 at every step and
    # 0.001 (the reference's WarmupPolyLR); VOC: 0, poly decay only.
    warmup_fraction_base: float = 0.0
    warmup_fraction_incremental: float = 0.0
    warmup_factor: float = 0.001
    epochs_base: int = 60
    epochs_incremental: int = 60
    batch_size: int = 32
    # Images per iteration at steps t >= 1; 0: batch_size. BatchNorm is frozen there, so a smaller batch
    # gives more updates for the same compute without noisier statistics (see step_batch_size).
    batch_size_incremental: int = 0
    crop_size: int = 512
    scale_min: float = 0.5
    scale_max: float = 2.0
    bn_momentum_base: float = 0.01
    amp: bool = True  # mixed precision on CUDA; evaluation always runs in float32
    # float16 with a gradient scaler, as the reference trains; bfloat16 (no scaler) where measured equal.
    amp_dtype: str = "float16"
    setting: str = "overlap"
    memory_size: int = 0  # DKD-M exemplar memory; 0 disables it
    seed: int = 0
    # "auto": min(8, CPU count) data-loading workers on CUDA (0 would starve the GPU), none on the CPU.
    num_workers: int | str = "auto"
    checkpoint_every: int = 200  # iterations between checkpoints (and one at the step's end)

    def __post_init__(self) -> None:
        _check_choice("train", "method", self.method, METHODS)
        _check_choice("train", "setting", self.setting, SETTINGS)
        _check_choice("train", "amp_dtype", self.amp_dtype, AMP_DTYPES)
        for name in ("warmup_fraction_base", "warmup_fraction_incremental"):
            _check_range("train", name, getattr(self, name), 0.0, 1.0)
        _check_range("train", "warmup_factor", self.warmup_factor, 0.0, 1.0)
        for name in ("lr_base", "lr_incremental", "head_lr_mult", "weight_decay", "poly_power"):
            _check_range("train", name, getattr(self, name), 0.0)
        _check_range("train", "momentum", self.momentum, 0.0, 1.0)
        for name in ("epochs_base", "epochs_incremental", "batch_size", "crop_size", "checkpoint_every"):
            _check_range("train", name, getattr(self, name), 1)
        _check_range("train", "batch_size_incremental", self.batch_size_incremental, 0)
        _check_range("train", "scale_min", self.scale_min, 0.01)
        if self.scale_max < self.scale_min:
            raise ConfigError(f"train.scale_max: {self.scale_max!r} must be >= train.scale_min")
        _check_range("train", "bn_momentum_base", self.bn_momentum_base, 0.0, 1.0)
        for name in ("memory_size", "seed"):
            _check_range("train", name, getattr(self, name), 0)
        if self.num_workers != "auto" and not (
            isinstance(self.num_workers, int)
            and not isinstance(self.num_workers, bool)
            and self.num_workers >= 0
        ):
            raise ConfigError(f'train.num_workers: {self.num_workers!r} must be "auto" or an integer >= 0')

    def loader_workers(self, device_type: str) -> int:
        """Data-loading worker processes on ``device_type`` ("cuda", "cpu"): ``num_workers`` resolved."""
        if self.num_workers != "auto":
            return int(self.num_workers)
        return min(8, os.cpu_count() or 1) if device_type == "cuda" else 0

    def step_batch_key(self, step_index: int) -> str:
        """The setting that holds step ``step_index``'s batch: ``batch_size`` at step 0, and after it
        ``batch_size_incremental`` where set (else ``batch_size``)."""
        return "batch_size_incremental" if step_index > 0 and self.batch_size_incremental else "batch_size"

    def step_batch_size(self, step_index: int) -> int:
        """Images per iteration at step ``step_index`` (see :meth:`step_batch_key`)."""
        return int(getattr(self, self.step_batch_key(step_index)))

    @property
    def use_kd(self) -> bool:
        return self.method in ("dkd", "kd", "kd_dkd_randinit")

    @property
    def use_dkd(self) -> bool:
        return self.method in ("dkd", "kd_dkd_randinit")

    @property
    def init_from_aux(self) -> bool:
        """Whether new heads start as copies of the auxiliary classifier (else random init)."""
        return self.method != "kd_dkd_randinit"


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs for a step; saved inside checkpoints and models."""

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineConfig:
        return cls(
            model=section_from_dict(ModelConfig, data.get("model", {}), "model"),
            loss=section_from_dict(LossConfig, data.get("loss", {}), "loss"),
            train=section_from_dict(TrainConfig, data.get("train", {}), "train"),
        )


def section_from_dict(cls: type[T], data: dict[str, Any], section: str) -> T:
    """Build one settings dataclass from a mapping, refusing unknown keys and values of the wrong type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{section}: expected a table of settings, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{section}.{unknown[0]}: unknown setting; allowed: {', '.join(fields)}")
    defaults = cls()
    values: dict[str, Any] = {}
    for name, value in data.items():
        expected = type(getattr(defaults, name))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if name == "pretrained" and value == "none":
            value = None  # TOML has no null: "none" asks for random init where the default names weights
        if name == "pretrained":
            ok = value is None or isinstance(value, str)
        elif name == "num_workers":
            ok = True  # "auto" or a count: __post_init__ says which values are allowed
        else:
            ok = isinstance(value, expected)
        if not ok or (expected is int and isinstance(value, bool)):
            raise ConfigError(f"{section}.{name}: {value!r} should be of type {expected.__name__}")
        values[name] = value
    return cls(**values)
