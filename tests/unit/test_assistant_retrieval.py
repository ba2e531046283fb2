"""Knowledge notes, the persisted index, hybrid retrieval and the recall@3 evaluation."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from components.assistant.evaluate import EVAL_PATH, evaluate_retrieval, load_eval
from components.assistant.evaluate import main as evaluate_main
from components.assistant.index import build_index, is_stale, load_index
from components.assistant.knowledge import KNOWLEDGE_DIR, chunk_note, load_note, load_notes
from components.assistant.retriever import Retriever
from components.errors import DataError, ModelError


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Single queries gain nothing from intra-op threads, and on a shared 2-core machine
    extra threads make MiniLM ~50x slower; the previous setting is restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("assistant-index")
    build_index(KNOWLEDGE_DIR, out)
    return out


@pytest.fixture(scope="module")
def retriever(index_dir):
    return Retriever(load_index(index_dir))


def test_notes_have_metadata_sources_and_sections():
    notes = load_notes()
    assert 15 <= len(notes) <= 30
    for note in notes:
        assert note.sources, note.id
        assert all("http" in source for source in note.sources), note.id
        assert len(chunk_note(note)) >= 2, note.id
    ids = {n.id for n in notes}
    for condition in ("glioma", "meningioma", "pituitary-tumours", "pneumonia", "disclaimer"):
        assert condition in ids


def test_note_without_sources_is_rejected(tmp_path):
    path = tmp_path / "bad.md"
    path.write_text("---\nid: bad-note\ntitle: Bad\n---\n# Bad\n## A\ntext\n", encoding="utf-8")
    with pytest.raises(DataError, match="sources"):
        load_note(path)


def test_chunks_follow_sections(tmp_path):
    path = tmp_path / "x.md"
    path.write_text(
        '---\nid: x-note\ntitle: X\nsources: ["S https://example.org"]\n---\n# X\n'
        "## First part\nAlpha beta.\n\nGamma.\n## Second part\nDelta.\n",
        encoding="utf-8",
    )
    chunks = chunk_note(load_note(path))
    assert [(c.section, c.text) for c in chunks] == [
        ("First part", "Alpha beta. Gamma."),
        ("Second part", "Delta."),
    ]
    assert chunks[0].chunk_id == "x-note#0"


def test_index_round_trip_and_staleness(index_dir, tmp_path):
    index = load_index(index_dir)
    assert index.embeddings is not None
    assert index.embeddings.shape[0] == len(index.chunks)
    assert index.model_name and "MiniLM" in index.model_name
    assert not is_stale(index, KNOWLEDGE_DIR)
    copy = tmp_path / "notes"
    shutil.copytree(KNOWLEDGE_DIR, copy)
    (copy / "glioma.md").write_text(
        (copy / "glioma.md").read_text(encoding="utf-8") + "\nOne more line.\n", encoding="utf-8"
    )
    assert is_stale(index, copy)


def test_missing_index_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="build it"):
        load_index(tmp_path / "nowhere")


def test_retrieval_recall_at_3_meets_target(retriever):
    items, out_of_scope = load_eval(EVAL_PATH)
    assert len(items) >= 40
    report = evaluate_retrieval(retriever, EVAL_PATH)
    assert report.mode == "hybrid"
    assert report.recall_at_3 >= 0.9, report.misses_at_3
    assert report.recall_at_1 <= report.recall_at_3 <= report.recall_at_5
    assert report.out_of_scope_rejection >= 0.9, report.false_accepts
    assert len(out_of_scope) == report.n_out_of_scope >= 10


def test_evaluate_command_reports_and_fails_below_target(index_dir, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert evaluate_main(["--index", str(index_dir), "--json", str(out)]) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["recall_at_3"] >= 0.9
    assert "recall@3" in capsys.readouterr().out
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(
        "questions:\n  - {q: 'What is a meningioma?', notes: [pneumonia]}\n", encoding="utf-8"
    )
    assert evaluate_main(["--index", str(index_dir), "--eval", str(wrong)]) == 1


def test_eval_set_naming_unknown_notes_is_an_error(retriever, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("questions:\n  - {q: 'x', notes: [no-such-note]}\n", encoding="utf-8")
    with pytest.raises(DataError, match="no-such-note"):
        evaluate_retrieval(retriever, bad)


def test_relevant_and_off_topic_queries(retriever):
    hits = retriever.search("What is a meningioma?", k=3)
    assert hits and hits[0].note_id == "meningioma"
    assert hits[0].dense is not None and hits[0].dense > 0.5
    assert retriever.search("What is the capital of France?") == []
    assert retriever.search("How do I bake sourdough bread?") == []


def test_bm25_only_index_is_used_loudly(caplog):
    with caplog.at_level(logging.ERROR, logger="components.assistant.retriever"):
        retriever = Retriever(build_index(KNOWLEDGE_DIR, dense=False))
    assert retriever.mode == "bm25"
    assert any("DEGRADED" in r.message for r in caplog.records)
    assert retriever.rank_notes("What is a meningioma?", k=1) == ["meningioma"]
    assert retriever.search("What is the capital of France?") == []


def test_unloadable_embedder_falls_back_to_bm25(index_dir, monkeypatch, caplog):
    import components.assistant.embedder as embedder_module

    def broken(*args, **kwargs):
        raise ModelError("embedding model missing")

    monkeypatch.setattr(embedder_module, "Embedder", broken)
    with caplog.at_level(logging.ERROR, logger="components.assistant.retriever"):
        retriever = Retriever(load_index(index_dir))
    assert retriever.mode == "bm25"
    assert "embedding model missing" in retriever.degraded_reason
    assert any("DEGRADED" in r.message for r in caplog.records)
