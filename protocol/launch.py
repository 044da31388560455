"""Starting a service process: the line it prints when it listens, and waiting for it.

Shared by the CLI's private services and the Blender add-on's local one.
"""

from __future__ import annotations

import ipaddress
import subprocess
import threading
from urllib.parse import urlsplit

#: ``splatface serve`` prints this, then the endpoint it bound, once it accepts requests.
READY_PREFIX = "splatface service listening on "


def wait_for_endpoint(proc: subprocess.Popen, timeout: float) -> str | None:
    """The endpoint a starting service prints on its (text) stdout, or None if it has not
    within ``timeout`` seconds or exits first. The caller decides what failure means."""
    found: list[str] = []

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.startswith(READY_PREFIX):
                found.append(line[len(READY_PREFIX) :].strip())
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    return found[0] if found else None


def is_loopback_endpoint(endpoint: str) -> bool:
    """True for ``ipc://``/``inproc://`` and ``tcp://`` on a loopback address: a service
    only this machine can reach (one a client may start, one that may run without keys)."""
    scheme = endpoint.split("://", 1)[0]
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    host = urlsplit(endpoint).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
