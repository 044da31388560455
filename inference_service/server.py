"""The ZeroMQ service: a ROUTER socket answering protocol requests.

Threads: the socket loop (owns the ROUTER, answers quick ops inline), one build worker
(``jobs.py``), and a small pool for renders, exports and mesh fetches. Pool threads hand
replies back through an ``inproc`` PUSH/PULL pair, since a ZeroMQ socket belongs to
one thread. So queries and renders are answered while a build runs.

A client that goes away (killed, or closing its socket after its own timeout) takes its
pool work with it: the socket's monitor reports the connection's file descriptor closed,
and the renders and exports that came over it stop at their next frame. Otherwise two
such clients held both pool threads, and every other render waited for their frames.
Builds are jobs, polled by id, and carry on. A client that stays but stops reading is
bounded instead: replies leave through an :class:`~.outbox.Outbox`, which holds a few
hundred MiB a client and answers ``busy`` past that.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import shutil
import socket
import stat
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import zmq

import kernels
from protocol import errors, messages
from protocol.arkit import ARKIT_NAMES, check_curves, reorder
from protocol.client import allow_ipv6, load_key_file
from protocol.codec import (
    MAX_REQUEST_ID,
    PROTOCOL_VERSION,
    decode,
    encode,
    request_op_and_id,
    usable_id,
)
from protocol.errors import ProtocolError
from protocol.files import atomic_write
from protocol.launch import is_loopback_endpoint

from . import __version__
from .avatar import Avatar
from .build.builder import BuildOptions
from .build.diffusion import EnhanceModels, ModelFolderError, check_ready, has_diffusers
from .export.bundle import bundle_zip
from .export.ply import frame_file_name, ply_bytes, write_ply
from .jobs import JobManager
from .outbox import SEND_HWM, Outbox, error_reply, route_length
from .posing import pose, split_transform
from .render import frame_count, render_frames
from .store import STALE_SECONDS, Store, storage_error, summary

log = logging.getLogger(__name__)
MAX_PENDING = 64
#: On stopping: the replies still queued are sent until none came for this long, and the
#: socket then has this long to hand them over.
SHUTDOWN_QUIET_MS = 200
SHUTDOWN_LINGER_MS = 2000
#: how often the loop offers held replies again (see outbox.py) while it holds any
OUTBOX_TICK_MS = 10
CACHE_SIZE = 4
POOL_OPS = ("get", "render", "export")
#: A delete resent under its id (the client retries a late reply) gets the first reply:
#: it answered not_found for the avatar it had just deleted. A reply is remembered by
#: (id, the avatar as named) for RETRY_SECONDS, and given only while that name finds no
#: avatar: ids repeat across clients (SPEC asks them to differ only among requests in
#: flight), and a name deleted and built again is another avatar to delete. The last
#: REMEMBERED are kept.
RETRY_SECONDS = 600.0
REMEMBERED = 256


def bind_address(endpoint: str) -> str:
    """``tcp://127.0.0.1:0`` means any free port (ZeroMQ spells it ``*``)."""
    return (
        endpoint[:-2] + ":*"
        if endpoint.startswith("tcp://") and endpoint.endswith(":0")
        else endpoint
    )


def check_ipc_free(endpoint: str) -> None:
    """``EADDRINUSE`` where an ``ipc://`` endpoint's socket file is another live service's.
    ZeroMQ binds a path by replacing the file there: a second service took the endpoint
    from a running one (its clients then saw another store), and when it stopped, the
    first was left running where no client could reach it. A socket file that takes no
    connection is stale, and replaced; ``EEXIST`` where the path is no socket (ZeroMQ
    deleted a file the endpoint named by mistake)."""
    path = endpoint.removeprefix("ipc://")
    if path == endpoint or path.startswith("@") or not os.path.lexists(path):
        return
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise zmq.ZMQError(errno.EEXIST)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:
        return
    finally:
        probe.close()
    raise zmq.ZMQError(errno.EADDRINUSE)


def _remove_stale_temporaries(exports: Path) -> None:
    """Temporary files an export stopped by a crash left (``.NAME.XXXXXXXX.tmp``, see
    ``atomic_write``), once untouched for ``STALE_SECONDS`` (another service on the same
    folder may be writing a fresh one). Only where exports write (``ID/`` and
    ``ID/STAMP/``): a farm's export folder may hold a great deal else."""
    if not exports.is_dir():
        return

    def found(pattern: str) -> Iterator[Path]:
        try:  # a folder removed while the walk goes on ends it quietly
            yield from exports.glob(pattern)
        except OSError:
            return

    now = time.time()
    for tmp in itertools.chain(found("*/.*.tmp"), found("*/*/.*.tmp")):
        with contextlib.suppress(OSError):
            if tmp.is_file() and now - tmp.stat().st_mtime > STALE_SECONDS:
                tmp.unlink()
                log.warning("removed %s, left by an interrupted export", tmp)


#: A key file changed this lately (ns) is read at every handshake: file systems stamp
#: mtimes at a clock tick, so a second change within the tick leaves the stat unchanged.
KEY_SETTLED_NS = 1_000_000_000


def check_server_keys(folder: Path) -> tuple[bytes, bytes]:
    """The service's (public, secret) keys from ``folder``, every authorized client's key
    checked first: a key file the service cannot read is named at the start, where once
    running it is only logged and skipped. ValueError naming what is missing or malformed."""
    clients = folder / "authorized_clients"
    if not (folder / "server.key_secret").is_file() or not clients.is_dir():
        raise ValueError(
            f"{folder} must hold server.key_secret and authorized_clients/ "
            "(run 'splatface keys DIR')"
        )
    public, secret = load_key_file(folder / "server.key_secret", secret=True)
    keys = sorted(clients.glob("*.key"))
    if not keys:
        raise ValueError(f"{clients} holds no client key (*.key): no client could connect")
    for key in keys:
        load_key_file(key)
    assert secret is not None
    return public, secret


class AuthorizedClients:
    """The ZAP credentials provider: lets in the public keys in ``folder/*.key`` as the
    folder is at each handshake, so keys added or removed count from the next connection
    without a restart. The folder is listed each time (cheap); a file is read again only
    when its stat changes, or while it was changed too lately for its mtime to tell a
    second change. One that cannot be read or holds no key is logged and skipped: raising
    would end the authenticator's thread, and then no handshake is answered."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._files: dict[Path, tuple[tuple[int, int, int, int], bytes | None]] = {}
        self._unreadable = False

    def keys(self) -> set[bytes]:
        """The public keys (Z85) the folder holds now."""
        try:
            with os.scandir(self.folder) as entries:
                paths = [Path(e.path) for e in entries if e.name.endswith(".key")]
        except OSError as exc:
            if not self._unreadable:
                log.error("cannot read %s, so no client is let in: %s", self.folder, exc)
            self._unreadable, self._files = True, {}
            return set()
        self._unreadable = False
        files = {}
        now = time.time_ns()
        for path in paths:
            try:
                st = path.stat()
            except OSError:  # removed since the folder was listed
                continue
            stamp = (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)
            known = self._files.get(path)
            same = known is not None and known[0] == stamp
            if same and now - st.st_mtime_ns > KEY_SETTLED_NS:
                files[path] = known
                continue
            try:
                public: bytes | None = load_key_file(path)[0]
            except ValueError as exc:
                if not same:
                    log.warning("skipping a client key: %s", exc)
                public = None
            files[path] = (stamp, public)
        self._files = files
        return {public for _, public in files.values() if public is not None}

    def callback(self, domain: str, key: bytes) -> bool:
        """pyzmq's ZAP hook: is ``key`` (Z85) authorized now?"""
        try:
            return key in self.keys()
        except Exception:  # a key file must never stop the authenticator
            log.exception("checking a client key against %s failed", self.folder)
            return False


#: Pixels (intrinsics) and metres (a camera's translation): past these a float32 camera
#: overflows or loses the head entirely, and a frame comes back empty or infinite.
MAX_CAMERA_VALUE = 1e6


def check_camera(intrinsics: np.ndarray, world_to_camera: np.ndarray) -> None:
    """``bad_request`` naming the first frame whose camera is not one: fx, fy > 0; values
    within :data:`MAX_CAMERA_VALUE`; ``world_to_camera`` a rotation (orthonormal, no scale,
    which would scale depth, or mirror) and a translation."""

    def refuse(frames: np.ndarray, what: str) -> None:
        if frames.any():
            raise ProtocolError(errors.BAD_REQUEST, f"frame {int(np.argmax(frames))}: {what}")

    rot = world_to_camera[:, :3, :3]
    refuse(np.any(intrinsics[:, :2] <= 0, axis=1), "intrinsics fx and fy must be positive")
    refuse(np.any(np.abs(intrinsics) > MAX_CAMERA_VALUE, axis=1),
           f"intrinsics must lie within ±{MAX_CAMERA_VALUE:g} pixels")  # fmt: skip
    refuse(~np.all(np.isclose(world_to_camera[:, 3], (0, 0, 0, 1)), axis=1),
           "world_to_camera's last row must be (0,0,0,1)")  # fmt: skip
    gram = np.einsum("fij,fkj->fik", rot, rot)
    refuse(~np.all(np.isclose(gram, np.eye(3), atol=1e-3), axis=(1, 2)) | (np.linalg.det(rot) <= 0),
           "world_to_camera's 3x3 part must be a rotation (orthonormal: no scale, shear or "
           "mirror)")  # fmt: skip
    refuse(np.any(np.abs(world_to_camera[:, :3, 3]) > MAX_CAMERA_VALUE, axis=1),
           f"world_to_camera's translation must lie within ±{MAX_CAMERA_VALUE:g} m")  # fmt: skip


def _connection(frame: Any) -> int | None:
    """The file descriptor of the connection a request came over (the monitor names
    closed connections by it), or None where the transport has none."""
    try:
        fd = frame.get(zmq.SRCFD)
    except (zmq.ZMQError, AttributeError, TypeError):
        return None
    return fd if isinstance(fd, int) and fd >= 0 else None


class Service:
    """Serve until :meth:`stop`. ``device``: auto, cpu or cuda. ``enhance``: diffusion
    weight folders builds use unless a request names its own (checked here, so a bad
    folder stops the service from starting rather than failing every build)."""

    def __init__(
        self,
        store: str | Path,
        endpoint: str = "tcp://127.0.0.1:5555",
        device: str = "auto",
        curve_keys: str | Path | None = None,
        exports: str | Path | None = None,
        workers: int = 2,
        enhance: EnhanceModels | None = None,
    ) -> None:
        if curve_keys is not None and not str(curve_keys).strip():
            raise ValueError("--curve-keys is empty: give the folder 'splatface keys' wrote")
        if not is_loopback_endpoint(endpoint) and curve_keys is None:
            raise ValueError(
                f"refusing to listen on {endpoint}: it is reachable from other machines. "
                "Give --curve-keys DIR (made by 'splatface keys DIR') to require CurveZMQ "
                "encryption and client keys, or bind to tcp://127.0.0.1:PORT"
            )
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, not {device!r}")
        has_cuda = kernels.has_cuda()
        if device == "cuda" and not has_cuda:
            raise ValueError("--device cuda asked for, but no CUDA device is available")
        self.device = "cuda" if device == "cuda" or (device == "auto" and has_cuda) else "cpu"
        if enhance is not None:
            check_ready(enhance)
        self.enhance = enhance
        self.endpoint = endpoint
        self.curve_keys = Path(curve_keys) if curve_keys is not None else None
        # read and checked here, so a bad key file stops the start with its name
        self._server_keys = None if self.curve_keys is None else check_server_keys(self.curve_keys)
        self.store = Store(store)
        self.exports = Path(exports) if exports else self.store.root / "exports"
        # in the background: on a large shared folder the walk takes a while, and a start
        # (Blender's, waiting to connect) should not
        self.tidying = threading.Thread(
            target=_remove_stale_temporaries, args=(self.exports,), daemon=True
        )
        self.tidying.start()
        self.jobs = JobManager(self.store)
        self.bound: str | None = None
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="splatface-work")
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._cache: OrderedDict[str, Avatar] = OrderedDict()
        self._cache_lock = threading.Lock()
        #: per (request id, avatar as named), a delete's time and reply (_delete_once)
        self._deleted: OrderedDict[tuple[str, str], tuple[float, list[Any]]] = OrderedDict()
        self._stop = threading.Event()
        self._ctx = zmq.Context()
        self._reply_addr = f"inproc://replies-{uuid.uuid4().hex}"
        self._local = threading.local()
        self._pushes: list[zmq.Socket] = []
        #: per connection (its file descriptor), the pool work that came over it: each
        #: request's event, set when the connection closes (see the module notes)
        self._by_connection: dict[int, set[threading.Event]] = {}
        #: descriptors reported closed and not yet taken by a new connection: a request
        #: read after its connection's close was reported is stopped at once
        self._closed: set[int] = set()

    # -- lifecycle ------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    def serve(self, ready=None) -> None:
        """Bind and answer requests until :meth:`stop`; ``ready(endpoint)`` once bound."""
        router = self._ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.MAXMSGSIZE, 1 << 30)
        # a full client queue raises (the outbox holds the reply) instead of blocking
        # the loop; a client gone raises too, and its reply is dropped as before
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.setsockopt(zmq.SNDHWM, SEND_HWM)
        allow_ipv6(router, self.endpoint)
        auth = None
        if self.curve_keys is not None:
            auth = self._setup_curve(router)
        check_ipc_free(self.endpoint)
        router.bind(bind_address(self.endpoint))
        self.bound = router.getsockopt_string(zmq.LAST_ENDPOINT)
        replies = self._ctx.socket(zmq.PULL)
        replies.bind(self._reply_addr)
        closed = router.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_ACCEPTED)
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(replies, zmq.POLLIN)
        poller.register(closed, zmq.POLLIN)
        outbox = Outbox(router)
        log.info("listening on %s (device %s, store %s)", self.bound, self.device, self.store.root)
        threading.Thread(target=self._warmup, daemon=True).start()
        if ready is not None:
            ready(self.bound)
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(OUTBOX_TICK_MS if outbox.pending() else 200))
                outbox.flush()
                if replies in events:
                    while True:
                        try:
                            frames = replies.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        outbox.send(frames)
                self._connections_closed(closed)
                if router in events:
                    for _ in range(100):
                        try:
                            frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        # a connection closed, and its descriptor taken by a new one, is
                        # reported before anything the new one sends can be read: drained
                        # once a request is in hand, those reports are all in (drained
                        # before the read, a connection that closed and was replaced in
                        # between cancelled its successor's first request)
                        self._connections_closed(closed)
                        reply = self._dispatch(frames)
                        if reply is not None:
                            outbox.send(reply)
        finally:
            log.info("stopping")
            self._stop.set()  # also when the loop ended by an exception
            self.jobs.shutdown()
            # every request taken gets its reply: queued ones answer "cancelled" at once
            # (see _work), running ones at their next check
            self._pool.shutdown(wait=True)
            while replies.poll(SHUTDOWN_QUIET_MS):
                outbox.send(replies.recv_multipart(copy=False))
            self._refuse_unread(router, outbox)
            # replies still held wait for their clients until the linger is over
            deadline = time.monotonic() + SHUTDOWN_LINGER_MS / 1000
            while outbox.pending() and time.monotonic() < deadline:
                time.sleep(OUTBOX_TICK_MS / 1000)
                outbox.flush()
            for push in self._pushes:  # pool threads are done with them
                push.close(0)
            router.disable_monitor()
            closed.close(0)
            # let the last replies leave, in what is left of the linger (a frozen client's
            # full queue would take all of it again)
            left = max(SHUTDOWN_QUIET_MS / 1000, deadline - time.monotonic())
            router.close(int(left * 1000))
            replies.close(0)
            if auth is not None:
                auth.stop()
            self._ctx.term()

    def _refuse_unread(self, router: zmq.Socket, outbox: Outbox) -> None:
        """Answer ``cancelled`` to the requests that came in after the loop's last read:
        they were left unanswered, and their clients waited out their timeouts."""
        stopping = ProtocolError(errors.CANCELLED, "the service is shutting down")
        while True:
            try:
                frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            envelope = route_length(frames)
            op, req_id = request_op_and_id(frames[envelope:])
            outbox.send([*frames[:envelope], *self._error(op, req_id, stopping)])

    def _connections_closed(self, monitor: zmq.Socket) -> None:
        """Stop the pool work of every connection the monitor reports closed."""
        from zmq.utils.monitor import recv_monitor_message

        while monitor.poll(0):
            event = recv_monitor_message(monitor, zmq.NOBLOCK)
            fd = int(event["value"])
            with self._pending_lock:
                if event["event"] == zmq.EVENT_ACCEPTED:
                    self._closed.discard(fd)
                    continue
                self._closed.add(fd)
                gone = self._by_connection.pop(fd, ())
            for work in gone:
                work.set()

    def _setup_curve(self, router: zmq.Socket):
        from zmq.auth.thread import ThreadAuthenticator

        public, secret = self._server_keys
        auth = ThreadAuthenticator(self._ctx)
        auth.start()
        auth.configure_curve_callback(
            domain="*",
            credentials_provider=AuthorizedClients(self.curve_keys / "authorized_clients"),
        )
        router.curve_secretkey = secret
        router.curve_publickey = public
        router.curve_server = True
        return auth

    # -- dispatch -------------------------------------------------------------------

    def _dispatch(self, frames: list[Any]) -> list[Any] | None:
        # a REQ socket takes its reply only behind the empty frame it put in its request
        envelope = route_length(frames)
        route, body = frames[:envelope], frames[envelope:]
        op, req_id = None, None
        try:
            msg = decode(body)
            op, req_id = msg.header.get("op"), msg.header.get("id")
            if req_id is not None and not usable_id(req_id):
                req_id = None
                raise ProtocolError(
                    errors.BAD_REQUEST,
                    f"'id' must be a string of at most {MAX_REQUEST_ID} characters",
                )
            version = msg.header.get("protocol")
            if type(version) is not int:  # bool and float are not versions either
                keys = " (header keys are msgpack bin here: send them as str)" * any(
                    isinstance(k, bytes) for k in msg.header
                )
                raise ProtocolError(
                    errors.BAD_REQUEST,
                    f"header key 'protocol' must be an integer, the protocol version "
                    f"({PROTOCOL_VERSION}), got {version!r}{keys}",
                )
            if version != PROTOCOL_VERSION:
                raise ProtocolError(
                    errors.UNSUPPORTED_VERSION,
                    f"protocol version {version!r} is not supported; this service speaks "
                    f"version {PROTOCOL_VERSION}",
                    {"supported": [PROTOCOL_VERSION]},
                )
            fields, arrays = messages.validate(msg)
            if op in POOL_OPS:
                self._submit(route, op, req_id, fields, arrays, _connection(frames[0]))
                return None
            if op == "delete":
                return [*route, *self._delete_once(req_id, fields)]
            header, out = getattr(self, "_op_" + op)(fields, arrays)
            # encoded here, inside the try: a value msgpack cannot hold (an integer past
            # 64 bits in a meta.json edited by hand) failed outside it and stopped the
            # service
            return [*route, *self._ok(op, req_id, header, out)]
        except ProtocolError as exc:
            if op is None:  # refused while decoding: answer the id the caller waits on
                op, req_id = request_op_and_id(body)
            return [*route, *self._error(op, req_id, exc)]
        except Exception as exc:
            return [*route, *self._error(op, req_id, self._unforeseen(op, exc))]

    def _delete_once(self, req_id: str | None, fields: dict[str, Any]) -> list[Any]:
        """A delete's reply; a retry of one already done gets its reply again (see
        :data:`RETRY_SECONDS`)."""
        key = (req_id, fields["avatar"])
        first = self._deleted.get(key)
        if first is not None and time.monotonic() - first[0] < RETRY_SECONDS:
            try:
                self.store.resolve(fields["avatar"])
            except ProtocolError as exc:
                if exc.code == errors.NOT_FOUND:
                    return first[1]
                raise
        header, _ = self._op_delete(fields, {})
        reply = self._ok("delete", req_id, header)
        if req_id is not None:
            self._deleted[key] = (time.monotonic(), reply)
            self._deleted.move_to_end(key)
            while len(self._deleted) > REMEMBERED:
                self._deleted.popitem(last=False)
        return reply

    def _unforeseen(self, op: str | None, exc: Exception) -> ProtocolError:
        """What an op's unforeseen exception answers. An OSError is the file system's (the
        store's folder deleted or its mount gone while serving): ``storage``, naming the
        store; anything else a bug: ``internal``, logged, and the service keeps serving."""
        if isinstance(exc, OSError):
            log.error("%s: the store %s failed: %s", op, self.store.root, exc)
            return storage_error(exc, "cannot use the store", self.store.root)
        log.exception("internal error in %s", op)
        return ProtocolError(errors.INTERNAL, str(exc), remote_traceback=traceback.format_exc())

    @staticmethod
    def _ok(op, req_id, header: dict[str, Any], arrays=None) -> list[Any]:
        return encode(
            {"protocol": PROTOCOL_VERSION, "op": op, "id": req_id, "ok": True, **header}, arrays
        )

    @staticmethod
    def _error(op, req_id, exc: ProtocolError) -> list[Any]:
        return error_reply(op, req_id, exc)

    def _submit(self, route, op, req_id, fields, arrays, connection: int | None) -> None:
        gone = threading.Event()
        with self._pending_lock:
            if self._pending >= MAX_PENDING:
                raise ProtocolError(errors.BUSY, f"{self._pending} requests in progress; try later")
            self._pending += 1
            if connection in self._closed:
                gone.set()
            elif connection is not None:
                self._by_connection.setdefault(connection, set()).add(gone)
        self._pool.submit(self._work, route, op, req_id, fields, arrays, connection, gone)

    def _work(self, route, op, req_id, fields, arrays, connection, gone) -> None:
        self._local.gone = gone
        try:
            self._check_stop()  # queued when the service began to stop, or the client left
            header, out = getattr(self, "_op_" + op)(fields, arrays)
            reply = self._ok(op, req_id, header, out)
        except ProtocolError as exc:
            reply = self._error(op, req_id, exc)
        except Exception as exc:
            reply = self._error(op, req_id, self._unforeseen(op, exc))
        finally:
            with self._pending_lock:
                self._pending -= 1
                works = self._by_connection.get(connection)
                if works is not None:
                    works.discard(gone)
                    if not works:
                        del self._by_connection[connection]
            self._local.gone = None
        if gone.is_set():
            log.info("stopped a %s for a client that went away", op)
            return
        sock = getattr(self._local, "push", None)
        if sock is None:
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self._reply_addr)
            self._local.push = sock
            self._pushes.append(sock)
        sock.send_multipart([*route, *reply], copy=False)

    def _avatar(self, ref: str) -> Avatar:
        avatar_id = self.store.resolve(ref)
        with self._cache_lock:
            if avatar_id in self._cache:
                self._cache.move_to_end(avatar_id)
                return self._cache[avatar_id]
        avatar = self.store.load(avatar_id)
        with self._cache_lock:
            # a delete between the load and here has already emptied its cache entry:
            # caching the loaded copy would hold a deleted avatar's memory
            if self.store.exists(avatar_id):
                self._cache[avatar_id] = avatar
                while len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
        return avatar

    # -- ops ------------------------------------------------------------------------

    def _warmup(self) -> None:
        """Compile (or load from numba's cache) the rasterizer and posing kernels in the
        background, so the first render does not pay for it."""
        from . import posing_kernels

        kernels.warmup(self.device)
        posing_kernels.warmup()

    def _op_hello(self, fields, arrays):
        return {
            "service": "splatface",
            "service_version": __version__,
            "protocol_versions": [PROTOCOL_VERSION],
            "backend": self.device,
            "rasterizer": self.device,
            "capabilities": {
                "ops": list(messages.OPS),
                "passes": list(messages.PASSES),
                "presets": list(messages.PRESETS),
                "export_formats": list(messages.EXPORT_FORMATS),
                "max_frames": messages.MAX_FRAMES,
                "max_size": messages.MAX_SIZE,
                "max_image_bytes": messages.MAX_IMAGE_BYTES,
                "shape_names": list(ARKIT_NAMES),
                "enhance": {"available": has_diffusers(), "default": self.enhance is not None},
                "fields": messages.request_fields(),
            },
        }, None

    def _op_build(self, fields, arrays):
        box = fields["face_box"]
        if box is not None and not (box[0] < box[2] and box[1] < box[3]):
            raise ProtocolError(
                errors.BAD_REQUEST, "face_box must be [x0, y0, x1, y1], x0<x1, y0<y1"
            )
        options = BuildOptions(
            name=fields["name"],
            preset=fields["preset"],
            face=fields["face"],
            face_box=None if box is None else tuple(box),
            enhance=self._enhance(fields["enhance"]),
        )
        self.store.check_writable()
        job = self.jobs.submit(arrays["image"].tobytes(), options)
        return {"job": job.id, "state": job.state}, None

    def _enhance(self, folders: list[str] | None) -> EnhanceModels | None:
        """The weights a build request asks for, checked before any build work."""
        if folders is None:
            return self.enhance
        if not folders:
            return None
        models = EnhanceModels(Path(folders[0]), Path(folders[1]) if len(folders) > 1 else None)
        try:
            check_ready(models)
        except ModelFolderError as exc:
            raise ProtocolError(errors.BAD_REQUEST, str(exc), {"field": "enhance"}) from None
        return models

    def _op_status(self, fields, arrays):
        return self.jobs.get(fields["job"]).status(fields["since"]), None

    def _op_cancel(self, fields, arrays):
        job = self.jobs.cancel(fields["job"])
        return {"job": job.id, "state": job.state}, None

    def _op_list(self, fields, arrays):
        avatars, damaged = self.store.listing()
        return {"avatars": avatars, "jobs": self.jobs.active(), "damaged": damaged}, None

    def _op_delete(self, fields, arrays):
        avatar_id = self.store.resolve(fields["avatar"])
        self.store.delete(avatar_id)
        with self._cache_lock:
            self._cache.pop(avatar_id, None)
        reply = {"deleted": avatar_id}
        # exports are files the user asked for and may still use: they stay, and the reply
        # says where, so deleting an avatar does not silently leave them behind
        exports = self.exports / avatar_id
        if exports.is_dir():
            reply["exports"] = str(exports)
        return reply, None

    def _op_get(self, fields, arrays):
        avatar = self._avatar(fields["avatar"])
        out = {}
        if fields["mesh"]:
            out["vertices"] = avatar.vertices
            out["triangles"] = avatar.triangles
        if fields["rig"]:
            out["shape_deltas"] = avatar.shape_deltas
        header = {
            "avatar": summary(avatar.meta),
            "meta": avatar.meta,
            "shape_names": list(ARKIT_NAMES),
        }
        return header, out

    @staticmethod
    def _curves(fields, arrays) -> np.ndarray | None:
        curves = arrays.get("curves")
        if curves is None:
            return None
        try:
            if fields["curve_names"]:
                curves = reorder(curves, fields["curve_names"])
            elif curves.shape[1] != len(ARKIT_NAMES):
                raise ValueError(
                    f"curves have {curves.shape[1]} columns; send 52 in protocol order or "
                    "name the columns with 'curve_names'"
                )
            return check_curves(curves)
        except ValueError as exc:
            raise ProtocolError(errors.BAD_REQUEST, str(exc)) from None

    @staticmethod
    def _heads(arrays) -> np.ndarray | None:
        heads = arrays.get("head")
        if heads is not None:
            for i, m in enumerate(heads):
                try:
                    split_transform(m)
                except ValueError as exc:
                    raise ProtocolError(errors.BAD_REQUEST, f"head[{i}]: {exc}") from None
        return heads

    def _op_render(self, fields, arrays):
        avatar = self._avatar(fields["avatar"])
        curves, heads = self._curves(fields, arrays), self._heads(arrays)
        intr, w2c = arrays["intrinsics"], arrays["world_to_camera"]
        try:
            f = frame_count(intr, w2c, curves, heads)
        except ValueError as exc:
            raise ProtocolError(errors.BAD_REQUEST, str(exc)) from None
        check_camera(intr, w2c)
        if fields["near"] >= fields["far"]:
            raise ProtocolError(errors.BAD_REQUEST, "near must be less than far")
        w, h, passes = fields["width"], fields["height"], tuple(dict.fromkeys(fields["passes"]))
        if not passes:
            raise ProtocolError(
                errors.BAD_REQUEST, f"passes is empty; name some of {', '.join(messages.PASSES)}"
            )
        channels = sum(messages.PASS_CHANNELS[p] for p in passes)
        nbytes = f * w * h * channels * 4
        if nbytes > messages.MAX_RENDER_BYTES:
            raise ProtocolError(
                errors.TOO_LARGE,
                f"{f} frames of {w}x{h} with {', '.join(passes)} is {nbytes >> 20} MiB; "
                f"limit {messages.MAX_RENDER_BYTES >> 20} MiB per request: send fewer frames",
            )
        t0 = time.perf_counter()
        out = render_frames(
            avatar,
            intr,
            w2c,
            w,
            h,
            curves,
            heads,
            passes,
            np.asarray(fields["background"]),
            fields["near"],
            fields["far"],
            check=lambda i, n: self._check_stop(),
            backend=self.device,
            bottom_up=fields["rows"] == "bottom_up",
        )
        ms = round((time.perf_counter() - t0) * 1000, 2)
        return {"frames": f, "width": w, "height": h, "passes": list(passes), "service_ms": ms}, out

    def _check_stop(self) -> None:
        """Between frames of pool work: stop if the service is, or the client went away."""
        if self._stop.is_set():
            raise ProtocolError(errors.CANCELLED, "the service is shutting down")
        gone = getattr(self._local, "gone", None)
        if gone is not None and gone.is_set():
            raise ProtocolError(errors.CANCELLED, "the client went away")

    def _op_export(self, fields, arrays):
        avatar = self._avatar(fields["avatar"])
        if fields["format"] == "bundle":
            return self._export_bundle(avatar, fields)
        curves, heads = self._curves(fields, arrays), self._heads(arrays)
        try:
            available = frame_count(curves, heads)
        except ValueError as exc:
            raise ProtocolError(errors.BAD_REQUEST, str(exc)) from None

        def posed(i: int):
            pick = lambda a: None if a is None else a[0 if len(a) == 1 else i]  # noqa: E731
            return pose(avatar, pick(curves), pick(heads))

        def check_frame(i: int) -> None:
            if available > 1 and i >= available:
                raise ProtocolError(
                    errors.BAD_REQUEST,
                    f"frame {i} asked for but the curves have {available} frames",
                )

        if fields["frames"] is None:
            i = fields["frame"]
            check_frame(i)
            data = ply_bytes(posed(i), fields["sh_degree"])
            if fields["to"] == "reply":
                return {"format": "ply", "frame": i, "bytes": len(data)}, {
                    "file": np.frombuffer(data, np.uint8)
                }
            frames = [i]
        else:
            a, b = fields["frames"]
            if not 0 <= a <= b <= messages.MAX_FRAME:
                raise ProtocolError(
                    errors.BAD_REQUEST,
                    f"frames must be [a, b] with 0 <= a <= b <= {messages.MAX_FRAME}, got {[a, b]}",
                )
            if b - a + 1 > messages.MAX_FRAMES:
                raise ProtocolError(
                    errors.TOO_LARGE, f"at most {messages.MAX_FRAMES} frames per export"
                )
            if fields["to"] == "reply":
                raise ProtocolError(
                    errors.BAD_REQUEST,
                    "a frame range is written to the service's export folder (to='folder'); "
                    "for the bytes, ask one frame per request",
                )
            check_frame(b)
            frames = list(range(a, b + 1))
        # a folder of this request's own: two exports of one avatar at once must not
        # write each other's frames under the names their replies list
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        folder = self._export_folder(avatar.id) / stamp
        written = []
        try:
            for i in frames:
                self._check_stop()
                path = folder / frame_file_name(i, frames[-1])
                written.append(str(write_ply(path, posed(i), fields["sh_degree"])))
        except BaseException as exc:  # none of a range that failed: a retry is whole again
            shutil.rmtree(folder, ignore_errors=True)
            if isinstance(exc, OSError):
                raise storage_error(exc, "cannot write the export into", folder.parent) from exc
            raise
        return {"format": "ply", "folder": str(folder), "files": written}, None

    def _export_folder(self, avatar_id: str) -> Path:
        """``<exports>/<avatar id>``, refused where it is a symbolic link: a link planted
        in a shared exports folder had the service write (as its own user) wherever it
        pointed. The exports folder itself may be a link; the service makes what lies
        below it."""
        folder = self.exports / avatar_id
        if folder.is_symlink():
            raise ProtocolError(
                errors.STORAGE,
                f"{folder} is a symbolic link: the service writes exports only into folders "
                "of its own there; remove the link",
                {"path": str(folder)},
            )
        return folder

    def _export_bundle(self, avatar, fields):
        """The rigged bundle (docs/rigged-bundle.md): a zip in the reply or the service's
        export folder; curves and frames do not apply (it is the rig itself)."""
        if fields["frames"] is not None:
            raise ProtocolError(errors.BAD_REQUEST, "a rigged bundle has no frame range")
        data = bundle_zip(avatar)
        if fields["to"] == "reply":
            return {"format": "bundle", "bytes": len(data)}, {"file": np.frombuffer(data, np.uint8)}
        path = self._export_folder(avatar.id) / f"{avatar.id}-rig.zip"
        try:
            if path.is_symlink():  # replaced, never written through (see _export_folder)
                path.unlink()
            atomic_write(path, data)
        except OSError as exc:
            raise storage_error(exc, "cannot write the bundle into", path.parent) from exc
        return {"format": "bundle", "folder": str(path.parent), "files": [str(path)]}, None
