"""The inline engine: a Flower `Grid` that hands each message to the ClientApp in this process.

The same ServerApp driver and the same ClientApp handlers run as on the simulation and
deployment engines; only the transport differs (sequential function calls instead of Ray actors
or HTTP). It exists for tests and machines too small for Ray; it is not a deployment. A site
whose handler raises is answered with an error reply, as Flower's runtimes do.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid

log = logging.getLogger(__name__)

CLIENT_APP_RAISED_EXCEPTION = 2  # flwr.common.constant.ErrorCode.CLIENT_APP_RAISED_EXCEPTION


def _set_task_identity() -> None:
    """Messages read the process's task identity; set it as Flower's Python simulation API does
    (only when no Flower runtime has set it in this process)."""
    from flwr.supercore.task_identity import TaskIdentity

    if TaskIdentity._run_id is None:
        TaskIdentity.run_id = 1
        TaskIdentity.task_id = 1
        TaskIdentity.node_id = SUPERLINK_NODE_ID


def _with_id(message: Message) -> Message:
    """Give a message its id, as Flower's grids do on push (replies then point back to it)."""
    if not message.metadata.message_id:
        message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
    return message


class InlineGrid(Grid):
    """Nodes 1..N, each with its own `node_config`, served by one in-process ClientApp."""

    def __init__(self, client_app: Any, node_configs: list[Mapping[str, Any]]) -> None:
        _set_task_identity()
        self._app = client_app
        self._run: Any = None
        self._contexts = {
            index + 1: Context(
                run_id=0,
                node_id=index + 1,
                node_config=dict(cfg),
                state=RecordDict(),
                run_config={},
            )
            for index, cfg in enumerate(node_configs)
        }
        self.offline: set[int] = set()  # nodes that stopped answering (tests use it)
        self._pending: list[Message] = []

    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return [node for node in self._contexts if node not in self.offline]

    def _deliver(self, message: Message) -> Message:
        node = message.metadata.dst_node_id
        if node in self.offline or node not in self._contexts:
            # as the SuperLink does: an error reply sent by the SuperLink's own node id
            reply = Message(Error(code=0, reason="Node Unavailable"), reply_to=message)
            reply.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
            return reply
        try:
            return self._app(message, self._contexts[node])
        except Exception as exc:  # Flower's runtimes turn a raising ClientApp into an error reply
            log.warning("node %d raised %s: %s", node, type(exc).__name__, exc)
            reason = f"{type(exc).__name__}: {exc}"
            return Message(Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        replies = [self._deliver(_with_id(m)) for m in messages]
        self._pending.extend(replies)
        return [str(i) for i in range(len(replies))]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies, self._pending = self._pending, []
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return [self._deliver(_with_id(m)) for m in messages]


__all__ = ["InlineGrid"]
