"""The input pipeline alone (``python -m benchmarks.throughput input``): decode, rescale, crop, flip,
normalise and label lookup of ``TrainTransform`` over generated VOC-sized JPEG images and PNG masks, per
stage on one thread and through a DataLoader built as ``train_step`` builds it, with N workers.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from engine.data import SegmentationFiles, label_lut, remap
from engine.sampling import StepSampler
from engine.synthetic import render_sample
from engine.transforms import TrainTransform, normalize_image, read_image, read_mask


def write_input_data(
    folder: Path, count: int, width: int, height: int, classes: int = 5
) -> list[tuple[Path, Path]]:
    """``count`` generated (JPEG image, PNG mask) pairs of width x height, like VOC's 500x375 photos."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    pairs = []
    for i in range(count):
        image, labels = render_sample(rng, max(width, height), 1 + i % classes, list(range(1, classes + 1)))
        image, labels = image[:height, :width], labels[:height, :width]  # (H, W, 3), (H, W)
        image_path, mask_path = folder / "images" / f"{i:04d}.jpg", folder / "masks" / f"{i:04d}.png"
        Image.fromarray(image).save(image_path, quality=90)
        Image.fromarray(labels).save(mask_path)
        pairs.append((image_path, mask_path))
    return pairs


def _stage_times(pairs: list[tuple[Path, Path]], crop: int, lut: Tensor) -> dict[str, float]:
    """Milliseconds per image of each stage of ``TrainTransform`` on one thread, in its order."""
    stages = dict.fromkeys(("decode", "rescale", "normalise", "crop_flip", "label_lookup"), 0.0)
    g = torch.Generator().manual_seed(0)
    for image_path, mask_path in pairs:
        t0 = time.perf_counter()
        image, mask = read_image(image_path), read_mask(mask_path)
        t1 = time.perf_counter()
        scale = 0.5 + 1.5 * torch.rand(1, generator=g).item()
        size = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
        image, mask = (
            image.resize(size, Image.Resampling.BILINEAR),
            mask.resize(size, Image.Resampling.NEAREST),
        )
        t2 = time.perf_counter()
        pixels = normalize_image(image)
        raw = torch.from_numpy(np.array(mask, dtype=np.uint8))
        t3 = time.perf_counter()
        pad_h, pad_w = max(0, crop - size[1]), max(0, crop - size[0])
        pixels = torch.nn.functional.pad(pixels, (0, pad_w, 0, pad_h))
        raw = torch.nn.functional.pad(raw, (0, pad_w, 0, pad_h), value=255)
        pixels, raw = pixels[:, :crop, :crop].flip(-1).contiguous(), raw[:crop, :crop].flip(-1).contiguous()
        t4 = time.perf_counter()
        remap(raw, lut)
        t5 = time.perf_counter()
        for name, seconds in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
            stages[name] += 1000 * seconds / len(pairs)
    return stages


def _loader_rate(dataset: Dataset, batch: int, workers: int, epochs: int) -> dict[str, float]:
    """images/s through a DataLoader built as ``train_step`` builds it, after a warm-up epoch."""
    sampler = StepSampler(len(dataset), batch, seed=0)
    loader = DataLoader(
        dataset,
        batch_size=batch,
        sampler=sampler,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
    )
    counted, started = 0, 0.0
    for epoch in range(epochs + 1):
        sampler.set_epoch(epoch)
        if epoch == 1:
            started = time.perf_counter()
        for images, _ in loader:
            counted += images.shape[0] if epoch >= 1 else 0
    seconds = time.perf_counter() - started
    return {"workers": workers, "images_per_second": counted / seconds, "images": counted}


def input_pipeline(args: argparse.Namespace) -> dict[str, Any]:
    width, height = (int(v) for v in args.source_size.split("x"))
    with tempfile.TemporaryDirectory(prefix="ciss-bench-input-") as tmp:
        pairs = write_input_data(Path(tmp), args.images, width, height)
        lut = label_lut({k: k for k in range(1, 6)})
        stages = _stage_times(pairs, args.size, lut)
        total = sum(stages.values())
        print(
            "one thread, ms per image: "
            + ", ".join(f"{name} {ms:.2f}" for name, ms in stages.items())
            + f"; total {total:.2f} ({1000 / total:.1f} images/s per core)",
            flush=True,
        )
        dataset = SegmentationFiles(pairs, lut, TrainTransform(args.size))
        rates = []
        for workers in args.workers:
            rate = _loader_rate(dataset, args.batch, workers, args.epochs)
            rates.append(rate)
            print(f"DataLoader, {workers} workers: {rate['images_per_second']:.1f} images/s", flush=True)
    return {
        "source_size": args.source_size,
        "crop": args.size,
        "batch": args.batch,
        "images": args.images,
        "stage_ms_per_image": stages,
        "loader": rates,
        "cpu_count": torch.multiprocessing.cpu_count(),
    }
