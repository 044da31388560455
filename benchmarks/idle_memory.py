"""An idle service's memory with ten avatars stored (issue 8: under 1.5 GB).

Ten avatars are built (``default`` preset, the two sample portraits in turn) into one
store by one service. Then a fresh service is started on that store and its resident
memory is read: at rest, after listing the avatars, and after rendering every one of them
once (avatars load on demand and the service keeps the last few). The baseline is the
same fresh service on an empty store, measured in the same run.

    .venv/bin/python benchmarks/idle_memory.py [--avatars N] [--preset P]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import emit, machine
from build import peak_rss_mb, png, portraits


def rss_mb(pid: int) -> float:
    """A live process's resident memory now (Linux ``VmRSS``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no VmRSS for process {pid}")


def settle_rss(pid: int, seconds: float = 3.0) -> float:
    """Resident memory once the service has finished warming its kernels."""
    time.sleep(seconds)
    return rss_mb(pid)


def main() -> None:
    from protocol.camera import intrinsics_from_fov, orbit
    from tests.conftest import ServiceProcess

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--avatars", type=int, default=10)
    parser.add_argument("--preset", default="default")
    args = parser.parse_args()
    images = list(portraits().values())
    with tempfile.TemporaryDirectory() as tmp:
        empty = ServiceProcess(Path(tmp) / "empty")
        try:
            with empty.client(timeout=600) as c:
                c.hello()
            baseline = settle_rss(empty.proc.pid)
        finally:
            empty.stop()

        store = Path(tmp) / "store"
        builder = ServiceProcess(store)
        try:
            with builder.client(timeout=900) as c:
                ids = [c.wait(c.build(png(images[i % len(images)]), name=f"a{i}",
                                      preset=args.preset))["avatar_id"]
                       for i in range(args.avatars)]  # fmt: skip
        finally:
            builder.stop()

        svc = ServiceProcess(store)
        try:
            with svc.client(timeout=600) as c:
                c.hello()
                at_rest = settle_rss(svc.proc.pid)
                listed = len(c.avatars())
                after_list = rss_mb(svc.proc.pid)
                k = intrinsics_from_fov(256, 256, 30)
                for avatar_id in ids:
                    c.render(avatar_id, k, orbit(np.zeros(3), 0.9), 256, 256)
                after_renders = rss_mb(svc.proc.pid)
            peak = peak_rss_mb(svc.proc.pid)
        finally:
            svc.stop()
    emit({"benchmark": "idle_memory", "machine": machine(), "preset": args.preset,
          "avatars": listed, "empty_store_rss_mb": baseline, "idle_rss_mb": at_rest,
          "after_list_rss_mb": after_list, "after_rendering_each_rss_mb": after_renders,
          "peak_rss_mb": peak, "ratio_idle_vs_empty": round(at_rest / baseline, 3),
          "ratio_after_renders_vs_empty": round(after_renders / baseline, 3)})  # fmt: skip


if __name__ == "__main__":
    main()
