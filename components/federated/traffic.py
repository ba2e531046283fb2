"""What crossed the wire per site: the array bytes of the messages the round driver exchanges.

`MeteredGrid` wraps the round driver's Grid and adds up, per destination node, the bytes of
the arrays (`ArrayRecord`s: the global model, a site's update, SecAgg+ shares) in every
message sent to it and in every reply received from it. `take(node_sites)` returns the counts
since the last call by site name and starts again, so the driver records one round at a time
in the ledger (`bytes`: {site: {"sent": n, "received": n}}).

Counted is the tensors' payload (`nbytes`: elements × item size); Flower's per-array header,
the protobuf framing and TLS add a little on top.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from math import prod
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid

from components.federated.protocol import site_of


def message_array_bytes(message: Message) -> int:
    """The payload bytes of every array in `message` (0 for an error reply)."""
    if not message.has_content():
        return 0
    return sum(
        _array_bytes(array)
        for record in message.content.array_records.values()
        for array in record.values()
    )


def _array_bytes(array: Any) -> int:
    """Elements × item size; an array without a numpy dtype (SecAgg+'s legacy FitIns layout
    carries serialised bytes) counts its serialised length."""
    if not array.dtype:
        return len(array.data)
    return np.dtype(array.dtype).itemsize * prod(array.shape)


class MeteredGrid(Grid):
    """A Grid that counts the array bytes sent to and received from each node."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self._sent: Counter[int] = Counter()
        self._received: Counter[int] = Counter()
        self._pending: dict[str, int] = {}  # pushed message id -> destination node

    def set_run(self, run: Any) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Any:
        return self._grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def _count_sent(self, messages: list[Message]) -> None:
        for message in messages:
            if size := message_array_bytes(message):
                self._sent[message.metadata.dst_node_id] += size

    def _count_replies(self, replies: list[Message], destinations: dict[str, int]) -> None:
        for reply in replies:
            meta = reply.metadata
            if size := message_array_bytes(reply):
                node = destinations.get(meta.reply_to_message_id, meta.src_node_id)
                self._received[node] += size

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        ids = list(self._grid.push_messages(messages))
        self._count_sent(messages)
        for message, message_id in zip(messages, ids, strict=False):
            self._pending[message_id] = message.metadata.dst_node_id
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self._grid.pull_messages(message_ids))
        self._count_replies(replies, self._pending)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        messages = list(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self._count_sent(messages)
        destinations = {
            m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id
        }
        self._count_replies(replies, destinations)
        return replies

    def take(self, node_sites: dict[int, str]) -> dict[str, dict[str, int]]:
        """{site: {"sent": bytes, "received": bytes}} since the last call; resets the counts."""
        out: dict[str, dict[str, int]] = {}
        for node in sorted(set(self._sent) | set(self._received)):
            row = out.setdefault(site_of(node, None, node_sites), {"sent": 0, "received": 0})
            row["sent"] += int(self._sent[node])
            row["received"] += int(self._received[node])
        self._sent.clear()
        self._received.clear()
        self._pending.clear()
        return dict(sorted(out.items()))


__all__ = ["MeteredGrid", "message_array_bytes"]
