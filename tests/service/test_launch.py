"""How many training processes a step gets (``daemon.gpus``, ``daemon.cpu_ranks``), and how they start."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ciss_daemon.exceptions import SettingsError
from ciss_daemon.service.launch import Launch, plan_launch, visible_gpus, worker_command
from ciss_daemon.service.protocol import JobRequest
from ciss_daemon.settings import DaemonSettings, parse_settings


def daemon(**values: object) -> DaemonSettings:
    lines = "\n".join(f"{k} = {v}" for k, v in values.items())
    return parse_settings(f"[daemon]\n{lines}\n").daemon


@pytest.mark.parametrize(
    ("toml", "expected"),
    [('"all"', "all"), ("2", 2), ("[0, 1]", [0, 1]), ("[3]", [3])],
)
def test_gpus_takes_all_a_count_or_a_list(toml: str, expected: object) -> None:
    assert daemon(gpus=toml).gpu_request() == expected


@pytest.mark.parametrize(
    ("toml", "shown"), [("0", "0"), ("[1, 1]", "[1,1]"), ('"two"', '"two"'), ("[]", "[]")]
)
def test_a_bad_gpus_value_is_one_line_naming_it(toml: str, shown: str) -> None:
    with pytest.raises(SettingsError) as caught:
        daemon(gpus=toml)
    assert str(caught.value) == (
        f'ciss.toml: daemon.gpus: {shown} is not "all", a count such as 2, or a list of distinct GPU indices '
        "such as [0, 1]"
    )


def test_every_gpu_of_the_box_by_default() -> None:
    assert plan_launch(daemon(), gpus=["0", "1", "2"]) == Launch(3, "cuda", "0,1,2", 300.0)
    assert plan_launch(daemon(gpus=2), gpus=["0", "1", "2"]) == Launch(2, "cuda", "0,1", 300.0)
    # Indices count the GPUs the daemon sees: with CUDA_VISIBLE_DEVICES=3,5,7, [0, 2] is GPUs 3 and 7.
    assert plan_launch(daemon(gpus="[0, 2]"), gpus=["3", "5", "7"]) == Launch(2, "cuda", "3,7", 300.0)


def test_one_gpu_is_one_plain_process() -> None:
    assert plan_launch(daemon(), gpus=["0"]) == Launch(1, "cuda:0", None, 300.0)
    assert plan_launch(daemon(gpus="[1]"), gpus=["0", "1"]) == Launch(1, "cuda:1", None, 300.0)
    assert plan_launch(daemon(device='"cuda:1"'), gpus=["0", "1"]) == Launch(1, "cuda:1", None, 300.0)


def test_the_cpu_trains_with_cpu_ranks() -> None:
    assert plan_launch(daemon(device='"cpu"'), gpus=["0", "1"]) == Launch(1, "cpu", None, 300.0)
    assert plan_launch(daemon(device='"cpu"', cpu_ranks=2), gpus=[]) == Launch(2, "cpu", None, 300.0)
    assert plan_launch(daemon(cpu_ranks=2, rank_timeout_seconds=30), gpus=[]) == Launch(2, "cpu", None, 30.0)


def test_more_gpus_than_visible_are_refused_in_one_line() -> None:
    with pytest.raises(SettingsError) as caught:
        plan_launch(daemon(gpus=4), gpus=["0", "1"])
    assert str(caught.value) == 'daemon.gpus: 4 GPUs asked for but 2 visible; use "all" or at most 2'
    with pytest.raises(SettingsError) as caught:
        plan_launch(daemon(gpus="[0, 5]"), gpus=["0", "1"])
    assert str(caught.value) == "daemon.gpus: GPU 5 is not visible (indices 0 to 1 are); fix the list"


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, GPU-abc")
    assert visible_gpus() == ["2", "GPU-abc"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []


def test_several_ranks_start_under_torch_distributed_run(tmp_path: Path) -> None:
    assert worker_command(tmp_path, Launch(1, "cpu")) == (
        [sys.executable, "-m", "ciss_daemon.service.worker", str(tmp_path)],
        {},
    )
    command, env = worker_command(tmp_path, Launch(2, "cuda", "0,3", 60.0))
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc-per-node=2" in command and "--standalone" in command
    assert command[-3:] == ["-m", "ciss_daemon.service.worker", str(tmp_path)]
    assert env == {"CISS_RANK_TIMEOUT": "60.0", "CUDA_VISIBLE_DEVICES": "0,3"}


@pytest.mark.parametrize(
    "message",
    [
        "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:4321",
        "[../third_party/gloo/gloo/transport/tcp/pair.cc:598] Connection reset by peer",
        "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 15000ms for recv",
        "Application timeout caused pair closure",
    ],
)
def test_gloo_errors_of_a_lost_rank_are_told_as_a_lost_rank(message: str) -> None:
    from ciss_daemon.service.worker import _rank_lost, _rank_lost_reason

    error = RuntimeError(message)
    assert _rank_lost(error)
    reason = _rank_lost_reason(error, 2)
    assert reason.startswith("one of the 2 training processes of this step died or stopped answering (")
    assert "pair.cc" not in reason  # gloo's source location is not the user's business


def test_other_errors_are_not_a_lost_rank() -> None:
    from ciss_daemon.service.worker import _rank_lost

    assert not _rank_lost(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not _rank_lost(ValueError("batch 3: mask.png is not a palette image"))


def _request(step_index: int, **train: int) -> JobRequest:
    return JobRequest(
        step_index=step_index, step_sizes=[2, 1], class_names={}, train_batches=[], eval_batches=[],
        memory_batches=[], teacher_dir=None, workdir="job", output_dir="model", config={"train": train},
    )  # fmt: skip


def test_each_rank_takes_its_share_of_the_batch_its_step_trains_with() -> None:
    from ciss_daemon.service.worker import split_batch

    base = _request(0, batch_size=8, batch_size_incremental=2)
    split_batch(base, 2)
    assert base.config["train"] == {"batch_size": 4, "batch_size_incremental": 2}
    later = _request(1, batch_size=8, batch_size_incremental=2)
    split_batch(later, 2)
    assert later.config["train"] == {"batch_size": 8, "batch_size_incremental": 1}
    unset = _request(1, batch_size=8, batch_size_incremental=0)  # 0: later steps train with batch_size
    split_batch(unset, 4)
    assert unset.config["train"] == {"batch_size": 2, "batch_size_incremental": 0}


def test_a_batch_that_does_not_split_over_the_ranks_is_one_line_naming_it() -> None:
    from ciss_daemon.service.worker import split_batch
    from engine.exceptions import ConfigError

    with pytest.raises(ConfigError) as caught:
        split_batch(_request(1, batch_size=4, batch_size_incremental=1), 2)
    assert str(caught.value) == (
        "train.batch_size_incremental: 1 does not split evenly over 2 training processes; use a multiple of 2"
    )
