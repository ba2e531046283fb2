"""The BentoML diagnosis service over real HTTP: one `bentoml serve` for the whole module.

The served bundle is a seeded, untrained small_cnn: this module checks serving mechanics
(loading, preprocessing parity, auth, error handling), not model quality. In the product only
trained, registered bundles are packaged.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import time
import zlib

import httpx
import pytest

from components.errors import ConfigError
from serving.client import DiagnosisClient, ServiceError

pytestmark = pytest.mark.integration

CLASSES = ["benign", "malignant", "normal"]
KEY = "test-key-123"


# ---------------------------------------------------------------- images


def png_bytes(size=(48, 40), seed: int = 0, mode: str = "RGB") -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype="uint8"), mode).save(buffer, "PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A syntactically valid PNG signature + IHDR claiming `width`x`height`, tiny IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def animated_gif() -> bytes:
    from PIL import Image

    frames = [Image.new("L", (16, 16), v) for v in (0, 128, 255)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


def dicom_bytes() -> bytes:
    """A 12-bit MONOCHROME2 DICOM carrying a patient name and id (must never reach the logs)."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.PatientName, ds.PatientID, ds.Modality = "ROE^RICHARD", "PID-778899", "MR"
    pixels = (np.arange(24 * 30, dtype=np.uint16).reshape(24, 30) * 5) % 4000
    ds.set_pixel_data(pixels, "MONOCHROME2", 12)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    import torch

    from components.bundle import ModelBundle
    from components.data.preprocess import Preprocessing
    from components.models import build_model

    kwargs = {"num_classes": len(CLASSES), "in_channels": 3, "width": 4}
    torch.manual_seed(3)
    model = build_model("small_cnn", **kwargs)
    bundle = ModelBundle(
        architecture="small_cnn",
        architecture_kwargs=kwargs,
        class_names=CLASSES,
        preprocessing=Preprocessing(size=32, channels=3),
        state_dict=model.state_dict(),
        metrics={"macro_f1": 0.42, "per_class": {"benign": {"sensitivity": 0.5}}},
        data_fingerprint="d" * 64,
        privacy={"epsilon": 8.0, "delta": 1e-5},
    )
    return bundle.save(tmp_path_factory.mktemp("bundle") / "b")


@pytest.fixture(scope="module")
def bento_home(tmp_path_factory):
    return tmp_path_factory.mktemp("bentoml")


def run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter (BentoML's store location is fixed per process)."""
    from serving.launch import PROJECT_ROOT

    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def model_tag(bundle_dir, bento_home):
    code = (
        "from serving.packaging import import_bundle; print(import_bundle("
        f"{str(bundle_dir)!r}, labels={{'registered_model': 'oncoflow-test', "
        "'version': '7'}))"
    )
    done = run_python(code, {"BENTOML_HOME": str(bento_home), "BENTOML_DO_NOT_TRACK": "true"})
    assert done.returncode == 0, done.stderr
    tag = done.stdout.strip().splitlines()[-1]
    assert tag.startswith("oncoflow-model:")
    return tag


@pytest.fixture(scope="module")
def server(start_server, port, model_tag, bento_home):
    """One real `bentoml serve` for this module; yields (base_url, seconds until ready)."""
    from serving.launch import PROJECT_ROOT, serve_command, serve_env

    env = serve_env(model_tag, bento_home, base={})
    env |= {"ONCOFLOW_API_KEYS": f"other-key, {KEY}", "ONCOFLOW_MAX_REQUEST_MB": "1"}
    env.pop("ONCOFLOW_ALLOW_NO_AUTH", None)
    proc = start_server(serve_command("127.0.0.1", port), env, PROJECT_ROOT)
    base = f"http://127.0.0.1:{port}"
    waited = proc.wait_until(f"{base}/readyz")
    print(f"bentoml serve ready after {waited:.1f} s")
    yield base, proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    with DiagnosisClient(server[0], api_key=KEY, timeout=60) as c:
        yield c


def in_process_probabilities(bundle_dir, image: bytes) -> list[float]:
    import torch

    from components.bundle import ModelBundle
    from components.data.images import decode_bytes

    bundle = ModelBundle.load(bundle_dir)
    model = bundle.build_model()
    with torch.inference_mode():
        x = bundle.preprocessing.to_tensor(decode_bytes(image)).unsqueeze(0)
        return torch.softmax(model(x), dim=1)[0].tolist()


# ---------------------------------------------------------------- over HTTP


def test_probes_are_open(server):
    base, _ = server
    for path in ("/readyz", "/livez", "/metrics"):
        assert httpx.get(base + path, timeout=10).status_code == 200, path


def test_predict_matches_the_in_process_model(client, bundle_dir, model_tag):
    for seed in (0, 1):
        image = png_bytes(seed=seed)
        answer = client.predict(image, "scan.png")
        expected = in_process_probabilities(bundle_dir, image)
        assert list(answer.probabilities) == CLASSES
        assert [answer.probabilities[c] for c in CLASSES] == pytest.approx(expected, abs=1e-5)
        assert sum(answer.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert answer.label == CLASSES[max(range(3), key=expected.__getitem__)]
        assert answer.model.tag == model_tag
        assert (answer.model.name, answer.model.version) == ("oncoflow-test", "7")
        assert answer.latency_ms > 0


def test_dicom_is_accepted_and_matches_in_process(client, bundle_dir):
    data = dicom_bytes()
    answer = client.predict(data, "scan.dcm")
    expected = in_process_probabilities(bundle_dir, data)
    assert [answer.probabilities[c] for c in CLASSES] == pytest.approx(expected, abs=1e-5)


def test_grayscale_and_jpeg_are_accepted(client):
    from PIL import Image

    buffer = io.BytesIO()
    Image.open(io.BytesIO(png_bytes(seed=5))).save(buffer, "JPEG")
    for image, name in ((png_bytes(mode="L"), "g.png"), (buffer.getvalue(), "c.jpg")):
        assert set(client.predict(image, name).probabilities) == set(CLASSES)


def test_auth_is_required(server):
    base, _ = server
    files = {"image": ("x.png", png_bytes(), "image/png")}
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": KEY},
        {"Authorization": "Basic " + KEY},
    ):
        for method, path in (("POST", "/predict"), ("GET", "/model_card")):
            kwargs = {"files": files} if method == "POST" else {}
            response = httpx.request(method, base + path, headers=headers, timeout=30, **kwargs)
            assert response.status_code == 401, (headers, path)
            assert response.json()["error"]["type"] == "Unauthorized"
    second_key = httpx.get(
        base + "/model_card", timeout=30, headers={"Authorization": "Bearer other-key"}
    )
    assert second_key.status_code == 200


BAD_INPUTS = {
    "empty": (b"", "image/png", "empty"),
    "text": (b"hello, this is not an image", "text/plain", "not an image"),
    "truncated": (png_bytes(size=(200, 200))[:400], "image/png", "truncated"),
    "bomb": (png_header_only(16000, 16000), "image/png", "too large"),
    "absurd": (png_header_only(1, 100_000), "image/png", "absurd"),
    "multiframe": (animated_gif(), "image/gif", "frames"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_images_get_a_4xx_json_error(server, client, case):
    base, _ = server
    data, content_type, phrase = BAD_INPUTS[case]
    response = httpx.post(
        base + "/predict",
        files={"image": ("f", data, content_type)},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=30,
    )
    assert 400 <= response.status_code < 500, response.text
    error = response.json()["error"]
    assert error["type"] == "InputError" and response.status_code == 422
    assert phrase in error["message"].lower() or phrase in error["message"], error
    assert client.predict(png_bytes(), "ok.png").label in CLASSES  # still healthy


def test_wrong_request_shapes_are_4xx_json(server, client):
    base, _ = server
    auth = {"Authorization": f"Bearer {KEY}"}
    png = ("f.png", png_bytes(), "image/png")
    cases = {  # name: (request kwargs, expected status, phrase in the message)
        "missing field": ({"files": {"picture": png}}, 422, "missing multipart file field"),
        "extra field": ({"files": {"image": png, "other": png}}, 422, "exactly one"),
        "text not file": (
            {"files": {"image": (None, b"http://127.0.0.1:1/x")}},
            422,
            "file upload",
        ),
        "json body": ({"json": {"image": "x"}}, 415, "multipart/form-data"),
        "no body": ({}, 415, "multipart/form-data"),
        "broken multipart": (
            {
                "content": b"--xx\r\nnot a part",
                "headers": {"Content-Type": "multipart/form-data; boundary=xx"},
            },
            422,
            "malformed multipart",
        ),
        "oversized": ({"files": {"image": ("f", bytes(1_200_000), "image/png")}}, 413, "1 MB"),
    }
    for name, (kwargs, status, phrase) in cases.items():
        headers = auth | kwargs.pop("headers", {})
        response = httpx.post(base + "/predict", headers=headers, timeout=30, **kwargs)
        assert response.status_code == status, (name, response.text)
        assert phrase in response.json()["error"]["message"], (name, response.text)
    with pytest.raises(ServiceError) as info:
        client.predict(b"", "empty.png")
    assert info.value.status == 422 and info.value.type == "InputError"
    assert client.predict(png_bytes(), "ok.png").label in CLASSES


def test_streamed_oversize_body_without_length_is_refused(server):
    base, _ = server

    def chunks():
        for _ in range(40):
            yield b"x" * 65536

    response = httpx.post(
        base + "/predict",
        content=chunks(),
        timeout=30,
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 413, response.text
    assert response.json()["error"]["type"] == "PayloadTooLarge"


def test_model_card(client, model_tag):
    card = client.model_card()
    assert card.classes == CLASSES
    assert card.architecture == "small_cnn"
    assert card.architecture_kwargs["width"] == 4
    assert card.metrics["macro_f1"] == pytest.approx(0.42)
    assert card.data_fingerprint == "d" * 64
    assert card.privacy == {"epsilon": 8.0, "delta": 1e-5}
    assert card.preprocessing["size"] == 32
    assert card.model.tag == model_tag and card.intended_use
    assert client.ready()


def test_unknown_route_is_json_404(server):
    base, _ = server
    response = httpx.get(base + "/nope", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert response.status_code == 404 and response.json()["error"]["type"] == "NotFound"


def test_server_logs_no_identifiers(server, client):
    base, proc = server
    client.predict(png_bytes(seed=9), "Doe_John_1970-01-01.png")
    httpx.post(
        base + "/predict",
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=30,
        files={"image": ("Doe_Jane_secret.png", b"junk", "image/png")},
    )
    client.predict(dicom_bytes(), "scan.dcm")
    time.sleep(0.5)
    log = proc.log_path.read_text(errors="replace")
    for secret in ("Doe_", KEY, "ROE", "RICHARD", "PID-778899"):
        assert secret not in log, secret


# ---------------------------------------------------------------- start-up refusals


def test_no_api_keys_refuses_to_start_unless_opted_out():
    from serving.middleware import load_api_keys

    with pytest.raises(ConfigError, match="ONCOFLOW_API_KEYS"):
        load_api_keys({})
    with pytest.raises(ConfigError):
        load_api_keys({"ONCOFLOW_API_KEYS": " , "})
    assert load_api_keys({"ONCOFLOW_ALLOW_NO_AUTH": "1"}) is None
    assert load_api_keys({"ONCOFLOW_API_KEYS": "a, b,"}) == ("a", "b")


def test_serve_refuses_to_start_without_a_model(tmp_path):
    code = "from serving.launch import serve; serve(None, '127.0.0.1', 1)"
    done = run_python(code, {"BENTOML_HOME": str(tmp_path), "ONCOFLOW_API_KEYS": KEY})
    assert done.returncode != 0
    assert "ModelError: no model 'oncoflow-model:latest'" in done.stderr
    assert "never serves an untrained model" in done.stderr


def test_serve_refuses_to_start_without_keys(tmp_path):
    code = "from serving.launch import serve; serve(None, '127.0.0.1', 1)"
    env = {"BENTOML_HOME": str(tmp_path), "ONCOFLOW_API_KEYS": "", "ONCOFLOW_ALLOW_NO_AUTH": ""}
    done = run_python(code, env)
    assert done.returncode != 0 and "ConfigError: no API keys configured" in done.stderr
