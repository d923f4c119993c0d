"""Atomic writes, safe checkpoint loading, RNG state and model files."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

from engine import checkpoint
from engine.atomic import write_bytes
from engine.checkpoint import (
    META_FILE,
    MODEL_FILE,
    file_sha256,
    load_checkpoint,
    load_model_files,
    rng_state,
    save_checkpoint,
    save_model,
    set_rng_state,
)
from engine.config import EngineConfig
from engine.exceptions import CheckpointError

CLASSES = [{"id": 1, "name": "cat", "step": 0}, {"id": 2, "name": "dog", "step": 1}]


class _Payload:
    """Unpickling this object runs code that writes ``marker``: the shape of a malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def _trained_state() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: (1 - i / 10) ** 0.9)
    model(torch.randn(2, 3, 4, 4)).square().mean().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def _no_temp_files(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if p.name.endswith(".tmp")]


# --- atomic writes ----------------------------------------------------------------------------------


def test_atomic_write_replaces_content_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "file.bin"
    write_bytes(target, b"old")
    write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert _no_temp_files(tmp_path)


def test_atomic_write_failing_midway_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")

    def crash(src: object, dst: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(checkpoint.os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert _no_temp_files(tmp_path)


def test_save_checkpoint_failing_midway_keeps_old_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "job.pt"
    save_checkpoint(path, {"position": {"iteration": 1}})

    def crash(*args: object) -> None:
        raise OSError("no space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", crash)
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*job\.pt: no space left"):
        save_checkpoint(path, {"position": {"iteration": 2}})
    monkeypatch.undo()
    assert load_checkpoint(path)["position"] == {"iteration": 1}
    assert _no_temp_files(tmp_path)


# --- training checkpoints ---------------------------------------------------------------------------


def test_checkpoint_round_trip_restores_training_state_and_random_streams(tmp_path: Path) -> None:
    model, optimizer, scheduler = _trained_state()
    path = tmp_path / "jobs" / "7" / "last.pt"
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "position": {"epoch": 3, "iteration": 41},
        "settings": EngineConfig().to_dict(),
        "classes": CLASSES,
    }
    save_checkpoint(path, state)
    expected = (torch.rand(5), random.random(), np.random.rand(3))
    torch.rand(100), random.random(), np.random.rand(7)  # move every stream on

    loaded = load_checkpoint(path)
    set_rng_state(loaded["rng"])
    assert torch.equal(torch.rand(5), expected[0])
    assert random.random() == expected[1]
    assert np.array_equal(np.random.rand(3), expected[2])

    fresh_model, fresh_optimizer, fresh_scheduler = _trained_state()
    fresh_model.load_state_dict(loaded["model"])
    fresh_optimizer.load_state_dict(loaded["optimizer"])
    fresh_scheduler.load_state_dict(loaded["scheduler"])
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh_model.state_dict()[name], tensor)
    momentum = [optimizer.state[p]["momentum_buffer"] for p in model.parameters()]
    restored = [fresh_optimizer.state[p]["momentum_buffer"] for p in fresh_model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(momentum, restored, strict=True))
    assert fresh_optimizer.param_groups[0]["nesterov"] is True
    assert loaded["position"] == {"epoch": 3, "iteration": 41}
    assert EngineConfig.from_dict(loaded["settings"]) == EngineConfig()
    assert loaded["classes"] == CLASSES


@pytest.mark.parametrize("bad", [np.zeros(3), np.float64(1.0), {1.5: "float key"}, object()])
def test_save_checkpoint_refuses_values_a_safe_load_cannot_read(tmp_path: Path, bad: object) -> None:
    path = tmp_path / "job.pt"
    with pytest.raises(CheckpointError, match=r"checkpoint entry state\['extra'\]"):
        save_checkpoint(path, {"extra": [bad]} if not isinstance(bad, dict) else {"extra": bad})
    assert not path.exists()


def test_missing_checkpoint_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"checkpoint .*nothing\.pt does not exist"):
        load_checkpoint(tmp_path / "nothing.pt")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_checkpoint_is_a_checkpoint_error(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "job.pt"
    save_checkpoint(path, {"weights": torch.randn(64, 64)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"checkpoint .*job\.pt is truncated or corrupt.*delete it"):
        load_checkpoint(path)


def test_malicious_checkpoint_is_refused_even_when_the_environment_forces_unsafe_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pt"
    torch.save({"model": _Payload(marker)}, path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

    with pytest.raises(
        CheckpointError, match=r"evil\.pt holds objects other than tensors.*refused as unsafe"
    ):
        load_checkpoint(path)
    assert not marker.exists()
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1"  # the caller's environment is restored

    # The payload is live: a plain torch.load under this environment runs it.
    with pytest.warns(UserWarning):
        torch.load(path)
    assert marker.read_text() == "pwned"


def test_load_checkpoint_hides_the_unsafe_override_from_torch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Some torch versions let TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD win over weights_only=True: it must be unset
    # (and weights-only forced) while torch.load runs, whatever this torch version does with it.
    path = tmp_path / "job.pt"
    save_checkpoint(path, {"a": 1})
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)
    seen: dict[str, object] = {}

    def spy(source: object, **kwargs: object) -> dict:
        seen.update(kwargs)
        seen["no"] = os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
        seen["force"] = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
        return {"a": 1}

    monkeypatch.setattr(checkpoint.torch, "load", spy)
    assert load_checkpoint(path) == {"a": 1}
    assert seen["weights_only"] is True and seen["no"] is None and seen["force"] == "1"
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1"
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


# --- model files ------------------------------------------------------------------------------------


def _meta() -> dict:
    return {"settings": EngineConfig().to_dict(), "classes": CLASSES, "step_sizes": [1, 1]}


def test_model_files_round_trip_with_recorded_hashes(tmp_path: Path) -> None:
    shared = torch.randn(3, 4)
    state_dict = {
        "head.weight": shared,
        "tied.weight": shared,  # tied weights share storage, which safetensors refuses as is
        "transposed": torch.randn(4, 5).t(),  # not contiguous
        "steps": torch.tensor(7),
    }
    directory = tmp_path / "models" / "v3"
    hashes = save_model(directory, state_dict, _meta())

    assert hashes == {name: file_sha256(directory / name) for name in (MODEL_FILE, META_FILE)}
    assert _no_temp_files(directory)
    loaded, meta = load_model_files(directory)
    assert meta == _meta()
    assert set(loaded) == set(state_dict)
    for name, tensor in state_dict.items():
        assert torch.equal(loaded[name], tensor)
    # another program reads the weights with safetensors alone
    assert torch.equal(
        safetensors.torch.load_file(directory / MODEL_FILE)["transposed"], state_dict["transposed"]
    )
    assert json.loads((directory / META_FILE).read_text())["weights_sha256"] == hashes[MODEL_FILE]


def test_corrupt_model_json_is_a_checkpoint_error(tmp_path: Path) -> None:
    save_model(tmp_path, {"w": torch.ones(2)}, _meta())
    (tmp_path / META_FILE).write_text('{"settings": ')
    with pytest.raises(CheckpointError, match=r"model\.json is not valid JSON"):
        load_model_files(tmp_path)


def test_missing_model_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    save_model(tmp_path, {"w": torch.ones(2)}, _meta())
    (tmp_path / MODEL_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"has no model\.safetensors"):
        load_model_files(tmp_path)


def test_weights_not_matching_model_json_are_refused(tmp_path: Path) -> None:
    save_model(tmp_path / "a", {"w": torch.ones(2)}, _meta())
    save_model(tmp_path / "b", {"w": torch.zeros(2)}, _meta())
    (tmp_path / "a" / MODEL_FILE).write_bytes((tmp_path / "b" / MODEL_FILE).read_bytes())
    with pytest.raises(CheckpointError, match="does not match the sha256"):
        load_model_files(tmp_path / "a")


def test_unknown_model_format_version_is_refused(tmp_path: Path) -> None:
    save_model(tmp_path, {"w": torch.ones(2)}, _meta())
    document = json.loads((tmp_path / META_FILE).read_text())
    document["format_version"] = 99
    (tmp_path / META_FILE).write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match="format version 99"):
        load_model_files(tmp_path)


def test_save_model_refuses_meta_it_cannot_store(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not plain JSON"):
        save_model(tmp_path, {"w": torch.ones(2)}, {"score": float("nan")})
    with pytest.raises(CheckpointError, match="may not set"):
        save_model(tmp_path, {"w": torch.ones(2)}, {"format_version": 2})
    assert not (tmp_path / MODEL_FILE).exists()
