"""Great Expectations suites for image manifests and clinical tables.

Importing this package is cheap: Great Expectations loads only when a suite runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from validation.clinical_schema import ClinicalFeature, check_clinical_record, parse_schema
    from validation.clinical_suite import validate_clinical, validate_clinical_manifest
    from validation.manifest_suite import validate_manifest
    from validation.outcome import ValidationOutcome

_EXPORTS = {
    "validate_manifest": "validation.manifest_suite",
    "validate_clinical": "validation.clinical_suite",
    "validate_clinical_manifest": "validation.clinical_suite",
    "check_clinical_record": "validation.clinical_schema",
    "parse_schema": "validation.clinical_schema",
    "ClinicalFeature": "validation.clinical_schema",
    "ValidationOutcome": "validation.outcome",
}
__all__ = [
    "ClinicalFeature",
    "ValidationOutcome",
    "check_clinical_record",
    "parse_schema",
    "validate_clinical",
    "validate_clinical_manifest",
    "validate_manifest",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'validation' has no attribute {name!r}")
