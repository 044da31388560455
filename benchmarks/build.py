"""Build speed and quality: the astronaut and Grace Hopper, every preset, in a service.

Each build runs in a fresh ``splatface serve`` process (so its peak memory is the
build's) and is timed end to end through the protocol. The skeleton builder (detect,
align, project colours) is measured in the same run as the time the build takes up to
the end of its ``gaussians`` stage; the rest is the geometry and photo fits it did not
have (pseudo-views and the COIN fit). Quality: PSNR of the input view over the inner
face, as ``tests/test_builder``.

First a ``warm_up`` build (the astronaut, ``fast``), reported on its own: in a fresh
checkout it also waits for numba to compile the kernels, which the service's warm-up
starts at once but a build started at once waits for.

Last, a ``large_photo`` record: the astronaut, twice as large, on a 9000x7000 grey
canvas (63 MP, as a phone's or a camera's photo), built with ``fast``: its time and the
service's peak memory, against the astronaut's own ``fast`` build in the same run.
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

    def built(image: bytes, name: str, preset: str):
        """(seconds, the service's peak MB, the avatar, progress events) of one build."""
        with tempfile.TemporaryDirectory() as tmp:
            store = Path(tmp) / "store"
            svc = ServiceProcess(store)
            try:
                with svc.client(timeout=600) as c:
                    t = time.perf_counter()
                    events = []
                    st = c.wait(c.build(image, name=name, preset=preset),
                                progress=events.append)  # fmt: skip
                    seconds = time.perf_counter() - t
                peak = peak_rss_mb(svc.proc.pid)
                avatar = Store(store).load(st["avatar_id"])
            finally:
                svc.stop()
        return seconds, peak, avatar, events

    base = {"benchmark": "build", "machine": machine()}
    # in a fresh checkout the first build also waits for the kernels to compile (numba
    # caches them on disk): that build is reported on its own, and the rest are a warm
    # cache's
    first, _, _, _ = built(png(portraits()["astronaut"]), "warm-up", "fast")
    emit({**base, "portrait": "astronaut", "preset": "fast", "warm_up": True,
          "build_s": round(first, 2)})  # fmt: skip
    small = None
    for name, img in portraits().items():
        for preset in ("fast", "default", "high"):
            seconds, peak, avatar, events = built(png(img), name, preset)
            if (name, preset) == ("astronaut", "fast"):
                small = seconds, peak
            skeleton = next(e["time"] for e in events if e["stage"] == "views")
            emit({**base, "portrait": name, "preset": preset,
                  "build_s": round(seconds, 2), "skeleton_equivalent_s": round(skeleton, 2),
                  "ratio_vs_skeleton": round(seconds / max(skeleton, 1e-3), 2),
                  "gaussians": len(avatar.gaussians),
                  "input_view_psnr_db": round(face_psnr(avatar, img), 2),
                  "landmark_rms": avatar.meta["landmark_rms"],
                  "service_peak_rss_mb": peak})  # fmt: skip

    from PIL import Image

    canvas = Image.new("RGB", (9000, 7000), (128, 128, 128))
    canvas.paste(Image.fromarray(portraits()["astronaut"]).resize((1024, 1024)), (4000, 3000))
    buf = io.BytesIO()
    canvas.save(buf, format="JPEG", quality=92)
    seconds, peak, avatar, _ = built(buf.getvalue(), "large", "fast")
    emit({**base, "portrait": "large_photo", "preset": "fast", "megapixels": 63.0,
          "build_s": round(seconds, 2), "ratio_vs_astronaut_fast": round(seconds / small[0], 2),
          "service_peak_rss_mb": peak,
          "peak_ratio_vs_astronaut_fast": round(peak / small[1], 2) if peak and small[1] else None,
          "gaussians": len(avatar.gaussians)})  # fmt: skip


if __name__ == "__main__":
    main()
