"""`ciss report`: one self-contained HTML page of how the model learned, step by step.

The page shows mIoU (all, old, new) and hIoU per step, IoU per class over the steps (forgetting shows as a
row that fades), the training loss terms per epoch of each step, and a few held-out images with their ground
truth and the current model's prediction. Every plot is embedded in the page as a PNG data URI, so the file
can be mailed or archived alone, and is also written beside it.

Figures are drawn with matplotlib's Agg canvas directly, never through pyplot: no GUI backend, no global
figure state, safe in a daemon or a thread. IoUs are fractions in the data and shown as percentages.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator
from PIL import Image

from ciss_daemon.exceptions import CissError
from ciss_daemon.outputs.predict import OUT_OF_PALETTE, class_palette, colour_mask, predict_image
from engine.data import label_lut, remap
from engine.runner import load_model, resolve_device
from engine.transforms import read_image, read_mask

REPORT_FILE = "report.html"
SUMMARY_KEYS = (  # the gate's grouping: old = background and every class before the step
    ("miou_all", "mIoU all"),
    ("miou_old", "mIoU old"),
    ("miou_new", "mIoU new"),
    ("hiou", "hIoU"),
)
LOSS_ORDER = ("mbce", "kd", "dkd_pos", "dkd_neg", "ac", "total")
IGNORE = 255
LEGEND_COLUMNS = 4
_DPI = 100

# One held-out example: image (H, W, 3) uint8, ground truth (H, W) and prediction (H, W) of global class ids
# (255 in the ground truth: ignore).
Sample = tuple[np.ndarray, np.ndarray, np.ndarray]


class ReportError(CissError):
    """``ciss report`` cannot write its files."""


@dataclass
class StepReport:
    """One step as the catalog knows it."""

    index: int
    version: str | None  # the model version folder, None when no model was saved (failed step)
    state: str  # promoted, held, failed, rolled back, ...
    metrics: dict[str, Any] | None = None  # engine.evaluate.Metrics.to_dict(): iou, miou_*, hiou
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch: loss term -> mean value


@dataclass
class ReportData:
    class_names: dict[int, str]  # global class id (>= 1) -> name
    steps: list[StepReport]  # in the order to show them (usually by step index)
    samples: list[Sample] = field(default_factory=list)
    title: str = "ciss report"
    colours: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # name -> RGB, from [colors]


def _number(value: Any) -> float:
    """A metric as a float; None (how to_dict writes NaN) and missing values become NaN."""
    return math.nan if value is None else float(value)


def _percent(value: float) -> str:
    return "–" if math.isnan(value) else f"{100 * value:.1f}"


def _class_name(class_names: dict[int, str], class_id: int) -> str:
    if class_id == 0:
        return "background"
    return class_names.get(class_id, f"class {class_id}")


def _step_label(step: StepReport) -> str:
    return f"step {step.index}\n{step.state}"


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)  # the Agg (PNG) canvas, chosen explicitly
    return figure


def _iou_rows(steps: Sequence[StepReport]) -> tuple[list[int], np.ndarray]:
    """Class ids found in any step's metrics, and their IoU: an array (classes, steps), NaN where missing."""
    ids = sorted({int(k) for step in steps for k in ((step.metrics or {}).get("iou") or {})})
    table = np.full((len(ids), len(steps)), np.nan)
    for column, step in enumerate(steps):
        iou = (step.metrics or {}).get("iou") or {}
        for row, class_id in enumerate(ids):
            table[row, column] = _number(iou.get(str(class_id)))
    return ids, table


def summary_figure(steps: Sequence[StepReport]) -> Figure | None:
    """mIoU all/old/new and hIoU per step (lines); None when no step has metrics."""
    if not any(step.metrics for step in steps):
        return None
    figure = _new_figure(max(5.0, 1.1 * len(steps) + 2.0), 3.6)
    axes = figure.add_subplot()
    positions = np.arange(len(steps))
    for key, label in SUMMARY_KEYS:
        values = np.array([_number((step.metrics or {}).get(key)) for step in steps])
        # NaN leaves a gap in the line; markers keep a single step (or an isolated value) visible.
        axes.plot(positions, 100 * values, marker="o", label=label)
    # The paper's grouping (old = background + base classes), dashed, where the metrics hold it.
    for key, label in SUMMARY_KEYS[1:]:
        values = np.array([_number(((step.metrics or {}).get("paper") or {}).get(key)) for step in steps])
        if not np.isnan(values).all():
            axes.plot(positions, 100 * values, marker="s", linestyle="--", label=f"{label}, paper grouping")
    axes.set_xticks(positions, [_step_label(step) for step in steps])
    axes.set_xlim(-0.5, len(steps) - 0.5)
    axes.set_ylim(0, 100)
    axes.set_ylabel("IoU (%)")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower left", fontsize="small")
    axes.set_title("mIoU per step")
    return figure


def class_iou_figure(steps: Sequence[StepReport], class_names: dict[int, str]) -> Figure | None:
    """Heatmap of IoU, one row per class and one column per step; None when no step has per-class IoU."""
    ids, table = _iou_rows(steps)
    if not ids:
        return None
    figure = _new_figure(max(5.0, 0.9 * len(steps) + 3.0), max(2.5, 0.32 * len(ids) + 1.5))
    axes = figure.add_subplot()
    # Grey: a class not scored at a step (not yet taught, or no held-out pixel of it).
    cmap = colormaps["viridis"].with_extremes(bad="lightgrey")
    image = axes.imshow(np.ma.masked_invalid(100 * table), cmap=cmap, vmin=0, vmax=100, aspect="auto")
    axes.set_xticks(np.arange(len(steps)), [_step_label(step) for step in steps])
    axes.set_yticks(np.arange(len(ids)), [_class_name(class_names, k) for k in ids])
    if table.size <= 600:  # numbers stay legible up to about this many cells
        for (row, column), value in np.ndenumerate(table):
            if not math.isnan(value):
                axes.text(
                    column,
                    row,
                    f"{100 * value:.0f}",
                    ha="center",
                    va="center",
                    fontsize="x-small",
                    color="white" if value < 0.5 else "black",
                )
    figure.colorbar(image, ax=axes, label="IoU (%)")
    axes.set_title("IoU per class (grey: not scored)")
    return figure


def loss_figure(steps: Sequence[StepReport]) -> Figure | None:
    """Each loss term per epoch, one panel per step that has a training history; None when none has."""
    trained = [step for step in steps if step.history]
    if not trained:
        return None
    columns = min(3, len(trained))
    rows = math.ceil(len(trained) / columns)
    figure = _new_figure(4.2 * columns, 3.0 * rows)
    panels = figure.subplots(rows, columns, squeeze=False).ravel()
    keys = {key for step in trained for epoch in step.history for key in epoch}
    # One colour per loss term across all panels, in the order of docs/method.md's weighted sum.
    ordered = [k for k in LOSS_ORDER if k in keys] + sorted(keys - set(LOSS_ORDER))
    for axes, step in zip(panels, trained, strict=False):
        epochs = np.arange(1, len(step.history) + 1)
        for index, key in enumerate(ordered):
            if not any(key in epoch for epoch in step.history):
                continue
            values = [_number(epoch.get(key)) for epoch in step.history]
            marker = "o" if len(epochs) <= 30 else None
            label = "total (weighted sum)" if key == "total" else key
            style = "--" if key == "total" else "-"
            axes.plot(epochs, values, style, marker=marker, markersize=3, color=f"C{index % 10}", label=label)
        axes.set_title(f"step {step.index}" + (f" ({step.version})" if step.version else ""))
        axes.set_xlabel("epoch")
        axes.set_xlim(0.5, len(epochs) + 0.5)
        if len(epochs) <= 12:
            axes.set_xticks(epochs)
        else:
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel("loss (terms unweighted)")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="x-small")
    for axes in panels[len(trained) :]:
        axes.set_visible(False)
    return figure


def samples_figure(
    samples: Sequence[Sample],
    class_names: dict[int, str],
    class_colours: dict[str, tuple[int, int, int]] | None = None,
) -> Figure | None:
    """A grid of held-out examples: image, ground truth, prediction; None without samples."""
    if not samples:
        return None
    labels = [np.asarray(label) for _, gt, pred in samples for label in (gt, pred)]
    found = sorted({int(k) for label in labels for k in np.unique(label)} - {0})
    classes = [k for k in found if k != IGNORE]  # class ids are never 255 (engine.data.label_lut)
    colours = class_palette({k: _class_name(class_names, k) for k in {*class_names, *classes}}, class_colours)
    # The legend goes below the grid, LEGEND_COLUMNS entries a row: the figure grows by its rows, so
    # twenty classes are not cut off.
    entries = len(classes) + (IGNORE in found)
    legend_rows = math.ceil(entries / LEGEND_COLUMNS)
    figure = _new_figure(9.0, 2.8 * len(samples) + 0.3 * legend_rows + 0.4)
    panels = figure.subplots(len(samples), 3, squeeze=False)
    for row, (image, gt, pred) in enumerate(samples):
        for axes, picture, title in zip(
            panels[row],
            (np.asarray(image), colour_mask(gt, colours), colour_mask(pred, colours)),
            ("image", "ground truth", "prediction"),
            strict=True,
        ):
            axes.imshow(picture, interpolation="nearest")
            axes.set_axis_off()
            if row == 0:
                axes.set_title(title)
    handles = [
        Patch(facecolor=tuple(colours[k] / 255), edgecolor="grey", label=_class_name(class_names, k))
        for k in classes
    ]
    if IGNORE in found:
        handles.append(
            Patch(facecolor=tuple(np.array(OUT_OF_PALETTE) / 255), edgecolor="grey", label="ignore")
        )
    if handles:
        figure.legend(
            handles=handles,
            loc="outside lower center",
            ncols=min(LEGEND_COLUMNS, len(handles)),
            fontsize="small",
        )
    return figure


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _summary_table(steps: Sequence[StepReport]) -> str:
    head = "".join(f"<th>{label}</th>" for _, label in SUMMARY_KEYS)
    rows = []
    for step in steps:
        cells = "".join(
            f"<td>{_percent(_number((step.metrics or {}).get(key)))}</td>" for key, _ in SUMMARY_KEYS
        )
        version = html.escape(step.version or "–")
        rows.append(
            f"<tr><td>{step.index}</td><td>{version}</td><td>{html.escape(step.state)}</td>{cells}</tr>"
        )
    return f"<table><tr><th>step</th><th>version</th><th>state</th>{head}</tr>{''.join(rows)}</table>"


def _class_table(steps: Sequence[StepReport], class_names: dict[int, str]) -> str:
    """IoU (%) per class and step, and the drop from each class's best step to the last one scored."""
    ids, table = _iou_rows(steps)
    if not ids:
        return ""
    head = "".join(f"<th>step {step.index}</th>" for step in steps)
    rows = []
    for class_id, values in zip(ids, table, strict=True):
        scored = values[~np.isnan(values)]
        drop = _percent(float(scored.max() - scored[-1])) if scored.size else "–"
        cells = "".join(f"<td>{_percent(float(v))}</td>" for v in values)
        name = html.escape(_class_name(class_names, class_id))
        rows.append(f"<tr><td>{class_id}</td><td>{name}</td>{cells}<td>{drop}</td></tr>")
    return (
        "<h2>IoU per class (%)</h2>"
        f"<table><tr><th>id</th><th>class</th>{head}<th>drop from best</th></tr>{''.join(rows)}</table>"
    )


_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f2f2f2; }
td:nth-child(2), td:nth-child(3) { text-align: left; }
figure { margin: 1.5em 0; }
img { max-width: 100%; }
"""


def build_report(data: ReportData, out_dir: Path, *, progress: Callable[[str], None] | None = None) -> Path:
    """Write ``report.html`` and its PNG plots into ``out_dir``; returns the HTML file's path.

    A plot without data (no metrics yet, no training history, no samples) is left out; a page without
    any metrics says so. ``progress(words)`` hears which plot is being drawn.
    """
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        sections = []
        for name, caption, draw in _figures(data):
            if progress is not None:
                progress(f"drawing {name}")
            figure = draw()
            if figure is None:
                (out_dir / name).unlink(missing_ok=True)  # never leave an older run's plot beside this page
                continue
            sections.append(_figure_section(out_dir, name, caption, figure))
        if not any(step.metrics for step in data.steps):
            sections.insert(0, "<p>No step has been evaluated yet: there are no metrics to plot.</p>")
        title = html.escape(data.title)
        page = (
            f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{_STYLE}</style></head><body><h1>{title}</h1>"
            f"<h2>Steps (%)</h2>{_summary_table(data.steps)}{''.join(sections)}"
            f"{_class_table(data.steps, data.class_names)}</body></html>\n"
        )
        path = out_dir / REPORT_FILE
        path.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise ReportError(
            f"cannot write the report into {out_dir}: {exc.strerror or exc}; "
            "check the free space and permissions"
        ) from None
    return path


def _figures(data: ReportData) -> list[tuple[str, str, Callable[[], Figure | None]]]:
    """The page's plots in order: file name, caption, and how to draw it (None when it has no data)."""
    return [
        (
            "miou.png",
            "mIoU of all, old and new classes, and their harmonic mean hIoU, per step.",
            lambda: summary_figure(data.steps),
        ),
        (
            "class_iou.png",
            "IoU per class over the steps: a row that fades is a class being forgotten.",
            lambda: class_iou_figure(data.steps, data.class_names),
        ),
        (
            "losses.png",
            "Training loss terms per epoch, per step: each term unweighted (KD, DKD+ and DKD- as KL "
            "divergences: their BCE less the teacher target's entropy, 0 when the student matches), and "
            "their weighted sum (dashed).",
            lambda: loss_figure(data.steps),
        ),
        (
            "samples.png",
            "Held-out images, their ground truth and the current model's prediction.",
            lambda: samples_figure(data.samples, data.class_names, data.colours),
        ),
    ]


def _figure_section(out_dir: Path, name: str, caption: str, figure: Figure) -> str:
    """Write ``figure`` as ``out_dir/name`` and return it as an HTML figure with the PNG embedded."""
    png = _png(figure)
    (out_dir / name).write_bytes(png)
    uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return (
        f'<figure><img src="{uri}" alt="{html.escape(caption)}">'
        f'<figcaption>{html.escape(caption)} (<a href="{name}">{name}</a>)</figcaption></figure>'
    )


def distinct_pairs(
    pairs: Sequence[tuple[Path, Path, dict[int, int]]],
) -> list[tuple[Path, Path, dict[int, int]]]:
    """``pairs`` without repeated images: the same picture can be stored twice (a batch submitted again
    after its step was rolled back), and a report should not show it twice."""
    seen: set[str] = set()
    kept = []
    for pair in pairs:
        try:
            digest = hashlib.sha256(pair[0].read_bytes()).hexdigest()
        except OSError:
            digest = str(pair[0])  # unreadable here: sample_predictions reports it
        if digest not in seen:
            seen.add(digest)
            kept.append(pair)
    return kept


def sample_predictions(
    model_dir: Path,
    pairs: Sequence[tuple[Path, Path, dict[int, int]]],
    n: int,
    *,
    device: str = "cpu",
    max_size: int | None = 512,
) -> list[Sample]:
    """Predictions of the model in ``model_dir`` on the first ``n`` of ``pairs`` (image, mask, value map).

    Each mask's raw values go through its value map (mask value -> global class id; unmapped values
    become ignore, 255). Images and masks larger than ``max_size`` are shrunk first (bilinear, nearest):
    the report shows thumbnails.
    """
    model, _ = load_model(Path(model_dir), resolve_device(device))
    model.eval()
    samples = []
    for image_path, mask_path, value_map in pairs[:n]:
        image, mask = read_image(image_path), read_mask(mask_path)
        width, height = image.size
        if max_size is not None and max(width, height) > max_size:
            factor = max_size / max(width, height)
            size = (max(1, round(width * factor)), max(1, round(height * factor)))
            image = image.resize(size, Image.Resampling.BILINEAR)
            mask = mask.resize(size, Image.Resampling.NEAREST)
        gt = remap(torch.from_numpy(np.array(mask, dtype=np.uint8)), label_lut(value_map)).numpy()
        pred = predict_image(model, image, device=model.aux_classifier.weight.device, max_size=None)
        samples.append((np.asarray(image), gt, pred))
    return samples
