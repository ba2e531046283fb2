"""The `promote_and_package` flow: a registered model version, ready to serve.

It takes the champion (or a given version) from the MLflow registry, downloads its model
bundle, imports it into the Bento model store and builds the Bento. prefect.yaml triggers it
after every completed `train_pipeline` run, with the training run's own overrides, so it reads
the same registry and writes the same workspace; `oncoflow prefect promote` runs it by hand.

Caching: registry aliases move, so nothing that resolves one is cached (``NO_CACHE``). A
downloaded bundle is kept under a directory named by the immutable registry version *and*
the MLflow run id it came from, so a reused download is always the bytes of that version.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from components.config import PROJECT_ROOT
from components.workspace import Workspace
from flows import artifacts
from flows.hooks import IO_RETRIES, record_failure, slug
from flows.runtime import prepare_environment

BENTO_MODEL = "oncoflow-model"


@task(name="resolve-model-version", cache_policy=NO_CACHE, **IO_RETRIES)
def resolve_version_task(
    tracking_uri: str | None, workspace: Workspace, model_name: str, ref: str, reason: str | None
) -> dict[str, Any]:
    """Resolve `ref` (alias or number) to a concrete version; promote it first if `reason`."""
    from components.registry import RegistryClient

    client = RegistryClient.for_workspace(workspace, tracking_uri)
    if reason:
        client.promote(model_name, ref, reason)
        get_run_logger().info("promoted %s v%s to champion: %s", model_name, ref, reason)
    return client.version_info(model_name, ref)


@task(name="download-bundle", cache_policy=NO_CACHE, **IO_RETRIES)
def download_task(
    tracking_uri: str | None, workspace: Workspace, info: dict[str, Any]
) -> tuple[Path, bool]:
    """Download the version's bundle once; the directory name pins version and run id."""
    from components.registry import RegistryClient

    target = bundle_cache_dir(workspace, info)
    if (target / "bundle.json").is_file():
        return target, False
    if target.exists():  # an interrupted download: start again
        import shutil

        shutil.rmtree(target)
    client = RegistryClient.for_workspace(workspace, tracking_uri)
    client.download_bundle(info["name"], target, info["version"])
    return target, True


def bundle_cache_dir(workspace: Workspace, info: dict[str, Any]) -> Path:
    """``<workspace>/bundles/<model>/v<version>-<run id>``: immutable registry coordinates."""
    return workspace.bundles / slug(info["name"]) / f"v{info['version']}-{info['run_id']}"


@task(name="import-into-bento-store", cache_policy=NO_CACHE, retries=1)
def import_task(bundle_dir: Path, info: dict[str, Any], bentoml_home: Path) -> tuple[str, bool]:
    """Make `bundle_dir` the latest ``oncoflow-model``; reuse the import when it already is."""
    from serving.packaging import import_bundle, use_bentoml_home

    use_bentoml_home(bentoml_home)
    current = latest_bento_model(info["name"], info["version"], bundle_dir)
    if current is not None:
        return current, False
    tag = import_bundle(
        bundle_dir,
        name=BENTO_MODEL,
        labels={
            "registered_model": info["name"],
            "version": str(info["version"]),
            "run_id": str(info.get("run_id", "")),
        },
        metadata={"registered_model": info["name"], "model_version": str(info["version"])},
    )
    return tag, True


def latest_bento_model(model_name: str, version: str | int, bundle_dir: Path) -> str | None:
    """The newest ``oncoflow-model`` tag if it *is* this bundle (labels and bytes), else None.

    Only the newest counts: `bentoml build` and `oncoflow serve` default to ``:latest``. The
    files are compared too, so a registry rebuilt under the same version numbers (or any other
    mix-up) leads to a fresh import, never to serving a stale model.
    """
    import bentoml
    from bentoml.exceptions import NotFound as BentoNotFound

    try:
        latest = bentoml.models.get(f"{BENTO_MODEL}:latest")
    except BentoNotFound:
        return None
    labels = latest.info.labels
    if labels.get("registered_model") != model_name or labels.get("version") != str(version):
        return None
    return str(latest.tag) if same_files(bundle_dir, Path(latest.path)) else None


def same_files(bundle_dir: Path, other: Path) -> bool:
    """True when every file of `bundle_dir` exists in `other` with the same SHA-256."""
    import hashlib

    def digest(path: Path) -> str:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    files = [p for p in bundle_dir.rglob("*") if p.is_file()]
    return bool(files) and all(
        (other / p.relative_to(bundle_dir)).is_file()
        and digest(p) == digest(other / p.relative_to(bundle_dir))
        for p in files
    )


@task(name="build-bento", cache_policy=NO_CACHE, retries=1)
def build_task(bentoml_home: Path) -> str:
    from serving.packaging import build_bento

    return build_bento(PROJECT_ROOT, bentoml_home=bentoml_home)


def model_card(info: dict[str, Any], bundle_dir: Path, bento_model: str, bento: str | None) -> str:
    """A markdown model card from the registry entry and the bundle's own metadata."""
    meta = json.loads((bundle_dir / "bundle.json").read_text())
    metrics = meta.get("metrics") or {}
    headline = [
        f"| {name} | {metrics[name]:.4f} |"
        for name in (
            "accuracy",
            "balanced_accuracy",
            "macro_f1",
            "macro_auroc",
            "dangerous_auroc",
            "ece",
        )
        if isinstance(metrics.get(name), int | float)
    ]
    pre = meta.get("preprocessing") or {}
    privacy = meta.get("privacy") or {"mode": "none"}
    lines = [
        f"# Model card: {info['name']} v{info['version']}",
        "",
        f"- Aliases: {', '.join(info.get('aliases') or []) or 'none'}",
        f"- Architecture: `{meta.get('architecture')}`",
        f"- Classes (output order): {', '.join(meta.get('class_names', []))}",
        f"- Input: {pre.get('size')}px, {pre.get('channels')} channel(s)",
        f"- Test-time views: {_views_text(pre)}",
        *explanation_lines(meta),
        f"- Data fingerprint: `{meta.get('data_fingerprint', '')}`",
        f"- Test-set fingerprint: `{info.get('test_set_fingerprint', '')}`",
        f"- Gate: {info.get('gate_decision', '')} — {info.get('gate_reason', '')}",
        f"- Privacy: `{json.dumps(privacy, default=str)}`",
        f"- MLflow run: `{info.get('run_id')}`",
        f"- Bento model: `{bento_model}`" + (f", Bento: `{bento}`" if bento else ""),
        *bundle_contents_lines(meta.get("contents")),
        "",
        "| test metric | value |",
        "|---|---|",
        *headline,
        "",
        *calibration_lines(meta.get("calibration"), metrics.get("calibration")),
        *leakage_lines(metrics.get("leakage")),
        *comparison_lines(metrics.get("comparison")),
        *faithfulness_lines(bundle_dir),
    ]
    return "\n".join(lines)


def explanation_lines(meta: dict[str, Any]) -> list[str]:
    """What `/explain` computes for an image model by default (none for a tabular one)."""
    from components.bundle import shap_nsamples_of
    from components.data.inputs import IMAGE, input_kinds
    from components.explain.one_pass import ESTIMATOR

    if IMAGE not in input_kinds(str(meta.get("architecture", ""))):
        return []
    return [
        f"- Explanations: Grad-CAM, and image SHAP with {shap_nsamples_of(meta.get('config'))} "
        f"samples unless the server or the request names another count ({ESTIMATOR})"
    ]


def _views_text(pre: dict[str, Any]) -> str:
    """What every prediction averages its logits over (`Preprocessing.tta`)."""
    from components.data.preprocess import Preprocessing

    if not pre.get("tta"):  # also a bundle without image preprocessing
        return "none (the image itself)"
    spec = Preprocessing.from_dict(pre)
    parts = ["the image"]
    if "crop" in spec.tta:
        parts.append(f"its centre {spec.tta_crop:.1%} of each side, resized")
    if "hflip" in spec.tta:
        parts.append("the mirror image of each")
    return f"{spec.view_count} views, logits averaged: {'; '.join(parts)}"


def comparison_lines(comparison: dict[str, Any] | None) -> list[str]:
    """The "Does the clinical record help?" section: the model and its baselines on the same
    test split, and the verdict (also when the model loses)."""
    if not comparison:
        return []
    if comparison.get("skipped"):
        return ["", "## Baselines", "", f"- {comparison['skipped']}"]
    rows = [
        f"| {name} | {_fmt(row.get('macro_f1'))} | {_fmt(row.get('macro_auroc'))} | "
        f"{_fmt(row.get('balanced_accuracy'))} | {_fmt(row.get('dangerous_auroc'))} |"
        for name, row in comparison["metrics"].items()
    ]
    return [
        "",
        "## Baselines on the same test split",
        "",
        f"{comparison['verdict']} (n = {comparison['n_test']}; uncalibrated probabilities).",
        "",
        "| model | macro-F1 | macro AUROC | balanced accuracy | dangerous-vs-rest AUROC |",
        "|---|---|---|---|---|",
        *rows,
    ]


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.3f}"


def faithfulness_lines(bundle_dir: Path) -> list[str]:
    """The "Explanation faithfulness" section when the bundle holds `faithfulness.json`
    (written by `bench/explain_faithfulness.py RUN_DIR --into-bundle`)."""
    from components.explain.faithfulness import card_lines

    path = bundle_dir / "faithfulness.json"
    return ["", *card_lines(json.loads(path.read_text()))] if path.is_file() else []


def leakage_lines(leakage: dict[str, Any] | None) -> list[str]:
    """The model card's leakage certificate: exact and near-duplicate counts per split pair,
    the grouping used, and the test score without the test images near-matched in training."""
    if not leakage:
        return []
    near = leakage.get("near_duplicates") or {}
    proximity = leakage.get("proximity") or {}
    grouping = leakage.get("grouping") or {"method": "none"}
    exact = leakage.get("exact_duplicates_across_given_splits") or {}
    final = proximity.get("near_duplicate_pairs_by_final_split") or {}
    across = {pair: n for pair, n in final.items() if len(set(pair.split("/"))) > 1}
    lines = [
        "",
        "## Leakage certificate",
        "",
        f"- Exact copies across given splits: {exact.get('groups', 0)} "
        f"({exact.get('rows_dropped', 0)} rows dropped, the highest-precedence copy kept)",
    ]
    if near:
        found = ", ".join(f"{p} {n}" for p, n in near.get("pairs_by_split", {}).items())
        lines.append(
            f"- Near-duplicates (thumbnail similarity >= {near['min_similarity']}): "
            f"{near['pairs']} pairs found ({found or 'none'}), {near['groups']} groups kept "
            f"whole, {near['rows_dropped']} rows dropped; across final splits: "
            + (", ".join(f"{p} {n}" for p, n in across.items()) or "none")
        )
    else:
        lines.append("- Near-duplicates: not looked for (dataset.split.near_duplicates=false)")
    method = grouping.get("method", "none")
    lines.append(
        "- Grouping (likely same patient): "
        + (
            f"{method} (similarity >= {grouping['min_similarity']}): {grouping['groups']} "
            f"groups of {grouping['images_in_groups']} images, carved whole"
            if method != "none"
            else "none beyond near-duplicates"
        )
    )
    shares = proximity.get("splits") or {}
    if shares:
        lines.append(
            f"- Near-matched to a training image (similarity >= "
            f"{proximity.get('min_similarity')}): "
            + ", ".join(f"{s} {v['near_matched']}/{v['images']}" for s, v in shares.items())
        )
    if proximity.get("warning"):
        lines.append(f"- Warning: {proximity['warning']}")
    full, clean = leakage.get("test_full") or {}, leakage.get("test_without_near_matches")
    if full:
        lines += ["", "| test images | n | macro_f1 | macro_auroc | balanced_accuracy |"]
        lines.append("|---|---|---|---|---|")
        rows = [("all", leakage.get("test_images"), full)]
        if clean:
            n = leakage.get("test_images", 0) - leakage.get("test_near_matched", 0)
            rows.append(("without near-matches in training", n, clean))
        for name, n, values in rows:
            cells = " | ".join(
                f"{values[k]:.4f}" if isinstance(values.get(k), int | float) else "n/a"
                for k in ("macro_f1", "macro_auroc", "balanced_accuracy")
            )
            lines.append(f"| {name} | {n} | {cells} |")
    return lines


def calibration_lines(block: dict[str, Any] | None, test: dict[str, Any] | None) -> list[str]:
    """The model card's calibration section: T, conformal threshold, what each was fitted on,
    and their effect on the test split (ECE before/after, coverage, set size, referrals)."""
    if not block:
        why = (test or {}).get("reason") or (
            "no calibration was fitted (federated runs are not calibrated yet)"
        )
        return [
            "## Calibration",
            "",
            f"- Not calibrated: {why}. Served probabilities are the raw model scores; "
            "/predict gives no prediction set or referral.",
        ]
    sources = block.get("sources") or {}
    fitted_on = block.get("fitted_on")
    lines = [
        "## Calibration",
        "",
        f"- Temperature scaling ({block.get('method')}): T = {float(block['temperature']):.3f}, "
        f"fitted on the {sources.get('temperature', fitted_on)}",
        f"- Conformal prediction sets ({block.get('score')}, not randomised) at "
        f"{float(block['coverage']):.0%} coverage: threshold q = {float(block['qhat']):.4f}, "
        f"fitted on the {sources.get('conformal', fitted_on)}",
        f"- Referral: the set holds more than one class, or a dangerous class "
        f"({', '.join(block.get('dangerous') or []) or 'none marked'}) while another is top, "
        "or the operating point flags a dangerous class while another is top, or the image is "
        "out of distribution",
        *_operating_point_lines(block, test),
        *_ood_lines(block.get("ood"), (test or {}).get("ood")),
        *[f"- Note: {note}" for note in block.get("notes") or []],
    ]
    if test and "ece_before" in test:
        sets = test.get("conformal") or {}
        lines += [
            "",
            f"| on the test split (n = {test.get('n')}) | value |",
            "|---|---|",
            f"| ECE before / after | {test['ece_before']:.4f} / {test['ece_after']:.4f} |",
            f"| NLL before / after | {test['nll_before']:.4f} / {test['nll_after']:.4f} |",
            f"| empirical coverage (target {float(block['coverage']):.0%}) | "
            f"{sets.get('coverage', float('nan')):.4f} |",
            f"| mean set size | {sets.get('mean_set_size', float('nan')):.3f} |",
            f"| share of cases referred | {sets.get('referral_rate', float('nan')):.4f} |",
        ]
    return lines


def _share(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.3f}"


def _operating_point_lines(block: dict[str, Any], test: dict[str, Any] | None) -> list[str]:
    """The dangerous-class operating point: threshold, where it was fitted, test figures."""
    point = block.get("operating_point")
    if not point:
        return []
    lines = [
        f"- Operating point: refer as possibly dangerous when P(any of "
        f"{', '.join(block.get('dangerous') or [])}) >= {float(point['threshold']):.4f}, the "
        f"highest threshold reaching {float(point['target_sensitivity']):.0%} sensitivity on "
        f"the {(block.get('sources') or {}).get('operating_point', block.get('fitted_on'))} "
        f"(there: sensitivity {_share(point.get('sensitivity'))}, specificity "
        f"{_share(point.get('specificity'))})",
    ]
    at = ((test or {}).get("operating_point") or {}).get("test")
    if at:
        lines.append(
            f"- At the operating point on the test split: sensitivity "
            f"{_share(at.get('sensitivity'))} ({at.get('n_positive')} cases of a dangerous "
            f"class), specificity {_share(at.get('specificity'))} ({at.get('n_negative')} others)"
        )
    return lines


def _ood_lines(meta: dict[str, Any] | None, test: dict[str, Any] | None) -> list[str]:
    """The out-of-distribution check: score, threshold, what it was fitted on."""
    if not meta:
        return ["- Out-of-distribution check: none (every input gets a diagnosis-like answer)"]
    lines = [
        f"- Out-of-distribution check ({meta.get('score')}): inputs scoring above "
        f"{float(meta['threshold']):.4g} get no diagnosis; {meta.get('fitted_on')}",
    ]
    if test and test.get("test_flagged_rate") is not None:
        lines.append(
            f"- In-distribution test images flagged: {float(test['test_flagged_rate']):.3f} "
            f"of {test.get('n_test')} (target false-alarm rate {float(meta['false_alarm']):.0%})"
        )
    return lines


def bundle_contents_lines(contents: dict[str, Any] | None) -> list[str]:
    """The model card's account of what the bundle holds besides the weights."""
    if not contents:
        return ["- Bundle contents: not recorded (bundle written before contents were recorded)"]
    index = contents.get("case_index") or 0
    return [
        "- Bundle contents: weights"
        + f"; SHAP background: {contents.get('background', 'none')}"
        + f"; similar-case index: {f'{index} training images' if index else 'none'}"
        + f"; training images: {'yes' if contents.get('training_images') else 'no'}"
        + (f"; OOD check: {contents['ood_statistics']}" if contents.get("ood_statistics") else ""),
    ]


@flow(name="promote_and_package", on_failure=[record_failure], on_crashed=[record_failure])
def promote_and_package(
    overrides: list[str] | None = None,
    version: str = "champion",
    model_name: str | None = None,
    reason: str | None = None,
    build_bento: bool | None = None,
) -> dict[str, Any]:
    """Package a registered model version for serving.

    overrides:   Hydra overrides of the training run (registry URI, model name, workspace)
    version:     alias or version number; default the champion
    model_name:  registered model (default ``registry.model_name`` of the composed config)
    reason:      when set, first move the champion alias to `version` (a manual promotion)
    build_bento: run ``bentoml build`` (default ``package.build_bento`` of the config)
    """
    from components.config import compose, to_container

    cfg = to_container(compose(list(overrides or [])))
    workspace = Workspace.from_env(cfg["paths"]["workspace"])
    prepare_environment(workspace)
    tracking_uri = cfg["registry"]["tracking_uri"]
    name = model_name or cfg["registry"]["model_name"]
    build = cfg["package"]["build_bento"] if build_bento is None else build_bento
    logger = get_run_logger()

    info = resolve_version_task(tracking_uri, workspace, name, str(version), reason)
    bundle_dir, downloaded = download_task(tracking_uri, workspace, info)
    bento_model, imported = import_task(bundle_dir, info, workspace.bentoml_home)
    bento = build_task(workspace.bentoml_home) if build else None
    logger.info(
        "%s v%s: bundle %s, Bento model %s (%s)%s",
        name,
        info["version"],
        "downloaded" if downloaded else "already local",
        bento_model,
        "imported" if imported else "already the latest import",
        f", Bento {bento}" if bento else "",
    )
    artifacts.markdown(
        f"model-card-{slug(name)}"[:100], model_card(info, bundle_dir, bento_model, bento)
    )
    summary = {
        "model_name": name,
        "version": str(info["version"]),
        "aliases": info.get("aliases", []),
        "run_id": info.get("run_id"),
        "bundle_dir": str(bundle_dir),
        "downloaded": downloaded,
        "bento_model": bento_model,
        "imported": imported,
        "bento": bento,
    }
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    out = workspace.root / "runs" / f"{stamp}-promote-{slug(name)}" / "summary.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2, default=str))
    return summary


def run_promote(args: list[str], version: str, reason: str | None, build: bool | None) -> dict:
    """Entry for ``oncoflow prefect promote``: prepare the environment, then run the flow."""
    from components.config import compose

    prepare_environment(Workspace.from_env(compose(args).paths.workspace))
    with settings_from_environment():
        return promote_and_package(list(args), version=version, reason=reason, build_bento=build)


@contextlib.contextmanager
def settings_from_environment() -> Iterator[None]:
    """Run with Prefect settings re-read from ``os.environ``.

    Prefect reads its settings once, when first imported; `prepare_environment` runs later
    (this module imports prefect at the top), so its PREFECT_HOME and ephemeral-server
    start-up timeout would otherwise be ignored.
    """
    import prefect.context
    from prefect.settings import Settings

    current = prefect.context.get_settings_context()
    with prefect.context.SettingsContext(profile=current.profile, settings=Settings()):
        yield
