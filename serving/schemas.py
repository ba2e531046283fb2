"""Request/response models of the diagnosis HTTP API, shared by the service and its clients.

Plain pydantic: importing this module pulls in neither BentoML nor torch, so the UI can use it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ModelRef(BaseModel):
    """Which model answered: registered name, registry version and Bento model tag."""

    name: str
    version: str = Field(description="MLflow registered-model version ('' if not registered)")
    tag: str = Field(description="BentoML model-store tag the service loaded")


class PredictResponse(BaseModel):
    label: str = Field(description="the most probable class")
    probabilities: dict[str, float] = Field(description="class name -> probability (sums to 1)")
    model: ModelRef
    latency_ms: float = Field(description="server-side time to decode, preprocess and infer")


class ModelCard(BaseModel):
    model: ModelRef
    architecture: str
    architecture_kwargs: dict[str, Any] = Field(default_factory=dict)
    classes: list[str]
    preprocessing: dict[str, Any]
    metrics: dict[str, Any] = Field(default_factory=dict)
    data_fingerprint: str = ""
    privacy: dict[str, Any] | None = None
    intended_use: str = ""


class ErrorBody(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody
