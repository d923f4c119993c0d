"""Training rules of docs/method.md on a tiny model: optimiser groups, freezing, teacher, resume, DDP."""

from __future__ import annotations

import copy
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from train_helpers import RandomSegmentation, base_and_student, tiny_config

from engine.model import build_model
from engine.step_setup import build_optimizer, set_step_mode, warmup_poly
from engine.train import Progress, train_step
from engine.training_state import TrainingState


def _train_on_cpu(
    model: nn.Module, teacher: nn.Module | None, config: Any, step_index: int, dataset: Any, **options: Any
) -> Any:
    """``train_step`` of ``model`` on the CPU; ``options`` are train_step's other keywords."""
    return train_step(
        model=model,
        teacher=teacher,
        dataset=dataset,
        config=config,
        step_index=step_index,
        device=torch.device("cpu"),
        **options,
    )


def test_optimizer_groups_follow_method() -> None:
    config = tiny_config()
    teacher, student = base_and_student(config)
    base = build_optimizer(teacher, config, 0).param_groups
    assert [g["lr"] for g in base] == pytest.approx([1e-3, 1e-2, 1e-2])
    assert [g["weight_decay"] for g in base] == [1e-4, 1e-4, 1e-4]
    incremental = build_optimizer(student, config, 1).param_groups
    assert [g["lr"] for g in incremental] == pytest.approx([1e-4, 1e-3, 1e-3])
    # At t >= 1 weight decay only on the new classifier g_t.
    assert [g["weight_decay"] for g in incremental] == [0.0, 0.0, 1e-4]
    assert incremental[2]["params"] == list(student.classifiers[-1].parameters())
    assert all(g["nesterov"] and g["momentum"] == 0.9 for g in incremental)


def test_step_modes() -> None:
    config = tiny_config()
    teacher, student = base_and_student(config)
    set_step_mode(teacher, 0, config)
    bns = [m for m in teacher.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.training and m.momentum == 0.01 for m in bns)
    set_step_mode(student, 1, config)
    frozen = [m for m in student.modules() if isinstance(m, (nn.BatchNorm2d, nn.Dropout))]
    assert frozen and not any(m.training for m in frozen)
    assert student.classifiers[-1].training


def test_incremental_step_freezes_bn_stats_and_teacher() -> None:
    config = tiny_config(epochs_incremental=1)
    teacher, student = base_and_student(config)
    teacher_before = copy.deepcopy(teacher.state_dict())
    stats_before = {k: v.clone() for k, v in student.state_dict().items() if "running" in k}
    conv_before = student.backbone.conv1.weight.detach().clone()  # type: ignore[union-attr]
    _train_on_cpu(student, teacher, config, 1, RandomSegmentation(8, [3]))
    after = student.state_dict()
    assert all(torch.equal(stats_before[k], after[k]) for k in stats_before)
    assert not torch.equal(conv_before, student.backbone.conv1.weight)  # type: ignore[union-attr]
    assert not teacher.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())


def test_base_step_updates_bn_stats_and_reports_progress() -> None:
    config = tiny_config(epochs_base=1)
    torch.manual_seed(0)
    model = build_model(config.model, [2])
    before = model.head[2].running_mean.clone()  # type: ignore[index]
    seen: list[Progress] = []
    result = _train_on_cpu(model, None, config, 0, RandomSegmentation(8, [1, 2]), progress=seen.append)
    assert result.finished and result.iterations == 2
    assert [p.iteration for p in seen] == [1, 2] and seen[-1].total_iterations == 2
    assert set(seen[-1].losses) == {"mbce", "ac", "total"}
    assert len(result.history) == 1
    assert not torch.equal(before, model.head[2].running_mean)  # type: ignore[index]


def test_distillation_terms_are_recorded_as_kl_divergences() -> None:
    # The student starts as the teacher plus a new head, with BatchNorm and dropout frozen: at the first
    # iteration its old logits and reasoning scores are the teacher's, so every recorded KL is 0 (the BCE
    # itself is not), and the recorded total is the weighted sum of the recorded terms.
    config = tiny_config(epochs_incremental=1)
    teacher, student = base_and_student(config)
    seen: list[Progress] = []
    _train_on_cpu(student, teacher, config, 1, RandomSegmentation(8, [3]), progress=seen.append)
    first = seen[0].losses
    assert [first[k] for k in ("kd", "dkd_pos", "dkd_neg")] == pytest.approx([0.0, 0.0, 0.0], abs=1e-5)
    w = config.loss
    weighted = w.mbce * first["mbce"] + w.kd * first["kd"] + w.dkd_pos * first["dkd_pos"]
    weighted += w.dkd_neg * first["dkd_neg"] + w.ac * first["ac"]
    assert first["total"] == pytest.approx(weighted, rel=1e-5)
    assert seen[-1].losses["kd"] > 0.0


def test_checkpoints_every_n_iterations_and_at_the_end_not_at_every_epoch_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 12 images at batch 4: 3 iterations per epoch, 4 epochs. Epoch ends fall at 3, 6, 9 and 12.
    config = tiny_config(checkpoint_every=4, epochs_base=4)
    teacher, _ = base_and_student(config)
    saved: list[int] = []
    original = TrainingState.save

    def recording_save(state: TrainingState, path: Path, **options: Any) -> None:
        saved.append(state.iteration)
        original(state, path, **options)

    monkeypatch.setattr(TrainingState, "save", recording_save)
    _train_on_cpu(teacher, None, config, 0, RandomSegmentation(12, [1, 2]), checkpoint_path=tmp_path / "c.pt")
    # 4 and 8 inside epochs; 12 is both a multiple and the end; 9 (an epoch end 1 after a save) is skipped.
    assert saved == [4, 8, 12]


@pytest.mark.parametrize(("step_index", "iterations"), [(0, 3), (1, 6)])
def test_later_steps_train_with_their_own_batch(step_index: int, iterations: int) -> None:
    # 12 images a step: batch 4 at step 0 (3 iterations), batch_size_incremental 2 after it (6).
    config = tiny_config(batch_size=4, batch_size_incremental=2, epochs_base=1, epochs_incremental=1)
    teacher, student = base_and_student(config)
    model, frozen = (teacher, None) if step_index == 0 else (student, teacher)
    images: list[int] = []
    model.register_forward_pre_hook(lambda module, args: images.append(args[0].shape[0]))
    dataset = RandomSegmentation(12, [1, 2] if step_index == 0 else [3])
    result = _train_on_cpu(model, frozen, config, step_index, dataset)
    assert result.iterations == iterations
    assert images == [12 // iterations] * iterations


@pytest.mark.parametrize(("step_index", "batch_incremental"), [(0, 0), (1, 0), (1, 2)])
def test_interrupted_and_resumed_equals_uninterrupted(
    tmp_path: Path, step_index: int, batch_incremental: int
) -> None:
    # Dropout is on at step 0, so this also checks that RNG states are restored. With
    # batch_size_incremental 2 a step 1 resumes at its own batch's position in the epoch.
    config = tiny_config(
        checkpoint_every=3, epochs_base=2, epochs_incremental=2, batch_size_incremental=batch_incremental
    )
    per_epoch = 12 // config.train.step_batch_size(step_index)
    dataset = RandomSegmentation(12, [1, 2] if step_index == 0 else [3])

    def fresh() -> tuple[nn.Module | None, nn.Module]:
        teacher, student = base_and_student(config)
        return (None, teacher) if step_index == 0 else (teacher, student)

    def run(checkpoint: Path | None, stop_after: int | None) -> tuple[nn.Module, object]:
        teacher, model = fresh()
        calls = {"n": 0}

        def should_stop() -> bool:
            calls["n"] += 1
            return stop_after is not None and calls["n"] > stop_after

        torch.manual_seed(123)
        result = _train_on_cpu(
            model, teacher, config, step_index, dataset, checkpoint_path=checkpoint, should_stop=should_stop
        )
        return model, result

    reference, full = run(None, None)
    checkpoint = tmp_path / "checkpoint.pt"
    _, stopped = run(checkpoint, per_epoch + 1)  # stops inside the second epoch
    assert not stopped.finished and stopped.iterations == per_epoch + 1
    torch.manual_seed(999)  # resuming must not depend on the global RNG state before it
    resumed, finished = run(checkpoint, None)
    assert finished.finished and finished.iterations == full.iterations == 2 * per_epoch
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert len(finished.history) == len(full.history) == 2
    for resumed_epoch, full_epoch in zip(finished.history, full.history, strict=True):
        assert resumed_epoch == pytest.approx(full_epoch)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    try:
        config = tiny_config(epochs_base=1)
        torch.manual_seed(0)
        model = build_model(config.model, [2])
        result = train_step(
            model=model,
            teacher=None,
            dataset=RandomSegmentation(16, [1, 2]),
            config=config,
            step_index=0,
            device=torch.device("cpu"),
            checkpoint_path=Path(out) / "checkpoint.pt",
        )
        torch.save(
            {"iterations": result.iterations, "weight": model.classifiers[0].weight.detach()},
            Path(out) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_ddp_step(tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    # 16 images, batch 4 per rank, 2 ranks: each rank sees half the data, 2 iterations.
    assert ranks[0]["iterations"] == ranks[1]["iterations"] == 2
    # DDP averages gradients, so both replicas end with identical weights.
    assert torch.equal(ranks[0]["weight"], ranks[1]["weight"])
    # Only rank 0 writes the checkpoint.
    assert (tmp_path / "checkpoint.pt").exists()


def test_incremental_step_leaves_batchnorm_affine_out_of_the_optimiser() -> None:
    config = tiny_config(epochs_incremental=1)
    teacher, student = base_and_student(config)
    bn_params = {id(p) for m in student.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    assert bn_params
    in_optimiser = {id(p) for g in build_optimizer(student, config, 1).param_groups for p in g["params"]}
    assert not bn_params & in_optimiser
    # At step 0 they train with everything else.
    base = {id(p) for g in build_optimizer(teacher, config, 0).param_groups for p in g["params"]}
    assert {id(p) for m in teacher.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()} <= base
    affine_before = {
        k: v.clone() for k, v in student.state_dict().items() if k.endswith(("bn1.weight", "bn1.bias"))
    }
    _train_on_cpu(student, teacher, config, 1, RandomSegmentation(8, [3]))
    after = student.state_dict()
    assert affine_before and all(torch.equal(v, after[k]) for k, v in affine_before.items())
    assert all(
        not p.requires_grad
        for m in student.modules()
        if isinstance(m, nn.BatchNorm2d)
        for p in m.parameters()
    )


def test_warmup_poly_rises_linearly_then_decays() -> None:
    factor = warmup_poly(100, 0.9, 0.2, 0.001)
    assert factor(0) == pytest.approx(0.001)
    assert factor(10) == pytest.approx((0.001 + 0.999 * 0.5) * 0.9**0.9)
    assert factor(20) == pytest.approx(0.8**0.9)  # warm-up over: poly decay of the whole run
    assert factor(100) == 0.0
    plain = warmup_poly(100, 0.9, 0.0, 0.001)
    assert [plain(i) for i in (0, 50)] == pytest.approx([1.0, 0.5**0.9])


def test_training_follows_the_warmup_schedule() -> None:
    config = tiny_config(epochs_base=2, warmup_fraction_base=0.5, lr_base=0.1)
    model = build_model(config.model, [2])
    lrs: list[float] = []
    _train_on_cpu(model, None, config, 0, RandomSegmentation(8, [1, 2]), progress=lambda p: lrs.append(p.lr))
    # 4 iterations, 2 of warm-up: the learning rate reported after each is that of the next iteration.
    expected = [0.1 * warmup_poly(4, 0.9, 0.5, 0.001)(i) for i in range(1, 5)]
    assert lrs == pytest.approx(expected)


def test_an_incremental_step_warms_up_by_its_own_fraction() -> None:
    # Only later steps warm up (as the CPU settings do); step 0's fraction must not leak into them.
    config = tiny_config(warmup_fraction_base=0.0, warmup_fraction_incremental=0.5, lr_incremental=0.1)
    teacher, student = base_and_student(config)
    lrs: list[float] = []
    data = RandomSegmentation(8, [3])
    _train_on_cpu(student, teacher, config, 1, data, progress=lambda p: lrs.append(p.lr))
    expected = [0.1 * warmup_poly(4, 0.9, 0.5, 0.001)(i) for i in range(1, 5)]
    assert lrs == pytest.approx(expected)


def test_a_stop_between_micro_batches_checkpoints_the_last_completed_iteration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import engine.step_setup

    class HalfBatches(engine.step_setup.MicroBatchFallback):
        # As after a CUDA out-of-memory halving: each batch of 4 runs as two micro-batches of 2.
        def __init__(self, batch_size: int, **kwargs: object) -> None:
            super().__init__(batch_size, **kwargs)  # type: ignore[arg-type]
            self.micro_batch = batch_size // 2

    monkeypatch.setattr(engine.step_setup, "MicroBatchFallback", HalfBatches)
    config = tiny_config(checkpoint_every=100, epochs_incremental=1)
    teacher, student = base_and_student(config)
    calls = {"n": 0}

    def should_stop() -> bool:
        # Checked before each batch and between its micro-batches: calls 1, 2 (batch 1), 3, 4 (batch 2).
        calls["n"] += 1
        return calls["n"] == 4

    checkpoint = tmp_path / "checkpoint.pt"
    seen: list[torch.Tensor] = []
    result = train_step(
        model=student,
        teacher=teacher,
        dataset=RandomSegmentation(12, [3]),
        config=config,
        step_index=1,
        device=torch.device("cpu"),
        checkpoint_path=checkpoint,
        should_stop=should_stop,
        progress=lambda p: seen.append(student.classifiers[-1].weight.detach().clone()),  # type: ignore[index]
    )
    assert not result.finished and result.iterations == 1 and calls["n"] == 4
    from engine.checkpoint import load_checkpoint

    state = load_checkpoint(checkpoint)
    assert state["position"] == {"epoch": 0, "batch": 1, "iteration": 1}
    # The weights after iteration 1: the abandoned second batch changed nothing.
    assert len(seen) == 1
    assert torch.equal(state["model"]["classifiers.1.weight"], seen[0])
