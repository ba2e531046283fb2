"""Images with clinical records through the whole pipeline: real Prefect, MLflow on SQLite and
`bentoml serve`, on the seeded paired synthetic dataset (dataset=synthetic_clinical: the image
shows a lesion, only the record tells benign from malignant).

A fusion run trains, compares itself with its baselines on the same patient-level test split,
registers and packages; a tabular run and an image-only run on the same data are registered but
may not replace the fusion champion (they read other inputs); the served fusion champion answers
with a record and refuses a malformed one with a 4xx naming the field.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import pandas as pd
import pytest
from cli_runs import ONCOFLOW, ROOT, run_oncoflow, workspace_env
from server_process import free_port

pytestmark = pytest.mark.integration
PAIRED = [
    "dataset=synthetic_clinical",
    "dataset.synthetic.n_per_class=60",
    "trainer.batch_size=16",
    "trainer.augment=false",
]
FUSION = [
    "model=fusion",
    "model.image_architecture=small_cnn",
    "model.pretrained=false",
    "model.small_input=true",
    "model.width=8",
    "trainer.max_epochs=8",
]
RECORD = {"age": 50, "smoker": False, "site": "arm", "marker": 7.5}


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    return workspace_env(tmp_path_factory.mktemp("clinical-workspace"))


@pytest.fixture(scope="module")
def fusion_run(env) -> dict:
    return run_oncoflow(["run", *PAIRED, *FUSION], env)


@pytest.fixture(scope="module")
def tabular_run(env, fusion_run) -> dict:
    args = ["run", *PAIRED, "model=tabular", "trainer.max_epochs=30", "package.build_bento=false"]
    return run_oncoflow(args, env)


@pytest.fixture(scope="module")
def image_run(env, tabular_run) -> dict:
    args = ["run", *PAIRED, "model=small_cnn", "model.width=8", "trainer.max_epochs=3"]
    return run_oncoflow([*args, "package.build_bento=false"], env)


def test_fusion_run_compares_itself_with_both_baselines(fusion_run):
    assert fusion_run["champion"] is True and fusion_run["bento_model"]
    comparison = fusion_run["comparison"]
    assert set(comparison["metrics"]) == {"fusion", "image_only", "clinical_logistic_regression"}
    fusion = comparison["metrics"]["fusion"]
    # neither input alone can tell all three classes apart; together they can
    for baseline in ("image_only", "clinical_logistic_regression"):
        assert fusion["macro_f1"] > comparison["metrics"][baseline]["macro_f1"], comparison
    assert comparison["beats_all_baselines"] is True
    assert comparison["verdict"].startswith("fusion beats every baseline")
    assert fusion_run["test_metrics"]["dangerous_auroc"] > 0.8
    run_dir = Path(fusion_run["run_dir"])
    saved = json.loads((run_dir / "comparison.json").read_text())
    assert saved["metrics"] == comparison["metrics"]


def test_patients_never_share_splits_and_the_bundle_carries_the_schema(fusion_run):
    run_dir = Path(fusion_run["run_dir"])
    manifest = pd.read_parquet(run_dir / "manifest.parquet")
    splits_per_patient = manifest.groupby("group")["split"].nunique()
    assert len(splits_per_patient) > 20 and splits_per_patient.max() == 1
    assert not manifest["group"].str.startswith("P0").any()  # kept only as a hash
    meta = json.loads((run_dir / "bundle" / "bundle.json").read_text())
    assert meta["architecture"] == "fusion"
    assert [f["name"] for f in meta["tabular_schema"]] == ["age", "smoker", "site", "marker"]
    assert "imputation record" in meta["contents"]["background"]
    assert meta["contents"]["training_images"] is False
    assert "tabular_schema" not in meta["architecture_kwargs"]


def test_a_model_reading_other_inputs_does_not_replace_the_champion(fusion_run, tabular_run):
    assert tabular_run["model_version"] == "2"
    assert tabular_run["champion"] is False
    assert "not comparable: the candidate reads clinical" in tabular_run["gate_reason"]
    assert set(tabular_run["comparison"]["metrics"]) == {
        "tabular_mlp",
        "clinical_logistic_regression",
    }


def test_an_image_model_on_the_same_data_reads_the_images_only(fusion_run, image_run):
    assert image_run["model_version"] == "3" and image_run["champion"] is False
    assert (
        "not comparable: the candidate reads image, the champion image+clinical"
        in (image_run["gate_reason"])
    )
    assert image_run["comparison"] is None  # an image model has no clinical baselines
    meta = json.loads((Path(image_run["run_dir"]) / "bundle" / "bundle.json").read_text())
    assert meta["architecture"] == "small_cnn" and meta["tabular_schema"] is None


def test_served_fusion_champion_reads_the_record_and_names_a_bad_field(
    fusion_run, tabular_run, env, start_server
):
    from PIL import Image

    from components.data.synthetic import make_synthetic

    port = free_port()
    key = "clinical-e2e-key"
    server = start_server(
        [*ONCOFLOW, "serve", "--port", str(port), "--model", fusion_run["bento_model"]],
        {**env, "ONCOFLOW_API_KEYS": key},
        ROOT,
    )
    server.wait_until(f"http://127.0.0.1:{port}/readyz", timeout_s=240)
    lesion = make_synthetic(n_per_class=1, size=32, seed=5)
    buffer = io.BytesIO()
    Image.fromarray(lesion.images[list(lesion.labels).index(1)]).save(buffer, "PNG")
    png = buffer.getvalue()
    headers = {"Authorization": f"Bearer {key}"}
    url = f"http://127.0.0.1:{port}/predict"

    def predict(record) -> httpx.Response:
        data = {} if record is None else {"clinical": json.dumps(record)}
        files = {"image": ("case.png", png, "image/png")}
        return httpx.post(url, files=files, data=data, headers=headers, timeout=60)

    high = predict(RECORD)
    assert high.status_code == 200, high.text
    low = predict({**RECORD, "marker": 2.0})
    assert low.status_code == 200, low.text
    p_high, p_low = high.json()["probabilities"], low.json()["probabilities"]
    # the same lesion: a high marker makes malignant more likely than a low one
    assert p_high["malignant"] > p_low["malignant"]
    assert p_low["benign"] > p_high["benign"]

    missing = predict({k: v for k, v in RECORD.items() if k != "marker"})
    assert 400 <= missing.status_code < 500 and "marker" in missing.text
    wrong = predict({**RECORD, "site": "knee"})
    assert 400 <= wrong.status_code < 500 and "site" in wrong.text
    assert 400 <= predict(None).status_code < 500
