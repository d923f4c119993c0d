"""The DKD segmenter of docs/method.md: a dilated backbone, the DeepLabV3 head, per-step classifiers.

The network is built from torchvision parts. Its logits put the auxiliary classifier in channel 0 and
class k in channel k (background has no channel), all at feature resolution (h = H / output stride).

``DKDSegmenter(config, step_sizes)`` always starts from random weights, which is what a caller wants when a
full state dict is loaded next (checkpoints, saved models). ``build_model`` also loads the backbone weights
that ``config.pretrained`` names, which is what step 0 wants.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision import models
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation.deeplabv3 import ASPP, ASPPConv

from engine.config import ModelConfig
from engine.exceptions import CheckpointError, ConfigError

FEATURE_CHANNELS = 256
ASPP_RATES = (6, 12, 18)

_RESNETS = {
    "resnet18": (models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1),
    "resnet50": (models.resnet50, models.ResNet50_Weights.IMAGENET1K_V1),
    "resnet101": (models.resnet101, models.ResNet101_Weights.IMAGENET1K_V1),
}
_MOBILENET_WEIGHTS = models.MobileNet_V3_Large_Weights.IMAGENET1K_V1


@dataclass
class SegOutput:
    """What one forward pass returns."""

    logits: Tensor  # (N, 1 + K, h, w): channel 0 auxiliary, channel k class k, feature resolution
    features: Tensor  # (N, 256, h, w): f, the output of the feature extractor


def _dilate_basic_layer(layer: nn.Sequential, previous_dilation: int) -> None:
    """Turn the stride-2 entry of a ResNet stage of BasicBlocks into dilation, in place.

    torchvision refuses dilation in BasicBlock, so resnet18 is dilated here the way it does Bottleneck: the
    first 3x3 conv keeps the incoming dilation with stride 1, every later 3x3 conv of the stage sees twice
    that dilation so the receptive field matches the strided original. Padding equals dilation, which keeps
    the spatial size.
    """
    dilation = previous_dilation * 2
    blocks: list[Any] = list(layer)  # torchvision Bottleneck/BasicBlock: conv1, conv2, downsample, stride
    for index, block in enumerate(blocks):
        for conv, rate in (
            (block.conv1, previous_dilation if index == 0 else dilation),
            (block.conv2, dilation),
        ):
            conv.stride = (1, 1)
            conv.dilation = (rate, rate)
            conv.padding = (rate, rate)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)
        block.stride = 1


def _build_backbone(config: ModelConfig) -> tuple[nn.Module, int]:
    """The randomly initialised backbone (returns {"out": (N, C, h, w)}) and its channel count C."""
    if config.backbone == "mobilenet_v3_large":
        if config.output_stride != 16:
            raise ConfigError(
                f"model.output_stride: {config.output_stride} is not supported by mobilenet_v3_large, "
                "which supports 16 only; set model.output_stride = 16 or pick a resnet backbone"
            )
        features = models.mobilenet_v3_large(weights=None, dilated=True).features
        last = len(features) - 1  # the 1x1 conv to 960 channels closes the (dilated) last stage
        return IntermediateLayerGetter(features, {str(last): "out"}), features[last].out_channels

    constructor, _ = _RESNETS[config.backbone]
    # Output stride 16 dilates the last stage, 8 the last two.
    dilate = [False, config.output_stride == 8, True]
    if config.backbone == "resnet18":
        resnet = constructor(weights=None)
        previous = 1
        for layer, dilated in zip((resnet.layer2, resnet.layer3, resnet.layer4), dilate, strict=True):
            if dilated:
                _dilate_basic_layer(layer, previous)
                previous *= 2
    else:
        resnet = constructor(weights=None, replace_stride_with_dilation=dilate)
    return IntermediateLayerGetter(resnet, {"layer4": "out"}), resnet.fc.in_features


def _backbone_keys(state_dict: Mapping[str, Tensor], backbone_name: str) -> dict[str, Tensor]:
    """Map a torchvision classification state dict onto backbone keys; backbone keys pass through.

    The classifier of the classification network (resnet ``fc``, mobilenet ``classifier``) is dropped and
    mobilenet's ``features.`` prefix removed, because the backbone holds ``features`` itself.
    """
    if backbone_name == "mobilenet_v3_large":
        return {
            key.removeprefix("features."): value
            for key, value in state_dict.items()
            if not key.startswith("classifier.")
        }
    return {key: value for key, value in state_dict.items() if not key.startswith("fc.")}


def load_backbone_weights(
    backbone: nn.Module, state_dict: Mapping[str, Tensor], *, backbone_name: str, source: str
) -> None:
    """Copy weights into ``backbone`` from a classification or backbone state dict, strictly.

    ``source`` names where the weights came from, for the error message.
    Raises CheckpointError when keys are missing, unexpected or of the wrong shape.
    """
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, Tensor) for v in state_dict.values()):
        raise CheckpointError(
            f"{source}: is not a state dict of tensors; save one with torch.save(model.state_dict(), path)"
        )
    weights = _backbone_keys(state_dict, backbone_name)
    expected = backbone.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(weights) if expected[k].shape != weights[k].shape)
    for problem, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
        if keys:
            raise CheckpointError(
                f"{source}: does not fit a {backbone_name} backbone ({len(keys)} {problem} keys, "
                f"e.g. {keys[0]!r}); give a torchvision {backbone_name} state dict in model.pretrained"
            )
    backbone.load_state_dict(weights)


def _read_pretrained(config: ModelConfig) -> tuple[dict[str, Tensor], str]:
    """The state dict that ``config.pretrained`` names, and a description of where it came from."""
    pretrained, backbone_name = str(config.pretrained), config.backbone
    if pretrained == "synthetic":
        from engine.pretrain import synthetic_backbone  # trains the backbone with this module's model

        pretrained = str(synthetic_backbone(backbone_name, config.output_stride))
    if pretrained == "imagenet":
        enum = _MOBILENET_WEIGHTS if backbone_name == "mobilenet_v3_large" else _RESNETS[backbone_name][1]
        source = f"model.pretrained: torchvision {backbone_name} {enum}"
        try:
            # weights_only: torchvision's default unpickles anything, and a file already in the hub cache is
            # loaded without its hash being checked again, so a pickle planted there would run.
            return enum.get_state_dict(progress=False, check_hash=True, weights_only=True), source
        except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise CheckpointError(
                f"{source}: could not be downloaded or read from the torch hub cache ({reason}); "
                "put a local file path in model.pretrained instead"
            ) from None
    path = Path(pretrained).expanduser()
    source = f"model.pretrained: {path}"
    if not path.is_file():
        raise CheckpointError(f"{source}: no such file; give the path of a backbone state-dict file or None")
    try:
        return torch.load(path, map_location="cpu", weights_only=True), source
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(
            f"{source}: cannot be read as a weights-only torch file ({reason}); "
            "save it with torch.save(model.state_dict(), path)"
        ) from None


class CentreTapConv2d(nn.Conv2d):
    """An ASPP atrous conv (3x3, dilation d, padding d) that skips the taps which only ever read padding.

    When the feature map is no larger than the dilation (h <= d and w <= d), every off-centre tap of every
    output position falls in the zero padding, so the conv equals a 1x1 conv with the centre weights, at a
    ninth of the FLOPs. Off-centre weights get a zero gradient either way, so training is the same up to
    float rounding. This happens on small crops (the CPU settings: 64x64 at output stride 8 give 8x8
    features against the rates 12 and 18), never at the paper's 512x512 (32x32 features at stride 16).
    """

    @classmethod
    def taking_over(cls, conv: nn.Conv2d) -> CentreTapConv2d:
        """The same conv, sharing ``conv``'s parameters; it draws no random numbers, so seeded runs keep
        theirs."""
        new = nn.utils.skip_init(
            cls,
            conv.in_channels,
            conv.out_channels,
            cast(tuple[int, int], conv.kernel_size),
            stride=cast(tuple[int, int], conv.stride),
            padding=cast(tuple[int, int], conv.padding),
            dilation=cast(tuple[int, int], conv.dilation),
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
        )
        new.weight = conv.weight
        new.bias = conv.bias
        return new

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        height, width = input.shape[-2:]  # input (N, C, h, w)
        only_centre = (
            self.kernel_size == (3, 3)
            and self.stride == (1, 1)
            and self.groups == 1
            and self.padding_mode == "zeros"
            and self.padding == self.dilation
            and height <= self.dilation[0]
            and width <= self.dilation[1]
        )
        if only_centre:
            return F.conv2d(input, weight[:, :, 1:2, 1:2], bias)  # (N, out, h, w)
        return super()._conv_forward(input, weight, bias)


class DKDSegmenter(nn.Module):
    """Backbone + ASPP head + 3x3 conv (the feature extractor F), per-step classifiers g_s, auxiliary a.

    Attributes: ``backbone`` (the part that gets BN momentum 0.01 at step 0), ``head`` (ASPP, 3x3 conv,
    BN, ReLU), ``classifiers`` (one 1x1 conv per step) and ``aux_classifier`` (1x1 conv to one channel).
    """

    def __init__(self, config: ModelConfig, step_sizes: Sequence[int]) -> None:
        super().__init__()
        if not step_sizes or any(size < 1 for size in step_sizes):
            raise ValueError(f"step_sizes: {list(step_sizes)!r} must be a non-empty list of positive sizes")
        self.config = config
        self.step_sizes: list[int] = []
        self.backbone, backbone_channels = _build_backbone(config)
        aspp = ASPP(backbone_channels, ASPP_RATES, FEATURE_CHANNELS)
        for branch in aspp.convs:
            if isinstance(branch, ASPPConv):
                branch[0] = CentreTapConv2d.taking_over(branch[0])
        for module in aspp.project.modules():
            if isinstance(module, nn.Dropout):
                module.p = config.head_dropout
        self.head = nn.Sequential(
            aspp,
            nn.Conv2d(FEATURE_CHANNELS, FEATURE_CHANNELS, 3, padding=1, bias=False),
            nn.BatchNorm2d(FEATURE_CHANNELS),
            nn.ReLU(inplace=True),
        )
        self.aux_classifier = nn.Conv2d(FEATURE_CHANNELS, 1, 1, bias=True)
        # The reference's init (docs/method.md): Kaiming-normal weights for the ASPP, the 3x3 head conv and
        # every classifier; PyTorch's default is about 2.4x narrower. Biases keep PyTorch's default.
        for module in (*self.head.modules(), self.aux_classifier):
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)
        self.classifiers = nn.ModuleList()
        for size in step_sizes:
            self.add_step(size, init_from_aux=False)

    @property
    def num_classes(self) -> int:
        """K, the number of classes over all steps so far."""
        return sum(self.step_sizes)

    def forward(self, images: Tensor) -> SegOutput:
        """images (N, 3, H, W) -> logits (N, 1 + K, h, w) and features (N, 256, h, w)."""
        features = self.head(self.backbone(images)["out"])  # (N, 256, h, w)
        # The stop-gradient keeps the AC loss from shaping the features (docs/method.md).
        aux = self.aux_classifier(features.detach())  # (N, 1, h, w)
        logits = torch.cat([aux, *(classifier(features) for classifier in self.classifiers)], dim=1)
        return SegOutput(logits=logits, features=features)

    def reasoning_scores(self, features: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
        """Positive and negative reasoning scores z+ and z- of classes 1..num_classes, bias excluded.

        features (N, 256, h, w) -> two tensors (N, num_classes, h, w) with
        z+_k = sum_c f_c max(w_kc, 0) and z-_k = sum_c f_c min(w_kc, 0), so z_k = z+_k + z-_k + b_k.
        """
        if not 1 <= num_classes <= self.num_classes:
            raise ValueError(f"num_classes: {num_classes} must be between 1 and {self.num_classes}")
        # (num_classes, 256, 1, 1): the rows of classes 1..num_classes across the step classifiers
        weight = torch.cat([cast(nn.Conv2d, c).weight for c in self.classifiers])[:num_classes]
        return F.conv2d(features, weight.clamp(min=0)), F.conv2d(features, weight.clamp(max=0))

    def add_step(self, num_new: int, init_from_aux: bool = True) -> None:
        """Append the classifier g_t of ``num_new`` classes.

        With ``init_from_aux`` every output row (weight and bias) starts as a copy of the auxiliary
        classifier, as docs/method.md prescribes for t >= 1; otherwise Kaiming-normal weights.
        """
        if num_new < 1:
            raise ValueError(f"num_new: {num_new} must be at least 1")
        aux = self.aux_classifier
        classifier = nn.Conv2d(FEATURE_CHANNELS, num_new, 1, bias=True).to(
            aux.weight.device, aux.weight.dtype
        )
        if init_from_aux:
            with torch.no_grad():
                classifier.weight.copy_(aux.weight.expand_as(classifier.weight))
                bias, aux_bias = cast(Tensor, classifier.bias), cast(Tensor, aux.bias)  # both have one
                bias.copy_(aux_bias.expand_as(bias))
        else:
            nn.init.kaiming_normal_(classifier.weight)
        self.classifiers.append(classifier)
        self.step_sizes.append(num_new)

    def parameter_groups(
        self, *, freeze_bn_affine: bool = False
    ) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]]:
        """Trainable parameters split for the optimiser, each exactly once.

        Returns (backbone, head + auxiliary classifier + old classifiers, newest classifier). The backbone
        gets the base learning rate and the rest 10x; at t >= 1 only the newest classifier has weight decay.
        ``freeze_bn_affine`` (t >= 1, as the reference) leaves every BatchNorm weight and bias out.
        """
        frozen = set()
        if freeze_bn_affine:
            frozen = {
                id(p)
                for m in self.modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm)
                for p in m.parameters(recurse=False)
            }
        old_classifiers = self.classifiers[:-1]
        groups = (
            self.backbone.parameters(),
            [*self.head.parameters(), *self.aux_classifier.parameters(), *old_classifiers.parameters()],
            self.classifiers[-1].parameters(),
        )
        backbone, head, newest = (
            [p for p in group if p.requires_grad and id(p) not in frozen] for group in groups
        )
        return backbone, head, newest


def build_model(config: ModelConfig, step_sizes: Sequence[int]) -> DKDSegmenter:
    """A new segmenter whose backbone holds the weights ``config.pretrained`` names (None: random init)."""
    model = DKDSegmenter(config, step_sizes)
    if config.pretrained is not None:
        state_dict, source = _read_pretrained(config)
        load_backbone_weights(model.backbone, state_dict, backbone_name=config.backbone, source=source)
    return model


def upsample(logits: Tensor, size: tuple[int, ...]) -> Tensor:
    """(N, C, h, w) -> (N, C, *size), bilinear with align_corners=False as docs/method.md prescribes."""
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
