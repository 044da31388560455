"""Build speed and quality: the astronaut and Grace Hopper, every preset, in a service.

Each build runs in a fresh ``splatface serve`` process (so its peak memory is the
build's) and is timed end to end through the protocol. The skeleton builder (detect,
align, project colours) is measured in the same run as the time the build takes up to
the end of its ``gaussians`` stage; the rest is the geometry and photo fits it did not
have (pseudo-views and the COIN fit). Quality: PSNR of the input view over the inner
face, as ``tests/test_builder``.
"""

from __future__ import annotations

import io
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import emit, machine


def portraits() -> dict[str, np.ndarray]:
    import matplotlib.cbook
    import skimage.data
    from PIL import Image

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        hopper = np.asarray(Image.open(f).convert("RGB"))
    return {"astronaut": skimage.data.astronaut(), "grace_hopper": hopper}


def nudged(img: np.ndarray, seed: int) -> np.ndarray:
    """``img`` with every channel moved by -1, 0 or +1 level (seeded; 0: ``img`` itself):
    a photo no one could tell apart, to measure how much a figure moves by chance."""
    if seed == 0:
        return img
    rng = np.random.default_rng(seed)
    return np.clip(img.astype(np.int16) + rng.integers(-1, 2, img.shape), 0, 255).astype(np.uint8)


def png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def peak_rss_mb(pid: int) -> float | None:
    """A live process's peak resident memory (Linux ``VmHWM``)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def main() -> None:
    from inference_service.store import Store
    from tests.conftest import ServiceProcess
    from tests.test_builder import face_psnr

    base = {"benchmark": "build", "machine": machine()}
    for name, img in portraits().items():
        for preset in ("fast", "default", "high"):
            with tempfile.TemporaryDirectory() as tmp:
                store = Path(tmp) / "store"
                svc = ServiceProcess(store)
                try:
                    with svc.client(timeout=600) as c:
                        t = time.perf_counter()
                        events = []
                        st = c.wait(c.build(png(img), name=name, preset=preset),
                                    progress=events.append)  # fmt: skip
                        seconds = time.perf_counter() - t
                    peak = peak_rss_mb(svc.proc.pid)
                    avatar = Store(store).load(st["avatar_id"])
                finally:
                    svc.stop()
                skeleton = next(e["time"] for e in events if e["stage"] == "views")
                emit({**base, "portrait": name, "preset": preset,
                      "build_s": round(seconds, 2), "skeleton_equivalent_s": round(skeleton, 2),
                      "ratio_vs_skeleton": round(seconds / max(skeleton, 1e-3), 2),
                      "gaussians": len(avatar.gaussians),
                      "input_view_psnr_db": round(face_psnr(avatar, img), 2),
                      "landmark_rms": avatar.meta["landmark_rms"],
                      "service_peak_rss_mb": peak})  # fmt: skip


if __name__ == "__main__":
    main()
