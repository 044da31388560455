"""Blocking client for the splatface service (Lazy Pirate: poll, time out, reopen, retry).

Usable unchanged from Blender's Python: it needs numpy, pyzmq and msgpack only. One
``Client`` may be shared between threads; calls are serialised by a lock.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from . import errors, messages
from .animation import load_animation
from .codec import PROTOCOL_VERSION, REPLY_LIMITS, Message, decode, encode
from .errors import ProtocolError

Progress = Callable[[dict[str, Any]], None]
Curves = np.ndarray | str | os.PathLike
#: Frames per render request, at most: a long take goes in parts, each answered within
#: the client's timeout (64 frames of 512 px: about 6 s on two CPU cores).
RENDER_FRAMES = 64


def _curves_array(curves: Curves | None, curve_names: list[str] | None) -> np.ndarray | None:
    """Curves as sent: an array as given, or a curves file (Live Link Face or splatface CSV,
    ``.npy``) loaded with :func:`protocol.animation.load_animation` (its curves only)."""
    if curves is None:
        return None
    if isinstance(curves, str | os.PathLike):
        if curve_names is not None:
            raise ValueError("curve_names cannot be given with a curves file (it names its own)")
        return load_animation(curves).curves
    return np.asarray(curves, np.float32)


def unresolved_host(endpoint: str) -> str | None:
    """Why a ``tcp://`` endpoint's host name does not resolve, or None. ZeroMQ keeps
    retrying such a host in silence, so a mistyped name looked like a service down."""
    host = endpoint.removeprefix("tcp://").rpartition(":")[0].strip("[]")
    if not endpoint.startswith("tcp://") or host in ("", "*"):
        return None
    try:
        socket.getaddrinfo(host, None)
    except socket.gaierror as exc:
        return f"its host {host!r} does not resolve ({exc.strerror or exc})"
    except (OSError, UnicodeError):
        return None
    return None


def allow_ipv6(sock: zmq.Socket, endpoint: str) -> None:
    """Let ``sock`` use an IPv6 ``endpoint`` (``tcp://[::1]:5555``): ZeroMQ leaves IPv6 off
    unless asked, on both the binding and the connecting side."""
    if "[" in endpoint:
        sock.setsockopt(zmq.IPV6, 1)


def load_key_file(path: str | Path, secret: bool = False) -> tuple[bytes, bytes | None]:
    """(public, secret) Z85 keys of a key file written by ``splatface keys`` (pyzmq's
    format); ``secret``: the secret key must be there too. ValueError naming the file when
    it is missing or unreadable or lacks a well-formed key."""
    import zmq.auth
    from zmq.utils import z85

    path = Path(path)
    if not path.exists():  # pyzmq says "Invalid certificate file" of a file not there
        raise ValueError(f"no key file {path} (run 'splatface keys DIR')")
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except OSError as exc:
        raise ValueError(f"cannot read the key file {path}: {exc.strerror or exc}") from None
    except (ValueError, IndexError):  # no key line in it, or one without "="
        public = secret_key = None
    for kind, key in [("public", public)] + ([("secret", secret_key)] if secret else []):
        try:
            ok = key is not None and len(key) == 40 and len(z85.decode(key)) == 32
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise ValueError(f"{path} holds no well-formed {kind} key (run 'splatface keys DIR')")
    return public, secret_key


@dataclass(frozen=True)
class CurveKeys:
    """CurveZMQ keys a client needs: the server's public key and its own key pair (Z85)."""

    server_public: bytes
    public: bytes
    secret: bytes

    @classmethod
    def from_dir(cls, folder: str | Path) -> CurveKeys:
        """Load ``server.key`` and ``client.key_secret`` written by ``splatface keys``;
        ValueError naming what is missing or malformed."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"CurveZMQ key folder {folder} does not exist")
        server_public, _ = load_key_file(folder / "server.key")
        public, secret = load_key_file(folder / "client.key_secret", secret=True)
        assert secret is not None
        return cls(server_public, public, secret)


#: Socket monitor events of the handshake. ZAP turning a key away is definite, and so is
#: a mechanism mismatch (a keyed client meeting a service without keys, or the reverse;
#: reported once: libzmq does not reconnect after it); other failures also follow a
#: connection dropped mid-handshake, so only failures with none succeeding between, for
#: ``_REFUSED_FOR`` seconds (libzmq reconnects every 100 ms) or through the last attempt,
#: count as a refusal.
_HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
)
_REFUSED_AFTER = 3
_REFUSED_FOR = 1.5
_NEEDS_KEYS = (
    "its handshake fails: it needs CurveZMQ keys (a service started with --curve-keys; pass "
    "the folder holding server.key and client.key_secret that 'splatface keys' wrote), or "
    "it is not a splatface service"
)
_WRONG_SERVER = (
    "its CurveZMQ handshake fails: server.key is not the service's key, or the service runs "
    "without keys"
)


class Client:
    """Talks to one service endpoint.

    Args:
        endpoint: e.g. ``tcp://127.0.0.1:5555``.
        timeout: seconds to wait for each reply before giving up on that attempt.
        retries: further attempts after a timeout (socket closed and reopened each time),
            so a service that restarts is picked up again. ``build``, ``render`` and
            ``export`` are never retried: a retry would start the same work again beside
            the first (pass them a ``timeout`` long enough for it).
        curve: keys for a CurveZMQ-secured service.
    """

    def __init__(
        self,
        endpoint: str,
        timeout: float = 30.0,
        retries: int = 2,
        curve: CurveKeys | None = None,
        context: zmq.Context | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.retries = retries
        self.curve = curve
        self._ctx = context or zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self._failures = 0  # handshakes failed since the last that succeeded
        self._failing_since: float | None = None  # monotonic time of the first of them
        self._failed_last = 0.0  # and of the last
        # what ``hello`` said of the service's request fields, and its version: asked
        # once a connection, where a request uses a field older services drop
        self._service_fields: tuple[dict[str, list[str]], str] | None = None
        self._lock = threading.RLock()

    # -- plumbing -----------------------------------------------------------------

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            s = self._ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            allow_ipv6(s, self.endpoint)
            try:
                if self.curve is not None:
                    s.curve_serverkey = self.curve.server_public
                    s.curve_publickey = self.curve.public
                    s.curve_secretkey = self.curve.secret
                self._failures, self._failing_since = 0, None
                self._monitor = s.get_monitor_socket(_HANDSHAKE_EVENTS)
                s.connect(self.endpoint)
            except zmq.ZMQError:
                self._close_monitor(s)
                s.close(linger=0)
                raise
            self._sock = s
        return self._sock

    def _close_monitor(self, sock: zmq.Socket) -> None:
        if self._monitor is not None:
            with contextlib.suppress(zmq.ZMQError):  # a context already terminated
                sock.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None

    def _refusal(self, attempt_over: bool = False) -> str | None:
        """Why the service refuses this client, once the monitor has seen it do so: ZAP
        turning its key away, a mechanism mismatch (keys on one side only), or
        handshakes failing since the last one that succeeded, again and again over
        ``_REFUSED_FOR`` seconds, or through the last attempt (``attempt_over``: libzmq may
        stop reconnecting after a mismatch; earlier attempts are retried, as a restarting
        service drops a connection mid-handshake too)."""
        from zmq.utils.monitor import recv_monitor_message

        keyed = self.curve is not None
        while self._monitor is not None and self._monitor.poll(0):
            message = recv_monitor_message(self._monitor)
            event = message["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._failures, self._failing_since = 0, None
            elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH and keyed:
                return (
                    "it does not know this client's key: add client.key to its "
                    "authorized_clients/ folder"
                )
            elif (
                event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                and message["value"] == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH
            ):
                return _WRONG_SERVER if keyed else _NEEDS_KEYS
            else:
                self._failures += 1
                self._failed_last = time.monotonic()
                if self._failing_since is None:
                    self._failing_since = self._failed_last
        if self._failing_since is None:
            return None
        span = self._failed_last - self._failing_since  # failures still coming, not one
        if not attempt_over and (self._failures < _REFUSED_AFTER or span < _REFUSED_FOR):
            return None
        return _WRONG_SERVER if keyed else _NEEDS_KEYS

    def _reset(self) -> None:
        self._service_fields = None  # a service started again may be another version
        if self._sock is not None:
            self._close_monitor(self._sock)
            self._sock.close(linger=0)
            self._sock = None

    def close(self) -> None:
        with self._lock:
            self._reset()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self,
        op: str,
        fields: Mapping[str, Any] | None = None,
        arrays: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        retries: int | None = None,
        on_sent: Callable[[], None] | None = None,
    ) -> Message:
        """Send one request and wait for its reply; raise :class:`ProtocolError` on error.

        ``on_sent`` is called once the request is on its way (a caller waiting on
        another thread may then start work of its own without delaying the send)."""
        timeout = self.timeout if timeout is None else timeout
        retries = self.retries if retries is None else retries
        self._check_fields(op, fields or {}, timeout)
        req_id = uuid.uuid4().hex
        header = {"protocol": PROTOCOL_VERSION, "op": op, "id": req_id}
        header.update({k: v for k, v in (fields or {}).items() if v is not None})
        frames = encode(header, {k: v for k, v in (arrays or {}).items() if v is not None})
        with self._lock:
            for attempt in range(retries + 1):
                sock = self._socket()
                sock.send_multipart(frames, copy=False)
                if on_sent is not None:
                    on_sent()
                deadline = time.monotonic() + timeout
                while (remaining := deadline - time.monotonic()) > 0:
                    if not sock.poll(min(int(remaining * 1000) + 1, 250), zmq.POLLIN):
                        last = attempt == retries and remaining <= 0.25
                        if (why := self._refusal(attempt_over=last)) is not None:
                            self._reset()
                            raise ProtocolError(
                                errors.REFUSED,
                                f"{self.endpoint} refused the connection: {why}",
                            )
                        continue
                    reply = decode(sock.recv_multipart(copy=False), REPLY_LIMITS)
                    if reply.header.get("id") != req_id:
                        continue  # a late reply to an attempt we gave up on
                    if not reply.header.get("ok", False):
                        raise ProtocolError.from_dict(reply.header.get("error"))
                    return reply
                self._reset()
        raise ProtocolError(
            errors.TIMEOUT,
            f"no reply to {op!r} from {self.endpoint} within {timeout:g} s "
            f"({retries + 1} attempt(s)); "
            + (
                unresolved_host(self.endpoint)
                or "is the service running, and not busy with longer renders (two run at a time)?"
            ),
        )

    def _check_fields(self, op: str, fields: Mapping[str, Any], timeout: float) -> None:
        """Refuse to send a field the service would drop unseen (an older service): its
        answer would ignore what was asked (a ``.ply`` without the SH degree asked for).
        Only :data:`protocol.messages.CHECKED_FIELDS` are checked, at the cost of a
        ``hello`` once a connection."""
        checked = messages.CHECKED_FIELDS.get(op, ())
        defaults = {name: messages.OPS[op].fields[name].default for name in checked}
        asked = [
            name for name, default in defaults.items() if fields.get(name) not in (None, default)
        ]
        if not asked:
            return
        if self._service_fields is None:
            hello = self.request("hello", {"client": "protocol.Client"}, timeout=timeout).header
            reported = hello.get("capabilities", {}).get("fields")
            self._service_fields = (reported or {}, hello.get("service_version", "?"))
        known, version = self._service_fields
        for name in asked:
            if name not in known.get(op, ()):
                raise ProtocolError(
                    errors.UNSUPPORTED_VERSION,
                    f"the service at {self.endpoint} (splatface {version}) does not take "
                    f"{op}'s {name!r}, and would answer as if it had not been asked: it is "
                    "older than this client; update it",
                )

    # -- ops ------------------------------------------------------------------------

    def hello(self, client: str = "protocol.Client") -> dict[str, Any]:
        return self.request("hello", {"client": client}).header

    def build(
        self,
        image: bytes | np.ndarray,
        name: str = "",
        preset: str = "default",
        face: int | None = None,
        face_box: list[float] | None = None,
        enhance: list[str] | None = None,
    ) -> str:
        """Start a build from encoded image bytes (PNG, JPEG, ...); returns the job id.

        ``enhance``: diffusion weight folders on the service's machine, ``[model]`` or
        ``[model, controlnet]``, to paint the unseen parts of the head; ``[]`` turns off
        the service's own; ``None`` leaves the service's choice.
        """
        data = np.frombuffer(image, np.uint8) if isinstance(image, bytes | bytearray) else image
        spec = messages.OPS["build"].arrays["image"]
        if data.nbytes > spec.max_bytes:  # said here: past the codec's limit it says less
            raise messages.too_large(spec, data.nbytes)
        fields = {"name": name, "preset": preset, "face": face, "face_box": face_box,
                  "enhance": None if enhance is None else [str(p) for p in enhance]}  # fmt: skip
        reply = self.request("build", fields, {"image": data}, retries=0)
        return reply.header["job"]

    def status(self, job: str, since: int = 0) -> dict[str, Any]:
        return self.request("status", {"job": job, "since": since}).header

    def cancel(self, job: str) -> dict[str, Any]:
        return self.request("cancel", {"job": job}).header

    def wait(
        self,
        job: str,
        progress: Progress | None = None,
        poll: float = 0.1,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Wait for a job to end, calling ``progress(event)`` for each progress event.

        Returns the final status when the job is done; raises :class:`ProtocolError`
        with the job's error (``cancelled``, ``no_face``...) when it is not.
        """
        since = 0
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            st = self.status(job, since)
            for ev in st.get("events", []):
                if progress is not None:
                    progress(ev)
            since = st.get("next", since)
            if st["state"] == "done":
                return st
            if st["state"] in ("failed", "cancelled"):
                raise ProtocolError.from_dict(st.get("error"))
            if deadline is not None and time.monotonic() > deadline:
                raise ProtocolError(
                    errors.TIMEOUT, f"job {job} still {st['state']} after {timeout} s"
                )
            time.sleep(poll)

    def avatars(self) -> list[dict[str, Any]]:
        return self.request("list").header["avatars"]

    def get(self, avatar: str, mesh: bool = True, rig: bool = True) -> Message:
        return self.request("get", {"avatar": avatar, "mesh": mesh, "rig": rig})

    def render(
        self,
        avatar: str,
        intrinsics: np.ndarray,
        world_to_camera: np.ndarray,
        width: int,
        height: int,
        curves: Curves | None = None,
        head: np.ndarray | None = None,
        passes: tuple[str, ...] = ("rgb", "alpha"),
        curve_names: list[str] | None = None,
        background: tuple[float, float, float] | None = None,
        timeout: float | None = None,
        rows: str = "top_down",
        on_sent: Callable[[], None] | None = None,
        near: float | None = None,
        far: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Render frames; camera arrays are ``[F, 4]``/``[F, 4, 4]`` or one camera for all.
        ``near``/``far``: the clip range along the view axis (None: the service's).

        ``curves``: an array, or the path of a curves file (see ``SPEC.md``); the head
        pose is ``head`` in either case. Returns the passes as arrays ``[F, H, W, ...]``,
        row 0 at the top, or at the bottom with ``rows="bottom_up"`` (Blender, OpenGL).
        A take of any length is rendered in requests of :data:`RENDER_FRAMES` frames
        (see :meth:`render_chunks`, which hands them over as they come); ``timeout`` is
        per request. ``on_sent``: see :meth:`request` (called for the first request).
        """
        out: dict[str, np.ndarray] = {}
        chunks = self.render_chunks(
            avatar, intrinsics, world_to_camera, width, height, curves, head, passes,
            curve_names, background, timeout, rows, near, far, on_sent=on_sent,
        )  # fmt: skip
        for start, count, part in chunks:
            if not out and start + len(next(iter(part.values()))) == count:
                return part  # one request: its arrays as they came
            for name, a in part.items():
                if name not in out:
                    out[name] = np.empty((count, *a.shape[1:]), a.dtype)
                out[name][start : start + len(a)] = a
        return out

    def render_chunks(
        self,
        avatar: str,
        intrinsics: np.ndarray,
        world_to_camera: np.ndarray,
        width: int,
        height: int,
        curves: Curves | None = None,
        head: np.ndarray | None = None,
        passes: tuple[str, ...] = ("rgb", "alpha"),
        curve_names: list[str] | None = None,
        background: tuple[float, float, float] | None = None,
        timeout: float | None = None,
        rows: str = "top_down",
        near: float | None = None,
        far: float | None = None,
        frames: int | None = None,
        on_sent: Callable[[], None] | None = None,
    ) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
        """:meth:`render` a take of any length, a request at a time, for a caller that
        writes frames as they come instead of holding the take's passes: yields
        ``(first frame, frames in the take, passes [n, H, W, ...])``. ``frames``: frames
        per request, at most :data:`RENDER_FRAMES` and what
        :func:`protocol.messages.frames_per_render` allows (a request's reply is at most
        1 GiB). Per-frame arrays each have the take's F rows, or one row for all."""
        curves = _curves_array(curves, curve_names)
        intrinsics = np.asarray(intrinsics, np.float64).reshape(-1, 4)
        world_to_camera = np.asarray(world_to_camera, np.float64).reshape(-1, 4, 4)
        head = None if head is None else np.asarray(head, np.float64).reshape(-1, 4, 4)
        per_frame = {"intrinsics": intrinsics, "world_to_camera": world_to_camera,
                     "curves": curves, "head": head}  # fmt: skip
        # curves of another shape than [F, columns] go whole, for the service to refuse
        counts = {k: len(a) for k, a in per_frame.items()
                  if a is not None and (k != "curves" or a.ndim == 2)}  # fmt: skip
        many = set(counts.values()) - {1}
        if len(many) > 1:
            raise ProtocolError(
                errors.BAD_REQUEST,
                "per-frame arrays disagree on the frame count: "
                + ", ".join(f"{k} has {n}" for k, n in counts.items()),
            )
        count = many.pop() if many else 1
        step = max(
            1, min(frames or RENDER_FRAMES, messages.frames_per_render(width, height, passes))
        )
        fields = {
            "avatar": avatar,
            "width": int(width),
            "height": int(height),
            "passes": list(passes),
            "curve_names": curve_names,
            "background": None if background is None else [float(b) for b in background],
            "rows": rows,
            **({} if near is None else {"near": float(near)}),
            **({} if far is None else {"far": float(far)}),
        }
        # an empty array goes as it is, in one request, for the service to name
        for start in range(0, count, step) if count else [0]:
            stop = min(count, start + step)
            arrays = {k: a[start:stop] if counts.get(k, 1) > 1 else a
                      for k, a in per_frame.items()}  # fmt: skip
            reply = self.request(
                "render", fields, arrays, timeout=timeout, retries=0,
                on_sent=on_sent if start == 0 else None,
            )  # fmt: skip
            yield start, count, dict(reply.arrays)

    def export(
        self,
        avatar: str,
        curves: Curves | None = None,
        head: np.ndarray | None = None,
        frame: int = 0,
        frames: tuple[int, int] | None = None,
        to: str = "reply",
        curve_names: list[str] | None = None,
        timeout: float | None = None,
        format: str = "ply",
        sh_degree: int | None = None,
    ) -> Message:
        """Export posed Gaussians as ``.ply``, or with ``format='bundle'`` the rigged
        bundle (a zip: glTF head with 52 ARKit morph targets plus the bound Gaussians):
        the bytes (``to='reply'``) or files the service writes into its export folder
        (``to='folder'``, names in the reply). ``curves`` as for :meth:`render`.
        ``sh_degree``: the ``.ply``'s SH degree (default: the avatar's own); 3 for
        loaders that take only 3DGS's training output (zeros, the same colours)."""
        curves = _curves_array(curves, curve_names)
        return self.request(
            "export",
            {
                "avatar": avatar,
                "format": format,
                "frame": frame,
                "frames": None if frames is None else [int(frames[0]), int(frames[1])],
                "to": to,
                "curve_names": curve_names,
                "sh_degree": sh_degree,
            },
            {
                "curves": curves,
                "head": None if head is None else np.asarray(head, np.float64).reshape(-1, 4, 4),
            },
            timeout=timeout,
            retries=0,
        )

    def delete(self, avatar: str) -> dict[str, Any]:
        return self.request("delete", {"avatar": avatar}).header
