"""What the ServerApp and the ClientApp share: the model spec, weights <-> Flower records,
site data on disk, and local training / evaluation through the project's one training loop
(`components.training.loop.fit_local`) and metrics (`components.evaluation`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import zlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from components.data.preprocess import Preprocessing
from components.errors import DataError, ModelError

log = logging.getLogger(__name__)

SITE_META = "site.json"
TRAIN_FILE = "train.npz"
VAL_FILE = "val.npz"
TEST_FILE = "test.npz"  # a site's held-out test split (a real site: `oncoflow site prepare`)
BEST_MODEL_DIR = "best_model"
BEST_META = "best.json"


@dataclass(frozen=True)
class ModelSpec:
    """How to build the model and see pixels: `build_model` kwargs, preprocessing, classes."""

    architecture: dict[str, Any]
    preprocessing: dict[str, Any]
    class_names: list[str]

    def build(self):
        from components.models import build_model

        return build_model(**self.architecture)

    def prep(self) -> Preprocessing:
        return Preprocessing.from_dict(self.preprocessing)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        return cls(
            architecture=dict(data["architecture"]),
            preprocessing=dict(data["preprocessing"]),
            class_names=[str(c) for c in data["class_names"]],
        )


@dataclass(frozen=True)
class LocalTraining:
    """Settings of one local fit on a site (`fit_local` arguments)."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    imbalance: str = "none"
    augment: bool = False
    deterministic: bool = True
    proximal_mu: float = 0.0
    threads: int | None = None  # torch threads on the site; None = torch's default

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LocalTraining:
        return cls(**{k: data[k] for k in asdict(cls()) if k in data})


# --------------------------------------------------------------------------- weights


def state_arrays(model) -> dict[str, np.ndarray]:
    """The model's state dict as numpy arrays (copies, CPU)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def load_arrays(model, arrays: Mapping[str, np.ndarray]):
    """Load numpy weights into `model` strictly, cast to the model's own dtypes."""
    import torch

    own = model.state_dict()
    missing = sorted(set(own) - set(arrays))
    if missing:
        raise ModelError(f"weights lack {len(missing)} tensor(s) of the model, e.g. {missing[0]}")
    state = {}
    for key, ref in own.items():
        value = np.asarray(arrays[key])
        if tuple(value.shape) != tuple(ref.shape):
            raise ModelError(
                f"weights for {key} have shape {value.shape}, model has {tuple(ref.shape)}"
            )
        if not ref.dtype.is_floating_point:
            value = np.rint(value)
        state[key] = torch.as_tensor(value).to(ref.dtype)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"weights do not fit the model: {exc}") from exc
    return model


def match_dtypes(
    arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Cast aggregated arrays back to the reference dtypes (integer buffers are rounded)."""
    out = {}
    for key, ref in reference.items():
        ref = np.asarray(ref)
        value = np.asarray(arrays[key])
        if not np.issubdtype(ref.dtype, np.floating):
            value = np.rint(value)
        out[key] = value.astype(ref.dtype, copy=False)
    return out


def to_record(arrays: Mapping[str, np.ndarray]):
    """numpy weights -> `flwr.app.ArrayRecord` (names kept)."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord(array_dict={k: Array(np.asarray(v, order="C")) for k, v in arrays.items()})


def from_record(record) -> dict[str, np.ndarray]:
    """`flwr.app.ArrayRecord` -> numpy weights (names kept)."""
    return {key: np.asarray(value.numpy()) for key, value in record.items()}


def local_seed(seed: int, server_round: int, site: str) -> int:
    """A seed that differs per site and round but is the same on every engine and rerun."""
    return (int(seed) * 1_000_003 + server_round * 7919 + zlib.crc32(site.encode())) % (2**31 - 1)


# --------------------------------------------------------------------------- site data


@dataclass
class SiteData:
    """One site's images (uint8 N,C,H,W) and labels, read from its own directory only."""

    name: str
    directory: Path
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    meta: dict[str, Any]


def write_split(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    np.savez(path, x=np.ascontiguousarray(x, dtype=np.uint8), y=np.asarray(y, dtype=np.int64))


def read_split(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return data["x"], data["y"].astype(np.int64)
    except FileNotFoundError as exc:
        raise DataError(f"missing data file {path}") from exc
    except (KeyError, ValueError, OSError) as exc:
        raise DataError(f"{path} is not an oncoflow split file (x, y arrays): {exc}") from exc


def write_site(
    directory: Path,
    name: str,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    meta: Mapping[str, Any] | None = None,
    test: tuple[np.ndarray, np.ndarray] | None = None,
) -> Path:
    """Write one site's partition to `directory` (train.npz, val.npz, site.json; test.npz,
    the split only the site's final evaluation reads, when `test` is given)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_split(directory / TRAIN_FILE, *train)
    write_split(directory / VAL_FILE, *val)
    info = {"site": name, "num_train": len(train[1]), "num_val": len(val[1])}
    if test is not None:
        write_split(directory / TEST_FILE, *test)
        info["num_test"] = len(test[1])
    (directory / SITE_META).write_text(json.dumps({**info, **(meta or {})}, indent=1))
    return directory


def load_site_test(directory: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The site's held-out test split (`DataError` when the site has none)."""
    path = check_site_dir(directory) / TEST_FILE
    if not path.is_file():
        raise DataError(
            "this site holds no test split; prepare it with `oncoflow site prepare` "
            "(components.federated.site_prepare)"
        )
    return read_split(path)


def check_site_dir(directory: str | Path) -> Path:
    """`DataError` unless `directory` holds a site partition written by `write_site`."""
    path = Path(directory).expanduser()
    missing = [f for f in (SITE_META, TRAIN_FILE, VAL_FILE) if not (path / f).is_file()]
    if missing:
        raise DataError(
            f"no site data in {path} (missing {', '.join(missing)}); write the partition with "
            "`oncoflow fl prepare` (components.federated.layout.prepare_federation) first"
        )
    return path


def load_site(directory: str | Path) -> SiteData:
    path = check_site_dir(directory)
    meta = json.loads((path / SITE_META).read_text())
    x_train, y_train = read_split(path / TRAIN_FILE)
    x_val, y_val = read_split(path / VAL_FILE)
    return SiteData(
        name=str(meta["site"]),
        directory=path,
        x_train=x_train,
        y_train=y_train,
        x_val=x_val,
        y_val=y_val,
        meta=meta,
    )


# --------------------------------------------------------------------------- train / evaluate


def set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def train_local(
    model,
    x: np.ndarray,
    y: np.ndarray,
    spec: ModelSpec,
    training: LocalTraining,
    seed: int,
    dp: Any = None,
    label: str | None = None,
) -> dict[str, Any]:
    """Local epochs on one site with the project's one training loop (`fit_local`).

    `dp`: a `components.privacy.dp.DPSGD` hook pair making the fit DP-SGD (closed after).
    `label` (e.g. "site-a round 3") prefixes the per-epoch progress lines, logged at INFO."""
    from components.training.loop import fit_local

    hooks = {"optimizer_hook": dp.optimizer_hook, "loader_hook": dp.loader_hook} if dp else {}
    try:
        return fit_local(
            model,
            (x, y),
            spec.prep(),
            epochs=training.epochs,
            batch_size=training.batch_size,
            lr=training.lr,
            weight_decay=training.weight_decay,
            imbalance=training.imbalance,
            augment=training.augment,
            seed=seed,
            proximal_mu=training.proximal_mu,
            deterministic=training.deterministic,
            progress_label=label,
            **hooks,
        )
    finally:
        if dp is not None:
            dp.close()


def evaluate_model(model, x: np.ndarray, y: np.ndarray, spec: ModelSpec) -> dict[str, Any]:
    """`components.evaluation.metrics.evaluate` plus the mean cross-entropy `loss`."""
    from components.evaluation.metrics import evaluate
    from components.evaluation.predict import predict_proba

    probs = predict_proba(model, x, spec.prep())
    metrics = evaluate(y, probs, spec.class_names)
    picked = probs[np.arange(len(y)), np.asarray(y, dtype=np.int64)].astype(np.float64)
    metrics["loss"] = float(-np.mean(np.log(np.clip(picked, 1e-12, 1.0))))
    return metrics


HEADLINE = ("loss", "accuracy", "balanced_accuracy", "macro_f1", "macro_auroc", "ece")


def headline(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The scalar metrics kept per round (None, e.g. an undefined AUROC, is dropped)."""
    return {k: float(metrics[k]) for k in HEADLINE if metrics.get(k) is not None}


def keep_best(
    site_dir: Path,
    model,
    spec: ModelSpec,
    score: float,
    *,
    server_round: int,
    source: str,
    site: str,
    metrics: Mapping[str, Any],
) -> bool:
    """Save `model` as the site's best model (a model bundle in `<site>/best_model/`) when its
    validation macro-F1 `score` beats the stored one. Returns whether it was saved."""
    from components.bundle import ModelBundle

    best_dir = Path(site_dir) / BEST_MODEL_DIR
    meta_path = best_dir / BEST_META
    if meta_path.is_file():
        previous = json.loads(meta_path.read_text()).get("val_macro_f1", float("-inf"))
        if not score > previous:
            return False
    arch = dict(spec.architecture)
    bundle = ModelBundle(
        architecture=arch.pop("name"),
        architecture_kwargs=arch,
        class_names=list(spec.class_names),
        preprocessing=spec.prep(),
        state_dict={k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        metrics={"site_validation": dict(metrics)},
        extra={"site": site, "round": server_round, "source": source},
    )
    tmp = Path(site_dir) / f".tmp-best-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    bundle.save(tmp)
    (tmp / BEST_META).write_text(
        json.dumps({"val_macro_f1": score, "round": server_round, "source": source})
    )
    if best_dir.exists():
        shutil.rmtree(best_dir)
    os.replace(tmp, best_dir)
    return True


def best_score(site_dir: Path) -> float | None:
    meta_path = Path(site_dir) / BEST_MODEL_DIR / BEST_META
    if not meta_path.is_file():
        return None
    return float(json.loads(meta_path.read_text())["val_macro_f1"])


__all__ = [
    "HEADLINE",
    "LocalTraining",
    "ModelSpec",
    "SiteData",
    "best_score",
    "check_site_dir",
    "evaluate_model",
    "from_record",
    "headline",
    "keep_best",
    "load_arrays",
    "load_site",
    "load_site_test",
    "local_seed",
    "match_dtypes",
    "read_split",
    "state_arrays",
    "to_record",
    "train_local",
    "write_site",
    "write_split",
]
