"""The explanation process (serving.explainer): same answers as the engine in process, errors
kept by kind, a model it cannot load turns explanations off with the reason, no process left.
(Killed children and orphans under `oncoflow serve`: tests/integration/test_serve_crashes.py.)"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import os

import numpy as np
import pytest
import torch

from components.config import ServingConf
from components.errors import InputError
from serving.api_errors import Overloaded
from serving.explainer import ExplainerSpec, ExplanationProcess
from serving.prediction_load import PredictionLoad


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from components.bundle_builder import make_bundle
    from components.data.preprocess import Preprocessing
    from components.models import build_model
    from serving.engine import DiagnosisEngine
    from serving.schemas import ModelRef

    architecture = {"name": "small_cnn", "num_classes": 2, "in_channels": 3, "width": 4}
    torch.manual_seed(0)
    path = make_bundle(
        build_model(**architecture).eval(),
        architecture=architecture,
        class_names=["a", "b"],
        preprocessing=Preprocessing(size=16, channels=3),
        metrics={},
        data_fingerprint="f" * 64,
        config={},
        background_size=4,
        out_dir=tmp_path_factory.mktemp("bundle") / "b",
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the child (explain_threads=1): the same sums, the same maps
    yield DiagnosisEngine.from_dir(path, ModelRef(name="m", version="1", tag="m:1"))
    torch.set_num_threads(threads)


def png(seed: int = 0) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_answers_like_the_engine_and_keeps_error_kinds(engine):
    settings = ServingConf(explain_threads=1, shap_nsamples=3)  # the server's SHAP default
    explainer = ExplanationProcess(ExplainerSpec.of(engine, settings))
    explainer.start()

    async def calls():
        answer = await explainer.call("explain", image=png(), clinical=None, target="b")
        with pytest.raises(InputError, match="not an image"):
            await explainer.call("explain", image=b"not an image", clinical=None)
        with pytest.raises(InputError, match="unknown target class"):
            await explainer.call("explain", image=png(), clinical=None, target="c")
        both = await asyncio.gather(
            *(explainer.call("explain", image=png(s), clinical=None) for s in (1, 2))
        )
        pdf = await explainer.call("report", image=png(), clinical=None, case_id="C-1")
        return answer, both, pdf

    try:
        answer, both, pdf = asyncio.run(calls())
        pid = explainer.process.pid  # the lowest priority: predictions preempt it at once
        assert os.getpriority(os.PRIO_PROCESS, pid) == 19
        assert os.sched_getscheduler(pid) == os.SCHED_IDLE
    finally:
        explainer.close()
    local = engine.explain(engine.prepare(png()), target="b", nsamples=3)
    assert answer.heatmap_png == local.heatmap_png and answer.shap_png == local.shap_png
    assert answer.probabilities == pytest.approx(local.probabilities, abs=1e-6)
    assert answer.target == "b" and answer.shap_image == local.shap_image
    assert answer.shap_image.nsamples == 3
    for seed, got in zip((1, 2), both, strict=True):  # concurrent calls get their own answers
        assert got.heatmap_png == engine.explain(engine.prepare(png(seed))).heatmap_png
    assert pdf.startswith(b"%PDF")
    explainer.process.wait(timeout=10)  # closed: the child is gone
    assert explainer.starts == 1


def test_an_explanation_takes_the_server_s_sample_count_unless_it_names_one(engine):
    from components.bundle import ModelBundle
    from serving.engine import DiagnosisEngine

    five = DiagnosisEngine.from_dir(engine.model_dir, engine.ref, shap_nsamples=5)
    case = five.prepare(png())
    assert ServingConf().shap_nsamples is None  # by default each model's own count
    assert engine.explain(case).shap_image.nsamples == 8  # a bundle that names none
    bundle = ModelBundle.load(engine.model_dir)
    bundle.config = {**bundle.config, "package": {"shap_nsamples": 12}}
    assert DiagnosisEngine(bundle, engine.ref).explain(case).shap_image.nsamples == 12
    server = DiagnosisEngine(bundle, engine.ref, shap_nsamples=5)  # the server's count wins
    assert server.explain(case).shap_image.nsamples == 5
    assert five.explain(case).shap_image.nsamples == 5
    assert five.explain(case, nsamples=2).shap_image.nsamples == 2
    for bad in (0, 201, True, 2.5, "8"):
        with pytest.raises(InputError, match=r"nsamples must lie in 1\.\.200"):
            five.explain(case, nsamples=bad)
    with pytest.raises(InputError, match="nsamples"):
        DiagnosisEngine.from_dir(engine.model_dir, engine.ref, shap_nsamples=0)


def test_a_model_it_cannot_load_turns_explanations_off_with_the_reason(engine, tmp_path):
    spec = dataclasses.replace(
        ExplainerSpec.of(engine, ServingConf(explain_threads=1)), model_dir=str(tmp_path)
    )
    explainer = ExplanationProcess(spec, start_wait_s=120).start()
    with pytest.raises(Overloaded, match="could not load the model"):
        asyncio.run(explainer.call("explain", image=png(), clinical=None))
    assert explainer.starts == 1 and explainer.process.poll() is not None  # not restarted
    with pytest.raises(Overloaded, match="could not load the model"):  # at once from now on
        asyncio.run(explainer.call("explain", image=png(), clinical=None))


def test_the_child_takes_every_core_at_the_lowest_priority_unless_told(engine):
    from serving.process import EXPLAIN_NICENESS

    default = ExplainerSpec.of(engine, ServingConf())
    assert default.torch_threads == len(os.sched_getaffinity(0))
    assert default.niceness == EXPLAIN_NICENESS == 19
    assert ExplainerSpec.of(engine, ServingConf(explain_threads=1)).torch_threads == 1


def test_while_predictions_are_in_flight_the_child_waits_its_turn(engine):
    """Wired end to end: the worker's count reaches the child, which holds the next explanation
    back while predictions run (share 0.0001: 10,000 times the CPU time the last one used) and
    starts it as soon as they stop."""
    import time

    load = PredictionLoad()
    spec = dataclasses.replace(
        ExplainerSpec.of(engine, ServingConf(explain_threads=1)), share_under_load=0.0001
    )
    explainer = ExplanationProcess(spec, load=load).start()

    async def calls() -> tuple[bool, float]:
        await explainer.call("explain", image=png(), clinical=None)  # warm, not paced
        load.enter()  # a prediction is in flight from here on
        await explainer.call("explain", image=png(1), clinical=None)  # ran at once; now due
        held = asyncio.ensure_future(explainer.call("explain", image=png(2), clinical=None))
        await asyncio.sleep(1.0)  # < 10,000 x the 0.1+ ms of CPU an explanation takes
        waited = not held.done()
        load.leave()  # predictions stopped
        began = time.monotonic()
        await held
        return waited, time.monotonic() - began

    try:
        waited, after = asyncio.run(calls())
    finally:
        explainer.close()
    assert waited, "the explanation did not wait for the predictions in flight"
    assert after < 5.0  # it started once they stopped, not after the whole pause


def test_an_explanation_pass_holds_a_bounded_number_of_pixels():
    """32 rows at 96 px (brain MRI's 24 samples and the image in one pass), fewer for larger
    images, never under 2 (the image and one sample)."""
    from serving.engine import explain_rows

    assert explain_rows((96, 96)) == 32
    assert explain_rows((224, 224)) == 5
    assert explain_rows((1024, 1024)) == 2
    assert explain_rows((32, 32)) == 288
