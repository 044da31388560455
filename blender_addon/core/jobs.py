"""Work off Blender's UI thread: a daemon worker thread and a main-thread queue.

Blender's data may only be touched from the main thread, and a blocked main thread
freezes the UI. So sockets live on a :class:`Worker` thread that only *enqueues* results
(as callbacks) on a :class:`MainQueue`; a ``bpy.app.timers`` callback calls
:meth:`MainQueue.drain` on the main thread. Timers do not fire in background mode, so
tests and batch scripts call ``drain`` themselves.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from typing import Any

log = logging.getLogger(__name__)


class MainQueue:
    """Callbacks posted from any thread, run in order by :meth:`drain`."""

    def __init__(self) -> None:
        self._q: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]]] = queue.SimpleQueue()

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        self._q.put((fn, args))

    def drain(self, budget_s: float = 0.02) -> int:
        """Run queued callbacks for up to ``budget_s`` seconds; returns how many ran.

        A failing callback is logged and does not stop the others (the UI must survive).
        """
        ran = 0
        deadline = time.monotonic() + budget_s
        while True:
            try:
                fn, args = self._q.get_nowait()
            except queue.Empty:
                return ran
            try:
                fn(*args)
            except Exception:
                log.exception("splatface: a main-thread callback failed")
            ran += 1
            if time.monotonic() > deadline:
                return ran


class Worker:
    """One daemon thread running submitted calls in order.

    ``submit`` returns a :class:`Future`; with ``key``, a call still waiting under the
    same key is dropped (its future cancelled) in favour of the new one, so a viewport
    that asks for frame after frame gets the latest, never a backlog.
    """

    def __init__(self, name: str = "splatface-worker") -> None:
        self._name = name
        self._cond = threading.Condition()
        self._pending: list[tuple[str | None, Future, Callable[[], Any]]] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._running = False

    def submit(self, fn: Callable[[], Any], key: str | None = None) -> Future:
        future: Future = Future()
        with self._cond:
            if self._stopping:
                raise RuntimeError("the worker has stopped")
            if key is not None:
                for item in [p for p in self._pending if p[0] == key]:
                    self._pending.remove(item)
                    item[1].cancel()
            self._pending.append((key, future, fn))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify()
        return future

    def busy(self) -> bool:
        with self._cond:
            return bool(self._pending) or self._running

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._pending:
                    return
                _key, future, fn = self._pending.pop(0)
                self._running = True
            try:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as exc:
                        future.set_exception(exc)
            finally:
                with self._cond:
                    self._running = False

    def stop(self, timeout: float = 1.0) -> None:
        """Drop waiting calls and let the thread end (a call in flight finishes on its own)."""
        with self._cond:
            self._stopping = True
            for _key, future, _fn in self._pending:
                future.cancel()
            self._pending.clear()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)


def on_main_thread(future: Future, main: MainQueue, fn: Callable[[Future], Any]) -> None:
    """Call ``fn(future)`` on the main thread once ``future`` is done (not if cancelled)."""

    def done(f: Future) -> None:
        try:
            f.exception()
        except CancelledError:
            return
        main.post(fn, f)

    future.add_done_callback(done)
