"""The builder's quality targets as ``splatface eval`` measures them, over a few builds.

One build's figures move with things that should not matter: the same photo with every
pixel nudged by at most one level moved the astronaut's input-view PSNR by 0.3 dB and
the ±30° landmark agreement by up to 1.3 points of the eye distance (measured). A target
that one build meets by less than that is met by chance. So for each portrait (the
astronaut and Grace Hopper) this builds ``NUDGES + 1`` avatars with the ``default``
preset in one service, from the photo and from copies with seeded ±1-level noise, and
runs ``evaluate`` on each against the photo it was built from.

Records: one per build (``nudge``: 0 for the photo itself, else the noise's seed) with
``input_psnr_db``, ``input_ssim``, ``coverage_min`` and ``stray_max`` over the seven
novel views, ``floaters_max``, ``landmark_rms_pct`` at +30° and -30° (None where
MediaPipe found no face), then one summary per portrait: each figure's mean, min and max
over the builds, and ``targets``, whether the mean meets each of issue 8's (input PSNR
≥ 30 dB; coverage ≥ 0.98 stated per pixel, here the share of the interior at alpha ≥ 0.98,
so 1.0; no floaters; landmarks within 3 % at ±30°).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from _common import emit, machine

NUDGES = (1, 2)  # seeds of the ±1-level noise; 0 stands for the photo as it is
TARGETS = {"input_psnr_db": (">=", 30.0), "coverage_min": (">=", 1.0),
           "floaters_max": ("<=", 0.0), "landmark_rms_pct": ("<=", 3.0)}  # fmt: skip


def figures(metrics: dict) -> dict:
    """One build's figures from ``evaluate``'s metrics."""
    views = metrics["views"].values()
    lm = {k: metrics["views"][k].get("landmark_rms") for k in ("+30", "-30")}
    return {
        "input_psnr_db": metrics["input_view"]["psnr_db"],
        "input_ssim": metrics["input_view"]["ssim"],
        "coverage_min": min(v["coverage"] for v in views),
        "stray_max": max(v["stray"] for v in views),
        "floaters_max": max(v["floaters"] for v in views),
        "landmark_rms_pct": {k: None if v is None else round(100 * v, 2) for k, v in lm.items()},
    }


def summary(rows: list[dict]) -> dict:
    """Mean, min and max of each figure over the builds, and the targets on the means."""
    out: dict = {}
    for key in ("input_psnr_db", "input_ssim", "coverage_min", "stray_max", "floaters_max"):
        v = np.array([r[key] for r in rows], float)
        out[key] = {k: round(float(f(v)), 5) for k, f in (("mean", np.mean), ("min", np.min),
                                                          ("max", np.max))}  # fmt: skip
    lms = [x for r in rows for x in r["landmark_rms_pct"].values()]
    found = [x for x in lms if x is not None]
    out["landmark_rms_pct"] = {"mean": round(float(np.mean(found)), 2) if found else None,
                               "min": min(found, default=None), "max": max(found, default=None),
                               "faces_found": f"{len(found)}/{len(lms)}"}  # fmt: skip
    met = {}
    for key, (op, bound) in TARGETS.items():
        mean = out[key]["mean"]
        met[key] = bool(mean is not None and (mean >= bound if op == ">=" else mean <= bound))
    out["targets"] = met
    return out


def main() -> None:
    from build import nudged, png, portraits

    from inference_service.evaluate import evaluate
    from tests.conftest import ServiceProcess

    base = {"benchmark": "targets", "machine": machine(), "preset": "default"}
    with tempfile.TemporaryDirectory() as tmp:
        svc = ServiceProcess(Path(tmp) / "store")
        try:
            with svc.client(timeout=600) as c:
                for name, photo in portraits().items():
                    rows = []
                    for seed in (0, *NUDGES):
                        img = nudged(photo, seed)
                        st = c.wait(c.build(png(img), name=f"{name}_{seed}", preset="default"))
                        m = evaluate(c, st["avatar_id"], img, Path(tmp) / f"{name}_{seed}")
                        rows.append(figures(m))
                        emit({**base, "portrait": name, "nudge": seed, **rows[-1]})
                    emit({**base, "portrait": name, "builds": len(rows), **summary(rows)})
        finally:
            svc.stop()


if __name__ == "__main__":
    main()
