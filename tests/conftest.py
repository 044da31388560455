"""Shared fixtures: real service processes on real loopback sockets, sample photos."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inference_service.cli import wait_ready
from protocol import Client

REPO = Path(__file__).resolve().parents[1]


class ServiceProcess:
    """``python -m inference_service serve`` in a child process."""

    def __init__(self, store: Path, endpoint: str = "tcp://127.0.0.1:0", extra=()) -> None:
        self.store = Path(store)
        self.log = self.store.parent / f"{self.store.name}-service.log"
        cmd = [sys.executable, "-m", "inference_service", "serve", "--endpoint", endpoint,
               "--store", str(store), *extra]  # fmt: skip
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO
            )
        self.endpoint = wait_ready(self.proc, timeout=120, log_path=self.log)

    def client(self, **kw) -> Client:
        kw.setdefault("timeout", 60)
        return Client(self.endpoint, **kw)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def encode_png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    import skimage.data

    return skimage.data.astronaut()


@pytest.fixture(scope="session")
def astronaut_png(astronaut) -> bytes:
    return encode_png(astronaut)


@pytest.fixture(scope="session")
def hopper() -> np.ndarray:
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        return np.asarray(Image.open(f).convert("RGB"))


@pytest.fixture(scope="session")
def service(tmp_path_factory):
    """One shared service for tests that do not stop it."""
    svc = ServiceProcess(tmp_path_factory.mktemp("shared") / "store")
    yield svc
    svc.stop()


@pytest.fixture(scope="session")
def client(service):
    with service.client() as c:
        yield c


@pytest.fixture(scope="session")
def astronaut_id(client, astronaut_png) -> str:
    """The astronaut built once (fast preset) on the shared service."""
    job = client.build(astronaut_png, name="astronaut", preset="fast")
    return client.wait(job, timeout=300)["avatar_id"]


@pytest.fixture(scope="session")
def hopper_png(hopper) -> bytes:
    return encode_png(hopper)


@pytest.fixture(scope="session")
def hopper_id(client, hopper_png) -> str:
    """Grace Hopper built once (fast preset) on the shared service."""
    job = client.build(hopper_png, name="grace_hopper", preset="fast")
    return client.wait(job, timeout=300)["avatar_id"]


@pytest.fixture
def env_store(tmp_path, monkeypatch) -> Path:
    """A private default store for CLI runs."""
    store = tmp_path / "avatars"
    monkeypatch.setenv("SPLATFACE_STORE", str(store))
    return store


def pytest_configure(config):
    os.environ.setdefault("GLOG_minloglevel", "2")
