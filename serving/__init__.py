"""HTTP serving: the BentoML diagnosis service, its packaging, launcher and typed client.

- `service`: the BentoML service `DiagnosisService` (its endpoints and wiring);
- `settings`: its settings (the composed ``serving`` config + ``ONCOFLOW_*`` overrides);
- `process` / `metrics` / `api_errors` / `model_store`: start-up tuning (logging, threads),
  Prometheus metrics, an endpoint's error -> its JSON answer, the served model;
- `engine`: one loaded model bundle and what it answers (no BentoML);
- `batching` / `inference`: in-process micro-batching of predictions, and the model copy
  rewritten for fast inference (no BentoML);
- `chat`: the grounded assistant behind the chat endpoints;
- `middleware`: request log, JSON errors, body limits, upload checks, API keys;
- `packaging` / `launch`: Bento model store import (+ assistant index), ``bentoml build``,
  ``oncoflow serve``;
- `client` / `schemas`: the typed HTTP client and its models.

Import submodules directly; `serving.client` and `serving.schemas` need neither BentoML nor
torch, so the UI can use them.
"""
