"""Training throughput, upsampling and input-pipeline benchmarks (issue: GPU speed and scale).

``python -m benchmarks.throughput throughput [--device cuda] [--backbone resnet101] [--size 512] [--batch 16]
[--output-stride 16] [--steps 20] [--warmup 5] [--real-data DIR --workers 8] [--peak-tflops 989] [--out
results.json]`` trains step 0 and an incremental step (the VOC 15-5 layout: 15 base classes, 5 new) with the
fast paths off and on, and reports images/s, the micro-batch (below ``--batch`` when the OOM fallback split
it), peak memory (``torch.cuda.max_memory_allocated`` on CUDA, the peak RSS of the process on the CPU) and the
share of peak FLOP/s. Without ``--real-data`` each step trains on one random batch that stays on the device,
so only compute is measured, as in the project's H100 profile (docs/benchmarks.md, "GPU throughput"); with it,
``train_step`` runs end to end on the batch folder DIR, DataLoader workers included. Each case runs in a fresh
process, so peak memory and compilation caches are its own.

``python -m benchmarks.throughput parts [--device cuda] [--batch 16] [--size 512]`` times forward +
backward of the logits' upsampling alone, ``F.interpolate`` against the separable matrix products, in
float32 and bfloat16.

``python -m benchmarks.throughput input [--size 512] [--batch 16] [--images 64] [--workers 0 2 4]`` times
the input pipeline alone (decode, rescale, crop, flip, normalise, label lookup) over generated VOC-sized
JPEG images and PNG masks, per stage on one thread and through the DataLoader with N workers.

FLOP accounting: the forward FLOPs of the student per image are counted by ``torch.utils.flop_counter`` on
the meta device for the exact backbone, crop size and classes (ResNet-101 at 512x512: 135.6 GFLOP, as in
that profile). A training image costs 3 forward-equivalents at step 0 (backward = 2 forwards) and 4 in an
incremental step (plus the teacher's forward): 406.8 and 542.4 GFLOP for ResNet-101 at 512x512.
``--peak-tflops`` is the device's peak (default 989, H100 SXM bf16 dense, on CUDA; no share is given on
the CPU unless a peak is passed).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import resource
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.input_pipeline import input_pipeline
from engine.config import BACKBONES, EngineConfig, ModelConfig, TrainConfig
from engine.data import batch_dataset, read_manifest
from engine.fast import FastPaths, default_fast_paths
from engine.model import DKDSegmenter
from engine.sampling import StepSampler
from engine.step_setup import StepModel, freeze_teacher, prepare_step, set_step_mode
from engine.train import Progress, train_iteration, train_step
from engine.transforms import TrainTransform

BASE_CLASSES, NEW_CLASSES = 15, 5  # the VOC 15-5 layout: 21 logit channels in the incremental step
H100_BF16_DENSE_TFLOPS = 989.0


# --------------------------------------------------------------------------------------------------
# Training throughput
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ThroughputCase:
    """One measured configuration; picklable, so it can run in a fresh process."""

    device: str
    backbone: str
    size: int
    batch: int
    steps: int
    warmup: int
    step_index: int
    fast: FastPaths
    fast_label: str  # "off" or "on"
    real_data: str | None = None
    workers: int = 0
    output_stride: int = 16


def fast_paths_for(device: torch.device, on: bool, compile_model: bool) -> FastPaths:
    """The fast paths of a case: all off, or ``default_fast_paths`` on CUDA and on the CPU every path that
    runs there without code generation (channels_last, separable upsampling, inference-mode teacher).

    ``compile_model`` turns torch.compile on or off in either case.
    """
    if not on:
        return FastPaths()
    if device.type == "cuda":
        return replace(default_fast_paths(device), compile=compile_model)
    return FastPaths(
        channels_last=True,
        separable_upsample=True,
        teacher_inference_mode=True,
        compile=compile_model,
    )


def step_sizes(step_index: int) -> list[int]:
    return [BASE_CLASSES] if step_index == 0 else [BASE_CLASSES, NEW_CLASSES]


def forward_flops_per_image(backbone: str, size: int, step_index: int, output_stride: int = 16) -> float:
    """FLOPs of one student forward pass (logits and, at t >= 1, reasoning scores) on one image."""
    with torch.device("meta"):
        model = DKDSegmenter(
            ModelConfig(backbone=backbone, output_stride=output_stride), step_sizes(step_index)
        )
        images = torch.empty(1, 3, size, size)
    model.eval()
    student = StepModel(model, num_old=0 if step_index == 0 else BASE_CLASSES)
    with FlopCounterMode(display=False) as counter:
        student(images)
    return float(counter.get_total_flops())


def training_flops_per_image(backbone: str, size: int, step_index: int, output_stride: int = 16) -> float:
    """3 forward-equivalents at step 0 (backward = 2 forwards), 4 at t >= 1 (plus the teacher)."""
    return (3 if step_index == 0 else 4) * forward_flops_per_image(backbone, size, step_index, output_stride)


def _config(case: ThroughputCase) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(backbone=case.backbone, output_stride=case.output_stride),
        train=TrainConfig(batch_size=case.batch, crop_size=case.size, amp=True, num_workers=case.workers),
    )


def _models(case: ThroughputCase, device: torch.device) -> tuple[DKDSegmenter, DKDSegmenter | None]:
    """A random-init student of the case's step and, at t >= 1, a frozen teacher; speed needs no weights."""
    torch.manual_seed(0)
    sizes = step_sizes(case.step_index)
    model = DKDSegmenter(_config(case).model, sizes).to(device)
    if case.step_index == 0:
        return model, None
    teacher = DKDSegmenter(_config(case).model, sizes[:-1]).to(device)
    return model, freeze_teacher(teacher)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_on_device_batch(case: ThroughputCase, device: torch.device) -> tuple[list[float], int]:
    """Iteration end times of ``warmup + steps`` training iterations on one random on-device batch.

    Each is ``engine.train.train_iteration``, the iteration ``train_step`` runs, set up by the same
    ``engine.step_setup.prepare_step``: only the data loader is left out.
    """
    config = _config(case)
    model, teacher = _models(case, device)
    run, state = prepare_step(
        model=model,
        teacher=teacher,
        config=config,
        step_index=case.step_index,
        device=device,
        fast=case.fast,
        total_iterations=case.warmup + case.steps,
    )
    g = torch.Generator().manual_seed(0)
    images = torch.randn(case.batch, 3, case.size, case.size, generator=g).to(device)  # (N, 3, H, W)
    choices = torch.tensor([0, *run.new_classes, 255])
    labels = choices[torch.randint(len(choices), (case.batch, case.size, case.size), generator=g)].to(device)
    if case.fast.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    set_step_mode(model, case.step_index, config)
    ends = []
    for _ in range(case.warmup + case.steps):
        train_iteration(run, state, images, labels)  # reads the loss values, which synchronises
        ends.append(time.perf_counter())
    return ends, run.fallback.micro_batch


def _time_real_data(case: ThroughputCase, device: torch.device) -> tuple[list[float], int]:
    """Iteration end times of ``train_step`` end to end on the batch folder ``case.real_data``.

    The folder's mask values are spread over the step's new classes, so every image trains every term.
    """
    folder = Path(case.real_data or "")
    manifest = read_manifest(folder)
    new_classes = list(range(sum(step_sizes(case.step_index)[:-1]) + 1, sum(step_sizes(case.step_index)) + 1))
    value_to_class = {value: new_classes[i % len(new_classes)] for i, value in enumerate(manifest.classes)}
    dataset = batch_dataset([(folder, value_to_class)], "train", TrainTransform(case.size))
    iterations = case.warmup + case.steps
    per_epoch = StepSampler(len(dataset), case.batch, seed=0).batches_per_epoch()
    epochs = -(-iterations // per_epoch)
    config = _config(case)
    config = replace(config, train=replace(config.train, epochs_base=epochs, epochs_incremental=epochs))
    model, teacher = _models(case, device)
    ends: list[float] = []
    micro: list[int] = []

    def progress(p: Progress) -> None:
        ends.append(time.perf_counter())  # train_step has just read the losses, so the GPU is in step
        micro.append(p.micro_batch)

    train_step(
        model=model,
        teacher=teacher,
        dataset=dataset,
        config=config,
        step_index=case.step_index,
        device=device,
        progress=progress,
        should_stop=lambda: len(ends) >= iterations,
        fast=case.fast,
    )
    return ends, micro[-1] if micro else case.batch


def run_case(case: ThroughputCase) -> dict[str, Any]:
    """Measure one case (meant for a fresh process): images/s of the timed steps, peak memory, FLOPs."""
    device = torch.device(case.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer = _time_real_data if case.real_data else _time_on_device_batch
    started = time.perf_counter()
    ends, micro_batch = timer(case, device)
    _synchronize(device)
    if len(ends) <= case.warmup:
        raise RuntimeError(f"only {len(ends)} iterations ran; need more than --warmup {case.warmup}")
    timed = ends[case.warmup :]
    start = ends[case.warmup - 1] if case.warmup > 0 else started
    seconds = timed[-1] - start
    result = {
        **{k: v for k, v in asdict(case).items() if k != "fast"},
        "fast_paths": asdict(case.fast),
        "timed_steps": len(timed),
        "images_per_second": len(timed) * case.batch / seconds,
        "seconds_per_step": seconds / len(timed),
        "warmup_seconds": start - started,
        "micro_batch": micro_batch,
        "training_gflop_per_image": training_flops_per_image(
            case.backbone, case.size, case.step_index, case.output_stride
        )
        / 1e9,
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        result["memory_kind"] = "torch.cuda.max_memory_allocated"
    else:
        result["peak_memory_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        result["memory_kind"] = "peak RSS of the process"
    return result


def _run_isolated(case: ThroughputCase) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(run_case, case).result()


def throughput(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = torch.device(args.device)
    peak = (
        args.peak_tflops
        if args.peak_tflops is not None
        else (H100_BF16_DENSE_TFLOPS if device.type == "cuda" else None)
    )
    results = []
    for step_index in args.step_indices:
        for label in args.fast:
            case = ThroughputCase(
                device=args.device,
                backbone=args.backbone,
                size=args.size,
                batch=args.batch,
                steps=args.steps,
                warmup=args.warmup,
                step_index=step_index,
                fast=fast_paths_for(device, label == "on", compile_model=not args.no_compile),
                fast_label=label,
                real_data=args.real_data,
                workers=args.workers,
                output_stride=args.output_stride,
            )
            result = run_case(case) if args.in_process else _run_isolated(case)
            flops = result["images_per_second"] * result["training_gflop_per_image"] * 1e9
            result["achieved_tflops"] = flops / 1e12
            result["peak_tflops"] = peak
            result["share_of_peak"] = flops / (peak * 1e12) if peak else None
            results.append(result)
            print(_throughput_row(result), flush=True)
    return results


def _throughput_row(r: dict[str, Any]) -> str:
    share = f"{100 * r['share_of_peak']:.1f}%" if r["share_of_peak"] is not None else "n/a"
    return (
        f"step {r['step_index']}  fast {r['fast_label']:>3}  {r['backbone']} {r['size']}px "
        f"batch {r['batch']} "
        f"(micro {r['micro_batch']}): {r['images_per_second']:8.2f} images/s, "
        f"{r['peak_memory_gib']:.2f} GiB peak ({r['memory_kind']}), {r['achieved_tflops']:.3f} TFLOP/s "
        f"= {share} of peak, warm-up {r['warmup_seconds']:.1f} s"
    )


# --------------------------------------------------------------------------------------------------
# Parts: the upsampling alone
# --------------------------------------------------------------------------------------------------


def _time_pair(plain: Any, fast: Any, device: torch.device, repeats: int) -> tuple[float, float]:
    """Fastest milliseconds of ``plain()`` and ``fast()`` over ``repeats`` interleaved calls each.

    Interleaving and the minimum keep a shared, noisy machine from favouring either side.
    """
    for fn in (plain, fast, plain, fast):  # warm-up: caches, allocator, kernels
        fn()
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for index, fn in enumerate((plain, fast)):
            _synchronize(device)
            t0 = time.perf_counter()
            fn()
            _synchronize(device)
            best[index] = min(best[index], 1000 * (time.perf_counter() - t0))
    return best[0], best[1]


def loss_parts(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Forward + backward of the upsampling of the logits alone, ``F.interpolate`` against separable.

    Logits (N, 1 + K, size / 16, size / 16) as the student gives them, K = 20 (15 old, 5 new).
    """
    from engine.fast import upsample_separable
    from engine.model import upsample

    device = torch.device(args.device)
    n, channels, size = args.batch, 1 + BASE_CLASSES + NEW_CLASSES, args.size
    low = torch.randn(n, channels, size // 16, size // 16, generator=torch.Generator().manual_seed(0))
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        x = low.to(device, dtype).requires_grad_()
        plain_ms, fast_ms = _time_pair(
            lambda x=x: upsample(x, (size, size)).sum().backward(),
            lambda x=x: upsample_separable(x, (size, size)).sum().backward(),
            device,
            args.repeats,
        )
        row = {"part": "upsample fwd+bwd", "dtype": str(dtype).removeprefix("torch."), "plain_ms": plain_ms}
        row |= {"fast_ms": fast_ms, "speedup": plain_ms / fast_ms}
        results.append(row)
        print(
            f"{row['part']} {row['dtype']:>8}: F.interpolate {plain_ms:8.2f} ms, separable {fast_ms:8.2f} ms "
            f"({row['speedup']:.2f}x), batch {n}, {channels} channels, {size // 16} -> {size}",
            flush=True,
        )
    return results


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.throughput", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="mode", required=True)
    tp = sub.add_parser("throughput", help="training images/s, peak memory and FLOP share, fast paths off/on")
    tp.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    tp.add_argument("--backbone", default="resnet101", choices=BACKBONES)
    tp.add_argument("--size", type=int, default=512, help="crop size (square)")
    tp.add_argument("--output-stride", type=int, default=16, choices=(8, 16), help="8: the CPU settings'")
    tp.add_argument("--batch", type=int, default=16)
    tp.add_argument("--steps", type=int, default=20, help="timed iterations")
    tp.add_argument(
        "--warmup", type=int, default=5, help="untimed iterations first (compilation happens here)"
    )
    tp.add_argument(
        "--step-indices", type=int, nargs="+", default=[0, 1], help="0: base step, 1: incremental"
    )
    tp.add_argument("--fast", nargs="+", default=["off", "on"], choices=["off", "on"])
    tp.add_argument("--no-compile", action="store_true", help="fast paths without torch.compile")
    tp.add_argument("--real-data", default=None, help="a batch folder: run train_step end to end on it")
    tp.add_argument("--workers", type=int, default=0, help="DataLoader workers with --real-data")
    tp.add_argument("--peak-tflops", type=float, default=None, help="device peak (default: 989 on CUDA)")
    tp.add_argument("--in-process", action="store_true", help="run every case in this process")
    tp.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    pp = sub.add_parser("parts", help="the upsampling alone, F.interpolate against separable")
    pp.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    pp.add_argument("--size", type=int, default=512, help="output size; logits are size / 16")
    pp.add_argument("--batch", type=int, default=16)
    pp.add_argument("--repeats", type=int, default=10)
    pp.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ip = sub.add_parser("input", help="images/s of the input pipeline alone")
    ip.add_argument("--size", type=int, default=512, help="crop size")
    ip.add_argument("--batch", type=int, default=16)
    ip.add_argument("--images", type=int, default=64, help="generated images")
    ip.add_argument("--source-size", default="500x375", help="generated image size, WIDTHxHEIGHT")
    ip.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ip.add_argument("--epochs", type=int, default=2, help="timed epochs after one warm-up epoch")
    ip.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(
        f"torch {torch.__version__}, device {getattr(args, 'device', 'cpu')}, "
        f"{torch.get_num_threads()} threads"
    )
    if args.mode == "throughput":
        output: Any = throughput(args)
    elif args.mode == "parts":
        output = loss_parts(args)
    else:
        output = input_pipeline(args)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(output, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
