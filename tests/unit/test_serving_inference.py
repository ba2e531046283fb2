"""The prediction copy of a model: BatchNorm folded, channels-last, same outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from components.errors import ModelError
from components.models import build_model
from serving.inference import fold_batchnorm, for_inference


def with_trained_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine weights (as training would)."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5, generator=g)
            module.running_var.uniform_(0.5, 2.0, generator=g)
            module.weight.data.uniform_(0.5, 1.5, generator=g)
            module.bias.data.uniform_(-0.2, 0.2, generator=g)
    return model.eval()


def images(n: int = 3, size: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def probabilities(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return torch.softmax(model(x), dim=1)


@pytest.mark.parametrize("arch", ["small_cnn", "resnet18", "efficientnet_lite0"])
def test_the_rewrite_folds_every_batchnorm_and_keeps_the_outputs(arch: str) -> None:
    model = with_trained_statistics(build_model(arch, num_classes=3, width=8))
    expected = probabilities(model, images())
    assert expected.std() > 1e-3  # a model whose answers depend on the input

    fast = for_inference(model, (images(2, seed=7),))

    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # original untouched
    conv = next(m for m in fast.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(probabilities(fast, images()), expected, rtol=1e-4, atol=1e-5)
    for n in (1, 5):  # any batch size
        x = images(n, seed=n)
        torch.testing.assert_close(
            probabilities(fast, x), probabilities(model, x), rtol=1e-4, atol=1e-5
        )


@pytest.mark.parametrize("size", [16, 15, 96])  # even and odd sizes: uneven padding at stride 2
def test_efficientnet_same_padding_is_computed_once_for_the_served_size(size: int) -> None:
    from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding

    model = with_trained_statistics(
        build_model("efficientnet_lite0", num_classes=3, small_input=size < 64)
    )
    dynamic = sum(type(m) is Conv2dDynamicSamePadding for m in model.modules())
    assert dynamic > 10
    fast = for_inference(model, (images(2, size=size),))
    assert not any(type(m) is Conv2dDynamicSamePadding for m in fast.modules())
    assert sum(type(m) is nn.Conv2d for m in fast.modules()) >= dynamic
    x = images(4, size=size, seed=3)
    torch.testing.assert_close(
        probabilities(fast, x), probabilities(model, x), rtol=1e-4, atol=1e-5
    )
    with pytest.raises(ModelError, match="built for"):
        fast(images(1, size=size + 2))


def test_group_norm_models_are_only_made_channels_last() -> None:
    model = build_model("small_cnn", num_classes=2, width=4, norm="group").eval()
    fast = for_inference(model, (images(2),))
    assert sum(isinstance(m, nn.GroupNorm) for m in fast.modules()) == sum(
        isinstance(m, nn.GroupNorm) for m in model.modules()
    )
    torch.testing.assert_close(
        probabilities(fast, images()), probabilities(model, images()), rtol=1e-4, atol=1e-5
    )


class ConvUsedTwice(nn.Module):
    """The conv's output feeds the BatchNorm and a skip connection: folding would be wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.norm = nn.BatchNorm2d(3)
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.head((self.norm(y) + y).mean(dim=(2, 3)))


def test_an_unfaithful_fold_is_refused_and_the_model_served_as_trained() -> None:
    model = with_trained_statistics(ConvUsedTwice())
    folded = with_trained_statistics(ConvUsedTwice())
    folded.load_state_dict(model.state_dict())
    assert fold_batchnorm(folded, (images(2),)) == 1
    assert not torch.allclose(probabilities(folded, images()), probabilities(model, images()))

    served = for_inference(model, (images(2),))

    assert isinstance(served.norm, nn.BatchNorm2d)  # the check caught it
    torch.testing.assert_close(probabilities(served, images()), probabilities(model, images()))


def test_models_without_convolutions_are_copied_as_they_are() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)).eval()
    served = for_inference(model, (torch.randn(2, 4),))
    assert served is not model
    x = torch.randn(3, 4)
    torch.testing.assert_close(served(x), model(x))
