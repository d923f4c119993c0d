"""The settings `ciss init` writes for the machine (GPU or CPU), loader workers, and the CPU warning."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from daemon_helpers import FakeClock, in_process_daemon, new_workspace
from typer.testing import CliRunner

from ciss_daemon import profiles
from ciss_daemon.cli import app
from ciss_daemon.demo import plan
from ciss_daemon.settings import Settings, load_settings, parse_settings
from ciss_daemon.workspace import find_workspace
from engine.config import EngineConfig, TrainConfig
from engine.exceptions import ConfigError

runner = CliRunner()


def test_init_without_a_gpu_writes_the_demo_settings_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(profiles, "cuda_available", lambda: False)
    result = runner.invoke(app, ["init", str(tmp_path / "ws")])
    assert result.exit_code == 0, result.output
    demo = parse_settings(plan(incremental=2, quick=False).settings).engine
    assert load_settings(tmp_path / "ws" / "ciss.toml").engine == demo
    line = (
        f"no GPU found: CPU settings of `ciss demo`: {demo.model.backbone}, crop {demo.train.crop_size}, "
        f"batch {demo.train.batch_size}; `ciss init --profile gpu` writes the paper's GPU settings"
    )
    assert f"    {line}\n" in result.output
    assert f"# {line}\n" in (tmp_path / "ws" / "ciss.toml").read_text(encoding="utf-8")


def test_init_with_a_gpu_writes_the_papers_settings_with_imagenet_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(profiles, "cuda_available", lambda: True)
    result = runner.invoke(app, ["init", "--workspace", str(tmp_path / "ws")])
    assert result.exit_code == 0, result.output
    assert (
        "    GPU found: GPU settings of the paper: resnet101 from ImageNet weights, crop 512, batch 32\n"
        in result.output
    )
    engine = load_settings(tmp_path / "ws" / "ciss.toml").engine
    assert engine.model.pretrained == "imagenet"
    assert engine == EngineConfig(model=type(engine.model)(pretrained="imagenet"))
    assert engine.train.num_workers == "auto"


def test_init_takes_the_workspace_option_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert runner.invoke(app, ["init", "-w", str(tmp_path / "a"), "--profile", "cpu"]).exit_code == 0
    assert find_workspace(tmp_path / "a").root == (tmp_path / "a").resolve()
    monkeypatch.setenv("CISS_WORKSPACE", str(tmp_path / "b"))
    assert runner.invoke(app, ["init", "--profile", "cpu"]).exit_code == 0
    assert (tmp_path / "b" / "ciss.toml").is_file()
    both = runner.invoke(app, ["init", str(tmp_path / "c"), "-w", str(tmp_path / "d")])
    assert both.exit_code == 1
    assert (
        both.output
        == f"Error: two folders given, {tmp_path / 'c'} and --workspace {tmp_path / 'd'}; give one\n"
    )
    bad = runner.invoke(app, ["init", str(tmp_path / "e"), "--profile", "tpu"])
    assert bad.output == "Error: --profile 'tpu' is not one of auto, gpu, cpu\n"


def test_num_workers_auto_feeds_a_gpu_and_stays_zero_on_the_cpu() -> None:
    auto = TrainConfig()
    assert auto.num_workers == "auto"
    assert auto.loader_workers("cuda") == min(8, os.cpu_count() or 1)
    assert auto.loader_workers("cpu") == 0
    assert TrainConfig(num_workers=3).loader_workers("cuda") == 3
    assert parse_settings("[train]\nnum_workers = 2\n").engine.train.num_workers == 2
    for bad in ("many", -1, True):
        with pytest.raises(ConfigError) as info:
            EngineConfig.from_dict({"train": {"num_workers": bad}})
        assert str(info.value) == f'train.num_workers: {bad!r} must be "auto" or an integer >= 0'


def test_gpu_sized_settings_on_a_cpu_are_named_in_one_line() -> None:
    gpu = Settings(engine=profiles.gpu_profile().engine)
    assert profiles.cpu_mismatch(gpu, gpu_visible=False) == (
        "ciss.toml trains resnet101 at crop 512, batch 32, settings sized for a GPU, but no GPU is visible: "
        "a step may take hours; `ciss init --profile cpu DIR` writes CPU settings"
    )
    assert profiles.cpu_mismatch(gpu, gpu_visible=True) is None
    forced = parse_settings('[daemon]\ndevice = "cpu"\n')
    assert "but daemon.device is 'cpu':" in (profiles.cpu_mismatch(forced, gpu_visible=True) or "")
    cpu = Settings(engine=profiles.cpu_profile().engine)
    assert profiles.cpu_mismatch(cpu, gpu_visible=False) is None


def test_the_daemon_warns_once_started_when_gpu_settings_meet_a_cpu(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ws = new_workspace(tmp_path / "ws", '[daemon]\ndevice = "cpu"\n[model]\npretrained = "imagenet"\n')
    with caplog.at_level(logging.WARNING, logger="ciss.daemon"):
        daemon = in_process_daemon(ws, FakeClock())
        daemon.shutdown()
    assert [r.getMessage() for r in caplog.records if r.name == "ciss.daemon"] == [
        "ciss.toml trains resnet101 at crop 512, batch 32, settings sized for a GPU, but daemon.device is "
        "'cpu': a step may take hours; `ciss init --profile cpu DIR` writes CPU settings"
    ]


def test_a_batch_of_its_own_after_step_0_is_named_in_the_settings_line() -> None:
    assert profiles.batch_words(TrainConfig(batch_size=4)) == "batch 4"
    assert (
        profiles.batch_words(TrainConfig(batch_size=4, batch_size_incremental=1))
        == "batch 4 (1 after step 0)"
    )
