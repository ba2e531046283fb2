"""prefect.yaml, the Prefect helpers of flows/ and the deployments/ kit, checked without a server.

No container engine or cluster runs here, so the kit is validated by schemas (Prefect's own
models, Kubernetes OpenAPI schemas via kubernetes-validate, a strict Compose subset schema),
lint (yamllint, Dockerfile rules) and cross-references between the files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deployments"
PREFECT_YAML = ROOT / "prefect.yaml"
COMPOSE = DEPLOY / "compose.yaml"
K8S = DEPLOY / "k8s"
POOLS = DEPLOY / "prefect" / "work-pools"
DOCKERFILES = sorted((DEPLOY / "docker").glob("*.Dockerfile"))
K8S_VERSION = "1.32.0"
TRAINING = ("nightly-central", "weekly-federated", "federated-coordinator")
SITE_DEPLOYMENTS = ("site-prepare",)  # on each hospital's own pool


def _yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


@pytest.fixture(scope="module")
def prefect_yaml() -> dict:
    return yaml.safe_load(PREFECT_YAML.read_text())


@pytest.fixture(scope="module")
def deployments(prefect_yaml) -> dict[str, dict]:
    return {d["name"]: d for d in prefect_yaml["deployments"]}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def manifests() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [(path.name, doc) for doc in _yaml_docs(path)]
    return docs


# ----------------------------------------------------------------------------- prefect.yaml


def test_prefect_yaml_validates_against_prefects_own_models(prefect_yaml):
    from prefect.cli.deploy._models import PrefectYamlModel

    model = PrefectYamlModel.model_validate(prefect_yaml)
    assert [d.name for d in model.deployments] == [
        "nightly-central",
        "weekly-federated",
        "validate-data",
        "promote-and-package",
        "site-prepare",
        "federated-coordinator",
    ]
    assert model.pull == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $ONCOFLOW_ROOT }}"}}
    ]


def test_entrypoints_load_flows_that_take_hydra_overrides(deployments):
    from prefect.flows import load_flow_from_entrypoint

    expected = {
        "nightly-central": "train_pipeline",
        "weekly-federated": "train_pipeline",
        "validate-data": "validate_data",
        "promote-and-package": "promote_and_package",
        "site-prepare": "site_pipeline",
        "federated-coordinator": "federated_pipeline",
    }
    for name, d in deployments.items():
        path, func = d["entrypoint"].split(":")
        flow = load_flow_from_entrypoint(f"{ROOT / path}:{func}")
        assert flow.name == expected[name]
        assert "overrides" in flow.parameters.properties, name
        assert set(d["parameters"]) <= set(flow.parameters.properties), name


def test_deployment_overrides_compose_into_valid_configs(deployments):
    from components.config import compose

    for name, d in deployments.items():
        cfg = compose(d["parameters"]["overrides"])
        if name in TRAINING:
            assert cfg.trainer.max_epochs >= 1
    assert compose(deployments["nightly-central"]["parameters"]["overrides"]).model.name == (
        "efficientnet_lite0"
    )
    weekly = compose(deployments["weekly-federated"]["parameters"]["overrides"])
    assert weekly.training.mode == "federated"
    assert weekly.federation.strategy == "fedavg"


def test_schedules_are_valid_and_as_declared(deployments):
    from prefect.cli.deploy._models import RawScheduleConfig
    from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule

    def only(name):
        (raw,) = deployments[name]["schedules"]
        return RawScheduleConfig.model_validate(raw)

    nightly, weekly, validate = (
        only("nightly-central"),
        only("weekly-federated"),
        only("validate-data"),
    )
    CronSchedule(cron=nightly.cron, timezone=nightly.timezone)
    CronSchedule(cron=weekly.cron, timezone=weekly.timezone)
    IntervalSchedule(interval=validate.interval)
    assert (nightly.cron, weekly.cron) == ("0 2 * * *", "0 3 * * 0")
    assert validate.interval.total_seconds() == 6 * 3600
    assert "schedules" not in deployments["promote-and-package"]


def test_triggers_validate_and_template_the_right_parameters(deployments):
    from prefect.cli.deploy._triggers import _initialize_deployment_triggers

    (package,) = _initialize_deployment_triggers(
        "promote-and-package", [dict(t) for t in deployments["promote-and-package"]["triggers"]]
    )
    assert package.expect == {"prefect.flow-run.Completed"}
    assert package.match_related.root == {
        "prefect.resource.role": "flow",
        "prefect.resource.name": "train_pipeline",
    }
    assert package.parameters["overrides"] == "{{ flow_run.parameters.overrides }}"
    (validate,) = _initialize_deployment_triggers(
        "validate-data", [dict(t) for t in deployments["validate-data"]["triggers"]]
    )
    from flows.events import DATA_ARRIVED_EVENT

    assert validate.expect == {DATA_ARRIVED_EVENT}
    assert validate.parameters == {"overrides": "{{ event.payload.overrides }}"}


def test_deploy_time_templating_keeps_run_time_templates(deployments):
    """`prefect deploy` fills {{ $ENV }} from os.environ; the trigger templates must survive."""
    from prefect.utilities.templating import apply_values

    rendered = apply_values(deployments["promote-and-package"], dict(os.environ), False)
    assert rendered["triggers"][0]["parameters"]["overrides"] == (
        "{{ flow_run.parameters.overrides }}"
    )


def test_training_deployments_are_limited_to_one_concurrent_run(deployments):
    from flows.prefect_local import POOL, TRAINING_QUEUE

    for name in TRAINING:
        d = deployments[name]
        assert d["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
        assert d["work_pool"]["work_queue_name"] == TRAINING_QUEUE
    for name, d in deployments.items():
        if name in SITE_DEPLOYMENTS:  # each hospital's own pool, its worker outbound only
            assert d["work_pool"]["name"] == "oncoflow-site-{{ $ONCOFLOW_SITE }}"
        else:
            assert d["work_pool"]["name"] == POOL


def test_run_environment_is_the_quiet_runtime_environment(deployments):
    from components.telemetry import TELEMETRY_OFF

    for d in deployments.values():
        env = d["work_pool"]["job_variables"]["env"]
        assert {k: env[k] for k in TELEMETRY_OFF} == TELEMETRY_OFF


# ----------------------------------------------------------------------------- flows/ helpers


def test_failure_hook_records_why_a_run_failed(tmp_path, monkeypatch):
    import prefect.artifacts

    from flows.hooks import record_failure

    artifacts = []
    monkeypatch.setattr(
        prefect.artifacts, "create_markdown_artifact", lambda **kw: artifacts.append(kw)
    )
    monkeypatch.setenv("ONCOFLOW_WORKSPACE", str(tmp_path))
    flow = SimpleNamespace(name="promote_and_package")
    run = SimpleNamespace(
        id="6f1c", name="quiet-fox", deployment_id=None, parameters={"overrides": ["a=b"]}
    )
    state = SimpleNamespace(name="Failed", message="NotFound: no version 'champion'")
    record_failure(flow, run, state)
    (path,) = (tmp_path / "failures").glob("*-promote-and-package-quiet-fox.json")
    record = json.loads(path.read_text())
    assert record["message"] == "NotFound: no version 'champion'"
    assert record["parameters"] == {"overrides": ["a=b"]}
    assert record["state"] == "Failed"
    assert artifacts and "no version 'champion'" in artifacts[0]["markdown"]


def test_retries_only_for_transient_failures():
    import httpx
    from prefect.states import Failed

    from components.errors import ConfigError, ModelError, NotFound, RegistryError
    from flows.hooks import transient_failure

    def retried(exc: Exception) -> bool:
        return transient_failure(None, None, Failed(data=exc))

    assert retried(RegistryError("MLflow answered 503"))
    assert retried(httpx.ConnectError("connection refused"))
    assert retried(OSError("disk hiccup"))
    assert not retried(NotFound("no such version"))
    assert not retried(ConfigError("bad override"))
    assert not retried(ModelError("weights do not fit"))


def test_bundle_cache_is_keyed_by_immutable_version_and_run(tmp_path):
    from components.workspace import Workspace
    from flows.promote import bundle_cache_dir

    ws = Workspace(tmp_path)
    a = bundle_cache_dir(ws, {"name": "oncoflow-busi", "version": "3", "run_id": "r1"})
    b = bundle_cache_dir(ws, {"name": "oncoflow-busi", "version": "3", "run_id": "r2"})
    c = bundle_cache_dir(ws, {"name": "oncoflow-busi", "version": "4", "run_id": "r1"})
    assert len({a, b, c}) == 3
    assert a.is_relative_to(ws.bundles)
    assert a.name == "v3-r1"


def test_a_bento_import_is_reused_only_for_identical_bytes(tmp_path):
    from flows.promote import same_files

    bundle, stored = tmp_path / "bundle", tmp_path / "stored"
    for d in (bundle, stored):
        d.mkdir()
        (d / "bundle.json").write_text('{"architecture": "small_cnn"}')
        (d / "weights.pt").write_bytes(b"\x00\x01weights")
    (stored / "model.yaml").write_text("bentoml's own metadata")
    assert same_files(bundle, stored)
    (stored / "weights.pt").write_bytes(b"\x00\x02weights")  # same name, other bytes
    assert not same_files(bundle, stored)
    (stored / "weights.pt").unlink()
    assert not same_files(bundle, stored)
    assert not same_files(tmp_path / "empty", stored)


def test_model_card_reports_the_bundle_and_registry_facts(tmp_path):
    from flows.promote import model_card

    (tmp_path / "bundle.json").write_text(
        json.dumps(
            {
                "architecture": "small_cnn",
                "class_names": ["benign", "malignant"],
                "preprocessing": {"size": 64, "channels": 1},
                "metrics": {"accuracy": 0.91234, "macro_f1": 0.875, "confusion_matrix": [[1]]},
                "privacy": {"mode": "dp", "epsilon": 8.0},
                "data_fingerprint": "abc123",
            }
        )
    )
    info = {
        "name": "oncoflow-busi",
        "version": "7",
        "aliases": ["champion"],
        "run_id": "run-1",
        "test_set_fingerprint": "t-fp",
        "gate_decision": "promoted",
        "gate_reason": "beats the champion",
    }
    card = model_card(info, tmp_path, "oncoflow-model:xyz", None)
    assert card.startswith("# Model card: oncoflow-busi v7")
    assert "Classes (output order): benign, malignant" in card
    assert "| accuracy | 0.9123 |" in card
    assert "| macro_f1 | 0.8750 |" in card
    assert "balanced_accuracy" not in card  # absent metrics are not invented
    assert '"epsilon": 8.0' in card
    assert "Aliases: champion" in card
    assert "image SHAP with 8 samples unless" in card and "(expected gradients" in card


def test_model_card_states_the_model_s_shap_samples_and_none_for_a_record_model(tmp_path):
    from flows.promote import model_card

    info = {"name": "m", "version": "1", "run_id": "r"}
    meta = {"architecture": "efficientnet_lite0", "config": {"package": {"shap_nsamples": 24}}}
    (tmp_path / "bundle.json").write_text(json.dumps(meta))
    assert "SHAP with 24 samples unless the server or the request" in model_card(
        info, tmp_path, "t", None
    )
    (tmp_path / "bundle.json").write_text(json.dumps({"architecture": "tabular_mlp"}))
    assert "image SHAP" not in model_card(info, tmp_path, "t", None)


def test_down_without_a_stack_does_nothing(tmp_path):
    from flows.prefect_local import down, read_stack

    assert read_stack(__import__("components.workspace").workspace.Workspace(tmp_path)) is None
    assert down(tmp_path) == []


def test_down_never_stops_a_process_that_is_not_prefect(tmp_path):
    from components.workspace import Workspace
    from flows.prefect_local import STACK_FILE, _alive, down

    ws = Workspace(tmp_path)
    ws.prefect_home.mkdir(parents=True)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (ws.prefect_home / STACK_FILE).write_text(
            json.dumps({"api_url": "http://127.0.0.1:1/api", "pids": {"server": bystander.pid}})
        )
        assert down(tmp_path) == []
        assert _alive(bystander.pid)
        assert not (ws.prefect_home / STACK_FILE).exists()
    finally:
        bystander.kill()
        bystander.wait()


def test_announcing_data_needs_a_prefect_api(tmp_path, monkeypatch):
    from components.errors import ConfigError
    from flows.events import announce_data

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with pytest.raises(ConfigError, match="no Prefect API"):
        announce_data(["dataset=synthetic"], workspace=tmp_path)


def test_settings_set_after_prefect_was_imported_take_effect(monkeypatch):
    from prefect.settings import get_current_settings

    from flows.promote import settings_from_environment

    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "123")
    with settings_from_environment():
        assert get_current_settings().server.ephemeral.startup_timeout_seconds == 123


def test_stack_env_points_every_home_into_the_workspace(tmp_path, monkeypatch):
    from components.workspace import Workspace
    from flows.prefect_local import PROJECT_ROOT, stack_env

    monkeypatch.delenv("ONCOFLOW_ROOT", raising=False)
    env = stack_env(Workspace(tmp_path), "http://127.0.0.1:4200/api")
    assert env["PREFECT_HOME"] == str(tmp_path / "prefect")
    assert env["BENTOML_HOME"] == str(tmp_path / "bentoml")
    assert env["ONCOFLOW_WORKSPACE"] == str(tmp_path)
    assert env["ONCOFLOW_ROOT"] == str(PROJECT_ROOT)
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:4200/api"
    assert env["DO_NOT_TRACK"] == "1"


# ----------------------------------------------------------------------------- all files


def test_every_yaml_and_json_file_parses():
    files = [PREFECT_YAML, *DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")]
    assert len(files) >= 12
    for path in files:
        assert _yaml_docs(path), path
    for path in DEPLOY.rglob("*.json"):
        json.loads(path.read_text())


def test_yamllint_is_clean():
    pytest.importorskip("yamllint")
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    config = YamlLintConfig(
        "extends: default\n"
        "rules:\n"
        "  line-length: {max: 100}\n"
        "  document-start: disable\n"
        "  truthy: {allowed-values: ['true', 'false'], check-keys: false}\n"
        "  comments: {min-spaces-from-content: 1}\n"
        "  braces: {max-spaces-inside: 1}\n"
    )
    problems = []
    for path in [PREFECT_YAML, *DEPLOY.rglob("*.yaml")]:
        problems += [f"{path}:{p.line}: {p.message}" for p in linter.run(path.read_text(), config)]
    assert problems == []


_SECRET_PATTERNS = [
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"AKIA[0-9A-Z]{16}"),
    re.compile(r"minioadmin", re.I),
    # a key named like a secret with a literal value (not ${VAR}, $(VAR), a secretKeyRef,
    # a path or a boolean)
    re.compile(
        r"(?im)^[ \t-]*[\w.-]*(password|secret|token|api[_-]?keys?)[ \t]*[:=][ \t]*"
        r"(?![ \t\"']*(\$\{|\$\(|>-|\||$|valueFrom|secretKeyRef|/|\{name:|true|false))\S+"
    ),
    re.compile(r"(?i)(postgres(ql)?(\+\w+)?|s3|mysql)://[^:/\s]+:(?![$])[^@\s]+@"),
]


def test_no_plaintext_secrets_anywhere_in_the_kit():
    files = [PREFECT_YAML, *(p for p in DEPLOY.rglob("*") if p.is_file())]
    hits = []
    for path in files:
        for pattern in _SECRET_PATTERNS:
            hits += [
                f"{path.relative_to(ROOT)}: {m.group(0)!r}"
                for m in pattern.finditer(path.read_text(errors="replace"))
            ]
    assert hits == []
    assert not list(DEPLOY.rglob(".env")), "a .env file must never be committed"


def test_the_secret_scan_catches_literals():
    samples = [
        "POSTGRES_PASSWORD: hunter2",
        "      MINIO_ROOT_PASSWORD=abc123",
        "url: postgresql+asyncpg://prefect:s3cret@postgres:5432/prefect",
        "api-keys: 0123456789abcdef",
    ]
    for sample in samples:
        assert any(p.search(sample) for p in _SECRET_PATTERNS), sample
    clean = [
        "POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?set it}",
        "url: postgresql+asyncpg://prefect:${PREFECT_DB_PASSWORD:?}@postgres:5432/prefect",
        "- postgresql+psycopg2://mlflow:$(MLFLOW_DB_PASSWORD)@postgres:5432/mlflow",
        "secretKeyRef: {name: oncoflow-db, key: mlflow-password}",
    ]
    for sample in clean:
        assert not any(p.search(sample) for p in _SECRET_PATTERNS), sample


def test_env_example_lists_every_compose_variable_without_values(compose):
    text = COMPOSE.read_text()
    used = set(re.findall(r"(?<!\$)\$\{([A-Z0-9_]+)", text))
    example = {}
    for line in (DEPLOY / "env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            example[key] = value
    assert used <= set(example), used - set(example)
    assert {k: v for k, v in example.items() if v and k != "ONCOFLOW_VERSION"} == {}


# ----------------------------------------------------------------------------- compose


def test_compose_matches_the_subset_schema(compose):
    schema = json.loads((DEPLOY / "schemas" / "compose-subset.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    errors = [
        f"{e.json_path}: {e.message}"
        for e in jsonschema.Draft7Validator(schema).iter_errors(compose)
    ]
    assert errors == []
    broken = json.loads(json.dumps(compose))
    broken["services"]["mlflow"]["helthcheck"] = broken["services"]["mlflow"].pop("healthcheck")
    assert list(jsonschema.Draft7Validator(schema).iter_errors(broken)), "typos must fail"


def test_compose_has_every_component(compose):
    services = set(compose["services"])
    assert {
        "postgres",
        "minio",
        "mlflow",
        "prefect-server",
        "prefect-deploy",
        "prefect-worker",
        "bento",
        "ui",
        "superlink",
        "supernode-1",
        "supernode-2",
        "supernode-3",
    } <= services


def test_compose_references_resolve(compose):
    services = compose["services"]
    volumes = set(compose.get("volumes") or {})
    for name, svc in services.items():
        for target, dep in (svc.get("depends_on") or {}).items():
            assert target in services, f"{name} depends on unknown {target}"
            if dep["condition"] == "service_healthy":
                assert "healthcheck" in services[target], f"{target} has no healthcheck"
            if dep["condition"] == "service_completed_successfully":
                assert services[target].get("restart") == "no", target
        for mount in svc.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("./"):
                path = DEPLOY / source
                generated = path.parent.name == "certs"  # made by generate.sh
                assert path.exists() or (generated and path.parent.exists()), mount
            elif not source.startswith("$"):
                assert source in volumes, f"{name} mounts undeclared volume {source}"
        build = svc.get("build")
        if build:
            context = DEPLOY / build["context"]
            assert context.is_dir(), build
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), build


def test_compose_images_are_pinned(compose):
    for name, svc in compose["services"].items():
        image = svc["image"]
        tag = image.rsplit(":", 1)[1] if ":" in image.split("/")[-1] else ""
        default = re.fullmatch(r"\$\{[A-Z_]+:-([^}]+)\}", tag)
        tag = default.group(1) if default else tag
        assert tag and tag != "latest", f"{name}: {image} is not pinned"
    assert compose["services"]["prefect-server"]["image"].startswith(
        f"prefecthq/prefect:{_installed('prefect')}-"
    )


def test_compose_secrets_are_required_env_references(compose):
    for name, svc in compose["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|API_KEY|ACCESS_KEY", key):
                assert re.fullmatch(r"\$\{[A-Z0-9_]+:\?[^}]*\}", str(value)), f"{name}.{key}"


def test_long_running_services_have_healthchecks_and_limits(compose):
    for name, svc in compose["services"].items():
        if svc.get("restart") == "no":
            continue
        assert "healthcheck" in svc, name
        limits = svc["deploy"]["resources"]["limits"]
        assert limits["cpus"] and limits["memory"], name


def test_published_ports_stay_on_loopback_except_the_superlink(compose):
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            host = port.rsplit(":", 2)[0]
            if name == "superlink":
                assert host == "${FLOWER_BIND:-127.0.0.1}"
            else:
                assert host == "127.0.0.1", f"{name} publishes {port}"


def test_flower_services_use_tls(compose):
    services = compose["services"]
    link = services["superlink"]["command"]
    assert "--ssl-certfile=/certs/server.pem" in link
    assert "--ssl-keyfile=/certs/server.key" in link
    assert "--ssl-ca-certfile=/certs/ca.crt" in link
    sites = set()
    for i in (1, 2, 3):
        svc = services[f"supernode-{i}"]
        assert "--root-certificates=/certs/ca.crt" in svc["command"]
        assert "--superlink=superlink:8000" in svc["command"]
        assert not any("server.key" in v for v in svc["volumes"]), "nodes get the CA only"
        assert '--node-config=data-dir="/data"' in svc["command"]  # components.federated
        (data,) = [v for v in svc["volumes"] if v.endswith(":/data:ro")]
        sites.add(data)
    assert len(sites) == 3, "each SuperNode mounts its own site"
    assert "--insecure" not in COMPOSE.read_text()


# ----------------------------------------------------------------------------- Dockerfiles


def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfiles_follow_the_rules():
    assert {p.name for p in DOCKERFILES} == {
        "oncoflow.Dockerfile",
        "mlflow.Dockerfile",
        "ui.Dockerfile",
    }
    for path in DOCKERFILES:
        steps = _instructions(path)
        bases = [rest.split()[0] for word, rest in steps if word == "FROM"]
        assert bases, path
        for base in bases:
            assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base), f"{path.name}: {base}"
        users = [rest for word, rest in steps if word == "USER"]
        assert users and users[-1].split(":")[0] not in ("root", "0"), f"{path.name}: root"
        last_from = max(i for i, (w, _) in enumerate(steps) if w == "FROM")
        assert any(w == "USER" for w, _ in steps[last_from:]), path
        for word, rest in steps:
            assert not (word == "ADD" and re.search(r"https?://", rest)), f"{path.name}: ADD URL"
            if word == "RUN" and "apt-get install" in rest:
                assert "--no-install-recommends" in rest and "rm -rf /var/lib/apt/lists" in rest
            if word == "RUN" and "pip install" in rest:
                for spec in re.findall(r"pip install ([^&]+)", rest):
                    words = [w for w in spec.split() if not w.startswith("-")]
                    pinned = "-c constraints.txt" in spec or all(
                        "==" in w or w in (".", "-e") or w.startswith(("$", '"$')) for w in words
                    )
                    assert pinned, f"{path.name}: unpinned pip install {spec}"
        assert any(w in ("CMD", "ENTRYPOINT") for w, _ in steps), path


def test_dockerfile_pins_agree_with_constraints():
    constraints = dict(
        line.split("==", 1)
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    constraints = {k.lower(): v.strip() for k, v in constraints.items()}
    for path in DOCKERFILES:
        for name, version in re.findall(r"([A-Za-z0-9_.-]+)==([0-9][\w.]*)", path.read_text()):
            if name.lower() in constraints:
                assert constraints[name.lower()] == version, f"{path.name}: {name}=={version}"


def test_dockerfile_copy_sources_exist():
    for path in DOCKERFILES:
        for word, rest in _instructions(path):
            if word != "COPY" or "--from" in rest:
                continue
            sources = [s for s in rest.split()[:-1] if not s.startswith("--")]
            for source in sources:
                if source == ".":
                    continue
                if source.startswith("ui") and not (ROOT / "ui").exists():
                    pytest.skip("ui/ is not written yet")
                assert (ROOT / source).exists(), f"{path.name}: COPY {source}"
        ignore = path.with_name(path.name + ".dockerignore")
        if path.name != "mlflow.Dockerfile":
            assert ignore.is_file(), f"{path.name} needs {ignore.name} (context = repo root)"


def test_oncoflow_image_keeps_certificates_and_env_files_out():
    ignored = (DEPLOY / "docker" / "oncoflow.Dockerfile.dockerignore").read_text().splitlines()
    for pattern in ("deployments/flower/certs", "**/.env", "**/*.key", ".git", ".venv"):
        assert pattern in ignored, pattern


# ----------------------------------------------------------------------------- Kubernetes


def _pod_specs(manifests):
    for file, doc in manifests:
        spec = doc.get("spec") or {}
        template = (spec.get("template") or {}).get("spec")
        if template:
            yield file, doc, template


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    assert kustomization["namespace"] == "oncoflow"


def test_manifests_have_the_basic_fields(manifests):
    assert len(manifests) >= 25
    for file, doc in manifests:
        assert doc.get("apiVersion") and doc.get("kind"), file
        assert doc["metadata"].get("name"), file
        if doc["kind"] not in ("ConfigMap", "ServiceAccount", "Role", "RoleBinding", "Namespace"):
            assert "spec" in doc, f"{file}: {doc['kind']} without spec"
    assert not [d for _, d in manifests if d["kind"] == "Secret"], "secrets are created by hand"


def test_manifests_validate_against_the_kubernetes_schemas(manifests):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")

    for file, doc in manifests:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{file} {doc['kind']}/{doc['metadata']['name']}: {exc.message}")


def test_containers_are_pinned_limited_probed_and_unprivileged(manifests):
    for file, doc, pod in _pod_specs(manifests):
        where = f"{file}:{doc['metadata']['name']}"
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        long_running = doc["kind"] in ("Deployment", "StatefulSet")
        for c in pod["containers"]:
            image = c["image"]
            assert ":" in image and not image.endswith(":latest"), f"{where}: {image}"
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{where} {kind}"
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, where
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], where
            if long_running:
                assert "readinessProbe" in c and "livenessProbe" in c, where


def test_kubernetes_image_tags_match_the_kustomization_and_versions(manifests):
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    tags = {i["name"]: i["newTag"] for i in kustomization["images"]}
    for _, _, pod in _pod_specs(manifests):
        for c in pod["containers"]:
            name, tag = c["image"].rsplit(":", 1)
            if name in tags:
                assert tags[name] == tag, c["image"]
            if name.startswith("prefecthq/prefect"):
                assert tag.startswith(f"{_installed('prefect')}-"), c["image"]
    assert tags["oncoflow-mlflow"] == _installed("mlflow")


def test_services_select_existing_pods(manifests):
    pod_labels = [
        doc["spec"]["template"]["metadata"]["labels"]
        for _, doc in manifests
        if doc["kind"] in ("Deployment", "StatefulSet")
    ]
    for file, doc in manifests:
        if doc["kind"] == "Service":
            selector = doc["spec"]["selector"]
            assert any(selector.items() <= labels.items() for labels in pod_labels), file


def test_secret_configmap_and_claim_references_resolve(manifests):
    readme = (DEPLOY / "README.md").read_text()
    documented: dict[str, set[str]] = {}
    for name, args in re.findall(
        r"create secret generic ([\w-]+)((?:\s*\\\n)?(?:[^\n]*\\\n)*[^\n]*)", readme
    ):
        keys = set(re.findall(r"--from-literal=([\w-]+)=", args))
        keys |= {Path(f).name for f in re.findall(r"--from-file=(\S+)", args)}
        documented[name] = keys
    configmaps = {d["metadata"]["name"] for _, d in manifests if d["kind"] == "ConfigMap"}
    claims = {d["metadata"]["name"] for _, d in manifests if d["kind"] == "PersistentVolumeClaim"}
    text = yaml.safe_dump([d for _, d in manifests])
    for ref in re.findall(r"secretKeyRef:\s*\n\s*key: ([\w.-]+)\s*\n\s*name: ([\w-]+)", text):
        key, name = ref
        assert key in documented.get(name, set()), f"secret {name}/{key} is not in README"
    for file, doc, pod in _pod_specs(manifests):
        templates = {t["metadata"]["name"] for t in doc["spec"].get("volumeClaimTemplates", [])}
        for volume in pod.get("volumes", []):
            if "secret" in volume:
                assert volume["secret"]["secretName"] in documented, file
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps, file
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, file
        for c in pod["containers"]:
            for source in c.get("envFrom", []):
                assert source["configMapRef"]["name"] in configmaps, file
            for mount in c.get("volumeMounts", []):
                names = {v["name"] for v in pod.get("volumes", [])} | templates
                assert mount["name"] in names, f"{file}: mount {mount['name']}"


def test_postgres_init_script_is_the_same_in_compose_and_kubernetes(manifests):
    (init,) = [d for _, d in manifests if d["metadata"]["name"] == "postgres-init"]
    script = (DEPLOY / "postgres" / "init-databases.sh").read_text()
    assert init["data"]["10-oncoflow.sh"] == script


def test_kubectl_kustomize_renders_everything(manifests):
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl is not installed")
    out = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert len(rendered) == len(manifests)
    assert {d["metadata"].get("namespace") for d in rendered if d["kind"] != "Namespace"} == {
        "oncoflow"
    }


# ----------------------------------------------------------------------------- work pools


def _default_template(worker_type: str) -> dict:
    import prefect

    meta = json.loads(
        (
            Path(prefect.__file__).parent
            / "server/api/collections_data/views/aggregate-worker-metadata.json"
        ).read_text()
    )
    for collection in meta.values():
        if worker_type in collection:
            return collection[worker_type]["default_base_job_configuration"]
    raise AssertionError(worker_type)


@pytest.mark.parametrize("worker_type", ["docker", "kubernetes"])
def test_work_pool_templates_are_valid(worker_type):
    from prefect.server.schemas.actions import WorkPoolCreate, validate_base_job_template

    template = json.loads((POOLS / f"{worker_type}.json").read_text())
    validate_base_job_template(template)
    WorkPoolCreate(name=f"oncoflow-{worker_type}", type=worker_type, base_job_template=template)
    variables = template["variables"]
    jsonschema.Draft7Validator.check_schema(variables)
    default = _default_template(worker_type)
    assert set(variables["properties"]) == set(default["variables"]["properties"])
    assert set(template["job_configuration"]) == set(default["job_configuration"])
    defaults = {k: p["default"] for k, p in variables["properties"].items() if "default" in p}
    resolver = jsonschema.RefResolver.from_schema(variables)
    for key, value in defaults.items():
        jsonschema.validate(value, variables["properties"][key], resolver=resolver)
    assert defaults["image"] == "oncoflow:0.1.0"
    assert defaults["env"]["ONCOFLOW_ROOT"] == "/opt/oncoflow"


def test_kubernetes_work_pool_renders_a_valid_job(manifests):
    from prefect.utilities.templating import apply_values

    template = json.loads((POOLS / "kubernetes.json").read_text())
    values = {
        k: p["default"] for k, p in template["variables"]["properties"].items() if "default" in p
    }
    values |= {"name": "flow-run-1", "command": "prefect flow-run execute"}
    job = apply_values(template["job_configuration"]["job_manifest"], values)
    job["spec"]["template"]["spec"]["containers"][0]["env"] = [
        {"name": k, "value": v} for k, v in values["env"].items()
    ]
    job["spec"]["template"]["spec"]["containers"][0]["args"] = values["command"].split()
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    pod = job["spec"]["template"]["spec"]
    claims = {d["metadata"]["name"] for _, d in manifests if d["kind"] == "PersistentVolumeClaim"}
    for volume in pod["volumes"]:
        assert volume["persistentVolumeClaim"]["claimName"] in claims
    accounts = {d["metadata"]["name"] for _, d in manifests if d["kind"] == "ServiceAccount"}
    assert pod["serviceAccountName"] in accounts
    assert job["metadata"]["namespace"] == "oncoflow"
    assert pod["containers"][0]["resources"]["limits"] == {"cpu": "4", "memory": "8Gi"}


def test_docker_work_pool_joins_the_compose_project(compose):
    template = json.loads((POOLS / "docker.json").read_text())
    props = template["variables"]["properties"]
    project = compose["name"]
    assert props["networks"]["default"] == [f"{project}_default"]
    volume = props["volumes"]["default"][0].split(":")[0]
    assert volume.removeprefix(f"{project}_") in compose["volumes"]


# ----------------------------------------------------------------------------- TLS material


def test_certificate_script_makes_a_chain_the_superlink_can_use(tmp_path):
    openssl = shutil.which("openssl")
    if not openssl:
        pytest.skip("openssl is not installed")
    script = DEPLOY / "flower" / "certs" / "generate.sh"
    done = subprocess.run(
        [str(script), str(tmp_path), "DNS:flower.example.org"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "FLOWER_KEY_BITS": "2048"},  # quicker; the chain is the same
    )
    assert done.returncode == 0, done.stderr
    for name in ("ca.crt", "server.pem", "server.key", "ca.key"):
        assert (tmp_path / name).is_file(), name
    assert oct((tmp_path / "server.key").stat().st_mode & 0o777) == "0o600"
    verify = subprocess.run(
        [openssl, "verify", "-CAfile", str(tmp_path / "ca.crt"), str(tmp_path / "server.pem")],
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0 and ": OK" in verify.stdout
    text = subprocess.run(
        [openssl, "x509", "-in", str(tmp_path / "server.pem"), "-noout", "-text"],
        capture_output=True,
        text=True,
    ).stdout
    for san in ("DNS:superlink", "DNS:flower-superlink.oncoflow.svc", "DNS:flower.example.org"):
        assert san in text, san
    assert "TLS Web Server Authentication" in text
    gitignore = (DEPLOY / "flower" / "certs" / ".gitignore").read_text().split()
    assert gitignore[-3:] == ["*", "!.gitignore", "!generate.sh"]


# ----------------------------------------------------------------------------- README


def test_readme_documents_every_piece():
    readme = (DEPLOY / "README.md").read_text()
    for manifest in K8S.glob("*.yaml"):
        if manifest.name not in ("kustomization.yaml", "namespace.yaml"):
            assert manifest.name in readme, manifest.name
    for command in (
        "docker compose -f deployments/compose.yaml",
        "kubectl apply -k deployments/k8s",
        "oncoflow prefect up",
        "oncoflow prefect deploy",
        "bentoml containerize",
        "generate.sh",
    ):
        assert command in readme, command


def _installed(package: str) -> str:
    from importlib.metadata import version

    return version(package)
