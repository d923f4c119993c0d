"""The ablation: its arithmetic on hand-made metrics, and a whole run of tiny models in two processes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from engine import experiment
from engine.ablation_table import ABLATION_METHODS, ablation_markdown, gap_closure
from engine.config import EngineConfig, ModelConfig, TrainConfig
from engine.evaluate import Metrics, paper_view, summarize
from engine.experiment import AblationData, ablation, cpu_config


def metrics(iou: dict[int, float]) -> Metrics:
    """Metrics after the last step of a 2-1-1 protocol; the paper's grouping differs from the gate's."""
    return summarize(iou, [1, 2, 3], [4], base_classes=[1, 2])


def test_paper_view_scores_untaught_classes_zero() -> None:
    base = Metrics(iou={0: 0.9, 1: 0.6, 2: 0.3}, miou_old=0.6, miou_new=math.nan, miou_all=0.6, hiou=math.nan)
    view = paper_view(base, [1, 2], [3, 4])
    assert view.iou == {0: 0.9, 1: 0.6, 2: 0.3, 3: 0.0, 4: 0.0}
    assert view.paper is not None and view.paper.miou_old == pytest.approx(0.6)
    assert view.paper.miou_new == 0.0 and view.miou_all == pytest.approx(1.8 / 5)


def test_gap_closure_and_table() -> None:
    final = {
        "base": metrics({0: 0.9, 1: 0.6, 2: 0.6, 3: 0.0, 4: 0.0}),
        "finetune": metrics({0: 0.8, 1: 0.0, 2: 0.0, 3: 0.2, 4: 0.0}),  # all 0.2
        "kd": metrics({0: 0.8, 1: 0.2, 2: 0.2, 3: 0.3, 4: 0.0}),  # all 0.3
        "kd_dkd_randinit": metrics({0: 0.8, 1: 0.4, 2: 0.4, 3: 0.4, 4: 0.0}),  # all 0.4
        "dkd": metrics({0: 0.9, 1: 0.5, 2: 0.5, 3: 0.4, 4: 0.2}),  # all 0.5
        "joint": metrics({0: 0.9, 1: 0.6, 2: 0.6, 3: 0.6, 4: 0.3}),  # all 0.6
    }
    assert gap_closure(final) == pytest.approx(0.75)  # (0.5 - 0.2) / (0.6 - 0.2)
    assert gap_closure(final, "kd") == pytest.approx(0.25)
    table = ablation_markdown({0: final, 1: final}, AblationData(), cpu_config())
    # DKD, paper grouping: old (0.9 + 0.5 + 0.5) / 3, new (0.4 + 0.2) / 2, all 2.5 / 5, hIoU of the two.
    assert (
        "| DKD (KD + DKD + AC init) | 63.3 [63.3-63.3] | 30.0 [30.0-30.0] | 50.0 [50.0-50.0] | 40.7" in table
    )
    assert "DKD closes 75.0 [75.0-75.0] % of the gap" in table


def test_ablation_runs_every_row_of_every_seed_in_parallel(tmp_path: Path) -> None:
    # Two worker processes share 2 seeds x 6 rows; each seed's methods start from that seed's base model.
    config = EngineConfig(
        model=ModelConfig(backbone="resnet18", output_stride=16, pretrained=None),
        train=TrainConfig(epochs_base=1, epochs_incremental=1, batch_size=4, crop_size=32, amp=False),
    )
    data = AblationData(protocol="2-1-1", train_per_step=4, val_per_step=2, image_size=32, eval_images=4)
    final = ablation(tmp_path, data=data, seeds=(0, 1), config=config, workers=2)
    rows = {"base", *ABLATION_METHODS, "joint"}
    assert set(final) == {0, 1} and all(set(final[seed]) == rows for seed in final)
    # Every row is in the paper's grouping after the last step: new = classes 3 and 4.
    assert all(set(m.iou) == {0, 1, 2, 3, 4} for rows_ in final.values() for m in rows_.values())
    assert final[0]["base"].iou[3] == 0.0  # the base model was never taught class 3
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["seeds"] == [0, 1] and set(saved["runs"]["1"]) == rows
    assert "% of the gap from fine-tuning to joint training" in (tmp_path / "results.md").read_text()
    for method in ABLATION_METHODS:
        assert (tmp_path / "seed-1" / method / "step-02" / "model" / "model.json").is_file()


def test_command_line_passes_objects_and_incremental_epochs_to_the_ablation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, object] = {}

    def fake_ablation(out: Path, **options: object) -> None:
        seen.update(options, out=out)

    monkeypatch.setattr(experiment, "ablation", fake_ablation)
    experiment.main(["ablation", "--out", str(tmp_path), "--objects", "1", "3", "--epochs-incremental", "48"])
    data, config = seen["data"], seen["config"]
    assert isinstance(data, AblationData) and data.objects == (1, 3)
    assert isinstance(config, EngineConfig) and config.train.epochs_incremental == 48
    assert config.train.epochs_base == cpu_config().train.epochs_base  # the rest stays cpu_config's
    assert "1 to 3 objects an image" in ablation_markdown({}, data, config)


def test_command_line_passes_incremental_learning_rate_warm_up_batch_and_pos_weight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, object] = {}
    monkeypatch.setattr(experiment, "ablation", lambda out, **options: seen.update(options))
    experiment.main(["ablation", "--out", str(tmp_path), "--lr-incremental", "1e-3", "--pos-weight", "2",
                     "--warmup-incremental", "0.4", "--batch-incremental", "3"])  # fmt: skip
    config, default = seen["config"], cpu_config()
    assert isinstance(config, EngineConfig)
    assert config.train.lr_incremental == 1e-3 and config.loss.pos_weight_incremental == 2.0
    assert config.train.warmup_fraction_incremental == 0.4
    assert config.train.warmup_fraction_base == default.train.warmup_fraction_base
    assert config.train.batch_size_incremental == 3
    # Only the incremental steps change: the base step's rate, batch and pos_weight stay cpu_config's.
    assert config.train.lr_base == default.train.lr_base
    assert config.train.batch_size == default.train.batch_size
    assert config.loss.pos_weight_base == default.loss.pos_weight_base
    assert config.train.epochs_incremental == default.train.epochs_incremental
