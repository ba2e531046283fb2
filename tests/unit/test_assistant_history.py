"""Per-user, per-session history: bounded, thread-safe, and never shared."""

from __future__ import annotations

import threading

import pytest

from components.assistant import Assistant, HistoryStore
from components.assistant.index import build_index
from components.assistant.knowledge import KNOWLEDGE_DIR
from components.assistant.retriever import Retriever
from components.assistant.text import sentences
from components.errors import InputError


class RecordingBackend:
    """Answers with the first sentence of the first passage and keeps every request."""

    name = "recording"
    supports_streaming = False

    def __init__(self) -> None:
        self.requests = []

    def generate(self, request):
        self.requests.append(request)
        return sentences(request.passages[0].chunk.text)[0] + " [1]"

    def stream(self, request):
        yield self.generate(request)


@pytest.fixture(scope="module")
def retriever():
    return Retriever(build_index(KNOWLEDGE_DIR, dense=False))  # lexical is enough here


def test_sessions_and_users_are_isolated():
    store = HistoryStore()
    store.append("alice", "s1", "user", "alice in s1")
    store.append("alice", "s2", "user", "alice in s2")
    store.append("bob", "s1", "user", "bob in s1")
    assert [t.text for t in store.get("alice", "s1")] == ["alice in s1"]
    assert [t.text for t in store.get("alice", "s2")] == ["alice in s2"]
    assert [t.text for t in store.get("bob", "s1")] == ["bob in s1"]
    assert store.get("bob", "s2") == []
    store.clear("alice", "s1")
    assert store.get("alice", "s1") == [] and len(store.get("bob", "s1")) == 1


def test_history_is_bounded_and_returned_as_a_copy():
    store = HistoryStore(max_turns=3, max_sessions=2)
    for i in range(5):
        store.append("u", "s", "user", f"q{i}")
    assert [t.text for t in store.get("u", "s")] == ["q2", "q3", "q4"]
    assert [t.text for t in store.get("u", "s", last=1)] == ["q4"]
    store.get("u", "s").clear()
    assert len(store.get("u", "s")) == 3
    store.append("u", "t", "user", "x")
    store.append("u", "v", "user", "y")  # evicts the least recently used session ("s")
    assert store.get("u", "s") == [] and len(store) == 2


def test_bad_ids_and_roles_are_rejected():
    store = HistoryStore()
    with pytest.raises(InputError):
        store.append("u", "../other", "user", "x")
    with pytest.raises(InputError):
        store.append("u", "s", "system", "x")
    with pytest.raises(InputError):
        store.get("", "s")


def test_concurrent_appends_stay_in_their_sessions():
    store = HistoryStore(max_turns=1000)

    def worker(n: int) -> None:
        for i in range(200):
            store.append(f"user{n}", "shared-id", "user", f"{n}:{i}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for n in range(6):
        turns = store.get(f"user{n}", "shared-id")
        assert [t.text for t in turns] == [f"{n}:{i}" for i in range(200)]


def test_new_session_ids_are_random():
    ids = {HistoryStore.new_session_id() for _ in range(50)}
    assert len(ids) == 50 and all(len(i) >= 16 for i in ids)


def test_two_sessions_never_see_each_others_history(retriever):
    backend = RecordingBackend()
    assistant = Assistant(retriever, backend)
    assistant.answer("What is a meningioma?", "session-a", user_id="alice")
    assistant.answer("What is pneumonia?", "session-b", user_id="bob")
    assistant.answer("What is a pituitary adenoma?", "session-a", user_id="bob")
    assistant.answer("How is a meningioma treated?", "session-a", user_id="alice")

    alice_second = backend.requests[-1]
    seen = " ".join(t.text for t in alice_second.history)
    assert "meningioma" in seen
    assert "pneumonia" not in seen and "pituitary" not in seen
    prompt = alice_second.messages[1]["content"]
    assert "What is a meningioma?" in prompt
    assert "What is pneumonia?" not in prompt and "pituitary adenoma?" not in prompt

    bob_a = backend.requests[2]
    assert bob_a.history == []  # same session id as alice, different user
    assert "meningioma" not in bob_a.messages[1]["content"]

    alice_turns = assistant.history.get("alice", "session-a")
    assert [t.role for t in alice_turns] == ["user", "assistant", "user", "assistant"]
    assert all("pneumonia" not in t.text.lower() for t in alice_turns)
