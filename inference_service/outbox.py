"""Replies on their way out of the service's ROUTER socket, bounded for each client.

ZeroMQ queues a ROUTER's outgoing messages per client, and by default holds up to a
thousand of them: a client that stopped reading (frozen, stopped in a debugger, or a
script that sends and never receives) while it asked for renders kept every reply in
the service's memory. Ten renders of 256 MiB held it at 3 GB until the client was
killed. Here ZeroMQ holds one reply a client (:data:`SEND_HWM`; a multipart message
counts once) and the :class:`Outbox` the rest, in order, until the client reads. Once a
client's waiting replies reach :data:`BACKLOG_BYTES`, each further reply to it is
replaced by a small ``busy`` error with the same id, so the client learns what became
of it when it reads again, and the service's memory stays bounded by a few replies a
client. Past :data:`MAX_HELD` held replies a client's further ones are dropped.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

import msgpack
import zmq

from protocol import errors
from protocol.codec import PROTOCOL_VERSION, encode
from protocol.errors import ProtocolError

log = logging.getLogger(__name__)

#: replies ZeroMQ itself queues for one client (its ``SNDHWM``)
SEND_HWM = 1
#: replies the outbox holds for one client before it answers ``busy`` instead; one reply
#: is always held whatever its size (a render may be up to 1 GiB)
BACKLOG_BYTES = 256 << 20
#: replies held for one client at most, ``busy`` ones included: past this they are
#: dropped unsent, as ZeroMQ's own queue (a thousand) dropped them before (a client
#: that sent 100,000 requests and read none grew the held list without end)
MAX_HELD = 1000
#: what a held reply costs beyond its frames (the list, the tuple, the frame objects)
ENTRY_BYTES = 512


def _nbytes(frames: list[Any]) -> int:
    return sum(memoryview(f).nbytes for f in frames)


def route_length(frames: list[Any]) -> int:
    """How many leading frames of a request or reply route it: the client's identity, and
    the empty frame a REQ socket puts behind it (a header is never empty)."""
    return 2 if len(frames) > 2 and not memoryview(frames[1]).nbytes else 1


def unread_error(frames: list[Any], held: int) -> list[Any]:
    """The ``busy`` reply that stands in for ``frames``: same route, op and id."""
    route = frames[: route_length(frames)]
    try:
        header = msgpack.unpackb(memoryview(frames[len(route)]), raw=False)
    except Exception:  # every reply's header is ours; keep serving whatever it holds
        header = {}
    if not isinstance(header, dict):
        header = {}
    op, req_id = header.get("op"), header.get("id")
    message = (
        f"this client has not read {held / 2**20:.0f} MiB of earlier replies; the "
        f"service dropped this {op or 'reply'} instead of holding more (read replies as "
        "they come, or ask for less at a time)"
    )
    busy = ProtocolError(errors.BUSY, message, {"unread_bytes": held})
    return [*route, *error_reply(op, req_id, busy)]


def error_reply(op: Any, req_id: Any, exc: ProtocolError) -> list[Any]:
    """The frames of an error reply to ``op`` (None where it is not a string) and
    ``req_id``: the service's, and the outbox's in place of a reply it drops."""
    return encode(
        {
            "protocol": PROTOCOL_VERSION,
            "op": op if isinstance(op, str) else None,
            "id": req_id,
            "ok": False,
            "error": exc.to_dict(),
        }
    )


class Outbox:
    """Sends replies through ``router`` without blocking the service's loop.

    ``router`` must have ``ROUTER_MANDATORY`` set (a full client queue raises instead of
    dropping the reply unseen), ``SNDHWM`` at :data:`SEND_HWM` and no ``LINGER`` (with
    one, a client gone keeps its queue for the linger, and its replies stay held).
    :meth:`send` sends a reply or holds it behind that client's earlier ones;
    :meth:`flush` sends what the clients have made room for, and is called by the loop
    while :meth:`pending`.
    """

    def __init__(self, router: zmq.Socket, limit: int = BACKLOG_BYTES) -> None:
        self._router = router
        self._limit = limit
        self._held: dict[bytes, deque[tuple[list[Any], int]]] = {}
        self._bytes: dict[bytes, int] = {}
        #: per client over its budget since its held replies last drained: replies
        #: answered busy, and dropped past MAX_HELD (logged once, when it drains)
        self._over: dict[bytes, list[int]] = {}

    def pending(self) -> bool:
        return bool(self._held)

    def held_bytes(self) -> int:
        return sum(self._bytes.values())

    def send(self, frames: list[Any]) -> None:
        peer = bytes(memoryview(frames[0]))
        queue = self._held.get(peer)
        if queue is None and self._try(frames):
            return
        size, held = _nbytes(frames) + ENTRY_BYTES, self._bytes.get(peer, 0)
        if queue and held + size > self._limit:
            over = self._over.get(peer)
            if over is None:
                over = self._over[peer] = [0, 0]
                log.warning(
                    "a client has not read %.0f MiB of replies; its replies are answered "
                    "busy until it reads",
                    held / 2**20,
                )
            if len(queue) >= MAX_HELD:
                over[1] += 1
                return
            over[0] += 1
            frames = unread_error(frames, held)
            size = _nbytes(frames) + ENTRY_BYTES
        if queue is None:
            queue = self._held[peer] = deque()
        queue.append((frames, size))
        self._bytes[peer] = held + size

    def flush(self) -> None:
        for peer in list(self._held):
            queue = self._held[peer]
            while queue and self._try(queue[0][0]):
                self._bytes[peer] -= queue.popleft()[1]
            if not queue:
                del self._held[peer], self._bytes[peer]
                busy, dropped = self._over.pop(peer, (0, 0))
                if busy or dropped:
                    log.warning(
                        "a client that did not read its replies was answered busy %d "
                        "times, and %d replies to it were dropped",
                        busy,
                        dropped,
                    )

    def _try(self, frames: list[Any]) -> bool:
        """Whether ``frames`` left: sent, or dropped because the client is gone (as a
        ROUTER drops them without ``ROUTER_MANDATORY``); False if its queue is full."""
        for attempt in range(2):
            try:
                self._router.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                return True
            except zmq.Again:
                if attempt:
                    return False
                # a send reads the socket's commands only now and then, so a client that
                # has read its last reply may still look full (a reply in two waited a
                # tick, 10 ms): reading the socket's events reads them now
                self._router.getsockopt(zmq.EVENTS)
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EHOSTUNREACH:
                    raise
                return True
        return False
