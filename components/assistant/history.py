"""Per-user, per-session chat history kept in memory, bounded and thread-safe.

History is keyed by the pair (user_id, session_id): a caller can only read a conversation by
naming both, and there is deliberately no method that lists sessions, so one user can never
discover or read another's conversation, even by guessing a session id.
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass

from components.assistant.safety import check_id
from components.errors import InputError

ROLES = ("user", "assistant")


@dataclass(frozen=True)
class Turn:
    role: str
    text: str


class HistoryStore:
    """Bounded conversations: at most `max_turns` per session and `max_sessions` in total
    (the least recently used session is dropped first)."""

    def __init__(self, max_turns: int = 20, max_sessions: int = 10_000, max_chars: int = 4000):
        if max_turns < 1 or max_sessions < 1:
            raise InputError("max_turns and max_sessions must be positive")
        self.max_turns = max_turns
        self.max_sessions = max_sessions
        self.max_chars = max_chars
        self._lock = threading.Lock()
        self._sessions: OrderedDict[tuple[str, str], deque[Turn]] = OrderedDict()

    @staticmethod
    def new_session_id() -> str:
        """A random, unguessable session id for a new conversation."""
        return secrets.token_urlsafe(16)

    def append(self, user_id: str, session_id: str, role: str, text: str) -> None:
        key = (check_id(user_id, "user_id"), check_id(session_id, "session_id"))
        if role not in ROLES:
            raise InputError(f"role must be one of {ROLES}")
        turn = Turn(role, text[: self.max_chars])
        with self._lock:
            turns = self._sessions.get(key)
            if turns is None:
                turns = deque(maxlen=self.max_turns)
                self._sessions[key] = turns
            turns.append(turn)
            self._sessions.move_to_end(key)
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)

    def get(self, user_id: str, session_id: str, last: int | None = None) -> list[Turn]:
        """A copy of this user's session, oldest first ([] for an unknown session)."""
        key = (check_id(user_id, "user_id"), check_id(session_id, "session_id"))
        with self._lock:
            turns = list(self._sessions.get(key, ()))
        return turns[-last:] if last else turns

    def clear(self, user_id: str, session_id: str) -> None:
        key = (check_id(user_id, "user_id"), check_id(session_id, "session_id"))
        with self._lock:
            self._sessions.pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)
