"""The case the user is looking at, and its facts in plain language.

`CaseContext` is what the chat endpoint passes along with a question: the model's output for
the current image or record, where the Grad-CAM heat lies, the top SHAP features and facts from
the model card. `clinical_note` is free text from the user or an uploaded file: it is untrusted,
used only as quoted data, and never followed as an instruction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from components.assistant.text import clean_user_text
from components.errors import InputError

MAX_CLINICAL_NOTE_CHARS = 4000
MAX_LABEL_CHARS = 80
MAX_CLASSES = 50
MAX_SHAP_FEATURES = 20

# Dataset class names → the words a person would use.
_PLAIN_LABELS = {
    "glioma_tumor": "glioma",
    "meningioma_tumor": "meningioma",
    "pituitary_tumor": "pituitary tumour",
    "no_tumor": "no tumour",
    "normal_benign": "normal or benign",
}


def plain_label(label: str) -> str:
    """'glioma_tumor' -> 'glioma'; unknown labels get underscores replaced by spaces."""
    return _PLAIN_LABELS.get(label.lower(), label.replace("_", " ").lower())


@dataclass(frozen=True)
class ShapFeature:
    """One feature's SHAP value for the explained class (positive pushes towards it)."""

    name: str
    value: float


@dataclass(frozen=True)
class CaseContext:
    """Facts about the current case; built by serving from the prediction/explain responses."""

    predicted_label: str
    probabilities: dict[str, float]
    gradcam_summary: str | None = None
    shap_features: list[ShapFeature] = field(default_factory=list)
    model_card: dict[str, Any] = field(default_factory=dict)
    clinical_note: str | None = None

    def __post_init__(self) -> None:
        _check_label(self.predicted_label, "predicted_label")
        if not self.probabilities or len(self.probabilities) > MAX_CLASSES:
            raise InputError(f"case probabilities must name 1 to {MAX_CLASSES} classes")
        for label, prob in self.probabilities.items():
            _check_label(label, "probability class")
            if not isinstance(prob, int | float) or not math.isfinite(prob) or not 0 <= prob <= 1:
                raise InputError(f"case probability for {label!r} must be a number in [0, 1]")
        if self.predicted_label not in self.probabilities:
            raise InputError("case predicted_label must be one of the probability classes")
        if abs(sum(self.probabilities.values()) - 1.0) > 0.02:
            raise InputError("case probabilities must add up to 1")
        if len(self.shap_features) > MAX_SHAP_FEATURES:
            raise InputError(f"send at most {MAX_SHAP_FEATURES} SHAP features")
        for feature in self.shap_features:
            _check_label(feature.name, "SHAP feature name")
            if not math.isfinite(feature.value):
                raise InputError("SHAP feature values must be finite numbers")
        if self.gradcam_summary is not None and len(self.gradcam_summary) > 500:
            raise InputError("the Grad-CAM summary must be at most 500 characters")
        if self.clinical_note is not None and len(self.clinical_note) > MAX_CLINICAL_NOTE_CHARS:
            raise InputError(
                f"the clinical note is {len(self.clinical_note)} characters; "
                f"shorten it to at most {MAX_CLINICAL_NOTE_CHARS}"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CaseContext:
        """Build from a JSON-like mapping (the chat endpoint's `case` field)."""
        if not isinstance(data, dict):
            raise InputError("case must be a JSON object")
        try:
            raw_features = data.get("shap_features") or []
            features = [ShapFeature(str(f["name"]), float(f["value"])) for f in raw_features]
            return cls(
                predicted_label=str(data["predicted_label"]),
                probabilities={str(k): float(v) for k, v in dict(data["probabilities"]).items()},
                gradcam_summary=data.get("gradcam_summary"),
                shap_features=features,
                model_card=dict(data.get("model_card") or {}),
                clinical_note=data.get("clinical_note"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"case is missing or has a malformed field: {exc}") from exc

    def sorted_probabilities(self) -> list[tuple[str, float]]:
        return sorted(self.probabilities.items(), key=lambda kv: -kv[1])

    def facts(self) -> list[str]:
        """Plain-language statements about the case, each safe to quote to the user.

        Free text from the model card and the Grad-CAM summary is cleaned; the clinical note is
        deliberately not included (see `untrusted_note`).
        """
        ranked = self.sorted_probabilities()
        top_label, top_p = ranked[0][0], ranked[0][1]
        label = self.predicted_label
        out = [
            f"The model's output for this image is {label} ({plain_label(label)}), "
            f"with a probability score of {self.probabilities[label]:.0%}."
        ]
        others = [f"{plain_label(name)} {p:.0%}" for name, p in ranked if name != label][:3]
        if others:
            out.append(f"The scores for the other classes are: {', '.join(others)}.")
        if label == top_label and len(ranked) > 1 and top_p - ranked[1][1] < 0.15:
            out.append(
                f"The top two scores ({plain_label(top_label)} and {plain_label(ranked[1][0])}) "
                "are close, so the model is nearly undecided between them."
            )
        if self.gradcam_summary:
            summary = clean_user_text(self.gradcam_summary).rstrip(".")
            out.append(f"Grad-CAM heat map for {label}: {summary}.")
        if self.shap_features:
            parts = [
                f"{f.name} ({'towards' if f.value >= 0 else 'away from'} {label}, {f.value:+.3g})"
                for f in sorted(self.shap_features, key=lambda f: -abs(f.value))[:5]
            ]
            out.append(f"The features with the largest SHAP values are: {'; '.join(parts)}.")
        card = self._card_fact()
        if card:
            out.append(card)
        return out

    def untrusted_note(self) -> str | None:
        """The clinical note, cleaned, for quoting as data inside a prompt."""
        if not self.clinical_note:
            return None
        return clean_user_text(self.clinical_note)

    def _card_fact(self) -> str | None:
        card = self.model_card
        if not card:
            return None
        bits = []
        if card.get("name") or card.get("version"):
            bits.append(f"model {card.get('name', 'oncoflow')} version {card.get('version', '?')}")
        metrics = card.get("metrics") or {}
        for key in ("balanced_accuracy", "macro_f1", "auroc", "ece"):
            if isinstance(metrics.get(key), int | float):
                bits.append(f"test {key.replace('_', ' ')} {metrics[key]:.3f}")
        privacy = card.get("privacy") or {}
        if isinstance(privacy.get("epsilon"), int | float):
            delta = privacy.get("delta")
            delta_txt = f", δ = {delta:g}" if isinstance(delta, int | float) else ""
            bits.append(f"trained with differential privacy, ε = {privacy['epsilon']:g}{delta_txt}")
        elif privacy.get("mode") == "none":
            bits.append("trained without differential privacy")
        if card.get("dataset"):
            bits.append(f"dataset {clean_user_text(str(card['dataset']))[:80]}")
        if not bits:
            return None
        return "Model card: " + "; ".join(clean_user_text(b) for b in bits) + "."


def _check_label(value: str, what: str) -> None:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_LABEL_CHARS:
        raise InputError(f"{what} must be a non-empty string of at most {MAX_LABEL_CHARS} chars")
