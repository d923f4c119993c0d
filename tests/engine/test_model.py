"""The DKD segmenter: shapes and output stride, reasoning scores, stop-gradient, heads, weights, groups."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision import models
from torchvision.models._utils import IntermediateLayerGetter

from engine.config import ModelConfig
from engine.exceptions import CheckpointError, ConfigError
from engine.losses import ac_loss
from engine.model import CentreTapConv2d, DKDSegmenter, build_model, upsample

R18 = ModelConfig(backbone="resnet18")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize(
    ("backbone", "output_stride"),
    [("resnet18", 16), ("resnet18", 8), ("resnet50", 16), ("resnet50", 8), ("mobilenet_v3_large", 16)],
)
def test_output_stride(backbone: str, output_stride: int) -> None:
    model = DKDSegmenter(ModelConfig(backbone=backbone, output_stride=output_stride), [3, 2]).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    side = 64 // output_stride
    assert out.features.shape == (1, 256, side, side)
    assert out.logits.shape == (1, 1 + 5, side, side)


def test_default_backbone_is_resnet101_at_stride_16() -> None:
    model = DKDSegmenter(ModelConfig(), [2]).eval()
    assert len(model.backbone.layer3) == 23  # ResNet-101 has 23 blocks in its third stage
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).features.shape == (1, 256, 2, 2)


def test_mobilenet_refuses_stride_8() -> None:
    with pytest.raises(ConfigError, match="model.output_stride: 8 .*supports 16 only"):
        DKDSegmenter(ModelConfig(backbone="mobilenet_v3_large", output_stride=8), [1])


def test_dilated_resnet18_equals_strided_one_subsampled() -> None:
    # Dilation that replaces a stride computes the strided network's features at every other position.
    model = DKDSegmenter(R18, [1]).eval()
    strided = models.resnet18(weights=None)
    strided.load_state_dict(model.backbone.state_dict(), strict=False)  # everything but fc
    strided = IntermediateLayerGetter(strided, {"layer4": "out"}).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        dilated_out = model.backbone(images)["out"]  # (2, 512, 4, 4)
        strided_out = strided(images)["out"]  # (2, 512, 2, 2)
    torch.testing.assert_close(dilated_out[..., ::2, ::2], strided_out, rtol=1e-4, atol=1e-5)


def test_head_dropout_follows_config() -> None:
    model = DKDSegmenter(ModelConfig(backbone="resnet18", head_dropout=0.25), [1])
    dropouts = [m for m in model.head.modules() if isinstance(m, nn.Dropout)]
    assert [m.p for m in dropouts] == [0.25]


def test_reasoning_scores_add_up_to_logits() -> None:
    model = DKDSegmenter(R18, [3, 2]).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
        positive, negative = model.reasoning_scores(out.features, 4)
    assert positive.shape == negative.shape == (2, 4, 4, 4)
    bias = torch.cat([g.bias for g in model.classifiers])[:4].view(1, 4, 1, 1)
    torch.testing.assert_close(positive + negative + bias, out.logits[:, 1:5], rtol=1e-4, atol=1e-5)
    # f is post-ReLU, so the parts carry the sign of the weights they keep.
    assert (positive >= 0).all() and (negative <= 0).all()
    assert positive.abs().sum() > 0 and negative.abs().sum() > 0


def test_ac_loss_does_not_reach_the_feature_extractor() -> None:
    model = DKDSegmenter(R18, [2]).train()
    out = model(torch.randn(2, 3, 32, 32))
    ac_loss(upsample(out.logits[:, :1], (32, 32))).backward()
    assert model.aux_classifier.weight.grad is not None and model.aux_classifier.weight.grad.abs().sum() > 0
    for name, param in [*model.backbone.named_parameters(), *model.head.named_parameters()]:
        assert param.grad is None or not param.grad.any(), name


def test_add_step_copies_auxiliary_classifier() -> None:
    model = DKDSegmenter(R18, [3])
    model.add_step(2)
    new = model.classifiers[-1]
    assert new.weight.shape == (2, 256, 1, 1)
    for row in range(2):
        assert torch.equal(new.weight[row], model.aux_classifier.weight[0])
        assert torch.equal(new.bias[row], model.aux_classifier.bias[0])
    assert model.step_sizes == [3, 2] and model.num_classes == 5
    model.add_step(4, init_from_aux=False)
    assert not torch.equal(model.classifiers[-1].weight[0], model.aux_classifier.weight[0])
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32))
    assert out.logits.shape == (1, 1 + 9, 2, 2)
    # Rows copied from the auxiliary classifier give its logit (channel 0) for the new classes 4 and 5.
    torch.testing.assert_close(out.logits[:, 4:6], out.logits[:, :1].expand(-1, 2, -1, -1))


def test_parameter_groups_partition_trainable_parameters() -> None:
    model = DKDSegmenter(R18, [3])
    model.add_step(2)
    backbone, head, newest = model.parameter_groups()
    ids = [id(p) for p in (*backbone, *head, *newest)]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    assert {id(p) for p in backbone} == {id(p) for p in model.backbone.parameters()}
    assert {id(p) for p in newest} == {id(p) for p in model.classifiers[1].parameters()}
    assert id(model.classifiers[0].weight) in {id(p) for p in head}


def test_local_pretrained_file_loads_classification_state_dict(tmp_path) -> None:
    source = models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model = build_model(ModelConfig(backbone="resnet18", pretrained=str(path)), [2])
    loaded = model.backbone.state_dict()
    assert loaded.keys() == {k for k in source.state_dict() if not k.startswith("fc.")}
    for key, value in loaded.items():
        assert torch.equal(value, source.state_dict()[key]), key


def test_local_pretrained_file_with_backbone_keys(tmp_path) -> None:
    donor = DKDSegmenter(ModelConfig(backbone="mobilenet_v3_large"), [1])
    path = tmp_path / "backbone.pt"
    torch.save(donor.backbone.state_dict(), path)
    model = build_model(ModelConfig(backbone="mobilenet_v3_large", pretrained=str(path)), [1])
    assert all(torch.equal(v, donor.backbone.state_dict()[k]) for k, v in model.backbone.state_dict().items())


def test_mobilenet_classification_state_dict_loads(tmp_path) -> None:
    source = models.mobilenet_v3_large(weights=None)
    path = tmp_path / "mobilenet.pth"
    torch.save(source.state_dict(), path)
    model = build_model(ModelConfig(backbone="mobilenet_v3_large", pretrained=str(path)), [1])
    first_conv = model.backbone.state_dict()["0.0.weight"]
    assert torch.equal(first_conv, source.state_dict()["features.0.0.weight"])


def test_missing_pretrained_file_raises(tmp_path) -> None:
    path = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError, match=f"model.pretrained: {path}: no such file"):
        build_model(ModelConfig(backbone="resnet18", pretrained=str(path)), [1])


def test_mismatched_pretrained_file_raises(tmp_path) -> None:
    state = models.resnet18(weights=None).state_dict()
    state["conv1.weight"] = torch.zeros(8, 3, 3, 3)
    path = tmp_path / "wrong.pth"
    torch.save(state, path)
    with pytest.raises(
        CheckpointError, match=r"wrong\.pth: does not fit a resnet18 backbone .*'conv1.weight'"
    ):
        build_model(ModelConfig(backbone="resnet18", pretrained=str(path)), [1])
    torch.save({"layer9.weight": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="missing keys"):
        build_model(ModelConfig(backbone="resnet18", pretrained=str(path)), [1])


def test_unreadable_pretrained_file_raises(tmp_path) -> None:
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=r"garbage\.pth: cannot be read"):
        build_model(ModelConfig(backbone="resnet18", pretrained=str(path)), [1])


def test_imagenet_download_failure_points_to_local_file(monkeypatch) -> None:
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(models.ResNet18_Weights, "get_state_dict", offline)
    with pytest.raises(CheckpointError, match="put a local file path in model.pretrained instead") as info:
        build_model(ModelConfig(backbone="resnet18", pretrained="imagenet"), [1])
    assert "\n" not in str(info.value)


def test_head_and_classifiers_start_kaiming_normal() -> None:
    # Kaiming normal (fan in, ReLU gain): std sqrt(2 / fan_in); PyTorch's default would be ~2.4x narrower.
    torch.manual_seed(0)
    model = DKDSegmenter(R18, [40])
    model.add_step(40, init_from_aux=False)
    convs = [m for m in model.head.modules() if isinstance(m, torch.nn.Conv2d)]
    for conv in [*convs, *model.classifiers, model.aux_classifier]:
        fan_in = conv.weight[0].numel()
        expected = (2 / fan_in) ** 0.5
        assert conv.weight.std().item() == pytest.approx(
            expected, rel=0.25 if conv.weight.numel() < 1000 else 0.05
        )


@pytest.mark.parametrize("size, dilation", [(8, 12), (8, 8), (5, 6), (8, 6), (32, 18)])
def test_centre_tap_conv_equals_the_full_atrous_conv(size: int, dilation: int) -> None:
    # Below the dilation only the centre tap reads inside the map; at or above it the full conv runs.
    torch.manual_seed(0)
    full = nn.Conv2d(16, 8, 3, padding=dilation, dilation=dilation, bias=False)
    fast = CentreTapConv2d.taking_over(full)
    assert fast.weight is full.weight
    x = torch.randn(2, 16, size, size, requires_grad=True)
    expected = full(x)
    (grad_x_full, grad_w_full) = torch.autograd.grad(expected.square().sum(), (x, full.weight))
    got = fast(x)
    (grad_x, grad_w) = torch.autograd.grad(got.square().sum(), (x, fast.weight))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_x, grad_x_full, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad_w, grad_w_full, rtol=1e-5, atol=1e-4)
    if size <= dilation:
        off_centre = grad_w.clone()
        off_centre[:, :, 1, 1] = 0
        assert off_centre.abs().max() == 0  # those weights never matter here, in either conv


def test_aspp_atrous_convs_skip_dead_taps_without_changing_seeded_weights(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(0)
    model = DKDSegmenter(R18, [4])
    atrous = [m for m in model.head.modules() if isinstance(m, CentreTapConv2d)]
    assert [m.dilation[0] for m in atrous] == [6, 12, 18]
    # Against torchvision's ASPP with plain convs: the same random draws, so seeded runs keep their weights.
    monkeypatch.setattr(CentreTapConv2d, "taking_over", classmethod(lambda cls, conv: conv))
    torch.manual_seed(0)
    plain = DKDSegmenter(R18, [4])
    assert not any(isinstance(m, CentreTapConv2d) for m in plain.modules())
    for (name, value), (_, other) in zip(model.state_dict().items(), plain.state_dict().items(), strict=True):
        assert torch.equal(value, other), name
    x = torch.randn(2, 3, 64, 64)
    model.eval(), plain.eval()
    torch.testing.assert_close(model(x).logits, plain(x).logits, rtol=1e-4, atol=1e-4)
