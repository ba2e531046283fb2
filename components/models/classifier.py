"""The one module interface every architecture is wrapped in."""

from __future__ import annotations

import torch
from torch import nn


class Classifier(nn.Module):
    """Backbone feature maps -> global average pool -> (dropout) -> linear head.

    - `forward(x)` returns logits (N, num_classes);
    - `embed(x)` returns the pooled penultimate features (N, embed_dim), used for
      similar-case search;
    - `cam_target_layers()` returns the modules whose 4-D output Grad-CAM should explain
      (the last convolutional stage of the backbone).

    State-dict keys are `features.*` and `head.*`, fixed by the architecture name and its
    arguments, so a bundle's weights load strictly into a freshly built model.
    """

    def __init__(
        self,
        features: nn.Module,
        embed_dim: int,
        num_classes: int,
        in_channels: int,
        cam_layers: list[str],
        architecture: str,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(embed_dim, num_classes)
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.architecture = architecture
        self._cam_layers = list(cam_layers)
        for name in self._cam_layers:  # fail at build time, not at explain time
            self.get_submodule(name)

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Last feature maps (N, embed_dim, h, w) before pooling."""
        return self.features(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, embed_dim)."""
        return torch.flatten(self.pool(self.features(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.embed(x)))

    def cam_target_layers(self) -> list[nn.Module]:
        """Modules whose activations Grad-CAM uses (last convolutional stage)."""
        return [self.get_submodule(name) for name in self._cam_layers]

    def extra_repr(self) -> str:
        return (
            f"architecture={self.architecture}, in_channels={self.in_channels}, "
            f"embed_dim={self.embed_dim}, num_classes={self.num_classes}"
        )
