"""Clinical/tabular inputs: encoding a record by its schema, and an MLP over the encoding.

The clinical schema is the list of feature dicts described in `validation/clinical_schema.py`
(name, type float|int|bool|category, min/max, unit, allowed, required). Records are
validated there (`check_clinical_record`) before they are encoded here; `encode_record` only
refuses values it cannot encode, it does not check ranges.

Encoding: a float/int/bool feature is one column (bool as 0/1), a category is one 0/1 column
per allowed value; a missing value is NaN (numeric, bool) or all zeros (category). The model
imputes NaN with the training mean and standardises numeric columns with statistics stored as
buffers, so a bundle's state dict carries them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from components.errors import ConfigError, InputError, ModelError

TABULAR_ARCHITECTURE = "tabular_mlp"
_TYPES = ("float", "int", "bool", "category")


@dataclass(frozen=True)
class EncodedFeature:
    """Where one schema feature lives in the encoded vector."""

    name: str
    type: str
    columns: tuple[int, ...]
    allowed: tuple | None = None
    unit: str = ""


@dataclass(frozen=True)
class TabularLayout:
    """The encoded vector's columns for a schema (feature order = schema order)."""

    features: tuple[EncodedFeature, ...]
    columns: tuple[str, ...]

    @classmethod
    def from_schema(cls, schema: Iterable[Mapping[str, Any]]) -> TabularLayout:
        features: list[EncodedFeature] = []
        columns: list[str] = []
        for i, entry in enumerate(schema or ()):
            name, kind = entry.get("name"), entry.get("type")
            if not isinstance(name, str) or kind not in _TYPES:
                raise ConfigError(f"clinical schema entry {i} needs a name and a type in {_TYPES}")
            if any(f.name == name for f in features):
                raise ConfigError(f"clinical schema lists feature {name!r} twice")
            allowed = tuple(entry.get("allowed") or ()) if kind == "category" else None
            if kind == "category" and not allowed:
                raise ConfigError(f"category feature {name!r} needs a non-empty 'allowed' list")
            start = len(columns)
            columns += [f"{name}={v}" for v in allowed] if allowed else [name]
            features.append(
                EncodedFeature(
                    name=name,
                    type=kind,
                    columns=tuple(range(start, len(columns))),
                    allowed=allowed,
                    unit=str(entry.get("unit") or ""),
                )
            )
        if not features:
            raise ConfigError("clinical schema is empty; list at least one feature")
        return cls(features=tuple(features), columns=tuple(columns))

    @property
    def width(self) -> int:
        return len(self.columns)

    @property
    def standardised(self) -> np.ndarray:
        """bool (D,): columns standardised by the model (float and int features)."""
        mask = np.zeros(self.width, dtype=bool)
        for feature in self.features:
            if feature.type in ("float", "int"):
                mask[list(feature.columns)] = True
        return mask

    def encode(self, record: Mapping[str, Any]) -> np.ndarray:
        """float32 (D,) for one validated record; raises `InputError` on unusable values."""
        if not isinstance(record, Mapping):
            raise InputError(f"clinical record must be a mapping, got {type(record).__name__}")
        unknown = sorted(set(map(str, record)) - {f.name for f in self.features})
        if unknown:
            raise InputError(f"clinical record has fields not in the schema: {unknown}")
        row = np.zeros(self.width, dtype=np.float32)
        for feature in self.features:
            value = record.get(feature.name)
            first = feature.columns[0]
            if _missing(value):
                if feature.type != "category":
                    row[first] = np.nan
                continue
            if feature.type == "category":
                row[first + _category_index(feature, value)] = 1.0
            elif feature.type == "bool":
                row[first] = float(_as_bool(feature, value))
            else:
                row[first] = _as_number(feature, value)
        return row

    def encode_rows(self, rows: Sequence[Mapping[str, Any]] | Any) -> np.ndarray:
        """float32 (N, D) for many records: a sequence of mappings or a pandas DataFrame."""
        if hasattr(rows, "to_dict"):
            rows = rows.to_dict(orient="records")
        encoded = [self.encode(row) for row in rows]
        if not encoded:
            return np.zeros((0, self.width), dtype=np.float32)
        return np.stack(encoded)

    def decode(self, row: np.ndarray) -> dict[str, Any]:
        """The record an encoded row stands for (None where missing)."""
        row = np.asarray(row, dtype=np.float64).reshape(-1)
        if row.shape[0] != self.width:
            raise InputError(f"encoded record has {row.shape[0]} columns; expected {self.width}")
        out: dict[str, Any] = {}
        for feature in self.features:
            cells = row[list(feature.columns)]
            if feature.type == "category":
                hot = np.flatnonzero(cells > 0.5)
                out[feature.name] = feature.allowed[int(hot[0])] if len(hot) else None
            elif np.isnan(cells[0]):
                out[feature.name] = None
            elif feature.type == "bool":
                out[feature.name] = bool(cells[0] > 0.5)
            elif feature.type == "int":
                out[feature.name] = round(float(cells[0]))
            else:
                out[feature.name] = float(cells[0])
        return out


def encode_record(record: Mapping[str, Any], schema: Iterable[Mapping[str, Any]]) -> torch.Tensor:
    """Encode one record (validated with `check_clinical_record`) as a float tensor (D,)."""
    return torch.from_numpy(TabularLayout.from_schema(schema).encode(record))


def encode_table(rows, schema: Iterable[Mapping[str, Any]]) -> torch.Tensor:
    """Encode records (sequence of mappings or DataFrame) as a float tensor (N, D)."""
    return torch.from_numpy(TabularLayout.from_schema(schema).encode_rows(rows))


class TabularEncoder(nn.Module):
    """Impute + standardise the encoded record, then an MLP; `embed_dim` = last hidden width.

    Buffers `fill` (imputation value per column), `shift`/`scale` (standardisation) and
    `fitted` travel in the state dict; `fit_normalisation` sets them from training rows.
    """

    def __init__(
        self, tabular_schema: list[dict], hidden: Sequence[int] = (64, 32), dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.layout = TabularLayout.from_schema(tabular_schema)
        hidden = [int(h) for h in hidden]
        if not hidden or any(h < 1 for h in hidden):
            raise ConfigError(f"tabular hidden sizes must be positive integers, got {hidden}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ConfigError(f"dropout must lie in [0, 1), got {dropout}")
        width = self.layout.width
        self.register_buffer("fill", torch.zeros(width))
        self.register_buffer("shift", torch.zeros(width))
        self.register_buffer("scale", torch.ones(width))
        self.register_buffer("fitted", torch.tensor(False))
        layers: list[nn.Module] = []
        previous = width
        for size in hidden:
            layers += [nn.Linear(previous, size), nn.ReLU(), nn.Dropout(float(dropout))]
            previous = size
        self.mlp = nn.Sequential(*layers)
        self.in_features = width
        self.embed_dim = previous

    @torch.no_grad()
    def fit_normalisation(self, rows: torch.Tensor) -> None:
        """Set imputation and standardisation statistics from encoded training rows (N, D)."""
        rows = torch.as_tensor(rows, dtype=torch.float32)
        if rows.ndim != 2 or rows.shape[1] != self.in_features or rows.shape[0] < 2:
            raise ModelError(
                f"normalisation needs (N>=2, {self.in_features}) rows, got {tuple(rows.shape)}"
            )
        present = ~torch.isnan(rows)
        counts = present.sum(0)
        if bool((counts == 0).any()):
            empty = [self.layout.columns[i] for i in torch.flatnonzero(counts == 0).tolist()]
            raise ModelError(f"no training values at all for {empty}; cannot impute them")
        values = torch.where(present, rows, torch.zeros_like(rows))
        mean = values.sum(0) / counts
        var = (torch.where(present, rows - mean, torch.zeros_like(rows)) ** 2).sum(0) / counts
        std = var.sqrt()
        standardised = torch.from_numpy(self.layout.standardised)
        self.fill.copy_(mean)
        self.shift.copy_(torch.where(standardised, mean, torch.zeros_like(mean)))
        self.scale.copy_(torch.where(standardised & (std > 1e-8), std, torch.ones_like(std)))
        self.fitted.fill_(True)

    @torch.no_grad()
    def fit_normalisation_from_schema(self, schema: Iterable[Mapping[str, Any]]) -> None:
        """Set the statistics from the schema alone, reading no record: numeric columns centred
        on the middle of their [min, max] range and scaled by half its width (unbounded: left
        as they are), missing values imputed by that middle (numbers) or 0.5 (yes/no and each
        category column). For runs whose statistics may not come from the records un-noised:
        federated (no record leaves a site) and differentially private ones."""
        entries = {str(e["name"]): e for e in schema}
        fill = torch.zeros(self.in_features)
        shift = torch.zeros(self.in_features)
        scale = torch.ones(self.in_features)
        for feature in self.layout.features:
            entry = entries.get(feature.name, {})
            columns = list(feature.columns)
            if feature.type in ("float", "int"):
                low, high = entry.get("min"), entry.get("max")
                if low is not None and high is not None and float(high) > float(low):
                    middle = (float(low) + float(high)) / 2
                    fill[columns], shift[columns] = middle, middle
                    scale[columns] = (float(high) - float(low)) / 2
            elif feature.type == "bool":
                fill[columns] = 0.5
            else:
                fill[columns] = 1.0 / len(columns)
        self.fill.copy_(fill)
        self.shift.copy_(shift)
        self.scale.copy_(scale)
        self.fitted.fill_(True)

    def baseline(self, count: int = 1) -> torch.Tensor:
        """(count, D) copies of the imputation record (what the model reads for a record with
        every value missing): a SHAP reference made of the model's own statistics."""
        return self.fill.detach().clone().expand(int(count), -1).contiguous()

    def impute(self, x: torch.Tensor) -> torch.Tensor:
        """Replace missing (NaN) cells by the training mean of their column."""
        return torch.where(torch.isnan(x), self.fill.expand_as(x), x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.fitted):
            raise ModelError("tabular normalisation was never fitted; call fit_normalisation")
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise InputError(f"tabular input must be (N, {self.in_features}), got {tuple(x.shape)}")
        return self.mlp((self.impute(x) - self.shift) / self.scale)


class TabularMLP(nn.Module):
    """Tabular-only classifier: `TabularEncoder` -> linear head.

    `forward(x)` logits, `embed(x)` penultimate features, `impute(x)`; there is no image, so
    `cam_target_layers()` raises `ModelError`.
    """

    architecture = TABULAR_ARCHITECTURE

    def __init__(
        self,
        num_classes: int,
        tabular_schema: list[dict],
        hidden: Sequence[int] = (64, 32),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if int(num_classes) < 2:
            raise ConfigError(f"num_classes must be at least 2, got {num_classes}")
        self.encoder = TabularEncoder(tabular_schema, hidden, dropout)
        self.head = nn.Linear(self.encoder.embed_dim, int(num_classes))
        self.num_classes = int(num_classes)
        self.embed_dim = self.encoder.embed_dim
        self.in_features = self.encoder.in_features

    @property
    def layout(self) -> TabularLayout:
        return self.encoder.layout

    def fit_normalisation(self, rows: torch.Tensor) -> None:
        self.encoder.fit_normalisation(rows)

    def fit_normalisation_from_schema(self, schema: Iterable[Mapping[str, Any]]) -> None:
        self.encoder.fit_normalisation_from_schema(schema)

    def clinical_baseline(self, count: int = 1) -> torch.Tensor:
        return self.encoder.baseline(count)

    def impute(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.impute(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def cam_target_layers(self) -> list[nn.Module]:
        raise ModelError("a tabular-only model has no image layers to explain with Grad-CAM")


def build_tabular_model(
    num_classes: int,
    tabular_schema: list[dict],
    hidden: Sequence[int] = (64, 32),
    dropout: float = 0.1,
) -> TabularMLP:
    """The `tabular_mlp` architecture; the kwargs are JSON-safe for a bundle's
    `architecture_kwargs`."""
    return TabularMLP(num_classes, tabular_schema, hidden=hidden, dropout=dropout)


def _missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return value.strip() == ""
    return isinstance(value, float | np.floating) and math.isnan(value)


def _as_number(feature: EncodedFeature, value: Any) -> float:
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | float | np.number):
        raise InputError(f"{feature.name}: {value!r} is not a number")
    number = float(value)
    if not math.isfinite(number):
        raise InputError(f"{feature.name}: {value!r} is not a finite number")
    return number


def _as_bool(feature: EncodedFeature, value: Any) -> bool:
    if isinstance(value, bool | np.bool_):
        return bool(value)
    raise InputError(f"{feature.name}: {value!r} is not a boolean")


def _category_index(feature: EncodedFeature, value: Any) -> int:
    for i, option in enumerate(feature.allowed or ()):
        if option == value or str(option) == str(value).strip():
            return i
    raise InputError(f"{feature.name}: {value!r} is not one of {list(feature.allowed or ())}")


@dataclass(frozen=True)
class TabularDemo:
    """A real clinical table for tests and demos: rows, labels, class names and schema."""

    table: Any  # pandas.DataFrame, one column per schema feature
    labels: np.ndarray  # int64 (N,)
    class_names: list[str]
    schema: list[dict]


_DIMENSIONLESS = ("smoothness", "compactness", "concavity", "symmetry", "fractal dimension")


def wisconsin_breast_cancer() -> TabularDemo:
    """scikit-learn's bundled Wisconsin diagnostic breast cancer table (569 FNA samples).

    30 float features computed from digitised fine-needle-aspirate images; labels 0 =
    malignant, 1 = benign (sklearn's order). Ranges in the schema are [0, 1.5 × the largest
    value seen]; size features are in unstated image units ("a.u."), texture in grey levels.
    """
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer(as_frame=True)
    table = data.frame.drop(columns=["target"])
    schema = []
    for name in table.columns:
        high = float(table[name].max()) * 1.5
        magnitude = 10 ** (math.floor(math.log10(high)) - 2)
        if "texture" in name:
            unit = "grey levels"
        elif any(word in name for word in _DIMENSIONLESS) or "concave points" in name:
            unit = ""
        else:
            unit = "a.u."
        schema.append(
            {
                "name": str(name),
                "type": "float",
                "min": 0.0,
                "max": float(round(math.ceil(high / magnitude) * magnitude, 12)),
                "unit": unit,
            }
        )
    return TabularDemo(
        table=table,
        labels=np.asarray(data.target, dtype=np.int64),
        class_names=[str(c) for c in data.target_names],
        schema=schema,
    )


__all__ = [
    "TABULAR_ARCHITECTURE",
    "EncodedFeature",
    "TabularDemo",
    "TabularEncoder",
    "TabularLayout",
    "TabularMLP",
    "build_tabular_model",
    "encode_record",
    "encode_table",
    "wisconsin_breast_cancer",
]
