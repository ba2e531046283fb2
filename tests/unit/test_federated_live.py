"""Live and diagnosable federated runs (issue #14, item 5), on the inline engine with a real
MLflow on SQLite: each round reaches MLflow while the next one runs, with its real end time;
a failing site shows in the ledger, the MLflow tags and `oncoflow fl status` with a sanitised
reason; `fl status` reads a finished or failed run from the coordinator's files alone."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from tiny_config import tiny_cfg

from components.data.preprocess import Preprocessing
from components.data.synthetic import make_synthetic
from components.errors import DataError
from components.federated.checkpoint import read_ledger
from components.federated.client_app import build_client_app
from components.federated.inline import InlineGrid
from components.federated.layout import prepare_federation
from components.federated.reasons import classify, site_error
from components.federated.server_app import run_federation
from components.federated.status import RUN_STATE, read_status
from components.registry import RegistryClient
from flows.cli import main as oncoflow
from flows.live_rounds import live_federation

SIZE = 16
PREP = Preprocessing(size=SIZE, channels=3)
SECRET = "/data/hospital-3/patient-0042.png"  # what a site's exception text may carry


@pytest.fixture(scope="module")
def data():
    d = make_synthetic(n_per_class=20, size=SIZE, seed=0)
    x, y = d.images.transpose(0, 3, 1, 2).copy(), d.labels
    a, b = int(len(y) * 0.6), int(len(y) * 0.75)
    return {"train": (x[:a], y[:a]), "val": (x[a:b], y[a:b]), "test": (x[b:], y[b:])}, d.class_names


def prepare(data, root: Path, **federation):
    fed = {"engine": "inline", "num_sites": 3, "partition": "iid", "local_epochs": 1}
    cfg = tiny_cfg(
        "training=federated",
        "seed=3",
        "model.norm=group",
        trainer={"batch_size": 8, "imbalance": "none", "augment": False},
        federation=fed | federation,
    )
    arrays, classes = data
    return prepare_federation(cfg, arrays, classes, PREP, root, threads=1), cfg


def inline_grid(layout) -> InlineGrid:
    return InlineGrid(build_client_app(), [{"data-dir": str(p)} for p in layout.sites.values()])


def message_round(message) -> int:
    """The round a train/evaluate message belongs to; 0 for the messages after the last round
    (calibration exchanges and the final evaluation carry the last round's number)."""
    from components.federated.protocol import CALIBRATE_KEY, FINAL_KEY

    config = message.content["config"]
    if CALIBRATE_KEY in config or FINAL_KEY in config:
        return 0
    return int(config.get("server-round", 0))


@pytest.fixture
def registry(tmp_path):
    return RegistryClient(f"sqlite:///{tmp_path}/mlflow/mlflow.db")


def status_output(capsys, root: Path, *extra: str) -> tuple[int, str]:
    capsys.readouterr()
    code = oncoflow(["fl", "status", str(root), *extra])
    return code, capsys.readouterr().out


def test_each_round_reaches_mlflow_before_the_next_one_ends(data, tmp_path, registry, capsys):
    layout, cfg = prepare(data, tmp_path / "fed", rounds=3)
    run_id = registry.start_training_run("live", cfg, {"training": "federated"})
    grid = inline_grid(layout)
    original = grid.send_and_receive
    seen_during: dict[int, list[int]] = {}

    def send_and_receive(messages, *, timeout=None):
        messages = list(messages)
        current = message_round(messages[0])
        if messages[0].metadata.message_type == "evaluate" and current >= 2:
            # round `current` has not ended: wait (bounded) until MLflow shows round current-1
            deadline = time.monotonic() + 30
            steps: list[int] = []
            while time.monotonic() < deadline:
                history = registry.client.get_metric_history(run_id, "server.macro_f1")
                steps = sorted(m.step for m in history)
                if current - 1 in steps:
                    break
                time.sleep(0.1)
            seen_during[current] = steps
        return original(messages, timeout=timeout)

    grid.send_and_receive = send_and_receive
    with live_federation(registry, run_id, layout.out_dir, artifacts=False, poll_s=0.2) as w:
        run_federation(grid, layout.spec)
    assert w.logged == [1, 2, 3]
    # while round k+1 was still running, MLflow already held round k (and not round k+1)
    assert seen_during == {2: [1], 3: [1, 2]}

    ledger = read_ledger(layout.out_dir / "ledger.jsonl")
    ends = [row["ended_at"] for row in ledger]
    assert ends == sorted(ends) and len(set(ends)) == 3
    for row in ledger:
        assert row["started_at"] < row["ended_at"]
        assert row["accepted_sites"] == sorted(layout.sites) and row["failures"] == []
    history = registry.client.get_metric_history(run_id, "server.macro_f1")
    stamps = {m.step: m.timestamp for m in history}
    assert sorted(stamps) == [1, 2, 3]
    # the real end time of each round, distinct and increasing
    assert [stamps[k] for k in (1, 2, 3)] == [int(end * 1000) for end in ends]
    assert stamps[1] < stamps[2] < stamps[3]
    site_loss = registry.client.get_metric_history(run_id, "sites.site-2.train_loss")
    assert sorted(m.step for m in site_loss) == [1, 2, 3]
    tags = registry.client.get_run(run_id).data.tags
    assert tags["federation.status"] == "completed" and tags["federation.rounds_done"] == "3"
    assert tags["federation.failed_sites"] == "none"
    assert tags["federation.site.site-1"] == "accepted"

    # `oncoflow fl status` on the finished run, from the coordinator's files alone
    code, out = status_output(capsys, layout.root)
    assert code == 0
    assert "state:       completed" in out and "rounds:      3/3" in out
    for site in layout.sites:
        assert any(line.split()[:3] == [site, "3", "accepted"] for line in out.splitlines())
    code, out = status_output(capsys, layout.root, "--json")
    status = json.loads(out)
    assert code == 0 and status["state"] == "completed" and status["rounds_done"] == 3
    assert status["last_round_at"] == pytest.approx(ends[-1])


def test_a_failing_site_shows_with_a_sanitised_reason(data, tmp_path, registry, capsys):
    layout, cfg = prepare(data, tmp_path / "fed", rounds=2, min_fit_sites=2)
    run_id = registry.start_training_run("failing-site", cfg)
    grid = inline_grid(layout)
    app = grid._app

    def flaky(message, context):  # site-3's machine breaks from round 2 on
        if context.node_id == 3 and message_round(message) >= 2:
            raise OSError(f"cannot read {SECRET}")
        return app(message, context)

    grid._app = flaky
    with live_federation(registry, run_id, layout.out_dir, artifacts=False, poll_s=0.2):
        result = run_federation(grid, layout.spec)
    assert result["status"] == "completed"

    first, second = read_ledger(layout.out_dir / "ledger.jsonl")
    assert first["failures"] == [] and second["accepted_sites"] == ["site-1", "site-2"]
    assert second["failed_sites"] == ["site-3"]
    expected = {"category": "site_error", "message": "the site's ClientApp raised OSError"}
    assert second["failures"] == [{"site": "site-3", "status": "failed", **expected}]
    assert second["sites"]["site-3"]["reason"] == expected

    tags = registry.client.get_run(run_id).data.tags
    assert tags["federation.failed_sites"] == "site-3"
    assert tags["federation.site.site-3"] == (
        "failed (site_error: the site's ClientApp raised OSError)"
    )
    assert tags["federation.site.site-1"] == "accepted"

    code, out = status_output(capsys, layout.root)
    assert code == 0  # the run completed with the other two sites
    line = next(line for line in out.splitlines() if line.startswith("site-3"))
    assert line.split()[:3] == ["site-3", "2", "failed"]
    assert "site_error: the site's ClientApp raised OSError" in line

    # nothing the site's exception carried reached the coordinator's records
    records = [p.read_text() for p in layout.out_dir.glob("*.json*")]
    records += [json.dumps(tags)]
    for text in records:
        assert "patient-0042" not in text and "hospital-3" not in text


def test_a_silent_site_shows_before_its_round_ends(data, tmp_path, registry, capsys):
    layout, cfg = prepare(data, tmp_path / "fed", rounds=2, min_fit_sites=2, round_timeout=5)
    run_id = registry.start_training_run("silent-site", cfg)
    grid = inline_grid(layout)
    original = grid.send_and_receive
    during: dict[str, object] = {}

    def send_and_receive(messages, *, timeout=None):
        messages = list(messages)
        kind, current = messages[0].metadata.message_type, message_round(messages[0])
        if kind == "train" and current == 2:  # site-3 (node 3) never answers round 2
            messages = [m for m in messages if m.metadata.dst_node_id != 3]
        if kind == "evaluate" and current == 2:  # round 2 is still running
            during["asked"] = sorted(m.metadata.dst_node_id for m in messages)
            deadline, tags = time.monotonic() + 30, {}
            while time.monotonic() < deadline:
                tags = registry.client.get_run(run_id).data.tags
                if tags.get("federation.failed_sites") == "site-3":
                    break
                time.sleep(0.1)
            during["tags"] = tags
            during["status"] = status_output(capsys, layout.root, "--json")
        return original(messages, timeout=timeout)

    grid.send_and_receive = send_and_receive
    with live_federation(registry, run_id, layout.out_dir, artifacts=False, poll_s=0.2):
        run_federation(grid, layout.spec)

    assert during["asked"] == [1, 2]  # a site that missed training is not asked to evaluate
    timeout = {"category": "timeout", "message": "no reply within round_timeout=5s"}
    assert during["tags"]["federation.failed_sites"] == "site-3"
    assert during["tags"]["federation.site.site-3"] == (
        "failed (timeout: no reply within round_timeout=5s)"
    )
    code, out = during["status"]
    live = json.loads(out)
    assert code == 0 and live["state"] == "running" and live["rounds_done"] == 1
    assert live["current"]["round"] == 2 and live["current"]["phase"] == "evaluating"
    site3 = next(s for s in live["sites"] if s["site"] == "site-3")
    assert (site3["round"], site3["status"], site3["category"]) == (2, "failed", "timeout")
    second = read_ledger(layout.out_dir / "ledger.jsonl")[1]
    assert second["failures"] == [{"site": "site-3", "status": "failed", **timeout}]


def test_a_failed_run_is_reported_by_fl_status_and_ends_the_mlflow_run(
    data, tmp_path, registry, capsys
):
    layout, cfg = prepare(data, tmp_path / "fed", rounds=2, connect_timeout=0.5)
    run_id = registry.start_training_run("no-sites", cfg)
    grid = inline_grid(layout)
    grid.offline.update({1, 2, 3})  # no SuperNode ever connects
    with (
        pytest.raises(DataError, match="0 of 3 site"),
        live_federation(registry, run_id, layout.out_dir, artifacts=False, poll_s=0.2),
    ):
        run_federation(grid, layout.spec)

    state = json.loads((layout.out_dir / RUN_STATE).read_text())
    assert state["state"] == "failed" and state["reason"]["category"] == "server_error"
    run = registry.client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["federation.status"] == "failed"
    assert "0 of 3 site" in run.data.tags["federation.reason"]

    code, out = status_output(capsys, layout.root)
    assert code == 1
    assert "state:       failed" in out and "rounds:      0/2" in out
    assert "reason:      server_error: " in out and "0 of 3 site" in out
    assert [line.split()[:3] for line in out.splitlines() if line.startswith("site-")] == [
        [site, "0", "absent"] for site in sorted(layout.sites)
    ]
    assert oncoflow(["fl", "status", str(tmp_path / "nowhere")]) == 2


def test_a_driver_that_stops_reporting_is_stalled(tmp_path):
    out = tmp_path / "server" / "out"
    out.mkdir(parents=True)
    state = {"state": "running", "rounds_planned": 3, "sites": ["a", "b"], "stall_after_s": 60}
    (out / RUN_STATE).write_text(json.dumps(state | {"updated_at": time.time() - 30}))
    assert read_status(tmp_path).state == "running"
    (out / RUN_STATE).write_text(json.dumps(state | {"updated_at": time.time() - 61}))
    status = read_status(tmp_path)
    assert status.state == "stalled" and not status.ok
    assert [s.site for s in status.sites] == ["a", "b"] and status.sites[0].status == "not seen"


@pytest.mark.parametrize(
    ("raw", "category", "message"),
    [
        (
            "<class 'components.errors.DataError'>:<'no site data in /srv/site-1 (missing x)'>",
            "site_data",
            "DataError: no site data in <path> (missing x)",
        ),
        ("KeyError: 'patient 0042'", "site_error", "the site's ClientApp raised KeyError"),
        (
            "<class 'torch.OutOfMemoryError'>:<'CUDA out of memory'>",
            "site_error",
            "the site's ClientApp raised OutOfMemoryError",
        ),
        (
            "Error: Node Unavailable — The destination node failed to report a heartbeat",
            "unavailable",
            "Node Unavailable: the site stopped answering (no heartbeat)",
        ),
        (
            "PrivacyBudgetExceeded: round 3 would raise this site's ε from 1.0 to 2.5",
            "refused",
            "PrivacyBudgetExceeded: round 3 would raise this site's ε from 1.0 to 2.5",
        ),
        ("refused by site: ε 8 exceeds this site's maximum 3", "refused", None),
        ("something\nwith /etc/passwd in it", "site_error", None),
    ],
)
def test_site_errors_are_reduced_to_a_category_and_a_safe_message(raw, category, message):
    reason = site_error(raw)
    assert reason.category == category
    if message is not None:
        assert reason.message == message
    assert "/srv" not in reason.message and "passwd" not in reason.message
    assert "patient" not in reason.message and "\n" not in reason.message
    assert classify(f"no update: {raw}") == reason
    assert classify(reason.text) == reason  # sanitising twice changes nothing


def test_a_site_sends_no_foreign_exception_text_to_the_coordinator():
    """Sanitised at the source: the error reply a site sends carries the class and, for
    oncoflow's own errors only, a path-free message; the coordinator reads it back the same."""
    from components.errors import DataError
    from components.federated.reasons import outgoing_error, site_error

    foreign = outgoing_error(OSError(f"cannot read {SECRET}"))
    assert "patient" not in foreign and "hospital" not in foreign
    assert site_error(foreign).message == "the site's ClientApp raised OSError"
    ours = outgoing_error(DataError(f"no training images in {SECRET}"))
    assert "patient" not in ours and "no training images in <path>" in ours
    assert site_error(ours).category == "site_data"
