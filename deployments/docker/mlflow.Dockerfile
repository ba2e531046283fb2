# syntax=docker/dockerfile:1.7
# MLflow tracking server with the PostgreSQL driver and the S3 client (MinIO artifact store).
#   docker build -f deployments/docker/mlflow.Dockerfile -t oncoflow-mlflow:3.17.2 deployments/docker
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_ENABLE_TELEMETRY=false \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=1

RUN pip install mlflow==3.17.2 psycopg2-binary==2.9.13 boto3==1.44.5 \
    && useradd --system --uid 10001 --create-home --home-dir /home/mlflow mlflow

USER 10001:10001
WORKDIR /home/mlflow
EXPOSE 5000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=4)"]
# Arguments (backend store, artifact destination, allowed hosts) come from compose/k8s.
ENTRYPOINT ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
