"""Tracking round trip over several clips and builds: how well ``splatface track`` reads
back the curves an avatar was rendered with.

``tests/test_track.py`` holds one clip on one build to a correlation of 0.9. The figure
moves with things that should not matter: a build from the same photo with every pixel
nudged by at most one level moves a shape's correlation by up to 0.06 on that clip and
up to 0.3 on others (astronaut, measured). This benchmark measures the spread instead of
one draw.

For each portrait (the astronaut and Grace Hopper), two ``default`` builds: from the
photo, and from the photo with seeded ±1-level noise. Each build renders five clips at
320x320 (the test's clip and four seeded random ones: jaw, both blinks, both smiles and
``browInnerUp`` as bumps of random rhythm and size 0.6-1, gaze swinging left and right,
the head turning 6-14° and nodding up to 4°) and tracks them from PNG folders.

Each clip is also tracked after ``LEAD`` frames of a neutral face (the head turning a
little), once as it is and once calibrated on them (``track(..., neutral=...)``): the
summed weight those frames read (``rest_weight``, mean per frame, plain against
calibrated) and the clip's correlations after calibration (``calibrated``).

Records: one per clip (``correlation`` per shape: Pearson, truth against tracked; gaze
only on frames where that eye is open; ``calibrated`` likewise; ``rest_weight``), then
one summary per portrait (``mean``, ``min`` and ``share_at_least_0_9`` per shape over
its ten clips, for both, and the mean rest weights), and its ``pose_leak``: how far the
expressions turn the tracked head. MediaPipe's landmarks are one network's guess at the
whole face, and on our renders a one-sided smile rolls its eyes, nose and brows by
0.25-1.7 degrees and an open jaw scales them by 1.8-3.4 %; what the fit takes as head
motion no shape carries. Per angle (yaw, pitch, roll), the tracked angle's error in degrees
regressed on the animated shapes' true weights over the ten clips (an offset per clip):
degrees per unit of weight (``LEAK_SHAPES``), and the error left (``residual_deg``).

Which shapes can a round trip recover at all? Per build, one record of MediaPipe's
``response`` to each shape the tracker solves: the build rendered from the front as the
clips are, at rest and with that shape alone at weight 1, MediaPipe's landmarks (and iris
centres) on both, against the tracker's own rig (the subject fitted on the rest frame)
moved by the same shape. ``along_rig``: MediaPipe's motion projected on the rig's, over
the rig's (1 = MediaPipe sees the shape move the points as the rig does; 0 = it sees
nothing of it); ``mediapipe_pct``/``rig_pct``: RMS motion of the 25 points the rig moves
most, in % of the eye distance. The summary averages them over the two builds.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from _common import emit, machine

SHAPES = ("jawOpen", "mouthSmileLeft", "mouthSmileRight", "eyeBlinkLeft", "eyeBlinkRight",
          "eyeLookOutLeft", "eyeLookInLeft", "eyeLookOutRight", "eyeLookInRight",
          "browInnerUp")  # fmt: skip
RANDOM_CLIPS = (1, 2, 3, 4)
FRAMES = 48
LEAD = 12  # neutral frames before a clip, for the calibrated track
#: The shapes the clips animate, one column each (the right eye's gaze mirrors the left's).
LEAK_SHAPES = ("jawOpen", "mouthSmileLeft", "mouthSmileRight", "eyeBlinkLeft", "eyeBlinkRight",
               "browInnerUp", "eyeLookOutLeft", "eyeLookInLeft")  # fmt: skip


def random_clip(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Curves ``[FRAMES, 52]`` and head angles ``[FRAMES, 3]`` (radians), seeded."""
    from protocol.arkit import index_of

    rng = np.random.default_rng(seed)
    t = np.arange(FRAMES) / FRAMES

    def bump() -> np.ndarray:
        freq, phase, amp = rng.uniform(1, 2.5), rng.uniform(), rng.uniform(0.6, 1.0)
        return amp * (0.5 - 0.5 * np.cos(2 * np.pi * (freq * t + phase)))

    curves = np.zeros((FRAMES, 52), np.float32)
    for name in ("jawOpen", "eyeBlinkLeft", "eyeBlinkRight", "mouthSmileLeft",
                 "mouthSmileRight", "browInnerUp"):  # fmt: skip
        curves[:, index_of(name)] = bump()
    gaze = rng.uniform(0.5, 0.8) * np.sin(2 * np.pi * (rng.uniform(1, 2) * t + rng.uniform()))
    curves[:, index_of("eyeLookOutLeft")] = curves[:, index_of("eyeLookInRight")] = gaze.clip(0)
    curves[:, index_of("eyeLookInLeft")] = curves[:, index_of("eyeLookOutRight")] = (-gaze).clip(0)
    head = np.zeros((FRAMES, 3))
    head[:, 0] = np.radians(rng.uniform(6, 14)) * np.sin(
        2 * np.pi * (rng.uniform(0.5, 1) * t + rng.uniform())
    )
    head[:, 1] = np.radians(rng.uniform(-4, 4)) * np.cos(np.pi * t)
    return curves, head


def correlations(truth: np.ndarray, got: np.ndarray) -> dict[str, float | None]:
    """Per shape, as ``tests/test_track.correlations``; None where the truth is flat (no
    signal to recover), 0 where the tracked curve is (nothing recovered)."""
    from protocol.arkit import index_of

    out: dict[str, float | None] = {}
    for name in SHAPES:
        frames = np.ones(len(truth), bool)
        if name.startswith("eyeLook"):
            side = "Left" if name.endswith("Left") else "Right"
            frames = truth[:, index_of(f"eyeBlink{side}")] < 0.5
        t, g = truth[frames, index_of(name)], got[frames, index_of(name)]
        if t.std() <= 0.05:
            out[name] = None
        else:
            out[name] = round(float(np.corrcoef(t, g)[0, 1]), 3) if g.std() > 0 else 0.0
    return out


def pose_leak(clips: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict[str, dict]:
    """From ``(curves [F, 52], true head angles [F, 3], tracked ones [F, 3])`` per clip
    (radians): per angle, the least-squares degrees of error per unit of each
    ``LEAK_SHAPES`` weight, with an offset per clip, and the RMS error left."""
    from protocol.arkit import index_of

    cols = [index_of(n) for n in LEAK_SHAPES]
    x = np.concatenate([np.concatenate([c[:, cols], np.eye(len(clips))[[k] * len(c)]], 1)
                        for k, (c, _, _) in enumerate(clips)])  # fmt: skip
    err = np.degrees(np.concatenate([got - truth for _, truth, got in clips]))
    coef = np.linalg.lstsq(x, err, rcond=None)[0]
    left = np.sqrt(((err - x @ coef) ** 2).mean(0))
    per_shape = coef[: len(cols)]
    return {angle: {**{n: round(float(v), 2) for n, v in zip(LEAK_SHAPES, per_shape[:, a],
                                                              strict=True)},
                    "residual_deg": round(float(left[a]), 2)}
            for a, angle in enumerate(("yaw", "pitch", "roll"))}  # fmt: skip


def mediapipe_response(avatar) -> dict[str, dict[str, float | None]]:
    """Per solved shape: MediaPipe's landmark motion against the tracking rig's (see the
    module notes)."""
    from inference_service.headmodel import eye_distance
    from inference_service.track import (
        IRIS_CENTER,
        FrameSolver,
        LandmarkTracker,
        _basis,
        fit_subject,
    )
    from protocol.arkit import ARKIT_NAMES
    from tests.test_track import render_clip

    basis = _basis()
    shapes = len(basis.solved)
    curves = np.zeros((1 + shapes, 52), np.float32)
    curves[1 + np.arange(shapes), basis.solved] = 1.0
    frames = render_clip(avatar, curves, np.zeros((len(curves), 3)))
    found = [LandmarkTracker()(f) for f in frames]
    rest = found[0]
    if rest is None:
        raise RuntimeError("MediaPipe finds no face on the build's rest render")
    size = (frames.shape[2], frames.shape[1])
    rig = FrameSolver(fit_subject([rest], size), pose_only=True)  # weights held at 0
    x = rig.solve(rest, rig.initial(rest, size))[0]
    at_rest = rig.project(x, jacobian=False)[0]
    points = np.r_[basis.landmarks, IRIS_CENTER]  # rig rows -> MediaPipe indices
    iod = eye_distance(rest)
    out: dict[str, dict[str, float | None]] = {}
    for i, lm in enumerate(found[1:]):
        posed = x.copy()
        posed[i] = 1.0
        rig_move = rig.project(posed, jacobian=False)[0] - at_rest
        top = np.argsort(-np.linalg.norm(rig_move, axis=1))[:25]
        rig_pct = 100 * float(np.sqrt((rig_move[top] ** 2).sum(1).mean())) / iod
        entry: dict[str, float | None] = {"along_rig": None, "mediapipe_pct": None,
                                          "rig_pct": round(rig_pct, 2)}  # fmt: skip
        if lm is not None:
            seen = (lm - rest)[points, :2]
            along = float((seen * rig_move).sum() / max((rig_move**2).sum(), 1e-12))
            entry["along_rig"] = round(along, 2)
            entry["mediapipe_pct"] = round(
                100 * float(np.sqrt((seen[top] ** 2).sum(1).mean())) / iod, 2
            )
        out[ARKIT_NAMES[basis.solved[i]]] = entry
    return out


def _track_frames(
    frames: np.ndarray, neutral: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Curves ``[F, 52]`` and head angles ``[F, 3]`` (radians) tracked from PNGs of
    ``frames``."""
    from PIL import Image

    from inference_service.track import track

    with tempfile.TemporaryDirectory() as tmp:
        for i, f in enumerate(frames):
            Image.fromarray(f).save(Path(tmp) / f"frame{i:03d}.png")
        animation = track(tmp, neutral=neutral).animation
        return animation.curves, animation.head_angles


def round_trip(avatar, curves: np.ndarray, head: np.ndarray) -> tuple[dict, dict, np.ndarray]:
    """Render ``curves`` and ``head`` as the test does, track the PNGs and correlate; then
    the same clip after ``LEAD`` neutral frames (the head swaying 6° about where the clip
    starts), tracked plain and calibrated on those frames: the weight they read per frame
    both ways, and the clip's correlations after calibration. Also the head angles
    tracked from the clip."""
    from tests.test_track import render_clip

    clip = render_clip(avatar, curves, head)
    lead_head = np.tile(head[:1], (LEAD, 1))
    lead_head[:, 0] += np.radians(6.0) * np.sin(np.linspace(0, 2 * np.pi, LEAD))
    frames = np.concatenate([render_clip(avatar, np.zeros((LEAD, 52), np.float32), lead_head),
                             clip])  # fmt: skip
    plain, calibrated = _track_frames(frames)[0], _track_frames(frames, (0, LEAD - 1))[0]
    got, angles = _track_frames(clip)
    return correlations(curves, got), {
        "calibrated": correlations(curves, calibrated[LEAD:]),
        "rest_weight": {"plain": round(float(plain[:LEAD].sum(1).mean()), 3),
                        "calibrated": round(float(calibrated[:LEAD].sum(1).mean()), 3)},
    }, angles  # fmt: skip


def main() -> None:
    from build import nudged, png, portraits

    from inference_service.build.builder import BuildOptions, build_avatar
    from tests.test_track import known_curves

    clips = {"test": known_curves(), **{f"random{s}": random_clip(s) for s in RANDOM_CLIPS}}
    base = {"benchmark": "roundtrip", "machine": machine()}
    for name, img in portraits().items():
        rows, poses, responses = [], [], []
        for variant in ("photo", "noise1"):
            photo = nudged(img, 0 if variant == "photo" else 1)
            avatar = build_avatar(png(photo), BuildOptions(preset="default"), "0123456789ab",
                                  lambda s, f, m: None)  # fmt: skip
            response = mediapipe_response(avatar)
            responses.append(response)
            emit({**base, "portrait": name, "build": variant, "response": response})
            for clip, (curves, head) in clips.items():
                corr, cal, angles = round_trip(avatar, curves, head)
                rows.append((corr, cal))
                poses.append((curves, head, angles))
                emit({**base, "portrait": name, "build": variant, "clip": clip,
                      "correlation": corr, **cal})  # fmt: skip
        rest = {k: round(float(np.mean([c["rest_weight"][k] for _, c in rows])), 3)
                for k in ("plain", "calibrated")}  # fmt: skip
        emit({**base, "portrait": name, "summary": summarise([r for r, _ in rows]),
              "summary_calibrated": summarise([c["calibrated"] for _, c in rows]),
              "rest_weight_mean": rest, "pose_leak": pose_leak(poses),
              "response_mean": mean_response(responses)})  # fmt: skip


def mean_response(builds: list[dict[str, dict]]) -> dict[str, dict[str, float | None]]:
    """Each shape's ``mediapipe_response`` figures averaged over builds (None where a build
    found no face)."""
    out = {}
    for shape, first in builds[0].items():
        out[shape] = {}
        for key in first:
            values = [b[shape][key] for b in builds]
            out[shape][key] = None if None in values else round(float(np.mean(values)), 2)
    return out


def summarise(rows: list[dict[str, float | None]]) -> dict[str, dict[str, float]]:
    summary = {}
    for shape in SHAPES:
        values = np.array([r[shape] for r in rows if r[shape] is not None])
        summary[shape] = {"mean": round(float(values.mean()), 3),
                          "min": round(float(values.min()), 3),
                          "share_at_least_0_9": round(float((values >= 0.9).mean()), 2),
                          "clips": len(values)}  # fmt: skip
    return summary


if __name__ == "__main__":
    main()
