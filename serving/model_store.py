"""The served model: its entry in the Bento model store, and the engine built from it.

`load_model_ref` needs no torch (`oncoflow serve` resolves the tag with it before starting the
server); `load_engine` imports the engine, and torch with it, in the worker only."""

from __future__ import annotations

import os

import bentoml

from components.config import ServingConf
from components.errors import ModelError
from serving.schemas import ModelRef


def load_model_ref(tag: str) -> bentoml.Model:
    """The Bento model-store entry for `tag`, or a ModelError saying how to create one."""
    from bentoml.exceptions import BentoMLException

    try:
        return bentoml.models.get(tag)
    except (BentoMLException, ValueError) as exc:
        home = os.environ.get("BENTOML_HOME", "~/bentoml")
        raise ModelError(
            f"no model {tag!r} in the Bento model store under {home}: train and package one "
            "first (`oncoflow run`), or import a bundle with serving.packaging.import_bundle, "
            "or point serving.model_tag (ONCOFLOW_MODEL_TAG) at an existing tag. The service "
            "never serves an untrained model."
        ) from exc


def load_engine(settings: ServingConf):
    """The `DiagnosisEngine` for the model `settings.model_tag`, with the site-local case
    library `settings.case_library` (if any) for similar cases."""
    from serving.engine import DiagnosisEngine

    ref = load_model_ref(settings.model_tag)
    meta = ref.info.metadata or {}
    model_ref = ModelRef(
        name=str(meta.get("registered_model") or ref.tag.name),
        version=str(meta.get("model_version") or ""),
        tag=str(ref.tag),
    )
    return DiagnosisEngine.from_dir(
        ref.path,
        model_ref,
        settings.max_pixels,
        settings.optimise_model,
        case_library=settings.case_library,
    )
