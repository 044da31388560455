"""The service's outbox on real ZeroMQ sockets: replies to a client that does not read
are held up to a byte budget, then answered ``busy``; a client that reads gets them all."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import zmq

from inference_service.outbox import SEND_HWM, Outbox
from protocol import errors
from protocol.codec import PROTOCOL_VERSION, REPLY_LIMITS, decode, encode

MIB = 1 << 20


@pytest.fixture
def pair():
    """A ROUTER set up as the service's, and a DEALER that holds as little as it can:
    one message in ZeroMQ and a small kernel buffer, so what it does not read stays
    with the ROUTER."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.setsockopt(zmq.SNDHWM, SEND_HWM)
    router.setsockopt(zmq.SNDBUF, 64 << 10)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.RCVHWM, 1)
    dealer.setsockopt(zmq.RCVBUF, 64 << 10)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    dealer.send(b"hello")
    route = router.recv_multipart()[:1]
    yield router, dealer, route
    for s in (router, dealer):
        s.close(0)
    ctx.term()


def reply(route, i: int, size: int) -> list:
    header = {"protocol": PROTOCOL_VERSION, "op": "render", "id": f"r{i}", "ok": True}
    arrays = {"rgb": np.full(size // 4, i, np.float32)}
    return [*route, *encode(header, arrays)]


def offer(outbox: Outbox, route, count: int, size: int, seconds: float = 0.5) -> int:
    """Send ``count`` replies, then let the outbox flush for a while; the most it held."""
    most = 0
    for i in range(count):
        outbox.send(reply(route, i, size))
        most = max(most, outbox.held_bytes())
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        outbox.flush()
        most = max(most, outbox.held_bytes())
        time.sleep(0.01)
    return most


def read_all(dealer, outbox: Outbox, count: int) -> list:
    out = []
    while len(out) < count:
        outbox.flush()
        if dealer.poll(50):
            out.append(decode(dealer.recv_multipart(), REPLY_LIMITS))
    return out


def check_replies(got: list, count: int) -> int:
    """Every reply came, in order: the first ones whole, the rest ``busy`` saying why;
    the number of whole ones."""
    assert [m.header["id"] for m in got] == [f"r{i}" for i in range(count)]
    kept = sum(m.header["ok"] for m in got)
    assert [m.header["ok"] for m in got] == [True] * kept + [False] * (count - kept)
    for m in got[:kept]:
        np.testing.assert_array_equal(m.arrays["rgb"], int(m.header["id"][1:]))
    for m in got[kept:]:
        assert m.header["op"] == "render"
        assert m.header["error"]["code"] == errors.BUSY
        assert "not read" in m.header["error"]["message"]
    return kept


def test_replies_to_a_client_that_does_not_read_are_bounded(pair):
    router, dealer, route = pair
    outbox = Outbox(router, limit=16 * MIB)
    most = offer(outbox, route, count=20, size=4 * MIB)
    # the budget, and the one reply that may take it past
    assert 12 * MIB <= most <= 20 * MIB + MIB
    assert outbox.pending()
    kept = check_replies(read_all(dealer, outbox, 20), 20)
    assert 0 < kept < 20
    assert not outbox.pending()


def test_a_client_that_reads_gets_every_reply(pair):
    """Replies made at 200 MiB/s, faster than any render, reach a client that reads."""
    router, dealer, route = pair
    outbox = Outbox(router, limit=16 * MIB)
    got = []
    reader = threading.Thread(
        target=lambda: got.extend(decode(dealer.recv_multipart(), REPLY_LIMITS) for _ in range(20))
    )
    reader.start()
    for i in range(20):
        outbox.send(reply(route, i, 4 * MIB))
        for _ in range(2):
            time.sleep(0.01)
            outbox.flush()
    deadline = time.monotonic() + 30
    while reader.is_alive() and time.monotonic() < deadline:
        outbox.flush()
        reader.join(0.01)
    assert check_replies(got, 20) == 20


def test_one_reply_over_the_budget_is_held_whole(pair):
    router, dealer, route = pair
    outbox = Outbox(router, limit=MIB)
    most = offer(outbox, route, count=8, size=8 * MIB, seconds=0.2)
    assert 8 * MIB <= most < 9 * MIB  # one held, whatever its size; no second
    assert 0 < check_replies(read_all(dealer, outbox, 8), 8) < 8


def test_replies_to_a_client_gone_are_dropped(pair):
    router, dealer, route = pair
    outbox = Outbox(router, limit=16 * MIB)
    offer(outbox, route, count=6, size=4 * MIB, seconds=0.2)
    assert outbox.pending()
    dealer.close(0)
    deadline = time.monotonic() + 10
    while outbox.pending():
        assert time.monotonic() < deadline, "replies to a client gone were kept"
        # the service's loop polls its socket, which reads that the client left: a
        # ROUTER keeps a client's queue until it has read what the client sent
        router.poll(0)
        outbox.flush()
        time.sleep(0.01)


def test_a_client_that_read_its_last_reply_gets_the_next_at_once(pair):
    """A client that has read its last reply has room for the next, but a send reads the
    socket's news of that only now and then: one reply in ten waited for the loop's next
    tick. A request-reply client must never wait on the loop."""
    router, dealer, route = pair
    outbox = Outbox(router)
    for i in range(300):
        outbox.send(reply(route, i, 64))
        assert dealer.poll(2000), f"reply {i} was held for a client with room for it"
        assert decode(dealer.recv_multipart(), REPLY_LIMITS).header["id"] == f"r{i}"
    assert not outbox.pending()


def test_a_client_that_never_reads_is_held_a_bounded_count_of_replies(pair, monkeypatch, caplog):
    """Past the budget every reply was held as a busy one, so a client that sent 100,000
    small requests and read none grew the held list without end, logging each."""
    import inference_service.outbox as outbox_module

    monkeypatch.setattr(outbox_module, "MAX_HELD", 40)
    router, dealer, route = pair
    outbox = Outbox(router, limit=4 * MIB)
    most = offer(outbox, route, count=400, size=MIB)
    assert most <= 4 * MIB + MIB + 40 * 4096
    got = []
    while True:  # until nothing more comes
        outbox.flush()
        if not dealer.poll(500):
            break
        got.append(decode(dealer.recv_multipart(), REPLY_LIMITS))
    # the held ones, and the few that were on their way before the client's queue filled
    assert 40 <= len(got) <= 40 + 4
    kept = sum(m.header["ok"] for m in got)
    assert 0 < kept < len(got) and all(not m.header["ok"] for m in got[kept:])
    assert not outbox.pending()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2, warnings  # once over, once drained
    assert "dropped" in warnings[1]
