"""Request/response models of the diagnosis HTTP API, shared by the service and its clients.

Plain pydantic: importing this module pulls in neither BentoML nor torch, so the UI can use it.
Images travel as base64-encoded PNG strings; no model carries a patient identifier.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

#: Chat limits (the assistant enforces the same question limit; these stop oversized JSON early)
MAX_QUESTION_CHARS = 2000
MAX_NOTE_CHARS = 4000
SESSION_ID_PATTERN = r"^[A-Za-z0-9_.:@-]{1,128}$"


class ModelRef(BaseModel):
    """Which model answered: registered name, registry version and Bento model tag."""

    name: str
    version: str = Field(description="MLflow registered-model version ('' if not registered)")
    tag: str = Field(description="BentoML model-store tag the service loaded")


#: `PredictResponse.status` values
STATUS_OK = "ok"
STATUS_OOD = "out_of_distribution"


class PredictResponse(BaseModel):
    """One prediction. With ``status = "out_of_distribution"`` the image is unlike the images
    the model was trained on: no diagnosis is given (`label`, `probabilities`, `prediction_set`
    and the danger fields are null), `refer` is true and `referral_reason` says why."""

    status: Literal["ok", "out_of_distribution"] = Field(
        default=STATUS_OK,
        description="ok: a prediction; out_of_distribution: the input is unlike the training "
        "images (score above the model card's `calibration.ood.threshold`) and no diagnosis "
        "is given",
    )
    label: str | None = Field(
        default=None, description="the most probable class; null when out of distribution"
    )
    probabilities: dict[str, float] | None = Field(
        default=None,
        description="class name -> probability (sums to 1); temperature-scaled when "
        "`calibrated` is true; null when out of distribution",
    )
    calibrated: bool = Field(
        default=False,
        description="whether the probabilities are calibrated (softmax(logits / T), T fitted on "
        "held-out data; see the model card's `calibration`)",
    )
    prediction_set: list[str] | None = Field(
        default=None,
        description="conformal prediction set, most probable class first: holds the true class "
        "for the model card's `calibration.coverage` share of cases (never empty). null: the "
        "model has no calibration, or the input is out of distribution",
    )
    refer: bool | None = Field(
        default=None,
        description="refer for specialist review: the prediction set holds more than one class "
        "(or a dangerous class while another is top), the operating point flags a dangerous "
        "class while another is top, or the input is out of distribution. null: the model has "
        "no calibration",
    )
    referral_reason: str | None = Field(
        default=None, description="why (or why not) to refer, in plain words; null: no calibration"
    )
    danger_probability: float | None = Field(
        default=None,
        description="calibrated probability of any dangerous class (the sum of their "
        "probabilities); null: no operating point, or out of distribution",
    )
    danger_flagged: bool | None = Field(
        default=None,
        description="danger_probability is at or above the operating point's threshold (chosen "
        "on held-out data for the target sensitivity); null: no operating point, or out of "
        "distribution",
    )
    danger_threshold: float | None = Field(
        default=None, description="the operating point's threshold; null: no operating point"
    )
    ood_score: float | None = Field(
        default=None,
        description="out-of-distribution score (higher: more unlike the training images); "
        "null: the model has no OOD check",
    )
    ood_threshold: float | None = Field(
        default=None,
        description="scores above it are out of distribution; null: the model has no OOD check",
    )
    model: ModelRef
    latency_ms: float = Field(description="server-side time to decode, preprocess and infer")


class HeatSummary(BaseModel):
    """Where the Grad-CAM heat lies (fractions of width/height, y pointing down)."""

    centroid: list[float] | None = None
    peak: list[float] | None = None
    region: str | None = None
    top10_mass_fraction: float = 0.0
    flat: bool = False
    text: str = ""


class FeatureAttribution(BaseModel):
    """One clinical feature's SHAP value for the explained class (positive: towards it)."""

    feature: str
    value: Any = None
    unit: str = ""
    shap: float


class ShapImageSummary(BaseModel):
    expected: float = Field(description="mean probability of the class over the background")
    probability: float = Field(
        description="the image's probability of the class as the model gives it (before "
        "calibration: SHAP explains the model's own softmax)"
    )
    total: float = Field(description="sum of the pixel values (≈ probability - expected)")
    nsamples: int
    background_size: int
    estimator: str | None = Field(
        default=None, description="how the values were estimated (expected gradients, sampling)"
    )
    background: str | None = Field(
        default=None, description="the reference images the values are measured against"
    )


class ExplainResponse(BaseModel):
    label: str = Field(description="the predicted class")
    probabilities: dict[str, float]
    target: str = Field(description="the class explained")
    method: str | None = Field(default=None, description="CAM method used (None: tabular model)")
    overlay_png: str | None = Field(default=None, description="base64 PNG: heatmap over image")
    heatmap_png: str | None = Field(default=None, description="base64 PNG: colour-mapped heatmap")
    heat: HeatSummary | None = None
    shap_png: str | None = Field(default=None, description="base64 PNG: image SHAP map")
    shap_image: ShapImageSummary | None = None
    tabular_shap: list[FeatureAttribution] | None = Field(
        default=None, description="clinical features by |SHAP|, largest first"
    )
    warnings: list[str] = Field(default_factory=list)
    model: ModelRef
    latency_ms: float


class Neighbour(BaseModel):
    rank: int
    label: str
    distance: float = Field(description="1 - cosine similarity of the model's features")
    thumbnail_png: str = Field(description="base64 PNG thumbnail of the library case")


class SimilarResponse(BaseModel):
    label: str = Field(description="the query's predicted class")
    neighbours: list[Neighbour]
    index_size: int = Field(description="number of cases the neighbours were chosen from")
    source: str = Field(
        default="",
        description="where the cases come from: 'site-local case library' (this site's own "
        "images) or 'model bundle (training images)' (central non-DP bundles only)",
    )
    model: ModelRef
    latency_ms: float


class BundleContents(BaseModel):
    """What the served model bundle holds besides its weights."""

    weights: bool = True
    background: str = Field(description="what the SHAP background is made of ('none' if absent)")
    case_index: int = Field(description="training images indexed in the bundle (0: none)")
    training_images: bool = Field(
        description="whether any training image, thumbnail, embedding or label is inside"
    )
    ood_statistics: str | None = Field(
        default=None,
        description="what the out-of-distribution check keeps of the training data (aggregate "
        "feature statistics), null: none",
    )


class ClinicalFeatureSpec(BaseModel):
    """One feature of the clinical schema (what a form needs to render an input)."""

    model_config = ConfigDict(extra="allow")

    name: str
    type: str
    min: float | None = None
    max: float | None = None
    unit: str = ""
    allowed: list[Any] | None = None
    required: bool = True
    description: str | None = Field(default=None, description="the feature in words (forms show)")


class CalibrationInfo(BaseModel):
    """How the served probabilities are calibrated and prediction sets made."""

    method: str = Field(description="temperature (temperature scaling) or none (T = 1)")
    temperature: float = Field(description="T: probabilities = softmax(logits / T)")
    coverage: float = Field(description="target share of cases whose set holds the true class")
    qhat: float = Field(description="conformal threshold on the APS score (1: every class)")
    score: str = Field(
        description="conformal score (aps: adaptive prediction sets, not randomised)"
    )
    fitted_on: str = Field(description="the data T and the threshold were fitted on")
    n_fit: int = Field(description="cases they were fitted on")
    dangerous: list[str] = Field(
        default_factory=list,
        description="classes whose presence in the set with another top "
        "class is named in the referral",
    )
    operating_point: dict[str, Any] | None = Field(
        default=None,
        description="threshold on P(any dangerous class) for the target sensitivity, with the "
        "sensitivity/specificity and positive/negative counts where it was fitted; null: none",
    )
    ood: dict[str, Any] | None = Field(
        default=None,
        description="out-of-distribution check: score (mahalanobis | energy), threshold, "
        "false-alarm rate, what it was fitted on; null: no check",
    )
    sources: dict[str, str] = Field(
        default_factory=dict,
        description="what each part was fitted on, in words (temperature, conformal, "
        "operating_point, ood), with case counts",
    )
    notes: list[str] = Field(
        default_factory=list, description="why a part (operating point, OOD check) is missing"
    )
    test: dict[str, Any] | None = Field(
        default=None,
        description="effect on the test split: ECE and NLL before/after, empirical coverage, "
        "mean set size, referral rate",
    )


class ModelCard(BaseModel):
    model: ModelRef
    version: str = Field(default="", description="registry version (same as model.version)")
    kind: Literal["image", "fusion", "tabular"] = "image"
    architecture: str
    architecture_kwargs: dict[str, Any] = Field(default_factory=dict)
    classes: list[str]
    preprocessing: dict[str, Any] | None = None
    clinical_schema: list[ClinicalFeatureSpec] | None = None
    metrics: dict[str, Any] = Field(default_factory=dict, description="held-out test metrics")
    data_fingerprint: str = ""
    privacy: dict[str, Any] | None = Field(
        default=None, description="differential-privacy report (epsilon, delta...) if any"
    )
    intended_use: str = ""
    limitations: list[str] = Field(default_factory=list)
    explain_methods: list[str] = Field(default_factory=list)
    similar_cases: int = Field(default=0, description="size of the similar-case index")
    similar_source: str | None = Field(
        default=None, description="where /similar's cases come from (None: /similar is off)"
    )
    contents: BundleContents | None = Field(
        default=None, description="what the model bundle contains besides the weights"
    )
    chat: bool = Field(default=False, description="whether /chat is available")
    calibration: CalibrationInfo | None = Field(
        default=None, description="calibration and conformal referral (null: uncalibrated)"
    )


#: A class or feature name in a chat case: not blank, at most 80 characters.
CaseLabel = Annotated[str, Field(min_length=1, max_length=80, pattern=r"\S")]


class CaseFeature(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: CaseLabel
    value: float


class ChatCase(BaseModel):
    """The case on screen. Model-card facts are added by the service, not taken from here."""

    model_config = ConfigDict(extra="forbid")

    predicted_label: CaseLabel
    probabilities: dict[CaseLabel, Annotated[float, Field(ge=0.0, le=1.0)]] = Field(
        min_length=1, max_length=50, description="class -> probability; they add up to 1"
    )
    gradcam_summary: str | None = Field(default=None, max_length=500)
    shap_features: list[CaseFeature] = Field(default_factory=list, max_length=20)
    clinical_note: str | None = Field(
        default=None,
        max_length=MAX_NOTE_CHARS,
        description="free text from the user or a file: treated as data, never as instructions",
    )


class ChatRequest(BaseModel):
    """One question. The user is the authenticated API key's owner (never a body field)."""

    model_config = ConfigDict(extra="forbid")

    question: str = Field(max_length=MAX_QUESTION_CHARS)
    session_id: str = Field(pattern=SESSION_ID_PATTERN)
    case: ChatCase | None = None


class ChatSessionRequest(BaseModel):
    """Names one of the caller's conversations (``/chat/history``, ``/chat/reset``)."""

    model_config = ConfigDict(extra="forbid")

    session_id: str = Field(pattern=SESSION_ID_PATTERN)


class Citation(BaseModel):
    n: int = Field(description="the [n] marker in the answer text")
    note_id: str
    title: str
    section: str
    sources: list[str] = Field(default_factory=list)


class ChatResponse(BaseModel):
    text: str = Field(
        description="the answer; [n] markers refer to citations; ends with the disclaimer"
    )
    citations: list[Citation]
    refused: bool
    disclaimer: str
    backend: str
    session_id: str
    fallback_reason: str | None = None
    injection_detected: bool = False
    retrieval_mode: str = ""
    replaces_stream: bool = Field(
        default=False, description="streamed pieces were discarded: show `text` instead"
    )


class ChatTurn(BaseModel):
    role: Literal["user", "assistant"]
    text: str


class ChatHistoryResponse(BaseModel):
    """The caller's own conversation (empty for a session this user never used)."""

    session_id: str
    turns: list[ChatTurn]


class ChatResetResponse(BaseModel):
    session_id: str
    cleared: bool = True


class ErrorBody(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody
