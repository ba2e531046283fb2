"""The model side of the diagnosis service, free of BentoML: one loaded bundle and what it does.

`DiagnosisEngine` turns request bytes into model inputs (`CaseInput`), runs batches of packed
inputs (`infer_rows`, the function the micro-batcher calls), and answers explain, similar,
report and model-card requests by calling `components/`. Three kinds of bundle are served:

- ``image``: a zoo architecture; the request is an image;
- ``fusion``: image + clinical record (`components.models.fusion`); both are required;
- ``tabular``: a clinical record only (`components.models.tabular`).

A bundle with a clinical schema gets every record checked with `check_clinical_record`
(`InputError` naming each bad field); a bundle without one refuses clinical data.
Similar cases come from the site-local case library the engine is given
(`components.case_library`); without one, only a central non-DP bundle built with
`package.training_images` answers from its own index, and any other answers `NoCaseLibrary`.
Nothing here logs request content.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from components.config import SHAP_NSAMPLES_LIMIT, ServingConf
from components.errors import ConfigError, InputError, ModelError, NotFound
from components.evaluation.predict import mean_over_views
from serving.inference import FixedInputSize, for_inference
from serving.schemas import (
    STATUS_OOD,
    BundleContents,
    CalibrationInfo,
    ClinicalFeatureSpec,
    ExplainResponse,
    FeatureAttribution,
    HeatSummary,
    ModelCard,
    ModelRef,
    Neighbour,
    PredictResponse,
    ShapImageSummary,
    SimilarResponse,
)

log = logging.getLogger(__name__)

KINDS = ("image", "fusion", "tabular")
DEFAULT_MAX_PIXELS = 50_000_000
DISPLAY_MAX_SIDE = 256  # overlays and the report show the upload at most this large
TABULAR_SHAP_NSAMPLES = 200
# pixels (rows × H × W) per forward/backward pass of an image explanation: bounds its memory.
# 32 rows at 96 × 96 px: EfficientNet-Lite0, 200 samples, peak RSS +0.34 GiB (+0.19 in passes
# of 16 rows, +0.69 in passes of 64); brain MRI's 24 samples and the image then go in one pass,
# 13 % faster than in passes of 16 and 9 rows. Larger images get fewer rows a pass
EXPLAIN_BATCH_PIXELS = 32 * 96 * 96
TOP_FEATURES = 10
INTENDED_USE = (
    "Decision support for trained clinicians on images like the training data; "
    "not a diagnosis and not validated for clinical use."
)
GENERAL_LIMITATIONS = (
    "Research software: not a medical device and not validated for clinical use.",
    "The probabilities are the model's scores, calibrated (when the model card lists a "
    "calibration) on held-out data like the training data, not the chance that disease is "
    "present; they can be miscalibrated on data unlike it, and so can the prediction sets.",
    "Only validated on data like the training data (see the data fingerprint); other "
    "scanners, sites, populations or image types may give unreliable answers.",
    "Grad-CAM and SHAP show what the model used for its answer, not where disease is.",
)


BLANK_LEVELS = 2  # an upload whose every channel spans at most this many levels is blank
OOD_REASON = (
    "This image is unlike the images the model was trained on (for example another kind of "
    "scan, a blank or damaged image, or an image from a very different scanner), so the model "
    "gives no diagnosis for it — review it yourself or refer for specialist review."
)


def model_kind(architecture: str) -> str:
    """``fusion`` / ``tabular`` for the multimodal architectures, else ``image``."""
    from components.models.fusion import FUSION_ARCHITECTURE
    from components.models.tabular import TABULAR_ARCHITECTURE

    if architecture == FUSION_ARCHITECTURE:
        return "fusion"
    if architecture == TABULAR_ARCHITECTURE:
        return "tabular"
    return "image"


@dataclass(frozen=True)
class CaseInput:
    """One request's input, checked and ready for the model.

    `image`: normalised float tensor (C, H, W); `picture`: the upload as uint8 (H, W[, C]),
    at most `DISPLAY_MAX_SIDE` a side, for overlays and reports; `record`: the encoded clinical
    record (D,), NaN where an optional value is missing.
    """

    image: Any = None
    picture: np.ndarray | None = None
    record: np.ndarray | None = None


def b64png(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


class DiagnosisEngine:
    """One loaded bundle: input checks, batched inference, explanations, neighbours, reports.

    Calls on the model as trained (pytorch-grad-cam's other CAM methods, clinical SHAP,
    similar) are serialised by one lock: pytorch-grad-cam's hooks would otherwise record
    activations of a concurrent forward pass. Predictions (`infer_rows`) run on a second copy
    of the model, so they never wait for an explanation; with `optimise` that copy is rewritten
    for inference (`serving.inference.for_inference`). Default Grad-CAM and image SHAP run on
    a third, frozen copy (`explain_model`) whose hooks record only their own thread's pass, so
    concurrent explanations need no lock.
    """

    def __init__(
        self,
        bundle,
        ref: ModelRef,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        optimise: bool = True,
        case_library: str | Path | None = None,
        *,
        shap_nsamples: int | None = ServingConf.shap_nsamples,
    ) -> None:
        from components.explain.background import split_background

        self.bundle = bundle
        self.ref = ref
        self.max_pixels = int(max_pixels)
        self.kind = model_kind(bundle.architecture)
        self.classes = [str(c) for c in bundle.class_names]
        self.model = bundle.build_model()
        self.schema = bundle.tabular_schema if self.kind != "image" else None
        self.layout = None
        if self.schema:
            from components.models.tabular import TabularLayout
            from validation.clinical_schema import parse_schema

            parse_schema(self.schema)  # a broken schema fails at start-up, not per request
            self.layout = TabularLayout.from_schema(self.schema)
        elif bundle.tabular_schema:
            log.warning(
                "the bundle has a clinical schema but its %s model takes no clinical data; "
                "clinical fields will be refused",
                bundle.architecture,
            )
        self.image_background, self.tabular_background = split_background(bundle.background)
        self.calibration = self._calibration(bundle)
        self.temperature = self.calibration.temperature if self.calibration else 1.0
        self.ood = self._ood(bundle)
        self.min_side = _min_side(bundle.config)
        self.case_library = self._case_library(case_library)
        self.model_dir: Path | None = None  # the bundle's directory, when loaded from one
        self._lock = threading.Lock()
        self.optimise = optimise
        # the image-SHAP samples of an /explain naming none: the server's, else the model's
        self.shap_nsamples = _checked_nsamples(
            bundle.shap_nsamples if shap_nsamples is None else shap_nsamples
        )
        example = self._unpack(self._example_rows(2))
        self.predict_model = (
            for_inference(self.model, example) if optimise else copy.deepcopy(self.model)
        )
        self._explain_model = None  # built at first use: a server's request worker never does
        self._shap_expected: np.ndarray | None = None  # the background's mean probabilities

    @property
    def explain_model(self):
        """The copy Grad-CAM and image SHAP run on (`components.explain.one_pass`), None for
        a tabular model: rewritten like the prediction copy (the folded layers compute the same
        function, so the same gradients), weights frozen so a backward pass computes input
        gradients only; its CAM hooks never see a prediction's forward pass. Built on first
        use (the service explains in its own process, `serving.explainer`)."""
        if self.kind == "tabular":
            return None
        with self._lock:
            if self._explain_model is None:
                self._explain_model = self._explain_copy()
        return self._explain_model

    def _explain_copy(self):
        example = self._unpack(self._example_rows(2))
        model = for_inference(self.model, example) if self.optimise else copy.deepcopy(self.model)
        if isinstance(model, FixedInputSize):  # explained images always have the served size
            model = model.model
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        return model.eval()

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def from_dir(
        cls,
        path,
        ref: ModelRef,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        optimise: bool = True,
        case_library: str | Path | None = None,
        *,
        shap_nsamples: int | None = ServingConf.shap_nsamples,
    ):
        from components.bundle import ModelBundle

        bundle = ModelBundle.load(path)
        engine = cls(bundle, ref, max_pixels, optimise, case_library, shap_nsamples=shap_nsamples)
        engine.model_dir = Path(path)
        return engine

    def _calibration(self, bundle):
        """The bundle's calibration (None: served uncalibrated), refused at start-up when it
        does not describe this model's classes."""
        from components.calibration.record import Calibration

        calibration = Calibration.from_dict(bundle.calibration)
        if calibration is not None and calibration.classes != self.classes:
            raise ModelError("the bundle's calibration block names other classes than the model")
        if calibration is None:
            log.info("the bundle has no calibration: probabilities as trained, no referral")
        return calibration

    def _ood(self, bundle):
        """The bundle's out-of-distribution check (None: none), refused at start-up when its
        statistics do not fit the model's features."""
        from components.calibration.ood import OODDetector

        meta = self.calibration.ood if self.calibration is not None else None
        if not meta:
            return None
        detector = OODDetector.from_parts(meta, bundle.ood_stats)
        width = getattr(self.model, "embed_dim", None)
        if detector.needs_features and detector.stats["means"].shape[1] != width:
            raise ModelError("the bundle's OOD statistics do not match the model's features")
        return detector

    def _case_library(self, directory: str | Path | None):
        """The site-local library at `directory` (refused unless built with this model), else
        the bundle's own training-image index if it has one, else None."""
        from components.case_library import bundle_case_index, load_case_library

        if self.kind == "tabular":
            if directory:
                raise ConfigError("a tabular model reads no images: it takes no case library")
            return None
        if directory:
            library = load_case_library(directory, self.bundle)
            log.info("similar cases: %s, %d cases", library.source, len(library))
            return library
        return bundle_case_index(self.bundle)

    def _example_rows(self, n: int):
        """`n` packed rows of random images and all-missing clinical records (a tensor)."""
        import torch

        rows = torch.randn(n, self.row_width, generator=torch.Generator().manual_seed(0))
        if self.layout is not None:
            rows[:, self.row_width - self.layout.width :] = float("nan")
        return rows

    def warm_up(self, explainers: bool = False) -> None:
        """One forward pass; with `explainers`, also what the default explanation needs (the
        explanation copy, the SHAP base values, shap itself for clinical SHAP), so no request
        pays for them. pytorch-grad-cam (~300 MB, seconds to import) is left to the first
        request for another CAM method than Grad-CAM."""
        self.infer_rows(self._example_rows(1).numpy())
        if not explainers:
            return
        if self.layout is not None:  # clinical SHAP runs shap's explainer
            from components.explain.shap_image import import_shap

            import_shap()
        if self.explain_model is not None and self.kind == "image":  # fusion: per record
            self._background_probabilities(CaseInput())

    # -- inputs ----------------------------------------------------------------------------
    @property
    def image_shape(self) -> tuple[int, int, int] | None:
        if self.kind == "tabular":
            return None
        p = self.bundle.preprocessing
        return (p.channels, p.size, p.size)

    @property
    def row_width(self) -> int:
        """Width of one packed input row (see `pack`)."""
        width = int(np.prod(self.image_shape)) if self.image_shape else 0
        return width + (self.layout.width if self.layout is not None else 0)

    def parse_clinical(self, raw: Any) -> np.ndarray | None:
        """The encoded record from a request's clinical value (a JSON object or its text)."""
        if isinstance(raw, bytes):
            raw = raw.decode("utf-8", "replace")
        if isinstance(raw, str) and not raw.strip():
            raw = None
        if self.layout is None:
            if raw is not None:
                raise InputError(
                    "this model takes no clinical data: send the image only (the model card "
                    "lists no clinical_schema)"
                )
            return None
        if raw is None:
            names = ", ".join(f["name"] for f in self.schema)
            raise InputError(
                "this model needs a clinical record: send 'clinical' as a JSON object with "
                f"the fields of the model card's clinical_schema ({names})"
            )
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except ValueError:
                raise InputError("clinical must be a JSON object (not valid JSON)") from None
        if not isinstance(raw, dict):
            raise InputError(f"clinical must be a JSON object, not {type(raw).__name__}")
        from validation.clinical_schema import check_clinical_record

        return self.layout.encode(check_clinical_record(raw, self.schema))

    def prepare(self, image: bytes | None, clinical: Any = None, display: bool = True) -> CaseInput:
        """Decode and check one request's image and clinical record (`InputError` if unusable);
        `display=False` skips the display copy of the upload (predictions need none)."""
        if self.kind == "tabular":
            if image is not None:
                raise InputError(
                    "this model reads a clinical record only: send it as JSON to "
                    "/predict_tabular or /explain_tabular, without an image"
                )
            return CaseInput(record=self.parse_clinical(clinical))
        if image is None:
            raise InputError("no image received: send it as the multipart file field 'image'")
        record = self.parse_clinical(clinical)  # cheap checks first
        from components.data.images import decode_bytes

        picture = decode_bytes(image, max_pixels=self.max_pixels)
        if min(picture.size) < self.min_side:
            width, height = picture.size
            raise InputError(
                f"the image is {width}x{height} pixels; this model needs at least "
                f"{self.min_side} pixels on each side (the smallest its training images had)"
            )
        if self.ood is not None and _blank(picture):
            raise InputError(
                "the image is blank (every pixel the same colour): there is nothing to diagnose"
            )
        tensor = self.bundle.preprocessing.to_tensor(picture)
        shown = _display_array(picture) if display else None
        return CaseInput(image=tensor, picture=shown, record=record)

    def prepare_record(self, clinical: Any) -> CaseInput:
        """The input of a tabular-only request."""
        if self.kind != "tabular":
            raise InputError(
                f"this {self.kind} model needs an image: use /predict, /explain, /similar or "
                "/report with a multipart 'image' field"
            )
        return CaseInput(record=self.parse_clinical(clinical))

    # -- inference -------------------------------------------------------------------------
    def pack(self, case: CaseInput) -> np.ndarray:
        """One float32 row (1, row_width): the flattened image, then the encoded record."""
        parts = []
        if case.image is not None:
            parts.append(case.image.numpy().reshape(-1))
        if case.record is not None:
            parts.append(np.asarray(case.record, dtype=np.float32).reshape(-1))
        row = np.concatenate(parts).astype(np.float32, copy=False)[None]
        if row.shape[1] != self.row_width:
            raise ModelError(f"packed input has {row.shape[1]} values; expected {self.row_width}")
        return row

    def infer_rows(self, rows: np.ndarray) -> np.ndarray:
        """What the batcher calls, for packed rows (N, row_width): probabilities (N, K),
        softmax(logits / T) with the bundle's temperature (T = 1 without calibration), and with
        an OOD check one more column, each row's OOD score (N, K + 1)."""
        import torch

        x = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))
        if x.ndim != 2 or x.shape[1] != self.row_width:
            expected = f"(N, {self.row_width})"
            raise ModelError(f"input rows of shape {tuple(x.shape)}; expected {expected}")
        prep = self.bundle.preprocessing
        with torch.inference_mode():
            inputs = self._unpack(x)
            if self.ood is not None and self.ood.needs_features:
                features, logits = _features_and_logits(self.predict_model, inputs, prep)
            else:
                features, logits = None, mean_over_views(self.predict_model, inputs, prep)
            probs = torch.softmax(logits.float() / self.temperature, dim=1).numpy()
        if self.ood is None:
            return probs
        z = logits.float().numpy()
        scores = self.ood.scores(z, None if features is None else features.float().numpy())
        return np.concatenate([probs, scores[:, None].astype(probs.dtype)], axis=1)

    def _unpack(self, x) -> tuple:
        if self.kind == "tabular":
            return (x,)
        shape = self.image_shape
        size = int(np.prod(shape))
        images = x[:, :size].reshape(-1, *shape)
        return (images,) if self.kind == "image" else (images, x[:, size:])

    def predict_response(self, row, started: float) -> PredictResponse:
        """The answer for one row of `infer_rows` (already calibrated; with an OOD check, its
        score last): label, probabilities and, with a calibration, the conformal prediction
        set, the danger check and the referral; or, for an input unlike the training images,
        status `out_of_distribution` and a referral instead of a diagnosis."""
        values = [float(v) for v in row]
        probs, score = values[: len(self.classes)], None
        if len(values) > len(self.classes):
            score = values[len(self.classes)]
        latency = (time.perf_counter() - started) * 1000.0
        ood = {}
        if self.ood is not None:
            finite = score is not None and bool(np.isfinite(score))
            ood = {"ood_score": score if finite else None, "ood_threshold": self.ood.threshold}
            if not finite or bool(self.ood.is_out(score)):
                return PredictResponse(
                    status=STATUS_OOD,
                    calibrated=self.calibration is not None and self.calibration.method != "none",
                    refer=True,
                    referral_reason=OOD_REASON,
                    **ood,
                    model=self.ref,
                    latency_ms=latency,
                )
        best = int(np.argmax(probs))
        return PredictResponse(
            label=self.classes[best],
            probabilities=dict(zip(self.classes, probs, strict=True)),
            **self.referral(probs),
            **ood,
            model=self.ref,
            latency_ms=latency,
        )

    def referral(self, calibrated) -> dict[str, Any]:
        """`calibrated`, `prediction_set`, `refer`, `referral_reason` and the danger check for
        one case's calibrated probabilities (all but the first None without a calibration)."""
        if self.calibration is None:
            return {"calibrated": False}
        decision = self.calibration.decide(calibrated)
        point = self.calibration.operating_point
        return {
            "calibrated": self.calibration.method != "none",
            "prediction_set": decision.prediction_set,
            "refer": decision.refer,
            "referral_reason": decision.reason,
            "danger_probability": decision.danger_probability,
            "danger_flagged": decision.danger_flagged,
            "danger_threshold": point.threshold if point is not None else None,
        }

    def calibrated(self, probabilities) -> list[float]:
        """Calibrated probabilities from the model's plain softmax ones (explanations)."""
        if self.calibration is None:
            return [float(p) for p in probabilities]
        return [float(p) for p in self.calibration.recalibrate(np.asarray(probabilities)[None])[0]]

    def predict(self, case: CaseInput) -> PredictResponse:
        """One prediction, unbatched (the service goes through its micro-batcher instead)."""
        started = time.perf_counter()
        return self.predict_response(self.infer_rows(self.pack(case))[0], started)

    # -- explanations ----------------------------------------------------------------------
    def class_index(self, target: str | None) -> int | None:
        if target is None or (isinstance(target, str) and not target.strip()):
            return None
        name = str(target).strip()
        if name not in self.classes:
            raise InputError(f"unknown target class {name!r}; choose one of {self.classes}")
        return self.classes.index(name)

    def explain(
        self,
        case: CaseInput,
        *,
        method: str = "gradcam",
        target: str | None = None,
        opacity: float = 0.45,
        shap: bool = True,
        nsamples: int | None = None,
    ) -> ExplainResponse:
        """Grad-CAM (+ image SHAP, + clinical SHAP when a record is given) for one case.

        The maps explain the model on the image itself. With test-time views the answer's
        probabilities, label and default class are those `/predict` gives (averaged over the
        views), so an explanation never names another diagnosis than the prediction.
        `nsamples`: image-SHAP samples (None: the engine's `shap_nsamples`)."""
        started = time.perf_counter()
        target_index = self.class_index(target)
        if not 0.0 <= float(opacity) <= 1.0:
            raise InputError(f"opacity must lie in [0, 1], got {opacity}")
        nsamples = self.shap_nsamples if nsamples is None else _checked_nsamples(nsamples)
        if self.kind == "tabular":
            return self._explain_record(case, target_index, started)
        from components.explain.gradcam import (
            canonical_method,
            explain_gradcam,
            heatmap_png,
            overlay_png,
            summarise_heat,
        )
        from components.explain.one_pass import explain_image

        method = canonical_method(method)
        warnings: list[str] = []
        image_shap = shap and self.image_background is not None
        if shap and not image_shap:
            warnings.append(
                "no image SHAP map: this model bundle has no background set; re-package it with one"
            )
        served = None  # with test-time views, the probabilities /predict gives, and its class
        if self.bundle.preprocessing.tta:
            served = [float(p) for p in self.infer_rows(self.pack(case))[0][: len(self.classes)]]
            target_index = int(np.argmax(served)) if target_index is None else target_index
        one = None
        if method == "gradcam" or image_shap:  # Grad-CAM and SHAP from one batched pass
            one = explain_image(  # thread-safe on the frozen eval copy: no lock
                self.explain_model,
                case.image,
                self.image_background if image_shap else None,
                target_class=target_index,
                cam=method == "gradcam",
                nsamples=int(nsamples),
                tabular=case.record,
                expected=self._background_probabilities(case),
                batch_size=explain_rows(case.image.shape[-2:]),
            )
        cam = one.cam if one is not None else None
        features = None
        if cam is None or case.record is not None:
            with self._lock:  # pytorch-grad-cam and clinical SHAP use the model as trained
                if cam is None:  # the other CAM methods
                    cam = explain_gradcam(
                        self.model,
                        case.image,
                        method=method,
                        target_class=one.target_class if one is not None else target_index,
                        tabular=case.record,
                    )
                if case.record is not None:
                    features = self._record_shap(case, cam.target_class, warnings)
        shap_png_b64, shap_summary = None, None
        if one is not None and one.shap is not None:
            shap_png_b64, shap_summary = self._shap_answer(one.shap, case)
        if served is None:
            served = self.calibrated(cam.probabilities)
        probabilities = dict(zip(self.classes, served, strict=True))
        return ExplainResponse(
            label=self.classes[int(np.argmax(served))],
            probabilities=probabilities,
            target=self.classes[cam.target_class],
            method=cam.method,
            overlay_png=b64png(overlay_png(case.picture, cam.heatmap, opacity=float(opacity))),
            heatmap_png=b64png(heatmap_png(cam.heatmap)),
            heat=HeatSummary(**summarise_heat(cam.heatmap)),
            shap_png=shap_png_b64,
            shap_image=shap_summary,
            tabular_shap=features,
            warnings=warnings,
            model=self.ref,
            latency_ms=(time.perf_counter() - started) * 1000.0,
        )

    def _explain_record(self, case: CaseInput, target: int | None, started: float):
        warnings: list[str] = []
        with self._lock:
            probs = self.infer_rows(self.pack(case))[0]
            chosen = int(np.argmax(probs)) if target is None else target
            features = self._record_shap(case, chosen, warnings)
        return ExplainResponse(
            label=self.classes[int(np.argmax(probs))],
            probabilities=dict(zip(self.classes, map(float, probs), strict=True)),
            target=self.classes[chosen],
            tabular_shap=features,
            warnings=warnings,
            model=self.ref,
            latency_ms=(time.perf_counter() - started) * 1000.0,
        )

    def _background_probabilities(self, case: CaseInput) -> np.ndarray | None:
        """The SHAP base values (mean probability of each class over the background), computed
        once per model; None for a fusion case (they depend on its record)."""
        if self.image_background is None or case.record is not None:
            return None
        if self._shap_expected is None:
            from components.explain.one_pass import background_probabilities

            self._shap_expected = background_probabilities(
                self.explain_model, self.image_background
            )
        return self._shap_expected

    def _shap_answer(self, result, case: CaseInput) -> tuple[str, ShapImageSummary]:
        from components.explain.one_pass import ESTIMATOR
        from components.explain.shap_image import shap_png

        source = self.bundle.background_source or "unrecorded background"
        summary = ShapImageSummary(
            expected=result.expected,
            probability=result.probability,
            total=result.total,
            nsamples=result.nsamples,
            background_size=result.background_size,
            estimator=ESTIMATOR,
            background=f"{result.background_size} reference images: {source}",
        )
        return b64png(shap_png(result.attribution, case.picture)), summary

    def _record_shap(self, case: CaseInput, target: int, warnings: list[str]):
        from components.explain.shap_tabular import explain_tabular

        if self.tabular_background is None:
            warnings.append(
                "no clinical SHAP values: this model bundle has no tabular background set"
            )
            return None
        result = explain_tabular(
            self.model,
            case.record,
            self.tabular_background,
            target_class=target,
            nsamples=TABULAR_SHAP_NSAMPLES,
            image=case.image if self.kind == "fusion" else None,
        )
        return [FeatureAttribution(**item) for item in result.top(TOP_FEATURES)]

    # -- similar cases ---------------------------------------------------------------------
    def check_similar(self) -> None:
        """`NoCaseLibrary` (404) when an image model has no cases to search (before any
        upload is decoded); a tabular model is refused by `prepare` instead."""
        if self.case_library is None and self.kind != "tabular":
            from components.case_library import BUILD_HINT, NoCaseLibrary

            raise NoCaseLibrary(f"this server has no site-local case library; {BUILD_HINT}")

    def similar(self, case: CaseInput, k: int = 5) -> SimilarResponse:
        """The `k` nearest cases of the site-local library (or of a central non-DP bundle's
        own index); `NoCaseLibrary` (404) without either."""
        started = time.perf_counter()
        self.check_similar()
        if self.case_library is None:
            raise NotFound("a tabular model has no similar cases")
        import torch

        with self._lock, torch.inference_mode():
            batch = case.image.unsqueeze(0)
            if self.kind == "fusion":
                record = torch.from_numpy(np.asarray(case.record, dtype=np.float32))[None]
                probs = torch.softmax(self.model(batch, record), dim=1)[0]
                feature = self.model.embed(batch, record)[0]
            else:
                probs = torch.softmax(self.model(batch), dim=1)[0]
                feature = self.model.embed(batch)[0]
        found = self.case_library.index.query(feature.numpy(), k)
        return SimilarResponse(
            label=self.classes[int(probs.argmax())],
            neighbours=[
                Neighbour(
                    rank=n["rank"],
                    label=n["label"],
                    distance=n["distance"],
                    thumbnail_png=n["thumbnail_png_base64"],
                )
                for n in found
            ],
            index_size=len(self.case_library),
            source=self.case_library.source,
            model=self.ref,
            latency_ms=(time.perf_counter() - started) * 1000.0,
        )

    # -- report ----------------------------------------------------------------------------
    def report(
        self,
        case: CaseInput,
        *,
        method: str = "gradcam",
        target: str | None = None,
        case_id: str | None = None,
    ) -> bytes:
        """The one-case PDF: prediction, Grad-CAM overlay, clinical SHAP, model and privacy."""
        from components.reports.pdf import ReportInput, bundle_facts, render_report

        if self.kind == "tabular":
            raise InputError("the PDF report shows an image; this model reads clinical data only")
        if self.ood is not None:
            answer = self.predict(case)
            if answer.status == STATUS_OOD:  # no diagnosis, so no heatmap of one either
                return render_report(
                    ReportInput(
                        image_png=png_bytes(case.picture),
                        predicted_label="",
                        probabilities={},
                        model_name=self.ref.name,
                        model_version=self.ref.version or "unregistered",
                        case_id=case_id or None,
                        out_of_distribution=answer.referral_reason,
                        **bundle_facts(self.bundle),
                    )
                )
        explained = self.explain(case, method=method, target=target, shap=False)
        features = None
        if explained.tabular_shap:
            described = {f["name"]: f.get("description") or "" for f in self.schema or ()}
            features = [
                f.model_dump() | {"description": described.get(f.feature, "")}
                for f in explained.tabular_shap
            ]
        report = ReportInput(
            image_png=png_bytes(case.picture),
            predicted_label=explained.label,
            probabilities=explained.probabilities,
            model_name=self.ref.name,
            model_version=self.ref.version or "unregistered",
            overlay_png=base64.b64decode(explained.overlay_png),
            cam_method=explained.method,
            heat_summary=explained.heat.text if explained.heat else None,
            shap_features=features,
            shap_class=explained.target,
            case_id=case_id or None,
            **self._report_referral(explained.probabilities),
            **bundle_facts(self.bundle),
        )
        return render_report(report)

    def _report_referral(self, probabilities: dict[str, float]) -> dict[str, Any]:
        """The report's prediction set and referral, from calibrated probabilities."""
        answer = self.referral([probabilities[c] for c in self.classes])
        answer.pop("calibrated")
        answer.pop("danger_flagged", None)
        return answer

    # -- model card ------------------------------------------------------------------------
    def card(self, chat: bool = False) -> ModelCard:
        from components.bundle import bundle_summary
        from components.explain.gradcam import CAM_METHODS

        summary = bundle_summary(self.bundle)
        schema = None
        if self.schema:
            schema = [ClinicalFeatureSpec(**dict(f)) for f in self.schema]
        return ModelCard(
            model=self.ref,
            version=self.ref.version,
            kind=self.kind,
            architecture=self.bundle.architecture,
            architecture_kwargs={
                k: v
                for k, v in (summary.get("architecture_kwargs") or {}).items()
                if k != "tabular_schema"
            },
            classes=self.classes,
            preprocessing=summary["preprocessing"] if self.kind != "tabular" else None,
            clinical_schema=schema,
            metrics=summary.get("metrics") or {},
            data_fingerprint=self.bundle.data_fingerprint,
            privacy=summary.get("privacy"),
            intended_use=INTENDED_USE,
            limitations=self.limitations(),
            explain_methods=list(CAM_METHODS) if self.kind != "tabular" else [],
            similar_cases=len(self.case_library) if self.case_library is not None else 0,
            similar_source=self.case_library.source if self.case_library is not None else None,
            contents=BundleContents(**self.bundle.contents()),
            chat=chat,
            calibration=self.calibration_info(),
        )

    def calibration_info(self) -> CalibrationInfo | None:
        if self.calibration is None:
            return None
        block = self.calibration.to_dict()
        block.pop("classes")
        test = (self.bundle.metrics or {}).get("calibration")
        return CalibrationInfo(**block, test=test if isinstance(test, dict) else None)

    def limitations(self) -> list[str]:
        """General limitations plus the ones this bundle's own facts imply."""
        out = list(GENERAL_LIMITATIONS)
        privacy = self.bundle.privacy or {}
        if privacy.get("epsilon") is None:
            out.append("Trained without differential privacy: no formal privacy guarantee.")
        else:
            out.append(
                f"Trained with differential privacy (epsilon = {float(privacy['epsilon']):g}); "
                "this protects training records and usually costs some accuracy."
            )
        if not self.bundle.metrics:
            out.append("No held-out test metrics were recorded with this model.")
        if self.calibration is None:
            out.append(
                "Not calibrated: probabilities are the raw model scores and /predict gives no "
                "prediction set or referral."
            )
        if self.kind != "tabular":
            size = self.bundle.preprocessing.size
            out.append(f"Images are resized to {size}x{size} pixels: finer detail is not seen.")
        if self.schema:
            out.append(
                "Clinical values outside the schema's ranges are refused; missing optional "
                "values are filled with the training mean."
            )
        return out


def _features_and_logits(model, inputs: tuple, preprocessing):
    """Penultimate features of the image itself and the logits averaged over its test-time
    views, from one forward pass a view: every served architecture computes its logits as
    `head(embed(...))` (the classifier's dropout between them is off in eval mode). A model
    rewritten for one input size is unwrapped after checking the size."""
    from serving.inference import FixedInputSize

    if isinstance(model, FixedInputSize):
        if tuple(inputs[0].shape[-2:]) != model.size:
            raise ModelError(
                f"the prediction model was built for {model.size} inputs, got "
                f"{tuple(inputs[0].shape)}"
            )
        model = model.model
    image, rest = inputs[0], inputs[1:]
    views = preprocessing.views(image) if preprocessing.tta and image.ndim == 4 else [image]
    features = [model.embed(view, *rest) for view in views]
    logits = sum(model.head(f).float() for f in features) / len(features)
    return features[0], logits


def _blank(picture) -> bool:
    """Every channel of the decoded upload spans at most `BLANK_LEVELS` levels."""
    extrema = picture.getextrema()
    bands = extrema if isinstance(extrema[0], tuple) else (extrema,)
    return all(float(high) - float(low) <= BLANK_LEVELS for low, high in bands)


def _checked_nsamples(nsamples) -> int:
    """`nsamples` as an int in 1..SHAP_NSAMPLES_LIMIT, else InputError."""
    whole = isinstance(nsamples, int | np.integer) and not isinstance(nsamples, bool)
    if not whole or not 1 <= int(nsamples) <= SHAP_NSAMPLES_LIMIT:
        raise InputError(f"nsamples must lie in 1..{SHAP_NSAMPLES_LIMIT}, got {nsamples!r}")
    return int(nsamples)


def explain_rows(size) -> int:
    """Rows per forward/backward pass of an explanation of images of `size` (H, W): as many
    as `EXPLAIN_BATCH_PIXELS` allows, at least 2 (the image and one sample)."""
    height, width = (int(v) for v in size)
    return max(2, EXPLAIN_BATCH_PIXELS // (height * width))


def _min_side(config: dict[str, Any] | None) -> int:
    """The smallest image side the model's training data allowed (`dataset.limits.min_side` of
    the bundle's config; 1 when it does not say)."""
    limits = ((config or {}).get("dataset") or {}).get("limits") or {}
    return max(int(limits.get("min_side") or 1), 1)


def _display_array(picture) -> np.ndarray:
    """uint8 (H, W) or (H, W, 3) of the decoded upload, at most DISPLAY_MAX_SIDE a side."""
    from PIL import Image

    shown = picture
    if max(picture.size) > DISPLAY_MAX_SIDE:
        shown = picture.copy()
        shown.thumbnail((DISPLAY_MAX_SIDE, DISPLAY_MAX_SIDE), Image.Resampling.BILINEAR)
    return np.asarray(shown.convert("RGB" if picture.mode == "RGB" else "L"), dtype=np.uint8)


__all__ = [
    "INTENDED_USE",
    "KINDS",
    "CaseInput",
    "DiagnosisEngine",
    "model_kind",
]
