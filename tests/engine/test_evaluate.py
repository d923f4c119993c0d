"""Prediction rule, confusion matrix, summary numbers, partial-label scoring and the evaluate loop."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

from engine.evaluate import ConfusionMatrix, Metrics, PartialLabelScorer, evaluate, predict_labels, summarize

NAN = math.nan


def _pixels(*ids: int) -> Tensor:
    """A (1, 1, W) label map: one image of one row of pixels."""
    return torch.tensor([[list(ids)]], dtype=torch.int64)


def _fake_all_reduce(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend to be one of two ranks whose peer holds the same counts: all_reduce doubles."""

    def all_reduce(tensor: Tensor, op: object = None) -> None:
        assert op == dist.ReduceOp.SUM
        tensor.mul_(2)

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda: "gloo")
    monkeypatch.setattr(dist, "all_reduce", all_reduce)


# --- predict_labels ---------------------------------------------------------------------------------


def test_predict_labels_takes_best_class_above_half_and_never_the_auxiliary_channel() -> None:
    # five pixels in a row; channels: aux, class 1, class 2
    aux = [9.0, 9.0, 9.0, 9.0, 9.0]  # the highest everywhere, yet never predicted
    class1 = [2.0, -1.0, -3.0, 0.0, 0.01]
    class2 = [1.0, 0.5, -2.0, -0.1, -5.0]
    logits = torch.tensor([aux, class1, class2]).reshape(1, 3, 1, 5)
    labels = predict_labels(logits)
    assert labels.dtype == torch.int64
    assert labels.shape == (1, 1, 5)
    # pixel 3: p_1 = sigmoid(0) = 0.5 exactly, which is not above the threshold
    assert labels.flatten().tolist() == [1, 2, 0, 0, 1]


def test_predict_labels_without_classes_is_background() -> None:
    labels = predict_labels(torch.randn(2, 1, 3, 3))
    assert labels.shape == (2, 3, 3)
    assert not labels.any()


def test_predict_labels_separates_scores_that_saturate_in_half_precision() -> None:
    # sigmoid(12) and sigmoid(15) are both 1.0 in float16; the larger logit must still win.
    logits = torch.tensor([0.0, 12.0, 15.0], dtype=torch.float16).reshape(1, 3, 1, 1)
    assert predict_labels(logits).item() == 2


# --- ConfusionMatrix --------------------------------------------------------------------------------


def _example_matrix() -> ConfusionMatrix:
    matrix = ConfusionMatrix(3)
    target = torch.tensor([[[0, 0, 1, 1], [2, 2, 255, 0]]])
    pred = torch.tensor([[[0, 1, 1, 1], [2, 0, 2, 0]]])
    matrix.update(target, pred)
    return matrix


def test_confusion_matrix_counts_and_iou_by_hand() -> None:
    matrix = _example_matrix()
    # rows = target, cols = prediction; the 255 pixel is skipped
    assert matrix.mat.tolist() == [[2, 1, 0], [0, 2, 0], [1, 0, 1]]
    # IoU_0 = 2 / (3 + 3 - 2), IoU_1 = 2 / (2 + 3 - 2), IoU_2 = 1 / (2 + 1 - 1)
    assert matrix.iou().dtype == torch.float64
    assert matrix.iou().tolist() == pytest.approx([0.5, 2 / 3, 0.5])


def test_confusion_matrix_ignore_mask_skips_pixels() -> None:
    matrix = ConfusionMatrix(3)
    target = torch.tensor([[[0, 0, 1]]])
    pred = torch.tensor([[[0, 1, 1]]])
    matrix.update(target, pred, ignore_mask=torch.tensor([[[False, True, False]]]))
    assert matrix.mat.tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 0]]


def test_confusion_matrix_iou_is_nan_for_a_class_never_seen() -> None:
    matrix = ConfusionMatrix(4)
    matrix.update(torch.tensor([[[0, 1]]]), torch.tensor([[[0, 2]]]))
    iou = matrix.iou()
    assert iou[:3].tolist() == [1.0, 0.0, 0.0]
    assert math.isnan(iou[3].item())


def test_confusion_matrix_merge_adds_counts() -> None:
    total = _example_matrix()
    total.merge(_example_matrix())
    assert total.mat.tolist() == [[4, 2, 0], [0, 4, 0], [2, 0, 2]]
    with pytest.raises(ValueError, match="cannot merge"):
        total.merge(ConfusionMatrix(4))


def test_confusion_matrix_rejects_ids_out_of_range() -> None:
    with pytest.raises(ValueError, match=r"0\.\.2"):
        ConfusionMatrix(3).update(torch.tensor([[[0, 3]]]), torch.tensor([[[0, 0]]]))


def test_confusion_matrix_all_reduce_sums_over_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    matrix = _example_matrix()
    matrix.all_reduce()  # not distributed: unchanged
    assert matrix.mat.tolist() == [[2, 1, 0], [0, 2, 0], [1, 0, 1]]
    _fake_all_reduce(monkeypatch)
    matrix.all_reduce()
    assert matrix.mat.tolist() == [[4, 2, 0], [0, 4, 0], [2, 0, 2]]


# --- summarize and Metrics --------------------------------------------------------------------------


def test_summarize_by_hand() -> None:
    iou = torch.tensor([0.9, 0.6, 0.3, 0.5, NAN], dtype=torch.float64)
    metrics = summarize(iou, old_classes=[1, 2], new_classes=[3, 4])
    assert metrics.miou_old == pytest.approx((0.9 + 0.6 + 0.3) / 3)  # background counts as old
    assert metrics.miou_new == pytest.approx(0.5)  # class 4 is NaN and left out
    assert metrics.miou_all == pytest.approx((0.9 + 0.6 + 0.3 + 0.5) / 4)
    assert metrics.hiou == pytest.approx(2 * 0.6 * 0.5 / (0.6 + 0.5))
    assert list(metrics.iou) == [0, 1, 2, 3, 4]
    assert math.isnan(metrics.iou[4])


def test_summarize_at_step_zero_has_no_new_mean_nor_hiou() -> None:
    metrics = summarize({0: 0.8, 1: 0.4, 2: 0.6}, old_classes=[1, 2], new_classes=[])
    assert metrics.miou_old == pytest.approx(0.6)
    assert metrics.miou_all == pytest.approx(0.6)
    assert math.isnan(metrics.miou_new)
    assert math.isnan(metrics.hiou)


def test_summarize_hiou_is_zero_when_both_means_are_zero() -> None:
    metrics = summarize(torch.zeros(3, dtype=torch.float64), old_classes=[1], new_classes=[2])
    assert metrics.hiou == 0.0


def test_summarize_only_reports_the_classes_asked_for_and_checks_them() -> None:
    metrics = summarize(torch.tensor([1.0, 0.5, 0.25, 0.0]), old_classes=[1], new_classes=[2])
    assert list(metrics.iou) == [0, 1, 2]
    with pytest.raises(ValueError, match="no IoU given for classes"):
        summarize({0: 1.0}, old_classes=[1], new_classes=[])
    with pytest.raises(ValueError, match="distinct"):
        summarize({0: 1.0, 1: 1.0}, old_classes=[1], new_classes=[1])


def test_metrics_json_round_trip_turns_nan_into_none() -> None:
    metrics = Metrics(iou={0: 0.9, 3: NAN}, miou_old=0.9, miou_new=NAN, miou_all=0.9, hiou=NAN)
    data = metrics.to_dict()
    text = json.dumps(data, allow_nan=False)  # strict JSON: no NaN token
    assert data["iou"] == {"0": 0.9, "3": None}
    assert data["hiou"] is None
    back = Metrics.from_dict(json.loads(text))
    assert back.iou[0] == 0.9 and math.isnan(back.iou[3])
    assert back.miou_old == 0.9 and math.isnan(back.miou_new) and math.isnan(back.hiou)


# --- PartialLabelScorer -----------------------------------------------------------------------------


def test_scorer_skips_background_pixels_predicted_as_an_unlabelled_class() -> None:
    scorer = PartialLabelScorer(3)
    scorer.update("a", {1}, target=_pixels(0, 0), pred=_pixels(2, 0))
    # had the first pixel counted, background would be 1/2 and class 2 would be 0
    assert scorer.fp[2] == 0 and scorer.fn[0] == 0
    iou = scorer.iou()
    assert iou[0].item() == 1.0
    assert math.isnan(iou[2].item())


def test_scorer_counts_an_unlabelled_prediction_on_a_labelled_pixel_as_a_miss_only() -> None:
    scorer = PartialLabelScorer(3)
    scorer.update("a", {1}, target=_pixels(1, 1), pred=_pixels(2, 1))
    assert scorer.tp.tolist() == [0, 1, 0]
    assert scorer.fn.tolist() == [0, 1, 0]
    assert scorer.fp.tolist() == [0, 0, 0]
    assert scorer.iou()[1].item() == 0.5
    assert math.isnan(scorer.iou()[2].item())


def test_scorer_takes_each_class_from_the_groups_that_label_it() -> None:
    scorer = PartialLabelScorer(3)
    scorer.update("cats", {1}, target=_pixels(1, 0), pred=_pixels(2, 2))
    scorer.update("dogs", {2}, target=_pixels(2, 2, 0, 0, 2), pred=_pixels(2, 0, 2, 0, 1))
    # class 1: one miss in "cats"; the prediction of 1 in "dogs" is not held against it.
    # class 2: "dogs" only: TP 1, FN 2, FP 1; its predictions in "cats" are not counted.
    # background: "cats" contributes nothing, "dogs" TP 1, FP 1, FN 1.
    assert scorer.iou().tolist() == pytest.approx([1 / 3, 0.0, 1 / 4])


def test_scorer_counts_everything_in_a_fully_labelled_group() -> None:
    target = _pixels(0, 1, 2, 0, 3)  # class 3 is not taught to this model: scored as background
    pred = _pixels(2, 1, 1, 0, 0)
    scorer = PartialLabelScorer(3)
    scorer.update("eval", None, target, pred)
    expected = ConfusionMatrix(3)
    expected.update(_pixels(0, 1, 2, 0, 0), pred)
    assert scorer.iou().tolist() == pytest.approx(expected.iou().tolist())
    assert scorer.iou().tolist() == pytest.approx([2 / 3, 1 / 2, 0.0])


def test_scorer_refuses_inconsistent_groups_and_unlabelled_targets() -> None:
    scorer = PartialLabelScorer(3)
    scorer.update("a", [1], _pixels(1), _pixels(1))
    with pytest.raises(ValueError, match="first scored as labelling"):
        scorer.update("a", [2], _pixels(2), _pixels(2))
    with pytest.raises(ValueError, match=r"contains \[2\]"):
        scorer.update("b", [1], _pixels(2, 255), _pixels(2, 0))


def test_scorer_all_reduce_sums_over_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    scorer = PartialLabelScorer(3)
    scorer.update("a", {1}, target=_pixels(1, 1, 0), pred=_pixels(0, 1, 1))
    _fake_all_reduce(monkeypatch)
    scorer.all_reduce()
    assert scorer.tp.tolist() == [0, 2, 0]
    assert scorer.fp.tolist() == [2, 2, 0]
    assert scorer.fn.tolist() == [2, 2, 0]


# --- evaluate ---------------------------------------------------------------------------------------


class _PoolingModel(nn.Module):
    """Logits (N, 3, H/2, W/2) = the image's channels average-pooled; remembers the mode it ran in."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(3)
        self.modes_seen: list[bool] = []

    def forward(self, images: Tensor) -> SimpleNamespace:
        self.modes_seen.append(self.training)
        return SimpleNamespace(logits=nn.functional.avg_pool2d(images, 2))


def _images(aux: float, class1: float, class2: float) -> Tensor:
    """One 4x4 image whose three channels are constant: the logits of aux, class 1 and class 2."""
    return torch.tensor([aux, class1, class2]).reshape(1, 3, 1, 1).expand(1, 3, 4, 4).clone()


def test_evaluate_upsamples_predicts_scores_and_restores_modes() -> None:
    model = _PoolingModel()
    model.train()
    model.norm.eval()  # as training freezes BatchNorm at incremental steps
    predicts_1 = _images(5.0, 3.0, -1.0)
    predicts_0 = _images(5.0, -1.0, -2.0)
    top_half = torch.zeros(1, 4, 4, dtype=torch.int64)
    top_half[:, :2] = 1
    cats = [(torch.cat([predicts_1, predicts_0]), torch.cat([top_half, torch.zeros_like(top_half)]))]
    dogs = [(predicts_1, top_half * 2)]
    iou = evaluate(model, [("cats", {1}, cats), ("dogs", {2}, dogs)], 3, torch.device("cpu"))
    # background: TP 16 (second image), FN 8 (bottom of the first, predicted 1 in a group labelling 1).
    # class 1: TP 8, FP 8 in "cats"; "dogs" does not label it. class 2: all 8 pixels missed in "dogs";
    # the background of "dogs" predicted as 1 is skipped.
    assert iou.tolist() == pytest.approx([16 / 24, 0.5, 0.0])
    assert model.modes_seen == [False, False]
    assert model.training and not model.norm.training


def test_paper_grouping_on_a_hand_made_confusion_matrix() -> None:
    # Step 2 of a 2-1-1 protocol: classes 1, 2 are the base, 3 came at step 1, 4 at step 2.
    matrix = ConfusionMatrix(5)
    matrix.mat = torch.tensor(
        [
            [8, 1, 0, 1, 0],  # background
            [0, 3, 1, 0, 0],  # class 1
            [0, 0, 4, 0, 0],  # class 2
            [2, 0, 0, 2, 0],  # class 3
            [0, 0, 0, 1, 1],  # class 4
        ]
    )
    iou = matrix.iou()
    expected = {0: 8 / 12, 1: 3 / 5, 2: 4 / 5, 3: 2 / 6, 4: 1 / 2}
    assert iou.tolist() == pytest.approx([expected[k] for k in range(5)])
    metrics = summarize(iou, old_classes=[1, 2, 3], new_classes=[4], base_classes=[1, 2])
    # The gate's grouping: old = background + every class before the step, new = the step's.
    assert metrics.miou_old == pytest.approx((expected[0] + expected[1] + expected[2] + expected[3]) / 4)
    assert metrics.miou_new == pytest.approx(expected[4])
    # The paper's: old = background + base classes, new = every later class.
    paper_old = (expected[0] + expected[1] + expected[2]) / 3
    paper_new = (expected[3] + expected[4]) / 2
    assert metrics.paper is not None
    assert metrics.paper.miou_old == pytest.approx(paper_old)
    assert metrics.paper.miou_new == pytest.approx(paper_new)
    assert metrics.paper.hiou == pytest.approx(2 * paper_old * paper_new / (paper_old + paper_new))
    assert metrics.miou_all == pytest.approx(sum(expected.values()) / 5)
    data = metrics.to_dict()
    assert data["paper"]["miou_new"] == pytest.approx(paper_new)
    assert Metrics.from_dict(data) == metrics
    assert Metrics.from_dict({k: v for k, v in data.items() if k != "paper"}).paper is None
