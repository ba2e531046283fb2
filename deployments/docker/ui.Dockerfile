# syntax=docker/dockerfile:1.7
# The Gradio UI. It talks to the diagnosis service over HTTP only, so the image carries no
# torch and no model: ui/ plus its few dependencies.
#   docker build -f deployments/docker/ui.Dockerfile -t oncoflow-ui:0.1.0 .
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    DO_NOT_TRACK=1 \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860 \
    ONCOFLOW_UI_HOME=/var/lib/oncoflow-ui

WORKDIR /opt/oncoflow
COPY constraints.txt ./
RUN pip install -c constraints.txt gradio httpx pydantic argon2-cffi reportlab pypdf

COPY ui ./ui
COPY serving/client.py serving/schemas.py ./serving/
RUN touch serving/__init__.py \
    && useradd --system --uid 10001 --create-home --home-dir /home/oncoflow oncoflow \
    && mkdir -p /var/lib/oncoflow-ui \
    && chown oncoflow:oncoflow /var/lib/oncoflow-ui

USER 10001:10001
EXPOSE 7860
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:7860/', timeout=4)"]
CMD ["python", "-m", "ui"]
