"""Build jobs: queued, run one at a time off the socket loop, cancellable, with events."""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from protocol import errors
from protocol.errors import ProtocolError

from .build.builder import BuildOptions, build_avatar
from .store import Store

log = logging.getLogger(__name__)
MAX_FINISHED = 256
MAX_QUEUED = 32


@dataclass
class Job:
    id: str
    options: BuildOptions
    image: bytes | None
    state: str = "queued"  # queued, running, done, failed, cancelled
    stage: str = "queued"
    fraction: float = 0.0
    message: str = ""
    events: list[dict[str, Any]] = field(default_factory=list)
    avatar_id: str | None = None
    faces: list[dict[str, Any]] | None = None
    error: ProtocolError | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    created: float = field(default_factory=time.time)

    def report(self, stage: str, fraction: float, message: str) -> None:
        """Progress callback for the builder; raises ``cancelled`` when asked to stop."""
        if self.cancel.is_set():
            raise ProtocolError(errors.CANCELLED, "the build was cancelled")
        self.stage, self.fraction, self.message = stage, float(fraction), message
        self.events.append(
            {
                "stage": stage,
                "fraction": round(float(fraction), 4),
                "message": message,
                "time": round(time.time() - self.created, 3),
            }
        )

    def set_faces(self, faces: list[dict[str, Any]]) -> None:
        self.faces = faces

    def status(self, since: int = 0) -> dict[str, Any]:
        out: dict[str, Any] = {
            "job": self.id,
            "state": self.state,
            "stage": self.stage,
            "fraction": self.fraction,
            "message": self.message,
            "events": self.events[since:],
            "next": len(self.events),
        }
        if self.faces is not None:
            out["faces"] = self.faces
        if self.avatar_id:
            out["avatar_id"] = self.avatar_id
        if self.error is not None:
            out["error"] = self.error.to_dict()
        return out


class JobManager:
    """Runs builds on one worker thread (a build already uses every core it can)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="splatface-builder", daemon=True)
        self._thread.start()

    def submit(self, image: bytes, options: BuildOptions) -> Job:
        with self._lock:
            waiting = sum(j.state == "queued" for j in self._jobs.values())
            if waiting >= MAX_QUEUED:
                raise ProtocolError(errors.BUSY, f"{waiting} builds are already waiting; try later")
            job = Job(id=secrets.token_hex(8), options=options, image=image)
            self._jobs[job.id] = job
            self._trim()
        self._queue.put(job)
        return job

    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise ProtocolError(errors.NOT_FOUND, f"no job {job_id!r}")
        return job

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        job.cancel.set()
        with self._lock:
            if job.state == "queued":
                self._finish(
                    job, "cancelled", ProtocolError(errors.CANCELLED, "cancelled before it started")
                )
        return job

    def active(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {
                    "job": j.id,
                    "state": j.state,
                    "stage": j.stage,
                    "fraction": j.fraction,
                    "name": j.options.name,
                }
                for j in self._jobs.values()
                if j.state in ("queued", "running")
            ]

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._lock:
            for job in self._jobs.values():
                job.cancel.set()
        self._queue.put(None)
        self._thread.join(timeout)

    def _trim(self) -> None:
        finished = [k for k, j in self._jobs.items() if j.state in ("done", "failed", "cancelled")]
        for k in finished[: max(0, len(finished) - MAX_FINISHED)]:
            del self._jobs[k]

    def _finish(self, job: Job, state: str, error: ProtocolError | None = None) -> None:
        job.error, job.image = error, None
        # the status's own stage and fraction end as its last event does; the state goes
        # last, so a status read meanwhile (without the lock) that says done has it all
        job.stage, job.message = state, error.message if error else "done"
        job.fraction = 1.0 if state == "done" else job.fraction
        job.events.append(
            {
                "stage": state,
                "fraction": job.fraction,
                "message": job.message,
                "time": round(time.time() - job.created, 3),
            }
        )
        job.state = state

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                if job.state != "queued":
                    continue
                job.state = "running"
            log.info("job %s started", job.id)
            try:
                avatar_id = self.store.new_id()
                avatar = build_avatar(
                    job.image or b"",
                    job.options,
                    avatar_id,
                    job.report,
                    on_faces=job.set_faces,
                )
                job.report("save", 0.97, "saving")
                self.store.save(avatar)
                job.avatar_id = avatar_id
                with self._lock:
                    self._finish(job, "done")
                log.info("job %s built avatar %s", job.id, avatar_id)
            except ProtocolError as exc:
                state = "cancelled" if exc.code == errors.CANCELLED else "failed"
                with self._lock:
                    self._finish(job, state, exc)
                log.info("job %s %s: %s", job.id, state, exc.message)
            except Exception as exc:
                log.exception("job %s failed", job.id)
                err = ProtocolError(
                    errors.INTERNAL, f"build failed: {exc}", remote_traceback=traceback.format_exc()
                )
                with self._lock:
                    self._finish(job, "failed", err)
