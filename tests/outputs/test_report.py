"""`ciss report`: a self-contained HTML page with plots, tables, gaps for missing metrics, and samples."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ciss_daemon.outputs.report import (
    ReportData,
    ReportError,
    StepReport,
    build_report,
    sample_predictions,
    summary_figure,
)
from engine.config import EngineConfig, ModelConfig
from engine.model import DKDSegmenter
from engine.runner import save_trained_model

NAMES = {1: "cat", 2: "dog", 3: "bicycle"}
HISTORY = [
    {"mbce": 0.9, "kd": 0.2, "ac": 0.1, "total": 1.2},
    {"mbce": 0.7, "kd": 0.1, "ac": 0.1, "total": 1.0},
]


def _metrics(iou: dict[int, float | None], old, new, all_, hiou) -> dict:
    iou_text = {str(k): v for k, v in iou.items()}
    return {"iou": iou_text, "miou_old": old, "miou_new": new, "miou_all": all_, "hiou": hiou}


def _steps() -> list[StepReport]:
    return [
        StepReport(0, "v1", "promoted", _metrics({0: 0.9, 1: 0.7, 2: 0.6}, 0.73, None, 0.73, None), HISTORY),
        StepReport(1, None, "failed", None, []),
        StepReport(
            1, "v2", "held", _metrics({0: 0.8, 1: 0.4, 2: None, 3: 0.5}, 0.6, 0.5, 0.55, 0.545), HISTORY
        ),
    ]


def _sample() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    gt = np.zeros((12, 16), dtype=np.int64)
    gt[2:6, 2:8], gt[0] = 3, 255
    pred = np.zeros((12, 16), dtype=np.int64)
    pred[3:7, 2:8] = 3
    return np.full((12, 16, 3), 90, dtype=np.uint8), gt, pred


def test_report_embeds_every_plot_and_writes_it_beside(tmp_path: Path) -> None:
    path = build_report(ReportData(NAMES, _steps(), [_sample()], title="bikes <v2>"), tmp_path / "r")
    page = path.read_text()
    assert path == tmp_path / "r" / "report.html"
    assert "<title>bikes &lt;v2&gt;</title>" in page
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    files = ["miou.png", "class_iou.png", "losses.png", "samples.png"]
    assert len(embedded) == len(files)
    for data, name in zip(embedded, files, strict=True):
        png = base64.b64decode(data)
        assert png.startswith(b"\x89PNG") and png == (tmp_path / "r" / name).read_bytes()
    assert 'href="miou.png"' in page and 'src="http' not in page  # nothing fetched from elsewhere


def test_tables_show_percentages_gaps_and_forgetting(tmp_path: Path) -> None:
    page = build_report(ReportData(NAMES, _steps()), tmp_path).read_text()
    # summary row of the held step: all, old, new, hIoU
    assert "<td>1</td><td>v2</td><td>held</td><td>55.0</td><td>60.0</td><td>50.0</td><td>54.5</td>" in page
    # the failed step has no metrics: dashes, not zeros
    assert "<td>1</td><td>–</td><td>failed</td><td>–</td><td>–</td><td>–</td><td>–</td>" in page
    # cat went 70 -> (not scored) -> 40: a drop of 30 points from its best
    assert "<td>1</td><td>cat</td><td>70.0</td><td>–</td><td>40.0</td><td>30.0</td>" in page
    # dog's IoU is None at the last step: the drop is measured to its last scored value
    assert "<td>2</td><td>dog</td><td>60.0</td><td>–</td><td>–</td><td>0.0</td>" in page


def test_single_step_without_history_or_samples(tmp_path: Path) -> None:
    (tmp_path / "samples.png").write_bytes(b"from an older report")
    steps = [StepReport(0, "v1", "promoted", _metrics({0: 0.9, 1: float("nan")}, 0.9, None, 0.9, None))]
    page = build_report(ReportData(NAMES, steps), tmp_path).read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["class_iou.png", "miou.png", "report.html"]
    assert page.count("data:image/png;base64,") == 2


def test_report_without_metrics_says_so(tmp_path: Path) -> None:
    steps = [StepReport(0, None, "training", None, [])]
    page = build_report(ReportData(NAMES, steps), tmp_path).read_text()
    assert "No step has been evaluated yet" in page
    assert "data:image" not in page
    assert summary_figure(steps) is None


def test_unwritable_folder_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ReportError, match=r"cannot write the report into .*file/sub: .*check the free space"):
        build_report(ReportData(NAMES, _steps()), tmp_path / "file" / "sub")


def test_sample_predictions_maps_masks_and_predicts(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = EngineConfig(model=ModelConfig(backbone="resnet18"))
    model = DKDSegmenter(config.model, [2]).eval()
    with torch.no_grad():
        model.classifiers[0].bias.copy_(torch.tensor([-50.0, 50.0]))  # class 2 wins every pixel
    save_trained_model(model, tmp_path / "model", config=config, class_names={1: "a", 2: "b"}, step_index=0)
    image = np.random.default_rng(0).integers(0, 256, (40, 80, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "x.png")
    mask = np.zeros((40, 80), dtype=np.uint8)
    mask[:, 40:], mask[:10, :10] = 7, 9  # 9 is not in the value map: it becomes ignore (255)
    Image.fromarray(mask, "L").save(tmp_path / "x.mask.png")
    pair = (tmp_path / "x.png", tmp_path / "x.mask.png", {7: 2})

    samples = sample_predictions(tmp_path / "model", [pair, pair], 1, max_size=32)

    assert len(samples) == 1
    shown, gt, pred = samples[0]
    assert shown.shape == (16, 32, 3) and gt.shape == (16, 32) and pred.shape == (16, 32)
    assert (gt[:, 16:] == 2).all() and (gt[4:, :16] == 0).all() and (gt[:4, :4] == 255).all()
    assert (pred == 2).all()


def test_twenty_classes_keep_their_whole_legend_in_samples_png() -> None:
    from ciss_daemon.outputs.report import samples_figure

    names = {k: f"class-number-{k}" for k in range(1, 21)}
    gt = np.arange(1, 21).repeat(8).reshape(10, 16)  # every class present
    figure = samples_figure([(np.zeros((10, 16, 3), dtype=np.uint8), gt, gt)], names)
    assert figure is not None
    figure.canvas.draw()
    legend = figure.legends[0].get_window_extent()
    assert len(figure.legends[0].get_texts()) == 20
    assert legend.y0 >= 0 and legend.x0 >= 0 and legend.x1 <= figure.bbox.x1


def test_the_same_image_stored_twice_is_shown_once(tmp_path: Path) -> None:
    from ciss_daemon.outputs.report import distinct_pairs

    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / "a.png").write_bytes((tmp_path / "a.png").read_bytes())
    Image.fromarray(np.ones((4, 4, 3), dtype=np.uint8)).save(tmp_path / "b.png")
    pairs = [(tmp_path / n, tmp_path / "mask.png", {}) for n in ("a.png", "again/a.png", "b.png")]
    assert [p[0].name for p in distinct_pairs(pairs)] == ["a.png", "b.png"]


def test_the_loss_plot_says_which_line_is_the_weighted_total() -> None:
    from ciss_daemon.outputs.report import loss_figure

    figure = loss_figure(_steps())
    assert figure is not None
    labels = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    assert labels == ["mbce", "kd", "ac", "total (weighted sum)"]
    assert figure.axes[0].get_ylabel() == "loss (terms unweighted)"


def test_class_colours_follow_batch_toml_then_colour_words_then_the_palette() -> None:
    from ciss_daemon.outputs.predict import COLOUR_WORDS, class_palette, palette

    table = class_palette({1: "orange-plate", 2: "cat", 3: "striped_blue_disc"}, {"cat": (1, 2, 3)})
    assert table[1].tolist() == list(COLOUR_WORDS["orange"])
    assert table[2].tolist() == [1, 2, 3]
    assert table[3].tolist() == list(COLOUR_WORDS["blue"])
    assert table[0].tolist() == [0, 0, 0]
    assert class_palette({1: "cat", 2: "dog"}).tolist() == palette(2).tolist()
