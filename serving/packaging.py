"""Package a model bundle for serving: BentoML model store import and `bentoml build`.

The Bento model store lives under ``$BENTOML_HOME`` (the workspace sets it to
``<workspace>/bentoml``); call `use_bentoml_home` before anything imports BentoML, or pass
`bentoml_home` to the functions here, which run BentoML in a way that honours it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from components.errors import ConfigError, ModelError
from components.telemetry import quiet_environment

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "oncoflow-model"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
_SCALAR = (str, int, float, bool)


def use_bentoml_home(path: str | os.PathLike) -> Path:
    """Point BentoML's stores at `path` (env for subprocesses, container if already imported)."""
    home = Path(path).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    os.environ["BENTOML_HOME"] = str(home)
    if "bentoml" in sys.modules:
        from bentoml._internal.configuration.containers import BentoMLContainer

        if Path(BentoMLContainer.bentoml_home.get()).resolve() != home:
            BentoMLContainer.bentoml_home.set(str(home))
            BentoMLContainer.model_store.reset()
            BentoMLContainer.bento_store.reset()
    return home


def _scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def build_assistant_index(out_dir: str | os.PathLike, dense: bool = True) -> Path:
    """Build the chat assistant's retrieval index from the knowledge notes into `out_dir`.

    Dense (MiniLM) + BM25 by default; a dense index needs the embedding model and raises
    `ModelError` without it rather than quietly writing a keyword-only index.
    """
    from components.assistant import build_index

    index = build_index(out_path=out_dir, dense=dense)
    log.info(
        "assistant index: %d chunks from %d notes (%s)",
        len(index.chunks),
        len(index.note_ids),
        "dense+bm25" if index.embeddings is not None else "bm25 only",
    )
    return Path(out_dir)


def import_bundle(
    bundle_dir: str | os.PathLike,
    name: str = DEFAULT_MODEL_NAME,
    labels: dict[str, str] | None = None,
    metadata: dict[str, Any] | None = None,
    bentoml_home: str | os.PathLike | None = None,
    assistant_index: bool | str = True,
) -> str:
    """Copy a model bundle into the Bento model store; return the new tag (``name:version``).

    The bundle is loaded and its model built first, so a broken bundle is never packaged.
    `metadata` (or `labels`) may carry ``registered_model`` and ``model_version`` (or
    ``version``), the MLflow coordinates; the service reports them in every answer.
    `assistant_index`: build the chat assistant's retrieval index into the model's directory
    (``assistant-index/``) so the service loads it prebuilt; ``"bm25"`` builds a keyword-only
    index (no embedding model needed), False none (the service then builds it at start-up).
    """
    from components.bundle import ModelBundle
    from serving.chat import ASSISTANT_INDEX_DIR

    if assistant_index not in (True, False, "bm25"):
        raise ConfigError(f"assistant_index must be True, False or 'bm25', not {assistant_index!r}")
    source = Path(bundle_dir)
    bundle = ModelBundle.load(source)
    bundle.build_model()  # raises ModelError when weights and architecture disagree
    if bentoml_home is not None:
        use_bentoml_home(bentoml_home)
    import bentoml

    meta: dict[str, Any] = {
        "class_names": list(bundle.class_names),
        "architecture": bundle.architecture,
        "data_fingerprint": bundle.data_fingerprint,
        "metrics": _scalar_metrics(bundle.metrics),
        "registered_model": "",
        "model_version": "",
    }
    for key, value in (metadata or {}).items():
        if isinstance(value, _SCALAR) or value is None:
            meta[key] = "" if value is None else value
        elif isinstance(value, dict):
            meta[key] = {str(k): v for k, v in value.items() if isinstance(v, _SCALAR)}
        else:
            raise ConfigError(f"bento model metadata {key!r} must be a scalar or a flat dict")
    safe_labels = {str(k): str(v) for k, v in (labels or {}).items()}
    # The service reports metadata; accept the registry coordinates given as labels too.
    meta["registered_model"] = meta["registered_model"] or safe_labels.get("registered_model", "")
    meta["model_version"] = meta["model_version"] or safe_labels.get(
        "model_version", safe_labels.get("version", "")
    )
    meta["assistant_index"] = {True: "dense", False: "none"}.get(assistant_index, "bm25")
    with bentoml.models.create(name, labels=safe_labels, metadata=meta) as model_ref:
        shutil.copytree(source, model_ref.path, dirs_exist_ok=True)
        if assistant_index is not False:
            build_assistant_index(
                Path(model_ref.path) / ASSISTANT_INDEX_DIR, dense=assistant_index is True
            )
    tag = str(model_ref.tag)
    log.info("imported bundle into the Bento model store as %s", tag)
    return tag


def _bentoml_cli() -> list[str]:
    exe = Path(sys.executable).with_name("bentoml")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("bentoml")
    if found:
        return [found]
    raise ConfigError("the bentoml command is not installed in this environment")


def build_bento(
    project_dir: str | os.PathLike = PROJECT_ROOT,
    bentoml_home: str | os.PathLike | None = None,
    timeout_s: float = 900,
) -> str:
    """Run ``bentoml build`` on `project_dir`'s bentofile.yaml; return the Bento tag.

    The Bento contains the service code and the model(s) named in bentofile.yaml (by default
    ``oncoflow-model:latest``, i.e. the last `import_bundle`).
    """
    project = Path(project_dir).resolve()
    if not (project / "bentofile.yaml").is_file():
        raise ConfigError(f"no bentofile.yaml in {project}")
    env = dict(os.environ)
    if bentoml_home is not None:
        env["BENTOML_HOME"] = str(use_bentoml_home(bentoml_home))
    quiet_environment(env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(project), env.get("PYTHONPATH")]))
    command = [*_bentoml_cli(), "build", str(project), "--output", "tag"]
    try:
        done = subprocess.run(
            command, cwd=project, env=env, capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired as exc:
        raise ModelError(f"bentoml build did not finish within {timeout_s:.0f} s") from exc
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise ModelError(f"bentoml build failed (exit {done.returncode}):\n{tail}")
    match = re.search(r"__tag__:(\S+)", done.stdout)
    if not match:
        raise ModelError(f"bentoml build printed no tag: {done.stdout.strip()[-500:]}")
    tag = match.group(1)
    log.info("built Bento %s", tag)
    return tag
