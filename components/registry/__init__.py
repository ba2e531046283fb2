"""Model registry: MLflow runs, registered versions and the champion gate.

MLflow is imported lazily (by `RegistryClient`), so importing this package is cheap.
"""

from components.registry.client import RegistryClient, TrainingRecord, flatten_metrics
from components.registry.gate import GateConfig, GateDecision, decide

__all__ = [
    "GateConfig",
    "GateDecision",
    "RegistryClient",
    "TrainingRecord",
    "decide",
    "flatten_metrics",
]
