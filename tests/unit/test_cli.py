"""The CLI answers fast and turns user errors into one line without a traceback."""

from __future__ import annotations

import subprocess
import sys

from flows.cli import main


def test_help_lists_commands(capsys):
    try:
        main(["--help"])
    except SystemExit as exc:
        assert exc.code == 0
    out = capsys.readouterr().out
    for command in ("run", "validate", "serve", "fl", "ui", "prefect", "demo", "config"):
        assert command in out


def test_help_imports_nothing_heavy():
    code = (
        "import sys; from flows.cli import _parser; _parser();"
        "heavy = [m for m in ('torch', 'prefect', 'mlflow', 'gradio', 'great_expectations',"
        " 'bentoml', 'hydra') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_config_command_prints_composed_yaml(capsys):
    assert main(["config", "dataset=busi", "trainer.max_epochs=2"]) == 0
    out = capsys.readouterr().out
    assert "name: busi" in out
    assert "max_epochs: 2" in out


def test_user_error_is_one_line_without_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "config", "trainer.imbalance=magic"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("oncoflow: error: trainer.imbalance='magic'")
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_fl_certs_command_writes_a_ca_and_server_certificate(tmp_path, capsys):
    assert main(["fl", "certs", str(tmp_path / "certs"), "--site", "site-1"]) == 0
    out = capsys.readouterr().out
    for name in ("ca_cert", "server_cert", "server_key"):
        assert name in out
    assert (tmp_path / "certs").is_dir()
    assert any((tmp_path / "certs").rglob("*.crt")) or any((tmp_path / "certs").rglob("*.pem"))


def test_fl_certs_takes_the_directory_as_out_option_too(tmp_path, capsys):
    assert main(["fl", "certs", "--out", str(tmp_path / "certs")]) == 0
    assert "ca_cert" in capsys.readouterr().out
    assert any((tmp_path / "certs").rglob("*.crt"))
    try:
        main(["fl", "certs", str(tmp_path / "a"), "--out", str(tmp_path / "b")])
    except SystemExit as exc:
        assert exc.code == 2
    else:
        raise AssertionError("two output directories were accepted")


def test_fl_request_writes_the_spec_the_coordinator_flow_will_run(tmp_path, monkeypatch, capsys):
    """Sites on other machines approve `fl request`'s file before `fl coordinate` runs: it must
    name the very spec the coordinator's flow builds from the same sites and overrides."""
    import json

    from components.config import compose, to_container
    from components.federated import approval
    from components.federated.coordinator import coordinator_layout, request_path

    monkeypatch.setenv("ONCOFLOW_WORKSPACE", str(tmp_path / "ws"))
    overrides = ["dataset.adapter=folder", "federation.rounds=2"]
    out = tmp_path / "request.json"
    assert main(["fl", "request", "--site", "a", "--site", "b", "--out", str(out), *overrides]) == 0
    sent = approval.read_request(out)
    cfg = to_container(compose(["training=federated", *overrides]))
    flow_side = coordinator_layout(cfg, ["a", "b"], tmp_path / "run" / "federation")
    assert (
        sent["spec_fingerprint"]
        == approval.read_request(request_path(flow_side))["spec_fingerprint"]
    )
    assert json.loads(capsys.readouterr().out)["sites"] == ["a", "b"]


def test_library_housekeeping_stays_out_of_the_terminal_unless_verbose():
    code = (
        "import logging, sys; from flows.cli import main; main(sys.argv[1:]);"
        "logging.getLogger('great_expectations._docs_decorators').info('gx housekeeping');"
        "logging.getLogger('httpx').info('HTTP Request: GET');"
        "logging.getLogger('httpx').warning('httpx trouble');"
        "logging.getLogger('components.training.progress').info('epoch 1/3')"
    )

    def logged(*argv: str) -> str:
        run = [sys.executable, "-c", code, *argv, "config"]
        return subprocess.run(run, capture_output=True, text=True, check=True).stderr

    quiet, verbose = logged(), logged("--verbose")
    assert "epoch 1/3" in quiet and "httpx trouble" in quiet
    assert "gx housekeeping" not in quiet and "HTTP Request" not in quiet
    assert "gx housekeeping" in verbose and "HTTP Request" in verbose
