"""Typed settings of a workspace, read once from ``ciss.toml`` and checked at load.

Each section of the file is one frozen dataclass; the ``[model]``, ``[loss]`` and ``[train]`` sections are
the engine's own :class:`~engine.config.EngineConfig`. A bad file raises :class:`SettingsError` with one line
that names the key, the value and what is allowed: ``ciss.toml: daemon.settle_seconds: -1 must be >= 0``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ciss_daemon.exceptions import SettingsError
from engine.config import EngineConfig, section_from_dict
from engine.exceptions import ConfigError

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LAUNCHERS = ("local", "ray")
RAY_PLACEMENTS = ("pack", "spread", "strict_spread")
# [ray] address: "auto" (the cluster this machine belongs to) or host:port of the head's GCS.
_RAY_ADDRESS = re.compile(r"auto|[A-Za-z0-9.\-]+:\d{1,5}|\[[0-9A-Fa-f:]+\]:\d{1,5}")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
# daemon.gpus as stored: "all", a count ("2"), or a JSON list of indices ("[0,1]"); see parse_settings.
_GPUS = re.compile(r"all|[1-9]\d*|\[\d+(,\d+)*\]")
GIB = 1024**3


def _show(value: Any) -> str:
    # TOML integers given for float keys arrive as floats; print -1.0 as -1 so the message echoes the file.
    if isinstance(value, float) and value.is_integer():
        return repr(int(value))
    return repr(value)


def _at_least(section: str, name: str, value: float, low: float) -> None:
    if value < low:
        raise SettingsError(f"{section}.{name}: {_show(value)} must be >= {_show(low)}")


def _above(section: str, name: str, value: float, low: float) -> None:
    if value <= low:
        raise SettingsError(f"{section}.{name}: {_show(value)} must be > {_show(low)}")


def _fraction(section: str, name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise SettingsError(f"{section}.{name}: {_show(value)} must be between 0 and 1")


@dataclass(frozen=True)
class DaemonSettings:
    """How the daemon watches the inbox, when and where it trains, and how hard it retries."""

    settle_seconds: float = 10.0
    rescan_seconds: float = 30.0
    dispatch_seconds: float = 2.0
    training_window: str = ""
    max_attempts: int = 3
    device: str = "auto"
    stop_timeout_seconds: float = 120.0
    keep_checkpoints: int = 1
    log_level: str = "INFO"
    # Several processes per step (torch.distributed.run, one per GPU): see ``gpu_request``.
    gpus: str = "all"
    cpu_ranks: int = 1
    rank_timeout_seconds: float = 300.0
    # "local": this box (see above); "ray": the Ray cluster of the [ray] section (service/ray_launch.py).
    launcher: str = "local"

    def __post_init__(self) -> None:
        _at_least("daemon", "settle_seconds", self.settle_seconds, 0)
        _above("daemon", "rescan_seconds", self.rescan_seconds, 0)
        _above("daemon", "dispatch_seconds", self.dispatch_seconds, 0)
        if self.training_window:
            _check_cron("daemon", "training_window", self.training_window)
        _at_least("daemon", "max_attempts", self.max_attempts, 1)
        if not _DEVICE.fullmatch(self.device):
            raise SettingsError(f"daemon.device: {self.device!r} is not one of auto, cpu, cuda, cuda:N")
        _above("daemon", "stop_timeout_seconds", self.stop_timeout_seconds, 0)
        _at_least("daemon", "keep_checkpoints", self.keep_checkpoints, 0)
        if self.log_level not in LOG_LEVELS:
            raise SettingsError(f"daemon.log_level: {self.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
        indices = self.gpus.strip("[]").split(",")
        if not _GPUS.fullmatch(self.gpus) or len(set(indices)) != len(indices):
            raise SettingsError(
                f'daemon.gpus: {self.gpus} is not "all", a count such as 2, or a list of distinct GPU '
                "indices such as [0, 1]"
            )
        _at_least("daemon", "cpu_ranks", self.cpu_ranks, 1)
        _above("daemon", "rank_timeout_seconds", self.rank_timeout_seconds, 0)
        if self.launcher not in LAUNCHERS:
            raise SettingsError(f"daemon.launcher: {self.launcher!r} is not one of {', '.join(LAUNCHERS)}")

    def gpu_request(self) -> str | int | list[int]:
        """``daemon.gpus`` as written in ciss.toml: "all", a count, or a list of GPU indices."""
        if self.gpus == "all":
            return "all"
        return json.loads(self.gpus)


def _check_cron(section: str, name: str, expression: str) -> None:
    # Imported here: apscheduler is only needed when a window is set, and `ciss status` loads settings too.
    from apscheduler.triggers.cron import CronTrigger

    try:
        CronTrigger.from_crontab(expression, timezone=dt.UTC)
    except ValueError as exc:
        raise SettingsError(
            f"{section}.{name}: {expression!r} is not a cron expression "
            f"'minute hour day month day_of_week' ({exc})"
        ) from None


@dataclass(frozen=True)
class GateSettings:
    """When a trained candidate replaces the current model without asking the operator."""

    old_miou_budget: float = 0.05
    new_miou_floor: float = 0.10
    auto_promote: bool = True

    def __post_init__(self) -> None:
        _fraction("gate", "old_miou_budget", self.old_miou_budget)
        _fraction("gate", "new_miou_floor", self.new_miou_floor)


@dataclass(frozen=True)
class LimitsSettings:
    """Size limits a batch must respect before anything in it is decoded or copied."""

    max_batch_bytes: int = 2 * GIB
    max_files: int = 50_000
    max_image_pixels: int = 40_000_000
    max_image_side: int = 8192

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _at_least("limits", f.name, getattr(self, f.name), 1)


@dataclass(frozen=True)
class CatalogSettings:
    """Where the catalog lives: empty means ``catalog.sqlite`` inside the workspace."""

    url: str = ""

    def __post_init__(self) -> None:
        if self.url and not re.match(r"[A-Za-z][A-Za-z0-9+]*://", self.url):
            raise SettingsError(
                f"catalog.url: {self.url!r} is not a database URL "
                "(e.g. postgresql://user@host/ciss); leave it empty for the workspace's SQLite file"
            )


@dataclass(frozen=True)
class RaySettings:
    """The Ray cluster that trains each step when ``daemon.launcher = "ray"`` (``service/ray_launch.py``).

    A step trains on ``workers`` Ray actors, each with ``gpus_per_worker`` GPUs (one training process per
    GPU; 0: one process on the CPU, gloo) and ``cpus_per_worker`` CPUs.
    """

    address: str = "auto"
    workers: int = 1
    gpus_per_worker: int = 1
    cpus_per_worker: float = 1.0
    placement: str = "pack"
    start_timeout_seconds: float = 600.0

    def __post_init__(self) -> None:
        if not _RAY_ADDRESS.fullmatch(self.address):
            raise SettingsError(
                f'ray.address: {self.address!r} is not "auto" or the head\'s host:port, e.g. "10.0.0.1:6379"'
            )
        _at_least("ray", "workers", self.workers, 1)
        _at_least("ray", "gpus_per_worker", self.gpus_per_worker, 0)
        _above("ray", "cpus_per_worker", self.cpus_per_worker, 0)
        if self.placement not in RAY_PLACEMENTS:
            raise SettingsError(
                f"ray.placement: {self.placement!r} is not one of {', '.join(RAY_PLACEMENTS)}"
            )
        _above("ray", "start_timeout_seconds", self.start_timeout_seconds, 0)


NOTIFY_EVENTS = ("promoted", "held", "failed", "rejected")


@dataclass(frozen=True)
class WebSettings:
    """The dashboard (``ciss web``, or served by the daemon when ``enabled``) and its ``/metrics``."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 8470
    token: str = ""

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise SettingsError(f"web.port: {self.port} must be between 1 and 65535")
        if not self.host:
            raise SettingsError('web.host: must not be empty; "127.0.0.1" serves this machine only')
        if self.token and len(self.token) < 16:
            raise SettingsError(
                f"web.token: {len(self.token)} characters is too short to guess safely; use at least 16, "
                'e.g. the output of `python -c "import secrets; print(secrets.token_urlsafe())"`'
            )


@dataclass(frozen=True)
class NotifySettings:
    """Webhooks told when a step is promoted, held or failed, or a batch is rejected."""

    webhooks: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=lambda: list(NOTIFY_EVENTS))
    timeout_seconds: float = 5.0
    retries: int = 3
    retry_seconds: float = 2.0

    def __post_init__(self) -> None:
        for url in self.webhooks:
            if not isinstance(url, str) or not re.match(r"https?://[^\s/]+", url):
                raise SettingsError(f"notify.webhooks: {url!r} is not an http:// or https:// URL")
        for kind in self.events:
            if kind not in NOTIFY_EVENTS:
                raise SettingsError(f"notify.events: {kind!r} is not one of {', '.join(NOTIFY_EVENTS)}")
        _above("notify", "timeout_seconds", self.timeout_seconds, 0)
        _at_least("notify", "retries", self.retries, 0)
        _at_least("notify", "retry_seconds", self.retry_seconds, 0)


@dataclass(frozen=True)
class Settings:
    """Everything in ``ciss.toml``."""

    daemon: DaemonSettings = field(default_factory=DaemonSettings)
    gate: GateSettings = field(default_factory=GateSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    catalog: CatalogSettings = field(default_factory=CatalogSettings)
    web: WebSettings = field(default_factory=WebSettings)
    notify: NotifySettings = field(default_factory=NotifySettings)
    ray: RaySettings = field(default_factory=RaySettings)
    engine: EngineConfig = field(default_factory=EngineConfig)


_DAEMON_SECTIONS: dict[str, type] = {
    "daemon": DaemonSettings,
    "gate": GateSettings,
    "limits": LimitsSettings,
    "catalog": CatalogSettings,
    "web": WebSettings,
    "notify": NotifySettings,
    "ray": RaySettings,
}
_ENGINE_SECTIONS = ("model", "loss", "train")
SECTIONS = (*_DAEMON_SECTIONS, *_ENGINE_SECTIONS)


def parse_settings(text: str, *, source: str = "ciss.toml") -> Settings:
    """Parse and check the text of a settings file; ``source`` names it in error messages."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{source}: not valid TOML: {exc}") from None
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise SettingsError(f"{source}: unknown section [{unknown[0]}]; allowed: {', '.join(SECTIONS)}")
    try:
        _gpus_as_text(data.get("daemon"))
        sections: dict[str, Any] = {
            name: section_from_dict(cls, data.get(name, {}), name) for name, cls in _DAEMON_SECTIONS.items()
        }
        engine = EngineConfig.from_dict({name: data[name] for name in _ENGINE_SECTIONS if name in data})
    except (SettingsError, ConfigError) as exc:
        raise SettingsError(f"{source}: {exc}") from None
    return Settings(**sections, engine=engine)


def _gpus_as_text(daemon: Any) -> None:
    """``daemon.gpus`` may be "all", a count or a list in TOML; the settings keep one text form of it."""
    if not isinstance(daemon, dict) or "gpus" not in daemon:
        return
    value = daemon["gpus"]
    if isinstance(value, int) and not isinstance(value, bool):
        daemon["gpus"] = str(value)
    elif isinstance(value, list) and value and all(type(i) is int for i in value):
        daemon["gpus"] = json.dumps(value, separators=(",", ":"))
    elif not isinstance(value, str) or value != "all":
        daemon["gpus"] = json.dumps(value)  # refused, with the value as written, by DaemonSettings


def load_settings(path: Path) -> Settings:
    """Read and check ``ciss.toml``; every problem is a :class:`SettingsError` naming the key."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SettingsError(
            f"no settings file at {path}; run `ciss init {path.parent}` to create one"
        ) from None
    except UnicodeDecodeError:
        raise SettingsError(f"{path.name}: not UTF-8 text; save {path} as UTF-8") from None
    except OSError as exc:
        raise SettingsError(f"cannot read {path}: {exc.strerror}; check the file's permissions") from None
    return parse_settings(text, source=path.name)


# One line for every key of the default file. A key missing here is a bug that default_settings_toml reports.
_COMMENTS: dict[str, dict[str, str]] = {
    "daemon": {
        "settle_seconds": "Seconds a folder with batch.toml must stay unchanged to count as complete.",
        "rescan_seconds": "Seconds between full scans of the inbox (watcher events are only a hint).",
        "dispatch_seconds": "Seconds between checks for a queued step to start.",
        "training_window": 'Cron "minute hour day month day_of_week", in UTC, when training may start, '
        'e.g. "* 22-23,0-5 * * mon-fri"; name weekdays (numbers count 0 = Monday); "" = any time.',
        "max_attempts": "Attempts per training job (crash, out of memory, restart) before its step fails.",
        "device": '"auto" (CUDA when present), "cpu", "cuda" or "cuda:N".',
        "stop_timeout_seconds": "Seconds a stopping daemon waits for training to checkpoint (keep under "
        "the unit's TimeoutStopSec).",
        "keep_checkpoints": "Checkpoints of finished jobs kept, newest first (running, queued and held "
        "jobs keep theirs); `ciss prune` removes old models.",
        "log_level": "One of DEBUG, INFO, WARNING, ERROR, CRITICAL.",
        "gpus": '"all" GPUs of the box, a count (2) or indices ([0, 1]); more than one trains each step '
        "under torch.distributed.run, one process per GPU.",
        "cpu_ranks": "Training processes when the device is the CPU (gloo); 1 = one plain process.",
        "rank_timeout_seconds": "Seconds the training processes of one step wait for each other before "
        "the attempt ends (a rank that died or hangs).",
        "launcher": '"local": train on this box; "ray": on the Ray cluster of [ray] '
        "(pip install 'ciss[ray]').",
    },
    "gate": {
        "old_miou_budget": "Old-class mIoU (0..1) may fall at most this much below the current model's.",
        "new_miou_floor": "New-class mIoU (0..1) must reach at least this.",
        "auto_promote": "false: every trained step is held until `ciss promote` or `ciss discard`.",
    },
    "limits": {
        "max_batch_bytes": "Largest batch folder accepted, in bytes (2 GiB).",
        "max_files": "Most files in one batch folder.",
        "max_image_pixels": "Most pixels in one image (guards against decompression bombs).",
        "max_image_side": "Longest image side, in pixels.",
    },
    "catalog": {
        "url": '"" = catalog.sqlite in this workspace; or a URL such as "postgresql://user@host/ciss".',
    },
    "web": {
        "enabled": "true: the daemon also serves the dashboard (else run `ciss web`).",
        "host": 'Address to listen on; "127.0.0.1" serves this machine only (use a proxy for others).',
        "port": "TCP port of the dashboard and its /metrics.",
        "token": 'Operator actions (promote, discard, rollback) in the dashboard need it; "" = read-only.',
    },
    "notify": {
        "webhooks": 'URLs that get a JSON POST (Slack-compatible "text") per event, e.g. ["https://..."].',
        "events": "Which events to send: promoted, held, failed, rejected.",
        "timeout_seconds": "Seconds one POST may take.",
        "retries": "Further tries after a failed POST.",
        "retry_seconds": "Seconds before the first retry; doubled before each next one.",
    },
    "ray": {
        "address": 'The Ray head as host:port (e.g. "10.0.0.1:6379"), or "auto": the cluster this box '
        "joined.",
        "workers": "Ray workers (actors) that train each step; their nodes must share the workspace.",
        "gpus_per_worker": "GPUs of each worker, one training process per GPU; 0 = one CPU process (gloo).",
        "cpus_per_worker": "CPUs Ray reserves for each worker.",
        "placement": "pack (fewest nodes), spread (many nodes) or strict_spread (one worker per node).",
        "start_timeout_seconds": "Seconds to wait for the cluster to have room for every worker before the "
        "attempt ends.",
    },
    "model": {
        "backbone": "One of resnet101, resnet50, resnet18, mobilenet_v3_large.",
        "output_stride": "8 or 16: input size over feature size.",
        "pretrained": 'Backbone weights: unset = random init; "imagenet"; or a path to a state-dict file.',
        "head_dropout": "Dropout before the classifiers, 0..1.",
    },
    "loss": {
        "mbce": "Weight of the multi-label BCE on the new classes.",
        "kd": "Weight of the distillation of old-class logits.",
        "dkd_pos": "Weight of the positive-reasoning distillation (DKD+).",
        "dkd_neg": "Weight of the negative-reasoning distillation (DKD-).",
        "ac": "Weight of the auxiliary-classifier loss.",
        "pos_weight_base": "BCE positive weight at step 0 (VOC 2, ADE20K 35).",
        "pos_weight_incremental": "BCE positive weight after step 0 (VOC 1, ADE20K 35).",
    },
    "train": {
        "method": "dkd (full method), finetune, kd or kd_dkd_randinit.",
        "lr_base": "Learning rate of the backbone at step 0.",
        "lr_incremental": "Learning rate of the backbone after step 0.",
        "head_lr_mult": "The head and classifiers learn this many times faster than the backbone.",
        "momentum": "SGD momentum, 0..1.",
        "nesterov": "Nesterov momentum.",
        "weight_decay": "SGD weight decay.",
        "poly_power": "Power of the polynomial learning-rate decay.",
        "warmup_fraction_base": "Fraction of step 0's iterations over which the learning rate rises first "
        "(ADE20K 0.2; VOC 0).",
        "warmup_fraction_incremental": "The same for each later step (ADE20K 0.2; VOC 0).",
        "warmup_factor": "Learning-rate factor at the start of the warm-up.",
        "epochs_base": "Epochs of step 0.",
        "epochs_incremental": "Epochs of each later step.",
        "batch_size": "Images per iteration (over all GPUs).",
        "batch_size_incremental": "Images per iteration after step 0 (over all GPUs); 0 = batch_size. "
        "Batch norm is frozen there, so a smaller batch gives more updates for the same compute.",
        "crop_size": "Side of the square training crop, in pixels.",
        "scale_min": "Smallest random rescale before cropping.",
        "scale_max": "Largest random rescale before cropping.",
        "bn_momentum_base": "Batch-norm momentum at step 0 (later steps freeze batch norm).",
        "amp": "Mixed precision where the device supports it (CUDA); evaluation runs in float32.",
        "amp_dtype": '"float16" (with a gradient scaler, as the reference) or "bfloat16".',
        "setting": "overlap or disjoint: which images of a batch a step trains on.",
        "memory_size": "DKD-M exemplar memory, in images; 0 disables it.",
        "seed": "Random seed.",
        "num_workers": '"auto" (min(8, CPU count) on CUDA, 0 on the CPU) or a number of loader processes.',
        "checkpoint_every": "Iterations between checkpoints (one is also written when the step ends).",
    },
}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value:_}" if value >= 10_000 else str(value)
    if isinstance(value, float):
        return repr(value)
    # A JSON string literal is a valid TOML basic string.
    return json.dumps(value)


def default_settings_toml(engine: EngineConfig | None = None, *, profile: str = "") -> str:
    """The text of a new ``ciss.toml``: every key with its value and one comment line.

    ``engine`` (default: the engine's defaults) fills ``[model]``, ``[loss]`` and ``[train]``; ``profile``
    is a line saying what they were chosen for, written under the header.
    """
    return settings_toml(Settings() if engine is None else Settings(engine=engine), profile=profile)


def settings_toml(defaults: Settings, *, profile: str = "") -> str:
    """``defaults`` as ``ciss.toml`` text: every key with its value and one comment line."""
    instances: dict[str, Any] = {
        "daemon": defaults.daemon,
        "gate": defaults.gate,
        "limits": defaults.limits,
        "catalog": defaults.catalog,
        "web": defaults.web,
        "notify": defaults.notify,
        "ray": defaults.ray,
        "model": defaults.engine.model,
        "loss": defaults.engine.loss,
        "train": defaults.engine.train,
    }
    lines = ["# ciss settings. Every key is shown with its value; `ciss daemon` reads this file at start-up."]
    if profile:
        lines.append(f"# {profile}")
    for section, instance in instances.items():
        lines += ["", f"[{section}]"]
        for f in dataclasses.fields(instance):
            value = getattr(instance, f.name)
            lines.append(f"# {_COMMENTS[section][f.name]}")
            if value is None:
                # TOML has no null: an unset optional key stays commented out.
                lines.append(f"# {f.name} = (unset)")
            else:
                lines.append(f"{f.name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"
