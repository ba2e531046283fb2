"""Multimodal screening model: an image branch from the zoo plus a clinical-record branch.

Late fusion: each branch turns its input into an embedding (the zoo model's pooled features;
the tabular encoder's last hidden layer), the two are concatenated and a small MLP classifies
them. `forward(image, tabular)`; Grad-CAM explains the image branch's last stage with the
record held fixed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from components.errors import ConfigError, InputError
from components.models.tabular import TabularEncoder, TabularLayout

FUSION_ARCHITECTURE = "fusion"


class FusionModel(nn.Module):
    """Image branch (zoo `Classifier` without its head) + `TabularEncoder` -> fusion MLP.

    - `forward(image (N,C,H,W), tabular (N,D))` -> logits (N, num_classes);
    - `embed(image, tabular)` -> fused penultimate features (N, fusion_hidden);
    - `forward_from_image_features(features, tabular)` reuses one image's branch output;
    - `cam_target_layers()` -> the image branch's last convolutional stage;
    - `fit_normalisation(rows)` / `impute(rows)` for the clinical branch.
    """

    architecture = FUSION_ARCHITECTURE

    def __init__(
        self,
        num_classes: int,
        tabular_schema: list[dict],
        image_architecture: str = "small_cnn",
        in_channels: int = 3,
        norm: str = "batch",
        pretrained: bool = False,
        small_input: bool = True,
        width: int = 16,
        tabular_hidden: Sequence[int] = (32, 16),
        fusion_hidden: int = 32,
        dropout: float = 0.1,
        clinical_lr_scale: float = 1.0,
    ) -> None:
        super().__init__()
        from components.models import build_model

        if image_architecture == FUSION_ARCHITECTURE:
            raise ConfigError("the fusion model's image branch must be an image architecture")
        if int(fusion_hidden) < 1:
            raise ConfigError(f"fusion_hidden must be positive, got {fusion_hidden}")
        self.image = build_model(
            image_architecture,
            num_classes=num_classes,
            in_channels=in_channels,
            norm=norm,
            pretrained=pretrained,
            small_input=small_input,
            width=width,
        )
        self.image.head = nn.Identity()  # only the pooled features are used
        self.tabular = TabularEncoder(tabular_schema, tabular_hidden, dropout)
        joint = self.image.embed_dim + self.tabular.embed_dim
        self.fusion = nn.Sequential(
            nn.Linear(joint, int(fusion_hidden)), nn.ReLU(), nn.Dropout(float(dropout))
        )
        self.head = nn.Linear(int(fusion_hidden), int(num_classes))
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.embed_dim = int(fusion_hidden)
        self.image_architecture = image_architecture
        if float(clinical_lr_scale) <= 0:
            raise ConfigError(f"clinical_lr_scale must be positive, got {clinical_lr_scale}")
        self.clinical_lr_scale = float(clinical_lr_scale)

    @property
    def layout(self) -> TabularLayout:
        return self.tabular.layout

    def fit_normalisation(self, rows: torch.Tensor) -> None:
        self.tabular.fit_normalisation(rows)

    def fit_normalisation_from_schema(self, schema: list[dict]) -> None:
        self.tabular.fit_normalisation_from_schema(schema)

    def clinical_baseline(self, count: int = 1) -> torch.Tensor:
        return self.tabular.baseline(count)

    def impute(self, rows: torch.Tensor) -> torch.Tensor:
        return self.tabular.impute(rows)

    def embed(self, image: torch.Tensor, tabular: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.image.embed(image), tabular)

    def fuse(self, image_features: torch.Tensor, tabular: torch.Tensor) -> torch.Tensor:
        """Fused features from precomputed image features (N, D_img) and records (N, D)."""
        if image_features.shape[0] != tabular.shape[0]:
            raise InputError(
                f"{image_features.shape[0]} images but {tabular.shape[0]} clinical records "
                "in one batch"
            )
        return self.fusion(torch.cat([image_features, self.tabular(tabular)], dim=1))

    def forward(self, image: torch.Tensor, tabular: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(image, tabular))

    def forward_from_image_features(
        self, image_features: torch.Tensor, tabular: torch.Tensor
    ) -> torch.Tensor:
        """Logits when the image branch has already run (e.g. many records, one image)."""
        return self.head(self.fuse(image_features, tabular))

    def cam_target_layers(self) -> list[nn.Module]:
        return self.image.cam_target_layers()

    def parameter_groups(self, lr: float) -> list[dict]:
        """Optimiser groups: the image branch at `lr`, the newly initialised clinical branch,
        joint layer and head at `lr · clinical_lr_scale` (a pretrained backbone needs small
        steps; the new layers would otherwise barely move in a short fine-tune)."""
        image = [p for p in self.image.parameters() if p.requires_grad]
        ids = {id(p) for p in image}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return [
            {"params": image, "lr": lr},
            {"params": rest, "lr": lr * self.clinical_lr_scale},
        ]


def build_fusion_model(
    num_classes: int,
    tabular_schema: list[dict],
    image_architecture: str = "small_cnn",
    in_channels: int = 3,
    norm: str = "batch",
    pretrained: bool = False,
    small_input: bool = True,
    width: int = 16,
    tabular_hidden: Sequence[int] = (32, 16),
    fusion_hidden: int = 32,
    dropout: float = 0.1,
    clinical_lr_scale: float = 1.0,
) -> FusionModel:
    """The `fusion` architecture; the kwargs are JSON-safe for a bundle's
    `architecture_kwargs`."""
    return FusionModel(
        num_classes,
        tabular_schema,
        image_architecture=image_architecture,
        in_channels=in_channels,
        norm=norm,
        pretrained=pretrained,
        small_input=small_input,
        width=width,
        tabular_hidden=tabular_hidden,
        fusion_hidden=fusion_hidden,
        dropout=dropout,
        clinical_lr_scale=clinical_lr_scale,
    )


__all__ = ["FUSION_ARCHITECTURE", "FusionModel", "build_fusion_model"]
