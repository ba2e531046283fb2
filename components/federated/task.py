"""What the ServerApp and the ClientApp share: the model spec, weights <-> Flower records,
site data on disk, and local training / evaluation through the project's one training loop
(`components.training.loop.fit_local`) and metrics (`components.evaluation`).

A model that reads clinical records (`fusion`, `tabular_mlp`) gets the clinical schema from
the spec, and its imputation and scaling statistics from that schema alone
(`fit_normalisation_from_schema`): every site and the server build the same statistics, no
record leaves a site, and those buffers are not exchanged (`state_arrays` leaves them out), so
aggregation, update bounds and noise never touch them. A site's split files hold its images
(`x`), labels (`y`) and, with a clinical table, its encoded records (`c`).
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
from typing import TYPE_CHECKING, Any

import numpy as np

from components.data.inputs import CLINICAL, input_kinds
from components.data.preprocess import Preprocessing
from components.errors import ConfigError, DataError, ModelError

if TYPE_CHECKING:
    from components.data.cache import SplitArrays

log = logging.getLogger(__name__)

SITE_META = "site.json"
TRAIN_FILE = "train.npz"
VAL_FILE = "val.npz"
TEST_FILE = "test.npz"  # a site's held-out test split (a real site: `oncoflow site prepare`)
BEST_MODEL_DIR = "best_model"
BEST_META = "best.json"


@dataclass(frozen=True)
class ModelSpec:
    """How to build the model and see pixels: `build_model` kwargs, preprocessing, classes,
    and for a model reading clinical records the clinical `schema` (the dataset's features)."""

    architecture: dict[str, Any]
    preprocessing: dict[str, Any]
    class_names: list[str]
    schema: list[dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        if self.reads_clinical and not self.schema:
            raise ConfigError(
                f"model {self.architecture['name']!r} reads clinical records, but the dataset "
                "has no clinical schema: use a dataset with `clinical.features` or an image model"
            )

    @property
    def reads_clinical(self) -> bool:
        return CLINICAL in input_kinds(self.architecture["name"])

    def build(self):
        """The model, identical on every site and the server; a clinical model's imputation
        and scaling statistics come from the schema (never from records)."""
        from components.models import build_model

        if not self.reads_clinical:
            return build_model(**self.architecture)
        model = build_model(**self.architecture, tabular_schema=self.schema)
        model.fit_normalisation_from_schema(self.schema)
        return model

    def warn_unscaled(self) -> None:
        """Log the numeric features the schema gives no [min, max]: built from the schema
        alone, the model reads them unscaled (the spec's schema should bound them)."""
        for entry in self.schema or ():
            bounded = entry.get("min") is not None and entry.get("max") is not None
            if entry.get("type") in ("float", "int") and not bounded:
                log.warning(
                    "clinical feature %s has no [min, max] in the schema: the federated model "
                    "reads it unscaled (give it bounds in dataset.clinical.features)",
                    entry["name"],
                )

    def inputs(self, split: SplitArrays) -> tuple[np.ndarray, ...]:
        """The arrays of `split` this model reads, in `model(*inputs)` order."""
        return split.inputs(self.architecture["name"])

    def to_dict(self) -> dict[str, Any]:
        """The wire form (an image model's has no `schema` key, as specs always had)."""
        data = asdict(self)
        if self.schema is None:
            data.pop("schema")
        return data

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
            schema=[dict(e) for e in data["schema"]] if data.get("schema") else None,
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


def schema_fixed_keys(model) -> frozenset[str]:
    """State-dict keys the spec fixes and the federation never exchanges: the clinical
    branch's imputation/scaling buffers (`fill`, `shift`, `scale`, `fitted`), set from the
    schema when the model is built."""
    from components.models.tabular import TabularEncoder

    keys = set()
    for prefix, module in model.named_modules():
        if isinstance(module, TabularEncoder):
            for name, _ in module.named_buffers(recurse=False):
                keys.add(f"{prefix}.{name}" if prefix else name)
    return frozenset(keys)


def state_arrays(model) -> dict[str, np.ndarray]:
    """The model's exchanged state as numpy arrays (copies, CPU): the state dict without the
    schema-fixed statistics (`schema_fixed_keys`)."""
    fixed = schema_fixed_keys(model)
    return {
        k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items() if k not in fixed
    }


def load_arrays(model, arrays: Mapping[str, np.ndarray]):
    """Load numpy weights into `model` strictly, cast to the model's own dtypes. The
    schema-fixed statistics are the model's own (built from the spec); any sent are ignored."""
    import torch

    fixed = schema_fixed_keys(model)
    own = {k: v for k, v in model.state_dict().items() if k not in fixed}
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
    state.update({k: v for k, v in model.state_dict().items() if k in fixed})
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
    """One site's train and validation splits (`SplitArrays`: images uint8 N,C,H,W and/or
    encoded clinical records, labels), read from its own directory only."""

    name: str
    directory: Path
    train: SplitArrays
    val: SplitArrays
    meta: dict[str, Any]

    @property
    def x_train(self) -> np.ndarray | None:
        return self.train.x

    @property
    def y_train(self) -> np.ndarray:
        return self.train.y

    @property
    def x_val(self) -> np.ndarray | None:
        return self.val.x

    @property
    def y_val(self) -> np.ndarray:
        return self.val.y


Split = Any  # an (x, y) pair of arrays or a `SplitArrays` (images may be None, records too)


def _split_parts(split: Split) -> tuple[np.ndarray | None, np.ndarray, np.ndarray | None]:
    """(images or None, labels, encoded records or None) of an (x, y) pair or a split."""
    if hasattr(split, "y"):
        return split.x, split.y, getattr(split, "clinical", None)
    x, y = split
    return x, y, None


def write_split(
    path: Path, x: np.ndarray | None, y: np.ndarray, clinical: np.ndarray | None = None
) -> None:
    """One split file: `x` images (uint8), `y` labels, `c` encoded records (float32, NaN =
    missing); a table-only split has no `x`, an image-only one no `c`."""
    arrays = {"y": np.asarray(y, dtype=np.int64)}
    if x is not None:
        arrays["x"] = np.ascontiguousarray(x, dtype=np.uint8)
    if clinical is not None:
        arrays["c"] = np.ascontiguousarray(clinical, dtype=np.float32)
    if len(arrays) == 1:
        raise DataError(f"{path.name}: a split needs images or clinical records")
    np.savez(path, **arrays)


def read_arrays(path: Path) -> SplitArrays:
    """A split file as `SplitArrays` (no row ids: they never leave the coordinator's run)."""
    from components.data.cache import SplitArrays

    try:
        with np.load(path, allow_pickle=False) as data:
            y = data["y"].astype(np.int64)
            x = data["x"] if "x" in data.files else None
            clinical = data["c"] if "c" in data.files else None
    except FileNotFoundError as exc:
        raise DataError(f"missing data file {path}") from exc
    except (KeyError, ValueError, OSError) as exc:
        raise DataError(f"{path} is not an oncoflow split file (x, y arrays): {exc}") from exc
    if x is None and clinical is None:
        raise DataError(f"{path} holds neither images nor clinical records")
    return SplitArrays(x=x, y=y, ids=[], clinical=clinical)


def read_split(path: Path) -> tuple[np.ndarray | None, np.ndarray]:
    """(images, labels) of a split file (images None for a table-only split)."""
    split = read_arrays(path)
    return split.x, split.y


def write_site(
    directory: Path,
    name: str,
    train: Split,
    val: Split,
    meta: Mapping[str, Any] | None = None,
    test: Split | None = None,
) -> Path:
    """Write one site's partition to `directory` (train.npz, val.npz, site.json; test.npz,
    the split only the site's final evaluation reads, when `test` is given). Each split is an
    (x, y) pair or a `SplitArrays` (its clinical records are written too)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    splits = {TRAIN_FILE: train, VAL_FILE: val} | ({TEST_FILE: test} if test is not None else {})
    info: dict[str, Any] = {"site": name}
    for filename, split in splits.items():
        x, y, clinical = _split_parts(split)
        write_split(directory / filename, x, y, clinical)
        info[f"num_{filename.split('.')[0]}"] = len(y)
    (directory / SITE_META).write_text(json.dumps({**info, **(meta or {})}, indent=1))
    return directory


def site_test_split(directory: str | Path) -> SplitArrays:
    """The site's held-out test split (`DataError` when the site has none)."""
    path = check_site_dir(directory) / TEST_FILE
    if not path.is_file():
        raise DataError(
            "this site holds no test split; prepare it with `oncoflow site prepare` "
            "(components.federated.site_prepare)"
        )
    return read_arrays(path)


def load_site_test(directory: str | Path) -> tuple[np.ndarray | None, np.ndarray]:
    """(images, labels) of the site's held-out test split (`site_test_split`)."""
    split = site_test_split(directory)
    return split.x, split.y


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
    return SiteData(
        name=str(meta["site"]),
        directory=path,
        train=read_arrays(path / TRAIN_FILE),
        val=read_arrays(path / VAL_FILE),
        meta=meta,
    )


# --------------------------------------------------------------------------- train / evaluate


def set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def train_local(
    model,
    x: np.ndarray | tuple[np.ndarray, ...],
    y: np.ndarray,
    spec: ModelSpec,
    training: LocalTraining,
    seed: int,
    dp: Any = None,
    label: str | None = None,
) -> dict[str, Any]:
    """Local epochs on one site with the project's one training loop (`fit_local`); `x` is
    the image array or the tuple of arrays the model reads (`ModelSpec.inputs`).

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


def evaluate_model(model, x: Any, y: np.ndarray, spec: ModelSpec) -> dict[str, Any]:
    """`components.evaluation.metrics.evaluate` plus the mean cross-entropy `loss`; `x` is an
    image array, a tuple of the model's arrays or a `SplitArrays`."""
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
        tabular_schema=spec.schema,
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
    "read_arrays",
    "read_split",
    "schema_fixed_keys",
    "site_test_split",
    "state_arrays",
    "to_record",
    "train_local",
    "write_site",
    "write_split",
]
