"""The add-on's process-wide state: one client, one worker thread, the main-thread queue.

Operators submit socket work with :func:`submit`; results come back through
:data:`main_queue`, drained by a ``bpy.app.timers`` callback (:func:`drain`). Timers do
not run in background mode: scripts and tests call :func:`drain` or :func:`settle`.
"""

from __future__ import annotations

import atexit
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import bpy

from . import prefs
from ._protocol import Client
from .core.jobs import MainQueue, Worker, on_main_thread
from .core.service import (
    ConnectionSettings,
    LocalService,
    listening,
    may_start_local,
    start_local_service,
)

DRAIN_INTERVAL_S = 0.05

main_queue = MainQueue()
_worker: Worker | None = None
_build_worker: Worker | None = None
_client: Client | None = None
_client_settings: ConnectionSettings | None = None
_client_lock = threading.Lock()
local_service: LocalService | None = None
build_cancel = threading.Event()
#: Counts the times avatars left the service's store (deleted here or elsewhere): views
#: that keep layers per avatar drop them when it moves, so a deleted avatar's proxy asks
#: again (and shows why it is gone) instead of showing the avatar from memory.
store_epoch = 0


def worker() -> Worker:
    global _worker
    if _worker is None:
        _worker = Worker()
    return _worker


def build_worker() -> Worker:
    """A thread of its own for builds: a build follows its job for minutes, and the
    viewport, lists and exports must not wait behind it on :func:`worker`."""
    global _build_worker
    if _build_worker is None:
        _build_worker = Worker("splatface-build")
    return _build_worker


def client() -> Client:
    """The shared client for the current preferences (rebuilt when they change)."""
    global _client, _client_settings
    settings = prefs.connection_settings().resolved()
    with _client_lock:
        if _client is None or settings != _client_settings:
            if _client is not None:
                # closed once its request in flight (up to the timeout) ends, off this
                # thread: a preference change must not stall the UI behind it
                threading.Thread(target=_client.close, daemon=True).start()
            _client = settings.client()
            _client_settings = settings
        return _client


def settings() -> ConnectionSettings:
    return prefs.connection_settings().resolved()


_start_lock = threading.Lock()


def start_if_down() -> None:
    """Before a request (worker threads only: it may block while a service starts): start
    the configured local service where the preferences allow it and nothing listens at
    its endpoint, so any first request (Connect, a build, an import, a render) starts it."""
    global local_service
    s = settings()
    if not may_start_local(s):
        return
    with _start_lock:  # the worker, the build worker and renders may all ask at once
        if local_service is not None and local_service.proc.poll() is None:
            return
        if not listening(s.endpoint):
            folder = (
                bpy.utils.extension_path_user(__package__, create=True) if _is_extension() else ""
            )
            local_service = start_local_service(s.service_python, s.endpoint, s.store, folder)


def _is_extension() -> bool:
    return __package__.startswith("bl_ext.")


def submit(
    fn: Callable[[], Any],
    then: Callable[[Future], Any] | None = None,
    key: str | None = None,
    on: Callable[[], Worker] = worker,
) -> Future:
    """Run ``fn`` on the worker (``on``: :func:`worker` or :func:`build_worker`);
    ``then(future)`` runs on the main thread afterwards."""
    future = on().submit(fn, key=key)
    if then is not None:
        on_main_thread(future, main_queue, then)
    return future


def drain() -> float:
    """The timer callback: run queued main-thread callbacks; returns the next interval."""
    main_queue.drain()
    return DRAIN_INTERVAL_S


def settle(timeout: float = 60.0) -> None:
    """Drain until the worker is idle and the queue empty (background mode and tests)."""
    deadline = time.monotonic() + timeout
    while True:
        ran = main_queue.drain(budget_s=1.0)
        if not ran and not worker().busy() and not build_worker().busy():
            if not main_queue.drain():
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"splatface work still running after {timeout:.0f} s")
        time.sleep(0.01)


def store_changed() -> None:
    """Avatars left the store: see :data:`store_epoch`."""
    global store_epoch
    store_epoch += 1


def tag_redraw() -> None:
    """Redraw the sidebars so state changes show (no-op without a window)."""
    wm = bpy.context.window_manager
    if wm is None:
        return
    for window in wm.windows:
        for area in window.screen.areas:
            if area.type == "VIEW_3D":
                area.tag_redraw()


def shutdown() -> None:
    """Stop the worker, close the socket, stop a service we started."""
    global _worker, _build_worker, _client, local_service
    for w in (_worker, _build_worker):
        if w is not None:
            w.stop()
    _worker = _build_worker = None
    with _client_lock:
        if _client is not None:
            _client.close()
            _client = None
    if local_service is not None:
        local_service.stop()
        local_service = None


atexit.register(shutdown)
