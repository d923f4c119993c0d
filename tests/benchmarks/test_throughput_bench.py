"""benchmarks.throughput runs end to end on tiny CPU settings and counts FLOPs as docs/benchmarks.md says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import throughput as bench
from engine.synthetic import generate_batches


def test_flops_match_the_gpu_profile_figures() -> None:
    # The H100 profile (docs/benchmarks.md, "GPU throughput"): 135.6 GFLOP per ResNet-101 forward at 512x512
    # and 542 per incremental training image.
    forward = bench.forward_flops_per_image("resnet101", 512, 1)
    assert forward / 1e9 == pytest.approx(135.6, abs=0.1)
    assert bench.training_flops_per_image("resnet101", 512, 1) == pytest.approx(4 * forward)
    assert bench.training_flops_per_image("resnet101", 512, 0) / 1e9 == pytest.approx(406.8, abs=0.5)


def test_throughput_on_a_tiny_cpu_model(tmp_path: Path) -> None:
    out = tmp_path / "throughput.json"
    args = ["throughput", "--device", "cpu", "--backbone", "resnet18", "--size", "32", "--batch", "2"]
    args += ["--steps", "1", "--warmup", "1", "--no-compile", "--in-process", "--out", str(out)]
    assert bench.main(args) == 0
    rows = json.loads(out.read_text())
    assert [(r["step_index"], r["fast_label"]) for r in rows] == [
        (0, "off"),
        (0, "on"),
        (1, "off"),
        (1, "on"),
    ]
    for row in rows:
        assert row["images_per_second"] > 0 and row["micro_batch"] == 2 and row["peak_memory_gib"] > 0
        assert row["share_of_peak"] is None  # no peak is assumed on a CPU
    assert rows[1]["fast_paths"]["separable_upsample"] and not rows[0]["fast_paths"]["separable_upsample"]


def test_throughput_on_real_data_runs_train_step(tmp_path: Path) -> None:
    folders = generate_batches(tmp_path / "data", "2-2", train_per_step=4, val_per_step=0, image_size=32)
    out = tmp_path / "real.json"
    args = ["throughput", "--device", "cpu", "--backbone", "resnet18", "--size", "32", "--batch", "2"]
    args += ["--steps", "2", "--warmup", "1", "--no-compile", "--in-process", "--step-indices", "1"]
    args += ["--fast", "on", "--real-data", str(folders[1]), "--out", str(out)]
    assert bench.main(args) == 0
    (row,) = json.loads(out.read_text())
    assert row["timed_steps"] == 2 and row["images_per_second"] > 0


def test_input_pipeline_and_parts(tmp_path: Path) -> None:
    out = tmp_path / "input.json"
    args = ["input", "--size", "32", "--batch", "2", "--images", "4", "--source-size", "40x30"]
    assert bench.main([*args, "--workers", "0", "--epochs", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["stage_ms_per_image"]) == {
        "decode",
        "rescale",
        "normalise",
        "crop_flip",
        "label_lookup",
    }
    assert result["loader"][0]["images"] == 4 and result["loader"][0]["images_per_second"] > 0
    parts = tmp_path / "parts.json"
    assert (
        bench.main(
            [
                "parts",
                "--device",
                "cpu",
                "--size",
                "32",
                "--batch",
                "1",
                "--repeats",
                "1",
                "--out",
                str(parts),
            ]
        )
        == 0
    )
    rows = json.loads(parts.read_text())
    assert [(row["part"], row["dtype"]) for row in rows] == [
        ("upsample fwd+bwd", "float32"),
        ("upsample fwd+bwd", "bfloat16"),
    ]
