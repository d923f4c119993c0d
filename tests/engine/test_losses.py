"""Loss terms against values worked out by hand with math.log / math.exp on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from engine.config import LossConfig
from engine.losses import LOSS_TERMS, ac_loss, dkd_loss, kd_loss, mbce_loss, target_entropy, weighted_total


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def bce(x: float, y: float, pos_weight: float = 1.0) -> float:
    """Binary cross-entropy of one logit x against target y, written out."""
    return -(pos_weight * y * math.log(sigmoid(x)) + (1.0 - y) * math.log(1.0 - sigmoid(x)))


# (N=1, 1 + K=3, H=1, W=2): channel 0 auxiliary, channels 1..3 classes 1..3.
LOGITS = torch.tensor([[[[0.3, -1.2]], [[1.5, -0.5]], [[-2.0, 0.7]], [[0.4, 0.9]]]])


def test_mbce_matches_hand_computation_and_255_is_negative() -> None:
    labels = torch.tensor([[[2, 255]]])  # (1, 1, 2)
    # New classes 2 and 3: pixel 0 is class 2 (positive on channel 2), pixel 1 is ignore (negative on both).
    expected = (bce(-2.0, 1.0, 3.0) + bce(0.7, 0.0) + bce(0.4, 0.0) + bce(0.9, 0.0)) / 2
    assert mbce_loss(LOGITS, labels, [2, 3], pos_weight=3.0).item() == pytest.approx(expected, rel=1e-6)
    as_background = mbce_loss(LOGITS, torch.tensor([[[2, 0]]]), [2, 3], pos_weight=3.0)
    assert as_background.item() == pytest.approx(expected, rel=1e-6)


def test_mbce_pos_weight_scales_only_positive_terms() -> None:
    labels = torch.tensor([[[1, 3]]])
    loss_1 = mbce_loss(LOGITS, labels, [1, 3], pos_weight=1.0).item()
    loss_5 = mbce_loss(LOGITS, labels, [1, 3], pos_weight=5.0).item()
    positives = (-math.log(sigmoid(1.5)) - math.log(sigmoid(0.9))) / 2
    assert loss_5 - loss_1 == pytest.approx(4.0 * positives, rel=1e-5)


def test_mbce_ignores_channels_outside_new_classes() -> None:
    labels = torch.tensor([[[1, 0]]])
    changed = LOGITS.clone()
    changed[:, [0, 2, 3]] += 10.0  # auxiliary and classes 2, 3 are not in C_t = {1}
    assert mbce_loss(changed, labels, [1], 2.0).item() == pytest.approx(
        mbce_loss(LOGITS, labels, [1], 2.0).item()
    )
    assert mbce_loss(LOGITS, labels, [1], 2.0).item() == pytest.approx((bce(1.5, 1, 2) + bce(-0.5, 0)) / 2)


def test_mbce_rejects_mismatched_labels() -> None:
    with pytest.raises(ValueError, match="upsample"):
        mbce_loss(LOGITS, torch.zeros(1, 2, 2, dtype=torch.long), [1], 1.0)


def test_kd_is_bce_against_teacher_sigmoid_summed_over_channels() -> None:
    student = torch.tensor([[[[0.5, -1.0]], [[2.0, 0.0]]]], requires_grad=True)  # (1, 2, 1, 2)
    teacher = torch.tensor([[[[1.0, -3.0]], [[0.2, 4.0]]]], requires_grad=True)
    pairs = [(0.5, 1.0), (-1.0, -3.0), (2.0, 0.2), (0.0, 4.0)]
    expected = sum(bce(s, sigmoid(t)) for s, t in pairs) / 2  # / (N * H * W), not / channels
    loss = kd_loss(student, teacher)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert teacher.grad is None  # the teacher is a constant
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_dkd_averages_over_batch_and_pixels() -> None:
    student = torch.tensor([[[[0.1]]], [[[-0.4]]]])  # (2, 1, 1, 1): z+ of one class for two images
    teacher = torch.tensor([[[[1.3]]], [[[0.6]]]], requires_grad=True)
    expected = (bce(0.1, sigmoid(1.3)) + bce(-0.4, sigmoid(0.6))) / 2
    loss = dkd_loss(student, teacher)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert not loss.requires_grad  # nothing but the detached teacher needed gradients


def test_distillation_less_its_floor_is_the_binary_kl_divergence() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 4, 4) * 3, torch.randn(2, 3, 4, 4) * 3
    p, q = torch.sigmoid(teacher), torch.sigmoid(student)
    kl = (p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))).sum() / (2 * 4 * 4)
    assert float(kd_loss(student, teacher) - target_entropy(teacher)) == pytest.approx(float(kl), rel=1e-4)
    assert float(dkd_loss(teacher, teacher)) == pytest.approx(float(target_entropy(teacher)), abs=1e-6)
    assert float(target_entropy(teacher)) > 0.5


def test_distillation_rejects_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="dkd_loss"):
        dkd_loss(torch.zeros(1, 2, 3, 3), torch.zeros(1, 3, 3, 3))


def test_ac_targets_zero_everywhere() -> None:
    aux = torch.tensor([[[[0.3, -1.2], [2.5, 0.0]]]])  # (1, 1, 2, 2)
    expected = sum(-math.log(1.0 - sigmoid(x)) for x in (0.3, -1.2, 2.5, 0.0)) / 4
    assert ac_loss(aux).item() == pytest.approx(expected, rel=1e-6)


def test_terms_are_float32_for_half_inputs() -> None:
    half = LOGITS.to(torch.bfloat16)
    assert mbce_loss(half, torch.tensor([[[1, 0]]]), [1], 1.0).dtype == torch.float32
    assert kd_loss(half, half).dtype == torch.float32
    assert ac_loss(half[:, :1]).dtype == torch.float32


def test_weighted_total_uses_config_weights() -> None:
    terms = {
        name: torch.tensor(value) for name, value in zip(LOSS_TERMS, (1.0, 2.0, 3.0, 4.0, 5.0), strict=True)
    }
    weights = LossConfig(mbce=1.0, kd=5.0, dkd_pos=5.0, dkd_neg=2.0, ac=0.5)
    assert weighted_total(terms, weights).item() == pytest.approx(1 + 10 + 15 + 8 + 2.5)


def test_weighted_total_missing_terms_count_zero() -> None:
    step0 = {"mbce": torch.tensor(0.7), "ac": torch.tensor(0.2)}
    assert weighted_total(step0, LossConfig()).item() == pytest.approx(0.9)
    with pytest.raises(ValueError, match=r"\['dkd'\]"):
        weighted_total({"dkd": torch.tensor(1.0)}, LossConfig())
    with pytest.raises(ValueError):
        weighted_total({}, LossConfig())
