"""Swap BatchNorm for GroupNorm (per-sample normalisation, required by DP-SGD / Opacus)."""

from __future__ import annotations

from torch import nn

MAX_GROUPS = 32


def num_groups(channels: int, max_groups: int = MAX_GROUPS) -> int:
    """Largest group count ≤ `max_groups` dividing `channels` with ≥ 2 channels per group.

    64 -> 32, 16 -> 8, 24 -> 12, 40 -> 20, 1280 -> 32; falls back to 1 group (LayerNorm-like)
    when no such divisor exists (e.g. a prime channel count).
    """
    for groups in range(min(max_groups, channels // 2), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


def batch_to_group_norm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d under `module` in place by a GroupNorm of the same width.

    The affine weight and bias are copied, so a pretrained network keeps its learned scales and
    shifts. What is lost are the BatchNorm running statistics: GroupNorm normalises each sample
    by its own group statistics, so the activations a pretrained network sees change and it
    needs fine-tuning before its features are as good as with BatchNorm.
    """
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            channels = child.num_features
            replacement = nn.GroupNorm(
                num_groups(channels), channels, eps=child.eps, affine=child.affine
            )
            if child.affine:
                replacement.weight.data.copy_(child.weight.data)
                replacement.bias.data.copy_(child.bias.data)
            setattr(module, name, replacement)
        elif isinstance(child, nn.modules.batchnorm._BatchNorm):
            raise TypeError(f"cannot convert {type(child).__name__} at {name!r} to GroupNorm")
        else:
            batch_to_group_norm(child)
    return module
