"""ciss.toml: defaults, the default file's text, and the exact message of each kind of bad value."""

import dataclasses
from pathlib import Path

import pytest

from ciss_daemon.exceptions import SettingsError
from ciss_daemon.settings import (
    DaemonSettings,
    Settings,
    default_settings_toml,
    load_settings,
    parse_settings,
)


def test_default_text_loads_back_to_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "ciss.toml"
    path.write_text(default_settings_toml(), encoding="utf-8")
    assert load_settings(path) == Settings()


def test_default_text_shows_every_key_with_a_comment_line() -> None:
    lines = default_settings_toml().splitlines()
    defaults = Settings()
    sections = {
        "daemon": defaults.daemon,
        "gate": defaults.gate,
        "limits": defaults.limits,
        "catalog": defaults.catalog,
        "model": defaults.engine.model,
        "loss": defaults.engine.loss,
        "train": defaults.engine.train,
    }
    for section, instance in sections.items():
        start = lines.index(f"[{section}]")
        for f in dataclasses.fields(instance):
            # Set keys read "name = value"; an unset optional one is shown commented out.
            matches = [
                i for i in range(start, len(lines)) if lines[i].lstrip("# ").startswith(f"{f.name} = ")
            ]
            assert matches, f"{section}.{f.name} missing from the default ciss.toml"
            assert lines[matches[0] - 1].startswith("# "), f"{section}.{f.name} has no comment line"


def test_an_empty_file_means_every_default() -> None:
    assert parse_settings("") == Settings()


def test_values_are_read_into_their_sections() -> None:
    settings = parse_settings(
        """
        [daemon]
        settle_seconds = 5
        training_window = "* 22-23,0-5 * * *"
        device = "cuda:1"
        [gate]
        auto_promote = false
        [catalog]
        url = "postgresql://ciss@db/ciss"
        [train]
        batch_size = 4
        """
    )
    assert settings.daemon.settle_seconds == 5.0 and isinstance(settings.daemon.settle_seconds, float)
    assert settings.daemon.training_window == "* 22-23,0-5 * * *"
    assert settings.daemon.device == "cuda:1"
    assert settings.gate.auto_promote is False
    assert settings.catalog.url == "postgresql://ciss@db/ciss"
    assert settings.engine.train.batch_size == 4
    assert settings.engine.train.epochs_base == 60  # untouched keys keep the engine's (paper) defaults


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[daemon]\nsettle_seconds = -1", "ciss.toml: daemon.settle_seconds: -1 must be >= 0"),
        ("[daemon]\nrescan_seconds = 0", "ciss.toml: daemon.rescan_seconds: 0 must be > 0"),
        ("[daemon]\nmax_attempts = 0", "ciss.toml: daemon.max_attempts: 0 must be >= 1"),
        (
            "[daemon]\nsettle_seconds = 'ten'",
            "ciss.toml: daemon.settle_seconds: 'ten' should be of type float",
        ),
        ("[daemon]\nmax_attempts = true", "ciss.toml: daemon.max_attempts: True should be of type int"),
        (
            "[daemon]\nsettle = 3",
            "ciss.toml: daemon.settle: unknown setting; allowed: settle_seconds, rescan_seconds, "
            "dispatch_seconds, training_window, max_attempts, device, stop_timeout_seconds, "
            "keep_checkpoints, log_level, gpus, cpu_ranks, rank_timeout_seconds, launcher",
        ),
        (
            "[daemon]\ntraining_window = '* 22-6 * *'",
            "ciss.toml: daemon.training_window: '* 22-6 * *' is not a cron expression "
            "'minute hour day month day_of_week' (Wrong number of fields; got 4, expected 5)",
        ),
        (
            "[daemon]\ndevice = 'tpu'",
            "ciss.toml: daemon.device: 'tpu' is not one of auto, cpu, cuda, cuda:N",
        ),
        (
            "[daemon]\nlog_level = 'LOUD'",
            "ciss.toml: daemon.log_level: 'LOUD' is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL",
        ),
        ("[gate]\nold_miou_budget = 5", "ciss.toml: gate.old_miou_budget: 5 must be between 0 and 1"),
        ("[gate]\nnew_miou_floor = -0.5", "ciss.toml: gate.new_miou_floor: -0.5 must be between 0 and 1"),
        ("[limits]\nmax_files = 0", "ciss.toml: limits.max_files: 0 must be >= 1"),
        (
            "[catalog]\nurl = 'catalog.db'",
            "ciss.toml: catalog.url: 'catalog.db' is not a database URL (e.g. postgresql://user@host/ciss); "
            "leave it empty for the workspace's SQLite file",
        ),
        (
            "[deamon]\nsettle_seconds = 1",
            "ciss.toml: unknown section [deamon]; allowed: daemon, gate, limits, catalog, web, notify, "
            "ray, model, loss, train",
        ),
        ("daemon = 3", "ciss.toml: daemon: expected a table of settings, got int"),
        # Engine sections keep the engine's own messages, with the file's name in front.
        ("[train]\nbatch_size = 0", "ciss.toml: train.batch_size: 0 must be >= 1"),
        (
            "[model]\nbackbone = 'vgg16'",
            "ciss.toml: model.backbone: 'vgg16' is not one of "
            "resnet101, resnet50, resnet18, mobilenet_v3_large",
        ),
    ],
)
def test_bad_values_are_named_with_their_key(text: str, message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        parse_settings(text)
    assert str(caught.value) == message


def test_bad_toml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "ciss.toml"
    path.write_text("[daemon]\nsettle_seconds = \n", encoding="utf-8")
    with pytest.raises(SettingsError) as caught:
        load_settings(path)
    assert str(caught.value).startswith("ciss.toml: not valid TOML: ")
    assert "line 2" in str(caught.value)


def test_missing_file_says_to_run_init(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(tmp_path / "ciss.toml")
    assert str(caught.value) == (
        f"no settings file at {tmp_path / 'ciss.toml'}; run `ciss init {tmp_path}` to create one"
    )


def test_file_that_is_not_utf8_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "ciss.toml"
    path.write_bytes(b"[daemon]\nlog_level = '\xff'\n")
    with pytest.raises(SettingsError) as caught:
        load_settings(path)
    assert str(caught.value) == f"ciss.toml: not UTF-8 text; save {path} as UTF-8"


def test_settings_are_checked_when_built_in_code_too() -> None:
    with pytest.raises(SettingsError) as caught:
        DaemonSettings(dispatch_seconds=-2.5)
    assert str(caught.value) == "daemon.dispatch_seconds: -2.5 must be > 0"
