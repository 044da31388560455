"""Service connection settings, a local service started on demand, and builds that
report progress; no ``bpy`` here (the operators feed these from preferences).
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._protocol import (
    Client,
    CurveKeys,
    ProtocolError,
    errors,
    is_loopback_endpoint,
    wait_for_endpoint,
)

#: Overrides the preference, so render-farm workers can point at a shared service.
ENDPOINT_ENV = "SPLATFACE_ENDPOINT"
#: A folder holding ``server.key`` and ``client.key_secret`` (``splatface keys``).
CURVE_KEYS_ENV = "SPLATFACE_CURVE_KEYS"


@dataclass(frozen=True)
class ConnectionSettings:
    """How to reach the service.

    Attributes:
        endpoint: ZeroMQ endpoint, e.g. ``tcp://127.0.0.1:5555``.
        timeout: seconds to wait for each reply.
        curve_keys: folder with CurveZMQ client keys for a remote service, or "".
        auto_start: start a local service with ``service_python`` when none answers.
        service_python: the Python of an environment with splatface's service installed.
        store: avatar store for an auto-started service ("" = the service's default).
    """

    endpoint: str = "tcp://127.0.0.1:5555"
    timeout: float = 30.0
    curve_keys: str = ""
    auto_start: bool = False
    service_python: str = ""
    store: str = ""

    def resolved(self, environ: dict[str, str] | None = None) -> ConnectionSettings:
        """These settings with ``SPLATFACE_ENDPOINT``/``SPLATFACE_CURVE_KEYS`` applied."""
        env = os.environ if environ is None else environ
        endpoint = env.get(ENDPOINT_ENV, "").strip() or self.endpoint.strip()
        keys = env.get(CURVE_KEYS_ENV, "").strip() or self.curve_keys
        return ConnectionSettings(
            endpoint, self.timeout, keys, self.auto_start, self.service_python, self.store
        )

    def client(self) -> Client:
        """A client for these settings (environment applied)."""
        s = self.resolved()
        if not s.endpoint.startswith(("tcp://", "ipc://", "inproc://")):
            raise ValueError(f"service endpoint {s.endpoint!r} must start with tcp:// or ipc://")
        if s.endpoint.startswith("tcp://"):
            check_tcp_endpoint(s.endpoint)
        curve = CurveKeys.from_dir(s.curve_keys) if s.curve_keys else None
        return Client(s.endpoint, timeout=s.timeout, retries=1, curve=curve)


def check_tcp_endpoint(endpoint: str) -> None:
    """ValueError saying what is wrong with a ``tcp://HOST:PORT`` endpoint: each mistake
    was 'needs a port', also for one that has its port (``tcp://host:5555/``). A port
    with leading zeros is fine, as ZeroMQ reads it."""
    m = re.fullmatch(r"tcp://([^/]*?)(?::(\d+))?(/.*)?", endpoint)
    if m is None or not m.group(1):
        raise ValueError(f"service endpoint {endpoint!r} needs a host: tcp://HOST:PORT")
    if m.group(2) is None:
        raise ValueError(f"service endpoint {endpoint!r} needs a port: tcp://HOST:PORT")
    if m.group(3) is not None:
        raise ValueError(
            f"service endpoint {endpoint!r} has {m.group(3)!r} after its port: tcp://HOST:PORT"
        )
    if not 1 <= int(m.group(2)) <= 65535:
        raise ValueError(f"service endpoint {endpoint!r}: the port must be from 1 to 65535")
    if m.group(1) == "*":
        raise ValueError(
            f"service endpoint {endpoint!r} is how a service listens on every address: "
            "connect to its machine, tcp://HOST:PORT (tcp://127.0.0.1:PORT on this one)"
        )


@dataclass
class LocalService:
    """A service process this add-on started (stopped when Blender quits)."""

    proc: subprocess.Popen
    endpoint: str
    log_path: Path

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_local_service(
    python: str, endpoint: str, store: str = "", log_dir: str | Path = "", timeout: float = 120
) -> LocalService:
    """Run ``python -m inference_service serve`` and wait until it listens.

    Raises ``ValueError`` for a bad path and ``RuntimeError`` with the log's tail when the
    service does not come up.
    """
    if not python or not Path(python).is_file():
        raise ValueError(f"service Python {python!r} is not a file; set it in the preferences")
    log_path = Path(log_dir or Path.home()) / "splatface-service.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [python, "-m", "inference_service", "serve", "--endpoint", endpoint]
    if store:
        cmd += ["--store", store]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True
        )
    endpoint = wait_for_endpoint(proc, timeout)
    if endpoint is None:
        proc.kill()
        proc.wait()
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-10:])
        raise RuntimeError(f"the local service did not start within {timeout:.0f} s:\n{tail}")
    return LocalService(proc, endpoint, log_path)


@dataclass
class BuildState:
    """What the panel shows about a build; updated on the main thread only."""

    job: str = ""
    state: str = ""
    stage: str = ""
    fraction: float = 0.0
    message: str = ""
    faces: list[dict[str, Any]] = field(default_factory=list)
    avatar_id: str = ""
    error: str = ""


def run_build(
    client: Client,
    image: bytes,
    name: str = "",
    preset: str = "fast",
    face: int | None = None,
    enhance: list[str] | None = None,
    on_status: Callable[[dict[str, Any]], None] | None = None,
    cancel: threading.Event | None = None,
    poll: float = 0.1,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Build an avatar, calling ``on_status(status)`` after every poll (from this thread).

    Setting ``cancel`` asks the service to cancel the job, as does passing ``timeout``
    seconds (None: no limit; a build with diffusion fill on a CPU takes many minutes, and
    a service that stops answering fails the status poll anyway). ``enhance``: diffusion weight
    folders as the protocol's build option (None: the service's choice). Returns the final
    status when done; raises :class:`ProtocolError` (``cancelled``, ``no_face``,
    ``timeout``, ``bad_request`` for an unusable ``enhance`` folder...). A build cancelled
    here that failed before the cancel reached the service raises ``cancelled`` too: the
    user asked it to stop (a build of a face the photo lacks, cancelled at once, was
    reported failed when the failure came first).
    """
    job = client.build(image, name=name, preset=preset, face=face, enhance=enhance)
    since = 0
    asked_cancel = False
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        if cancel is not None and cancel.is_set() and not asked_cancel:
            client.cancel(job)
            asked_cancel = True
        st = client.status(job, since)
        since = st.get("next", since)
        if on_status is not None:
            on_status(st)
        if st["state"] == "done":
            return st
        if st["state"] in ("failed", "cancelled"):
            if asked_cancel:  # it failed before the cancel reached it: asked for, no error
                raise ProtocolError(errors.CANCELLED, "the build was cancelled")
            raise ProtocolError.from_dict(st.get("error"))
        if deadline is not None and time.monotonic() > deadline:
            client.cancel(job)
            raise ProtocolError(errors.TIMEOUT, f"build {job} took longer than {timeout:.0f} s")
        time.sleep(poll)


def listening(endpoint: str, timeout: float = 0.25) -> bool:
    """Whether something listens at a local ``endpoint`` now: a TCP connection is taken
    (or refused at once), an ipc socket file exists. ZeroMQ itself cannot tell: it waits
    for a peer that may come. True where it cannot be told (a wildcard port, inproc)."""
    import socket
    from urllib.parse import urlsplit

    scheme, _, rest = endpoint.partition("://")
    if scheme == "ipc":
        return os.path.exists(rest)
    if scheme != "tcp":
        return True
    try:
        parts = urlsplit(endpoint)
        host, port = parts.hostname, parts.port
    except ValueError:
        return True
    if not host or not port:
        return True
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def may_start_local(settings: ConnectionSettings) -> bool:
    """Whether a service may be started for ``settings`` when none answers: only on this
    machine, and not for CurveZMQ keys (a service started here would run without them,
    and refuse the keyed client)."""
    return (
        settings.auto_start and is_loopback_endpoint(settings.endpoint) and not settings.curve_keys
    )
