"""Prepare a federated run on disk: one directory per site, the server's test split, the spec.

    <root>/
      federation.json          settings + site report (class histogram per site)
      sites/<site>/            train.npz, val.npz, site.json  (a SuperNode reads only this)
                  best_model/  the site's best model (a model bundle), written by the site
      server/test.npz          the held-out test split (never sent to any site)
      server/spec.json         the RunSpec the ServerApp reads
      server/out/              checkpoints/, ledger.jsonl, result.json, final_model.npz

In a real deployment each hospital receives only its own `sites/<site>/` directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from components.data.cache import SplitArrays
from components.data.inputs import CLINICAL, IMAGE, input_kinds
from components.data.preprocess import Preprocessing
from components.errors import DataError
from components.federated.attacks import attacker_sites
from components.federated.checkpoint import CHECKPOINT_DIR, CheckpointStore
from components.federated.partition import (
    partition_splits,
    safe_site_name,
    site_report,
    site_report_markdown,
)
from components.federated.runspec import RunSpec
from components.federated.settings import FederationSettings, validate_federation
from components.federated.site_calibration import CalibrationSpec
from components.federated.strategies import build_strategy
from components.federated.task import (
    BEST_MODEL_DIR,
    LocalTraining,
    ModelSpec,
    write_site,
    write_split,
)
from components.privacy.federated import ServerPrivacy, clear_site_ledger
from components.privacy.settings import validate_privacy
from components.training.assembly import architecture_from_config, fit_settings_from_config

log = logging.getLogger(__name__)

FEDERATION_FILE = "federation.json"


@dataclass
class FederationLayout:
    """Where a prepared federated run lives."""

    root: Path
    settings: FederationSettings
    spec: RunSpec
    spec_path: Path
    sites: dict[str, Path]
    report: dict[str, Any]

    @property
    def out_dir(self) -> Path:
        return Path(self.spec.out_dir)

    @property
    def report_markdown(self) -> str:
        return site_report_markdown(self.report)

    @classmethod
    def open(cls, root: str | Path) -> FederationLayout:
        """Re-open a layout written by `prepare_federation` (e.g. for `oncoflow fl submit`)."""
        root = Path(root)
        try:
            meta = json.loads((root / FEDERATION_FILE).read_text())
        except FileNotFoundError as exc:
            raise DataError(
                f"{root} holds no prepared federation; run `oncoflow fl prepare` first"
            ) from exc
        spec_path = root / "server" / "spec.json"
        spec = RunSpec.load(spec_path)
        sites = {name: root / "sites" / d for name, d in meta["site_dirs"].items()}
        return cls(root, spec.settings, spec, spec_path, sites, meta["report"])


def local_training(
    cfg: Mapping[str, Any], settings: FederationSettings, threads: int | None
) -> LocalTraining:
    """A site's local fit: the run's `trainer` settings, epochs and FedProx from `federation`."""
    return LocalTraining(
        epochs=settings.local_epochs,
        augment=bool(cfg["trainer"]["augment"]),
        proximal_mu=settings.proximal_mu,
        threads=threads,
        **fit_settings_from_config(cfg),
    )


def _split(split: Any, name: str, architecture: str) -> SplitArrays:
    """`split` (`SplitArrays` or an (x, y) pair) holding only what `architecture` reads: an
    image model's sites get no clinical records, a table model's no images."""
    if split is None:
        raise DataError(f"federated training needs a {name} split")
    x, y, clinical = (split.x, split.y, split.clinical) if hasattr(split, "y") else (*split, None)
    kinds = input_kinds(architecture)
    out = SplitArrays(
        x=np.asarray(x) if IMAGE in kinds and x is not None else None,
        y=np.asarray(y),
        ids=[],
        clinical=np.asarray(clinical) if CLINICAL in kinds and clinical is not None else None,
    )
    out.inputs(architecture)  # DataError naming what the model reads and the split lacks
    return out


def _take(*parts: tuple[SplitArrays, np.ndarray]) -> SplitArrays:
    """The rows `index` of each (split, index) pair, concatenated."""

    def pick(field: str) -> np.ndarray | None:
        if getattr(parts[0][0], field) is None:
            return None
        return np.concatenate([getattr(split, field)[index] for split, index in parts])

    return SplitArrays(x=pick("x"), y=pick("y"), ids=[], clinical=pick("clinical"))


def _schema(arrays: Mapping[str, Any], architecture: Mapping[str, Any]) -> list[dict] | None:
    """The clinical schema the train split was encoded with, for a model that reads records."""
    if CLINICAL not in input_kinds(architecture["name"]):
        return None
    return getattr(arrays.get("train"), "schema", None)


def _with_given_sites(cfg: dict[str, Any], site_groups: Mapping[str, Any] | None) -> dict:
    """partition=given with num_sites null: one site per distinct training `site` value."""
    fed = cfg["federation"]
    if fed["partition"] != "given" or fed["num_sites"] is not None:
        return cfg
    train = (site_groups or {}).get("train")
    names = {str(s) for s in (() if train is None else train) if s is not None and str(s) != ""}
    if not names:
        raise DataError(
            "federation.partition=given found no site for any training row: fill the "
            "manifest's site column (or name a clinical column with dataset.clinical.site)"
        )
    return {**cfg, "federation": {**fed, "num_sites": len(names)}}


def array_fingerprint(parts: list[np.ndarray]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(str(part.shape).encode())
        digest.update(np.ascontiguousarray(part).tobytes())
    return digest.hexdigest()[:16]


def prepare_federation(
    cfg: Mapping[str, Any],
    arrays: Mapping[str, Any],
    class_names: list[str],
    preprocessing: Preprocessing,
    root: str | Path,
    *,
    site_groups: Mapping[str, Any] | None = None,
    threads: int | None = None,
) -> FederationLayout:
    """Validate, partition and write a federated run under `root`.

    `arrays` maps "train"/"val"/"test" to `SplitArrays` (or (x, y) pairs, x uint8 N,C,H,W).
    For a model that reads clinical records (fusion, tabular) the splits' encoded records
    are written to the sites and the server's test file, and the schema (`SplitArrays.schema`)
    goes into the run spec, so every site and the server build the same model; nothing
    is fitted on the records here (`ModelSpec.build`).
    `site_groups` gives, for partition=given, the site of every train/val image
    ({"train": [...], "val": [...]}, e.g. from `partition.site_column(manifest, ids)`).
    `threads` caps torch threads per site (default: federation.simulation.threads_per_site
    on the simulation engine, torch's default elsewhere).
    """
    if not isinstance(cfg, dict) and hasattr(cfg, "_get_node"):  # an OmegaConf DictConfig
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(cfg, resolve=True)
    settings = validate_federation(_with_given_sites(dict(cfg), site_groups))
    privacy = validate_privacy(cfg["privacy"], settings.to_dict(), cfg["trainer"])
    ServerPrivacy(privacy, settings.rounds, settings.num_sites).wrap(build_strategy(settings))
    if threads is None and settings.engine == "simulation":
        threads = settings.simulation.threads_per_site
    root = Path(root).resolve()
    architecture = architecture_from_config(cfg, len(class_names), privacy=privacy)
    model = ModelSpec(
        architecture=architecture,
        preprocessing=preprocessing.to_dict(),
        class_names=list(class_names),
        schema=_schema(arrays, architecture) or None,
    )
    model.warn_unscaled()
    train = _split(arrays.get("train"), "train", architecture["name"])
    val = _split(arrays.get("val"), "validation", architecture["name"])
    test = _split(arrays.get("test"), "test", architecture["name"])
    if not len(test.y):
        raise DataError("the test split is empty: the server has nothing to evaluate on")
    groups = site_groups or {}
    sites = partition_splits(
        train.y,
        val.y,
        settings.partition,
        settings.num_sites,
        alpha=settings.alpha,
        seed=settings.seed,
        train_groups=groups.get("train"),
        val_groups=groups.get("val"),
        num_classes=len(class_names),
        min_samples=settings.min_site_samples,
    )
    report = site_report(
        sites, train.y, val.y, class_names, scheme=settings.partition, alpha=settings.alpha
    )
    attacks = attacker_sites(settings.attack, list(sites))
    site_dirs: dict[str, Path] = {}
    used: set[str] = set()
    fingerprint_parts: list[np.ndarray] = [*test.inputs(), test.y]
    for name, parts in sites.items():
        dirname = safe_site_name(name)
        while dirname in used:
            dirname += "_"
        used.add(dirname)
        site_val = _take((val, parts.val), (train, parts.val_from_train))
        site_train = _take((train, parts.train))
        site_dirs[name] = write_site(
            root / "sites" / dirname,
            name,
            site_train,
            site_val,
            {"class_names": list(class_names), "histogram": report["sites"][name]},
        )
        step = max(1, len(site_train.y) // 64)
        fingerprint_parts += [site_train.y, site_val.y]
        fingerprint_parts += [a[::step] for a in site_train.inputs()]
    server_dir = root / "server"
    server_dir.mkdir(parents=True, exist_ok=True)
    write_split(server_dir / "test.npz", test.x, test.y, test.clinical)
    spec = RunSpec(
        settings=settings,
        model=model,
        training=local_training(cfg, settings, threads),
        test_path=str(server_dir / "test.npz"),
        out_dir=str(server_dir / "out"),
        sites=list(sites),
        attacks=attacks,
        data_fingerprint=array_fingerprint(fingerprint_parts),
        privacy=privacy,
        calibration=CalibrationSpec.from_config(cfg),
    )
    _check_resume(spec, site_dirs)
    spec_path = spec.save(server_dir / "spec.json")
    meta = {
        "settings": settings.to_dict(),
        "report": report,
        "site_dirs": {n: p.name for n, p in site_dirs.items()},
        "attackers": attacks,
    }
    (root / FEDERATION_FILE).write_text(json.dumps(meta, indent=1))
    log.info("prepared %d sites under %s\n%s", len(sites), root, site_report_markdown(report))
    return FederationLayout(root, settings, spec, spec_path, site_dirs, report)


def _check_resume(spec: RunSpec, site_dirs: Mapping[str, Path]) -> None:
    """Fail now if the output directory holds a checkpoint of other settings (resume=true);
    on a fresh start, drop the sites' best models and privacy ledgers left by an earlier run in
    this directory (a new model starts from ε = 0; a resumed one continues its ledgers)."""
    store = CheckpointStore(Path(spec.out_dir) / CHECKPOINT_DIR, spec.fingerprint())
    existing = store.latest() if spec.settings.resume else None
    if existing is None:
        for directory in site_dirs.values():
            shutil.rmtree(Path(directory) / BEST_MODEL_DIR, ignore_errors=True)
            clear_site_ledger(directory)
    else:
        log.info("a checkpoint after round %d exists: the run will resume", existing.round)


__all__ = ["FederationLayout", "prepare_federation"]
