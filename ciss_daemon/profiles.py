"""The settings ``ciss init`` writes for the machine it runs on, and the check that they fit it.

On a GPU box: the paper's settings (ResNet-101 from ImageNet weights, crop 512, batch 32). Without a GPU
those run at a fraction of an image per second with tens of GB resident, so ``ciss init`` writes the demo's
CPU settings there instead (a ResNet-18 from scratch on small crops), and ``ciss daemon`` warns when
GPU-sized settings meet a CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ciss_daemon.exceptions import SettingsError
from ciss_daemon.settings import Settings, default_settings_toml, parse_settings
from engine.config import EngineConfig, ModelConfig, TrainConfig

PROFILES = ("auto", "gpu", "cpu")
# Backbones and crops a CPU cannot train in useful time (measured: ResNet-101 at crop 512, 0.13 images/s).
GPU_BACKBONES = ("resnet101", "resnet50")
GPU_CROP = 256


def batch_words(train: TrainConfig) -> str:
    """The batch in words: "batch 32", or "batch 4 (1 after step 0)" where later steps have their own."""
    later = f" ({train.batch_size_incremental} after step 0)" if train.batch_size_incremental else ""
    return f"batch {train.batch_size}{later}"


@dataclass(frozen=True)
class Profile:
    name: str  # "gpu" or "cpu"
    engine: EngineConfig
    description: str  # one line, printed by `ciss init` and written into ciss.toml

    def settings_text(self) -> str:
        return default_settings_toml(self.engine, profile=self.description)


def gpu_profile(found: str = "") -> Profile:
    """The paper's settings, with its ImageNet-initialised backbone; ``found`` prefixes the description."""
    engine = EngineConfig(model=ModelConfig(pretrained="imagenet"))
    m, t = engine.model, engine.train
    return Profile(
        "gpu",
        engine,
        f"{found}GPU settings of the paper: {m.backbone} from ImageNet weights, crop {t.crop_size}, "
        + batch_words(t),
    )


def cpu_profile(found: str = "") -> Profile:
    """The settings ``ciss demo`` trains with on a CPU (its [model], [loss] and [train] sections)."""
    from ciss_daemon.demo import plan

    engine = parse_settings(plan(incremental=2, quick=False).settings, source="the demo's settings").engine
    m, t = engine.model, engine.train
    return Profile(
        "cpu",
        engine,
        f"{found}CPU settings of `ciss demo`: {m.backbone}, crop {t.crop_size}, {batch_words(t)}; "
        "`ciss init --profile gpu` writes the paper's GPU settings",
    )


def cuda_available() -> bool:
    """Whether torch sees a CUDA device (imports torch: for `ciss init`, not for the daemon's loop)."""
    import torch

    return torch.cuda.is_available()


def choose_profile(name: str) -> Profile:
    """The profile called ``name``: gpu, cpu, or auto (gpu when torch sees a CUDA device)."""
    if name not in PROFILES:
        raise SettingsError(f"--profile {name!r} is not one of {', '.join(PROFILES)}")
    if name == "gpu":
        return gpu_profile()
    if name == "cpu":
        return cpu_profile()
    return gpu_profile("GPU found: ") if cuda_available() else cpu_profile("no GPU found: ")


def nvidia_gpu_visible() -> bool:
    """Whether an NVIDIA GPU is visible to this process, without importing torch (the daemon stays light).

    Looks for the driver's device files and honours ``CUDA_VISIBLE_DEVICES`` hiding every device.
    """
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return False
    return any(Path("/dev").glob("nvidia[0-9]*"))


def cpu_mismatch(settings: Settings, *, gpu_visible: bool) -> str | None:
    """One line when GPU-sized settings will train on the CPU, else None."""
    device = settings.daemon.device
    on_cpu = device == "cpu" or (device == "auto" and not gpu_visible)
    m, t = settings.engine.model, settings.engine.train
    if not on_cpu or (m.backbone not in GPU_BACKBONES and t.crop_size < GPU_CROP):
        return None
    where = "daemon.device is 'cpu'" if device == "cpu" else "no GPU is visible"
    return (
        f"ciss.toml trains {m.backbone} at crop {t.crop_size}, {batch_words(t)}, settings sized for a "
        f"GPU, but {where}: a step may take hours; `ciss init --profile cpu DIR` writes CPU settings"
    )
