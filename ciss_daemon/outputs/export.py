"""`ciss export`: a model file that another program runs without this package (TorchScript or ONNX).

The exported graph takes normalised images and returns the final label map and the class probabilities: the
upsampling to input size, the sigmoid and the prediction rule of docs/method.md are inside it, so a consumer
needs only ``torch.jit.load`` or an ONNX runtime. Class names, their colours, the normalisation constants and
a description of inputs and outputs travel inside the file as one JSON document named ``ciss.json`` (a
TorchScript extra file, or an ONNX ``metadata_props`` entry).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import Tensor, nn

from ciss_daemon.exceptions import CissError
from ciss_daemon.outputs.predict import class_palette
from engine.evaluate import predict_labels
from engine.model import DKDSegmenter, upsample
from engine.runner import load_model
from engine.transforms import IMAGENET_MEAN, IMAGENET_STD

FORMATS = ("torchscript", "onnx")
# File name endings that say the format.
SUFFIXES = {".onnx": "onnx", ".pt": "torchscript", ".pth": "torchscript", ".torchscript": "torchscript"}
METADATA_KEY = "ciss.json"
ONNX_OPSET = 17
EXPORT_FORMAT_VERSION = 1
_TRACE_SIZE = 64  # side of the example image used to record the graph; the graph accepts any size


class ExportError(CissError):
    """``ciss export`` cannot write the requested file."""


class ExportedSegmenter(nn.Module):
    """The segmenter plus everything between its logits and a usable answer, for export.

    forward(images (N, 3, H, W) float, ImageNet-normalised) -> (labels (N, H, W) int64 in 0..K,
    probs (N, K, H, W) float: sigmoid of classes 1..K at full resolution).
    """

    def __init__(self, model: DKDSegmenter) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        logits = upsample(self.model(images).logits, images.shape[-2:])  # (N, 1 + K, H, W)
        return predict_labels(logits), torch.sigmoid(logits[:, 1:])


def export_metadata(
    meta: dict[str, Any], num_classes: int, colours: dict[str, tuple[int, int, int]] | None = None
) -> dict[str, Any]:
    """The JSON document stored in the exported file: what a consumer needs to feed it and read it."""
    names = {int(c["id"]): str(c["name"]) for c in meta["classes"]}
    table = class_palette({**dict.fromkeys(range(1, num_classes + 1), ""), **names}, colours)
    return {
        "format": "ciss-segmenter",
        "format_version": EXPORT_FORMAT_VERSION,
        "step_index": meta.get("step_index"),
        "classes": [{"id": 0, "name": "background"}, *({"id": k, "name": names[k]} for k in sorted(names))],
        "palette": table.tolist(),  # row k: RGB colour of class k
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "input": {
            "name": "images",
            "shape": "(N, 3, H, W) float32; any N, H, W",
            "preprocess": "RGB scaled to [0, 1], then (x - mean) / std per channel",
        },
        "outputs": {
            "labels": "(N, H, W) int64: class id per pixel, 0 = background",
            "probs": "(N, K, H, W) float32: probability of classes 1..K (channel k - 1 is class k)",
        },
        "rule": "labels = 1 + argmax(probs) where max(probs) > 0.5, else 0",
    }


def export_format(out: Path, fmt: str | None) -> str:
    """The format to write ``out`` in: ``fmt`` when given, else the one its extension names; a given
    format that contradicts the extension is refused (an ONNX graph in a ``.pt`` file misleads its reader).
    """
    if fmt is not None and fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; use one of: {', '.join(FORMATS)}")
    named = SUFFIXES.get(out.suffix.lower())
    if fmt is None and named is None:
        raise ExportError(
            f"cannot tell the format from the name {out.name}; end it in .onnx or .pt, or pass --format"
        )
    if fmt is not None and named is not None and fmt != named:
        wanted = next(suffix for suffix, f in SUFFIXES.items() if f == fmt)
        raise ExportError(
            f"{out.name} names a {named} file but --format is {fmt}; name it {out.stem}{wanted} "
            "or leave --format out"
        )
    return fmt or named  # type: ignore[return-value]


def export_model(
    model_dir: Path,
    out: Path,
    fmt: str | None = None,
    *,
    colours: dict[str, tuple[int, int, int]] | None = None,
) -> Path:
    """Write the model in ``model_dir`` to ``out`` as ``fmt`` ("torchscript" or "onnx"; default: what the
    extension of ``out`` says); returns ``out``.

    ``model_dir`` must be a resolved model folder (``promotion.resolve_current``). The file appears whole or
    not at all: it is written beside ``out`` and renamed into place.
    """
    out = Path(out)
    fmt = export_format(out, fmt)
    if not out.parent.is_dir():
        raise ExportError(f"cannot write {out}: folder {out.parent} does not exist; create it first")
    model, meta = load_model(Path(model_dir), "cpu")
    wrapper = ExportedSegmenter(model).eval()
    document = json.dumps(export_metadata(meta, model.num_classes, colours), indent=2)
    example = torch.randn(1, 3, _TRACE_SIZE, _TRACE_SIZE)
    partial = out.with_name(f".{out.name}.partial")
    try:
        if fmt == "torchscript":
            _write_torchscript(wrapper, example, partial, document)
        else:
            _write_onnx(wrapper, example, partial, document)
        os.replace(partial, out)
    except OSError as exc:
        raise ExportError(
            f"cannot write {out}: {exc.strerror or exc}; check the free space and permissions"
        ) from None
    finally:
        partial.unlink(missing_ok=True)
    return out


def _write_torchscript(wrapper: ExportedSegmenter, example: Tensor, path: Path, document: str) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        # Tracing warns that the output size is read from the input's shape (that is what lets the graph
        # take any image size, which the tests check) and that torch.jit is deprecated: nothing to act on.
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(wrapper, example)
        torch.jit.save(traced, str(path), _extra_files={METADATA_KEY: document})


def _write_onnx(wrapper: ExportedSegmenter, example: Tensor, path: Path, document: str) -> None:
    # The TorchScript-based exporter (dynamo=False) needs no extra tooling and supports dynamic axes.
    dynamic = {0: "batch", 2: "height", 3: "width"}  # of images (N, 3, H, W) and probs (N, K, H, W)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation and tracer notices: nothing a user can act on
        torch.onnx.export(
            wrapper,
            (example,),
            str(path),
            input_names=["images"],
            output_names=["labels", "probs"],
            dynamic_axes={
                "images": dynamic,
                "labels": {0: "batch", 1: "height", 2: "width"},
                "probs": dynamic,
            },
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
    graph = onnx.load(str(path))
    onnx.helper.set_model_props(graph, {METADATA_KEY: document})
    onnx.save(graph, str(path))
