"""The GPU fast paths compute the same step as the plain path: upsampling, layouts, bf16, inference mode,
compile, gradient accumulation and the out-of-memory fallback, on a tiny CPU model (GPU tests marked)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from train_helpers import RandomSegmentation, base_and_student, tiny_config

from engine.config import EngineConfig, ModelConfig, TrainConfig
from engine.fast import (
    FastPaths,
    MicroBatchFallback,
    accumulate_gradients,
    bilinear_matrix,
    default_fast_paths,
    device_batches,
    upsample_separable,
)
from engine.losses import weighted_total
from engine.step_setup import StepModel, freeze_teacher, set_step_mode
from engine.train import TrainResult, loss_terms, train_step

CPU = torch.device("cpu")
# Everything that runs on a CPU without code generation; compile has its own (slow) test.
ALL_BUT_COMPILE = FastPaths(
    channels_last=True,
    separable_upsample=True,
    teacher_inference_mode=True,
    prefetch=True,
)


# ---------------------------------------------------------------------------------------- upsampling


@pytest.mark.parametrize(
    ("h", "w", "out_h", "out_w"),
    [
        (2, 2, 32, 32),
        (4, 3, 32, 29),
        (5, 7, 33, 64),
        (1, 1, 8, 8),
        (3, 5, 3, 17),
        (2, 3, 7, 5),
        (32, 32, 512, 512),
    ],
)
def test_separable_upsample_equals_interpolate(h: int, w: int, out_h: int, out_w: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, h, w, dtype=torch.float64, requires_grad=True)
    expected = F.interpolate(x, size=(out_h, out_w), mode="bilinear", align_corners=False)
    actual = upsample_separable(x, (out_h, out_w))
    assert actual.shape == expected.shape == (2, 3, out_h, out_w)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12)
    grad_out = torch.randn_like(expected)
    (grad_expected,) = torch.autograd.grad(expected, x, grad_out)
    (grad_actual,) = torch.autograd.grad(actual, x, grad_out)
    torch.testing.assert_close(grad_actual, grad_expected, rtol=0, atol=1e-12)


def test_bilinear_matrix_is_an_interpolation_and_cached() -> None:
    matrix = bilinear_matrix(4, 10, CPU, torch.float64)  # (out, in)
    assert matrix.shape == (10, 4)
    torch.testing.assert_close(matrix.sum(dim=1), torch.ones(10, dtype=torch.float64))
    assert (matrix >= 0).all() and ((matrix > 0).sum(dim=1) <= 2).all()
    assert bilinear_matrix(4, 10, CPU, torch.float64) is matrix
    torch.testing.assert_close(bilinear_matrix(5, 5, CPU, torch.float64), torch.eye(5, dtype=torch.float64))


def test_bilinear_matrix_built_in_inference_mode_serves_autograd() -> None:
    bilinear_matrix.cache_clear()
    with torch.inference_mode():
        upsample_separable(torch.randn(1, 1, 3, 3), (9, 9))  # the teacher fills the cache first
    x = torch.randn(1, 1, 3, 3, requires_grad=True)
    upsample_separable(x, (9, 9)).sum().backward()  # the student's backward saves the same matrices
    assert x.grad is not None


def test_separable_upsample_channels_last_float32_and_bf16() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, 4, 4).contiguous(memory_format=torch.channels_last)
    expected = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(upsample_separable(x, (64, 64)), expected, rtol=1e-6, atol=1e-6)
    half = upsample_separable(x.bfloat16(), (64, 64))
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), expected, rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------------- fast loss terms vs plain


def _step_setup(step_index: int) -> tuple[EngineConfig, nn.Module | None, nn.Module, Tensor, Tensor]:
    """Tiny model, teacher (None at step 0), 2 images of 32x32 and labels with ignore pixels."""
    config = EngineConfig(
        model=ModelConfig(backbone="resnet18", head_dropout=0.0),  # dropout masks follow memory layout
        train=tiny_config().train,
    )
    teacher, student = base_and_student(config)
    model = teacher if step_index == 0 else student
    set_step_mode(model, step_index, config)
    if step_index:
        freeze_teacher(teacher)
    g = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, 32, 32, generator=g)
    classes = torch.tensor([0, 1, 2, 255] if step_index == 0 else [0, 3, 255])
    labels = classes[torch.randint(len(classes), (2, 32, 32), generator=g)]
    return config, (None if step_index == 0 else teacher), model, images, labels


def _terms_and_grads(
    config: EngineConfig,
    teacher: nn.Module | None,
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    fast: FastPaths | None,
    autocast: bool = False,
) -> tuple[dict[str, float], dict[str, Tensor]]:
    teacher, model = copy.deepcopy(teacher), copy.deepcopy(model)
    new_classes = [1, 2] if teacher is None else [3]
    if fast is not None:
        fast.apply_memory_format(model, teacher)
        images = images.contiguous(memory_format=torch.channels_last) if fast.channels_last else images
    student = StepModel(model, num_old=new_classes[0] - 1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        terms = loss_terms(
            student,
            teacher,
            images,
            labels,
            new_classes=new_classes,
            pos_weight=2.0,
            config=config,
            fast=fast,
        )
    weighted_total(terms, config.loss).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return {name: float(term.detach()) for name, term in terms.items()}, grads


@pytest.mark.parametrize(("step_index", "tolerance"), [(0, 5e-3), (1, 1e-5)])
def test_fast_loss_terms_equal_plain_in_float32(step_index: int, tolerance: float) -> None:
    # Per parameter, the largest gradient difference relative to the largest gradient. Step 0 trains
    # BatchNorm on 2 images (the ASPP pooling branch normalises 2 values per channel), which amplifies
    # float32 rounding differences of the channels_last convolutions to about 1.5e-3 with the Kaiming-
    # initialised head (about 5e-4 with PyTorch's narrower default init); t >= 1 stays near 1e-6. The loss
    # terms agree to about 1.5e-5 relative there.
    setup = _step_setup(step_index)
    plain_terms, plain_grads = _terms_and_grads(*setup, fast=None)
    fast_terms, fast_grads = _terms_and_grads(*setup, fast=ALL_BUT_COMPILE)
    expected = {"mbce", "ac"} if step_index == 0 else {"mbce", "ac", "kd", "dkd_pos", "dkd_neg"}
    assert set(fast_terms) == set(plain_terms) == expected
    assert fast_terms == pytest.approx(plain_terms, rel=5e-5, abs=1e-6)
    assert fast_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        difference = (fast_grads[name] - grad).abs().max()
        assert difference <= tolerance * grad.abs().max() + 1e-12, name


def test_fast_loss_terms_in_bf16_autocast_agree_within_bf16_tolerance() -> None:
    setup = _step_setup(1)
    plain_terms, plain_grads = _terms_and_grads(*setup, fast=None)
    fast_terms, fast_grads = _terms_and_grads(*setup, fast=ALL_BUT_COMPILE, autocast=True)
    assert fast_terms == pytest.approx(plain_terms, rel=3e-2, abs=1e-3)
    # Gradients as a whole: bf16 keeps about 3 significant digits per value; through the Kaiming-initialised
    # head (larger logits than PyTorch's default init) the whole gradient differs by about 7.5 %.
    flat = torch.cat([g.flatten() for g in plain_grads.values()])
    flat_fast = torch.cat([fast_grads[name].flatten() for name in plain_grads])
    assert torch.linalg.vector_norm(flat_fast - flat) <= 1e-1 * torch.linalg.vector_norm(flat)


# ------------------------------------------------------------------------------- whole training step


def _train(
    step_index: int, fast: FastPaths | None, *, amp: bool = False, **train: object
) -> tuple[nn.Module, TrainResult]:
    config = tiny_config(epochs_base=1, epochs_incremental=1, amp=amp, **train)
    teacher, student = base_and_student(config)
    dataset = RandomSegmentation(8, [1, 2] if step_index == 0 else [3])
    model = teacher if step_index == 0 else student
    torch.manual_seed(123)
    result = train_step(
        model=model,
        teacher=None if step_index == 0 else teacher,
        dataset=dataset,
        config=config,
        step_index=step_index,
        device=CPU,
        fast=fast,
    )
    return model, result


def _assert_same_training(
    a: tuple[nn.Module, TrainResult], b: tuple[nn.Module, TrainResult], rel: float
) -> None:
    (model_a, result_a), (model_b, result_b) = a, b
    assert result_a.iterations == result_b.iterations
    for epoch_a, epoch_b in zip(result_a.history, result_b.history, strict=True):
        assert epoch_a == pytest.approx(epoch_b, rel=rel, abs=rel * 1e-2)
    for (name, p), q in zip(model_a.state_dict().items(), model_b.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=rel, atol=rel * 1e-2, msg=name)


def test_train_step_with_fast_paths_equals_plain_in_float32() -> None:
    plain = _train(1, FastPaths())
    fast = _train(1, ALL_BUT_COMPILE)
    _assert_same_training(fast, plain, rel=1e-4)
    assert fast[1].micro_batch == plain[1].micro_batch == 4


def test_train_step_in_bf16_autocast_on_cpu_stays_close_to_float32() -> None:
    plain = _train(1, FastPaths())
    fast = _train(1, FastPaths(bf16_autocast=True, separable_upsample=True), amp=True)
    for epoch_a, epoch_b in zip(fast[1].history, plain[1].history, strict=True):
        assert epoch_a == pytest.approx(epoch_b, rel=3e-2, abs=1e-3)


@pytest.mark.slow
def test_train_step_compiled_equals_plain() -> None:
    # aot_eager runs dynamo and AOTAutograd, the parts that could change the graph, in seconds on a CPU;
    # inductor's code generation takes minutes here and is covered by the GPU test.
    compiled = FastPaths(
        channels_last=True,
        compile=True,
        compile_backend="aot_eager",
        separable_upsample=True,
    )
    _assert_same_training(_train(1, compiled), _train(1, FastPaths()), rel=1e-4)


def test_default_fast_paths() -> None:
    cuda = default_fast_paths("cuda")
    assert cuda.channels_last and cuda.bf16_autocast and cuda.compile and cuda.separable_upsample
    assert cuda.teacher_inference_mode and cuda.prefetch and cuda.oom_fallback
    assert cuda.cudnn_benchmark
    cpu = default_fast_paths(CPU)
    assert not (cpu.channels_last or cpu.compile or cpu.separable_upsample or cpu.prefetch)


def test_step_context_scopes_cudnn_autotuning() -> None:
    before = torch.backends.cudnn.benchmark
    with FastPaths(cudnn_benchmark=True).step_context():
        assert torch.backends.cudnn.benchmark
    assert torch.backends.cudnn.benchmark == before
    with FastPaths().step_context():
        assert torch.backends.cudnn.benchmark == before


def test_device_batches_moves_and_lays_out_the_images() -> None:
    batches = [(torch.randn(2, 3, 8, 8), torch.zeros(2, 8, 8, dtype=torch.int64)) for _ in range(3)]
    moved = list(device_batches(batches, CPU, ALL_BUT_COMPILE))
    assert len(moved) == 3
    for (images, labels), (original, original_labels) in zip(moved, batches, strict=True):
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(images, original) and torch.equal(labels, original_labels)
    # Without channels_last the layout the loader gave is kept, whatever it is.
    strided = [(torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last), torch.zeros(2, 8, 8))]
    ((images, _),) = device_batches(strided, CPU, FastPaths())
    assert images.is_contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------- accumulation and the OOM fallback


@pytest.mark.parametrize("micro_batch", [4, 3])
def test_micro_batches_give_the_gradients_of_the_whole_batch(micro_batch: int) -> None:
    # Incremental step: BatchNorm frozen and dropout off, so splitting the batch changes nothing.
    config, teacher, model, _, _ = _step_setup(1)
    g = torch.Generator().manual_seed(5)
    images = torch.randn(8, 3, 32, 32, generator=g)
    labels = torch.tensor([0, 3, 255])[torch.randint(3, (8, 32, 32), generator=g)]
    student = StepModel(model, num_old=2)

    def loss_fn(x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        terms = loss_terms(student, teacher, x, y, new_classes=[3], pos_weight=1.0, config=config)
        return weighted_total(terms, config.loss), terms

    results = []
    for size in (8, micro_batch):  # 8: one pass; 4: two equal halves; 3: 3 + 3 + 2
        model.zero_grad(set_to_none=True)
        total, terms = accumulate_gradients(images, labels, size, loss_fn, lambda loss: loss.backward())
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((total, terms, grads))
    (total, terms, grads), (micro_total, micro_terms, micro_grads) = results
    torch.testing.assert_close(micro_total, total, rtol=1e-6, atol=1e-7)
    for name, term in terms.items():
        torch.testing.assert_close(micro_terms[name], term.detach(), rtol=1e-6, atol=1e-7)
    for name, grad in grads.items():
        torch.testing.assert_close(micro_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_oom_falls_back_to_half_the_micro_batch(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    reference = _train(1, FastPaths(), batch_size=8)
    assert reference[1].micro_batch == 8

    forward = StepModel.forward
    seen: list[int] = []

    def forward_that_fits_four(self: StepModel, images: Tensor):  # type: ignore[no-untyped-def]
        seen.append(images.shape[0])
        if images.shape[0] > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(self, images)

    monkeypatch.setattr(StepModel, "forward", forward_that_fits_four)
    with caplog.at_level(logging.WARNING, logger="ciss.engine.fast"):
        fallen = _train(1, FastPaths(), batch_size=8)
    assert seen == [8, 4, 4]  # one batch of 8 images: a failed try, then two micro-batches of 4
    assert fallen[1].micro_batch == 4
    assert "micro-batch 4" in caplog.text
    _assert_same_training(fallen, reference, rel=1e-5)


def test_oom_fallback_limits() -> None:
    resets: list[int] = []
    images, labels = torch.zeros(8, 1), torch.zeros(8)

    def always_oom(x: Tensor, y: Tensor, micro: int) -> int:
        raise torch.cuda.OutOfMemoryError(f"simulated at {micro}")

    fallback = MicroBatchFallback(8, min_size=2)
    with pytest.raises(torch.cuda.OutOfMemoryError, match="simulated at 2"):
        fallback.run(images, labels, always_oom, reset=lambda: resets.append(1))
    assert fallback.micro_batch == 2 and len(resets) == 2  # 8 -> 4 -> 2, then it gives up

    with pytest.raises(torch.cuda.OutOfMemoryError, match="simulated at 8"):
        MicroBatchFallback(8, enabled=False).run(images, labels, always_oom, reset=lambda: None)

    late = MicroBatchFallback(8, window=2)
    for _ in range(2):
        assert late.run(images, labels, lambda x, y, micro: micro, reset=lambda: None) == 8
    with pytest.raises(torch.cuda.OutOfMemoryError, match="simulated at 8"):
        late.run(images, labels, always_oom, reset=lambda: None)  # past the first iterations: a real problem


# ------------------------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
def test_gpu_fast_step_matches_plain_within_bf16_tolerance() -> None:
    device = torch.device("cuda")

    def run(fast: FastPaths, amp: bool) -> list[dict[str, float]]:
        config = EngineConfig(
            model=ModelConfig(backbone="resnet18"),
            train=TrainConfig(batch_size=4, crop_size=64, epochs_incremental=2, amp=amp),
        )
        teacher, student = base_and_student(config)
        teacher.to(device)
        torch.manual_seed(123)
        result = train_step(
            model=student,
            teacher=teacher,
            dataset=RandomSegmentation(8, [3], size=64),
            config=config,
            step_index=1,
            device=device,
            fast=fast,
        )
        return result.history

    fast = run(default_fast_paths(device), amp=True)
    plain = run(FastPaths(), amp=False)
    for a, b in zip(fast, plain, strict=True):
        assert a == pytest.approx(b, rel=3e-2, abs=1e-3)


@pytest.mark.gpu
def test_gpu_separable_upsample_and_prefetch() -> None:
    device = torch.device("cuda")
    x = torch.randn(4, 21, 32, 32, device=device)
    expected = F.interpolate(x, size=(512, 512), mode="bilinear", align_corners=False)
    torch.testing.assert_close(upsample_separable(x, (512, 512)), expected, rtol=1e-4, atol=1e-4)
    batches = [
        (torch.randn(2, 3, 16, 16).pin_memory(), torch.ones(2, 16, 16, dtype=torch.int64)) for _ in range(4)
    ]
    moved = list(device_batches(batches, device, default_fast_paths(device)))
    for (images, labels), (original, original_labels) in zip(moved, batches, strict=True):
        assert images.device.type == "cuda" and torch.equal(images.cpu(), original)
        assert torch.equal(labels.cpu(), original_labels)


def test_accumulate_gradients_calls_between_before_every_micro_batch_but_the_first() -> None:
    seen: list[int] = []

    def loss_fn(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        seen.append(images.shape[0])
        loss = images.sum() * 0
        return loss, {"x": loss}

    calls = {"n": 0}

    def between() -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # any exception abandons the batch

    with pytest.raises(KeyboardInterrupt):
        accumulate_gradients(
            torch.zeros(6, 3, 2, 2), torch.zeros(6, 2, 2), 2, loss_fn, lambda loss: None, between=between
        )
    assert seen == [2, 2] and calls["n"] == 2
