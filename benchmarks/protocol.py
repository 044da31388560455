"""Round-trip cost of returning one 512x512 rgb+alpha+depth frame over loopback TCP.

Three measurements in one run, so the ratios compare like with like:
- ``zmq_echo``: bare pyzmq, DEALER → ROUTER, the server answers with one frame of the
  same byte count (the floor: what moving the bytes costs);
- ``codec``: the same sockets, but the reply is built with ``protocol.encode`` (header
  plus three array frames, zero-copy) and read by ``protocol.Client`` (decode, checks);
- ``service``: a real ``splatface serve`` process answering ``render`` for a one-Gaussian
  avatar, so validation, the worker pool and the inproc hop are included (and a near-empty
  render of three 512x512 buffers).

Then ``store_listing``: the listing behind every request that names an avatar by name,
for a store of 2,000 avatars, first (every meta.json read) against later (only the
metas that changed read).
"""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

import numpy as np
import zmq
from _common import emit, machine, timed

from protocol import Client
from protocol.codec import decode, encode

SIZE = 512
REPEAT = 100


def frame_arrays():
    return {
        "rgb": np.random.default_rng(0).random((1, SIZE, SIZE, 3), dtype=np.float32),
        "alpha": np.ones((1, SIZE, SIZE), np.float32),
        "depth": np.ones((1, SIZE, SIZE), np.float32),
    }


def server(ctx, endpoint_box, stop, reply_fn):
    s = ctx.socket(zmq.ROUTER)
    s.bind("tcp://127.0.0.1:*")
    endpoint_box.append(s.getsockopt_string(zmq.LAST_ENDPOINT))
    while not stop.is_set():
        if s.poll(100):
            frames = s.recv_multipart(copy=False)
            s.send_multipart([frames[0], *reply_fn(frames[1:])], copy=False)
    s.close(0)


def run_server(ctx, reply_fn):
    box, stop = [], threading.Event()
    t = threading.Thread(target=server, args=(ctx, box, stop, reply_fn), daemon=True)
    t.start()
    while not box:
        pass
    return box[0], stop, t


def main() -> None:
    ctx = zmq.Context()
    arrays = frame_arrays()
    nbytes = sum(a.nbytes for a in arrays.values())
    base = {"benchmark": "protocol", "width": SIZE, "height": SIZE, "bytes": nbytes,
            "machine": machine()}  # fmt: skip

    payload = np.zeros(nbytes, np.uint8)
    endpoint, stop, t = run_server(ctx, lambda frames: [payload])
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(endpoint)

    def echo():
        dealer.send(b"x")
        dealer.recv(copy=False)

    echo_t = timed(echo, REPEAT)
    dealer.close(0)
    stop.set()
    t.join()
    emit({**base, "case": "zmq_echo", **echo_t, "ratio": 1.0})

    def codec_reply(frames):
        req = decode(frames)
        return encode({"protocol": 1, "op": "render", "id": req.header["id"], "ok": True}, arrays)

    endpoint, stop, t = run_server(ctx, codec_reply)
    with Client(endpoint, context=ctx) as c:
        codec_t = timed(lambda: c.request("render", {"avatar": "x"}), REPEAT)
    stop.set()
    t.join()
    emit({**base, "case": "codec", **codec_t,
          "ratio": round(codec_t["median_ms"] / echo_t["median_ms"], 3)})  # fmt: skip

    service_t = service_render(ctx)
    emit({**base, "case": "service", **service_t,
          "ratio": round(service_t["median_ms"] / echo_t["median_ms"], 3)})  # fmt: skip
    ctx.term()
    emit({"benchmark": "protocol", "case": "store_listing", "machine": machine(),
          **store_listing()})  # fmt: skip


def one_gaussian_avatar(avatar_id: str = "0000000000aa"):
    from inference_service.avatar import Avatar, BoundGaussians

    g = BoundGaussians(
        triangle=np.zeros(1, np.int32), bary=np.full((1, 3), 1 / 3, np.float32),
        offset=np.zeros(1, np.float32), rotation=np.array([[1, 0, 0, 0]], np.float32),
        log_scale=np.full((1, 3), -4.0, np.float32), opacity_logit=np.zeros(1, np.float32),
        sh=np.zeros((1, 1, 3), np.float32),
    )  # fmt: skip
    verts = np.array([[0, 0, 0], [0.1, 0, 0], [0, 0, 0.1]], np.float32)
    return Avatar(avatar_id, "one", verts, np.array([[0, 1, 2]], np.int32),
                  np.zeros((52, 3, 3), np.float32), g, np.array([1.0, 1, 0, 0]),
                  np.eye(4))  # fmt: skip


STORE_AVATARS = 2000


def store_listing() -> dict:
    """A store of ``STORE_AVATARS`` avatars (every request naming an avatar by name lists
    it): the first listing, which reads every meta.json, against the next ones, which
    read only those that changed (none here)."""
    import json
    import shutil

    from inference_service.store import Store

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "store"
        Store(root).save(one_gaussian_avatar())
        first = root / "0000000000aa"
        meta = json.loads((first / "meta.json").read_text())
        for k in range(1, STORE_AVATARS):
            avatar_id = f"1{k:011x}"
            shutil.copytree(first, root / avatar_id)
            (root / avatar_id / "meta.json").write_text(json.dumps({**meta, "id": avatar_id}))
        cold = timed(lambda: Store(root).list(), 10, warmup=1)
        store = Store(root)
        store.list()
        warm = timed(store.list, 10, warmup=1)
    return {"avatars": STORE_AVATARS, "first_listing": cold, "next_listings": warm,
            "ratio": round(warm["median_ms"] / cold["median_ms"], 3)}  # fmt: skip


def service_render(ctx) -> dict:
    """Time ``render`` against a real service process holding a one-Gaussian avatar."""

    from inference_service.store import Store
    from tests.conftest import ServiceProcess

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        av = one_gaussian_avatar()
        Store(store).save(av)
        svc = ServiceProcess(store)
        try:
            intr = np.array([500.0, 500, SIZE / 2, SIZE / 2])
            w2c = np.eye(4)
            w2c[:3, 3] = [0, 0, 1]
            with Client(svc.endpoint, context=ctx) as c:
                return timed(
                    lambda: c.render(
                        av.id, intr, w2c, SIZE, SIZE, passes=("rgb", "alpha", "depth")
                    ),
                    REPEAT,
                )
        finally:
            svc.stop()


if __name__ == "__main__":
    main()
