"""Federated training of models that read clinical records (fusion, tabular) on the inline
engine: the sites hold their own encoded records, the spec carries the schema, the global
model's imputation and scaling come from the schema alone and are never exchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny_config import tiny_cfg

from components.bundle import ModelBundle
from components.data.cache import SplitArrays
from components.data.preprocess import Preprocessing
from components.data.synthetic import make_synthetic
from components.errors import ConfigError
from components.evaluation.predict import predict_proba
from components.federated.engines import run_prepared
from components.federated.layout import prepare_federation
from components.federated.task import load_site, read_arrays, schema_fixed_keys, state_arrays
from components.models.tabular import TabularLayout

SIZE = 16
PREP = Preprocessing(size=SIZE, channels=3)
SCHEMA = [
    {"name": "score", "type": "float", "min": -5.0, "max": 15.0},
    {"name": "smoker", "type": "bool", "required": False},
    {"name": "site", "type": "category", "allowed": ["arm", "face", "back"]},
]
CLASSES = ("healthy", "lesion_left", "lesion_right")  # the default dataset's classes
FUSION = ("model=fusion", "model.image_architecture=small_cnn", "model.pretrained=false")


def _split(n_per_class: int, seed: int, images: bool) -> SplitArrays:
    """Synthetic images (3 classes) and records whose `score` follows the class."""
    data = make_synthetic(n_per_class, size=SIZE, seed=seed)
    rng = np.random.default_rng(seed + 100)
    records = [
        {
            "score": float(label * 5 + rng.normal(0, 0.5)),
            "smoker": None if rng.random() < 0.3 else bool(rng.random() < 0.5),
            "site": str(rng.choice(["arm", "face", "back"])),
        }
        for label in data.labels
    ]
    return SplitArrays(
        x=data.images.transpose(0, 3, 1, 2).copy() if images else None,
        y=data.labels.astype(np.int64),
        ids=[f"{seed}-{i}" for i in range(len(data.labels))],
        clinical=TabularLayout.from_schema(SCHEMA).encode_rows(records),
        schema=SCHEMA,
    )


def _arrays(images: bool = True) -> dict[str, SplitArrays]:
    return {
        name: _split(n, seed, images)
        for name, n, seed in (("train", 24, 1), ("val", 6, 2), ("test", 8, 3))
    }


@pytest.fixture(scope="module")
def data():
    return _arrays(), make_synthetic(1, size=SIZE, seed=0).class_names


def _cfg(*overrides: str, **federation) -> dict:
    fed = {"engine": "inline", "num_sites": 3, "partition": "iid", "rounds": 1, "local_epochs": 1}
    return tiny_cfg(
        "training=federated",
        "seed=3",
        "model.norm=group",
        *overrides,
        trainer={"batch_size": 8, "lr": 0.01, "imbalance": "none", "augment": False},
        federation=fed | federation,
    )


def test_fusion_federation_reads_each_sites_records(data, tmp_path):
    arrays, classes = data
    layout = prepare_federation(
        _cfg(*FUSION, rounds=2), arrays, classes, PREP, tmp_path / "fed", threads=1
    )
    # the spec carries the schema; each site holds its own images and encoded records
    assert layout.spec.model.schema == SCHEMA
    sent = json.loads(layout.spec.client_spec.to_json())
    assert sent["model"]["schema"] == SCHEMA
    sizes = []
    for site_dir in layout.sites.values():
        site = load_site(site_dir)
        assert site.train.x.shape[0] == site.train.clinical.shape[0] == len(site.train.y)
        assert site.train.clinical.shape[1] == 5 and site.val.clinical is not None
        sizes.append(len(site.train.y))
    val_sizes = [len(load_site(d).val.y) for d in layout.sites.values()]
    assert sum(sizes) + sum(val_sizes) == len(arrays["train"]) + len(arrays["val"])

    result = run_prepared(layout)
    assert [row["accepted"] for row in result.history] == [3, 3]
    for site_dir in layout.sites.values():  # each site's best model is a loadable bundle
        best = ModelBundle.load(site_dir / "best_model")
        assert best.tabular_schema == SCHEMA and best.build_model().architecture == "fusion"
    model = result.model
    assert model.architecture == "fusion"
    # the global model's normalisation is the schema's, not fitted on any record
    encoder = model.tabular
    assert float(encoder.fill[0]) == pytest.approx(5.0) and float(encoder.scale[0]) == 10.0
    assert bool(encoder.fitted)
    # its server score is the final model's score on the server's test file
    test = read_arrays(layout.spec.test_path)
    probs = predict_proba(model, (test.x, test.clinical), PREP)
    accuracy = float((probs.argmax(1) == test.y).mean())
    assert accuracy == pytest.approx(result.history[-1]["server"]["accuracy"])
    # the model reads the record: changing it changes the prediction
    shifted = test.clinical.copy()
    shifted[:, 0] += 10.0
    assert np.abs(predict_proba(model, (test.x, shifted), PREP) - probs).max() > 1e-4


def test_tabular_only_federation(tmp_path):
    arrays = _arrays(images=False)
    classes = make_synthetic(1, size=SIZE, seed=0).class_names
    cfg = _cfg("model=tabular", rounds=2, local_epochs=3)
    layout = prepare_federation(cfg, arrays, classes, PREP, tmp_path / "fed", threads=1)
    for site_dir in layout.sites.values():
        site = load_site(site_dir)
        assert site.train.x is None and site.train.clinical is not None
    result = run_prepared(layout)
    assert result.model.architecture == "tabular_mlp"
    assert result.history[-1]["accepted"] == 3
    assert result.history[-1]["server"]["accuracy"] > 1 / 3


def test_normalisation_buffers_are_fixed_by_the_spec_not_exchanged(data, tmp_path):
    arrays, classes = data
    layout = prepare_federation(_cfg(*FUSION), arrays, classes, PREP, tmp_path / "fed", threads=1)
    model = layout.spec.model.build()
    fixed = schema_fixed_keys(model)
    assert fixed == {"tabular.fill", "tabular.shift", "tabular.scale", "tabular.fitted"}
    sent = state_arrays(model)
    assert not fixed & set(sent) and "tabular.mlp.0.weight" in sent


def test_image_model_sites_get_no_records_and_clinical_model_needs_them(data, tmp_path):
    arrays, classes = data
    layout = prepare_federation(_cfg(), arrays, classes, PREP, tmp_path / "img", threads=1)
    assert layout.spec.model.schema is None
    assert "schema" not in json.loads(layout.spec.client_spec.to_json())["model"]
    site = load_site(next(iter(layout.sites.values())))
    assert site.train.clinical is None and site.train.x is not None
    images_only = {k: SplitArrays(x=v.x, y=v.y, ids=v.ids) for k, v in arrays.items()}
    with pytest.raises(ConfigError, match="reads clinical records"):
        prepare_federation(_cfg(*FUSION), images_only, classes, PREP, tmp_path / "f", threads=1)


@pytest.mark.parametrize(
    "privacy",
    [
        {"mode": "dp_sgd", "noise_multiplier": 1.0, "max_grad_norm": 1.0, "epsilon": None},
        {"mode": "secagg_dp", "epsilon": 8.0, "update_norm_bound": 5.0},
        {"mode": "central_dp", "epsilon": 8.0},
    ],
    ids=["dp_sgd", "secagg_dp", "central_dp"],
)
def test_fusion_federation_with_private_training(data, tmp_path, privacy):
    """DP-SGD (Opacus per-sample gradients through both branches, Poisson batches of image and
    record tuples) at each site, alone and under SecAgg+; central DP noise on the aggregate.
    The schema's statistics are never exchanged, so no noise or bound touches them."""
    arrays, classes = data
    overrides = {"privacy": privacy}
    cfg = tiny_cfg(
        "training=federated",
        "seed=3",
        *FUSION,
        trainer={"batch_size": 8, "lr": 0.05, "imbalance": "none", "augment": False},
        federation={"engine": "inline", "num_sites": 2, "partition": "iid", "rounds": 1},
        **overrides,
    )
    layout = prepare_federation(cfg, arrays, classes, PREP, tmp_path / "fed", threads=1)
    result = run_prepared(layout)
    row = result.history[0]
    assert row["accepted"] == 2 and row["aggregated"]
    if privacy["mode"] != "central_dp":
        assert layout.spec.model.architecture["norm"] == "group"
        assert all(site["dp_epsilon"] > 0 for site in row["sites"].values())
    assert result.privacy["epsilon"] > 0
    encoder = result.model.tabular
    assert float(encoder.scale[0]) == 10.0 and float(encoder.fill[1]) == 0.5


@pytest.mark.parametrize("strategy", ["median", "krum"])
def test_fusion_federation_under_robust_rules(data, tmp_path, strategy):
    arrays, classes = data
    cfg = _cfg(*FUSION, f"federation={strategy}", num_sites=5, partition="iid")
    result = run_prepared(prepare_federation(cfg, arrays, classes, PREP, tmp_path / "f", threads=1))
    row = result.history[0]
    assert row["aggregated"] and row["accepted"] >= 3
    assert np.isfinite(row["server"]["loss"])


def _regional_table(root, rows: int = 90) -> list[str]:
    """A tabular-only clinical table whose `region` column also names each row's site."""
    import pandas as pd

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, rows)
    pd.DataFrame(
        {
            "pid": [f"P{i % 40}" for i in range(rows)],
            "region": rng.choice(["north", "south", "east"], rows),
            "score": np.round(labels * 5 + rng.normal(0, 0.5, rows), 2),
            "outcome": [CLASSES[label] for label in labels],
        }
    ).to_csv(root / "table.csv", index=False)
    return list(CLASSES)


def test_sites_by_a_clinical_column(tmp_path):
    """dataset.clinical.site=region: ingest writes each row's region as its manifest `site`;
    federation.partition=given then makes one site per region, each holding its own records."""
    from components.data.cache import load_split_arrays
    from components.data.ingest import ingest_table
    from components.federated.partition import site_column

    classes = _regional_table(tmp_path)
    features = (
        "[{name:score,type:float,min:-5,max:15},"
        "{name:region,type:category,allowed:[north,south,east]}]"
    )
    cfg = _cfg(
        "model=tabular",
        "dataset.adapter=table",
        "dataset.clinical.table=table.csv",
        "dataset.clinical.key=null",
        "dataset.clinical.label=outcome",
        "dataset.clinical.group=pid",
        f"dataset.clinical.features={features}",
        "dataset.clinical.site=region",
        partition="given",
        num_sites=None,
    )
    clinical = cfg["dataset"]["clinical"]
    frame = ingest_table(tmp_path, clinical, classes)
    np.testing.assert_array_equal(frame["site"], frame["clin__region"])
    frame["clin__score"] = frame["clin__score"].astype(float)  # as validation types it
    frame["split"] = np.where(np.arange(len(frame)) % 5 == 0, "test", "train")
    frame.loc[np.arange(len(frame)) % 5 == 1, "split"] = "val"
    arrays = load_split_arrays(
        frame, classes, PREP, tmp_path / "cache", schema=clinical["features"]
    )
    groups = {s: site_column(frame, arrays[s].ids) for s in ("train", "val")}
    layout = prepare_federation(
        cfg, arrays, classes, PREP, tmp_path / "fed", site_groups=groups, threads=1
    )
    assert sorted(layout.sites) == ["east", "north", "south"]
    region = TabularLayout.from_schema(clinical["features"]).features[1]
    for name, site_dir in layout.sites.items():
        site = load_site(site_dir)
        hot = site.train.clinical[:, list(region.columns)].argmax(1)
        assert {region.allowed[i] for i in hot} == {name}  # each site holds its region's rows
    result = run_prepared(layout)
    assert set(result.history[0]["sites"]) == {"east", "north", "south"}


def test_site_column_may_not_be_the_label_or_the_patient(tmp_path):
    base = (
        "dataset.adapter=table",
        "dataset.clinical.table=t.csv",
        "dataset.clinical.label=outcome",
        "dataset.clinical.group=pid",
        "dataset.clinical.features=[{name:score,type:float}]",
    )
    for column in ("outcome", "pid"):
        with pytest.raises(ConfigError, match="name the site by a feature"):
            tiny_cfg(*base, f"dataset.clinical.site={column}")


def test_real_sites_prepare_their_records_and_train_a_fusion_model(tmp_path):
    """Two hospitals prepare their own paired folders (images + clinical table: ingest, the
    clinical suite, records encoded by the configured schema); the coordinator's spec carries
    that schema from the config alone and the federated evaluation runs at the sites."""
    from components.data.synthetic import write_synthetic_clinical_folder
    from components.federated import approval, site_prepare
    from components.federated.coordinator import (
        FederationConnection,
        coordinator_layout,
        request_path,
    )
    from components.federated.result import load_result
    from components.federated.task import site_test_split

    cfg = tiny_cfg(
        "training=federated",
        "dataset=synthetic_clinical",
        "dataset.split.near_duplicates=false",
        *FUSION,
        "model.norm=group",
        validation={"min_per_class": 2},
        trainer={"batch_size": 8, "imbalance": "none"},
        federation={"engine": "inline", "rounds": 1, "local_epochs": 1, "min_fit_sites": 2},
    )
    dirs = {}
    for seed, name in enumerate(("north", "south")):
        folder = tmp_path / "data" / name
        write_synthetic_clinical_folder(folder, n_per_class=10, size=32, seed=seed)
        ctx = site_prepare.site_context(cfg, folder, name, tmp_path / "sites" / name)
        frame = site_prepare.split_site(ctx, site_prepare.ingest_site(ctx))
        frame = site_prepare.validate_site(ctx, frame)
        arrays = site_prepare.site_arrays(ctx, frame)
        site_prepare.write_site_partition(ctx, arrays)
        stats = site_prepare.compute_site_stats(ctx, frame, arrays)
        dirs[name] = ctx.site_dir
        assert (ctx.site_dir / "clinical_validation_report.json").is_file()
        assert "marker" not in json.dumps(stats)  # no record statistic leaves the site
        test = site_test_split(ctx.site_dir)
        assert test.clinical.shape == (len(test.y), 6) and test.x is not None

    layout = coordinator_layout(cfg, list(dirs), tmp_path / "coord", site_dirs=dirs)
    assert [f["name"] for f in layout.spec.model.schema] == ["age", "smoker", "site", "marker"]
    request = approval.read_request(request_path(layout))
    for site_dir in dirs.values():
        approval.decide(site_dir, request, accept=True)  # no privacy limit at these sites
    FederationConnection(inline_sites=dict(layout.sites)).run(layout, "federate")
    result = load_result(layout)
    assert result.history[0]["accepted"] == 2
    data = json.loads((layout.out_dir / "result.json").read_text())
    assert set(data["federated_evaluation"]["sites"]) == set(dirs)
    assert float(result.model.tabular.fill[0]) == pytest.approx(59.0)  # middle of [18, 100]


def test_given_sites_without_any_site_value_are_refused(tmp_path):
    from components.errors import DataError

    cfg = _cfg("model=tabular", partition="given", num_sites=None)
    with pytest.raises(DataError, match="found no site for any training row"):
        prepare_federation(cfg, _arrays(images=False), list(CLASSES), PREP, tmp_path / "f")


def test_an_unbounded_numeric_feature_is_named_in_a_warning(caplog):
    from components.federated.task import ModelSpec

    schema = [
        {"name": "score", "type": "float"},
        {"name": "age", "type": "int", "min": 0, "max": 9},
    ]
    spec = ModelSpec(
        {"name": "tabular_mlp", "num_classes": 3}, PREP.to_dict(), ["a", "b", "c"], schema
    )
    with caplog.at_level("WARNING"):
        spec.warn_unscaled()
    assert "score has no [min, max]" in caplog.text and "age" not in caplog.text
    model = spec.build()
    assert float(model.encoder.scale[0]) == 1.0 and float(model.encoder.scale[1]) == 4.5
