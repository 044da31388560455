"""The geometry fit on synthetic landmarks with a known answer, and the correspondence."""

from __future__ import annotations

import numpy as np

from inference_service.build.align import align
from inference_service.build.fit import IDENTITY_COMPONENTS, fit_geometry
from inference_service.headmodel import MEDIAPIPE_TO_68, load_correspondence, load_head_model
from protocol.arkit import index_of
from protocol.camera import intrinsics_from_fov, orbit, project


def synthetic_landmarks(identity, expression, w2c, intrinsics):
    """The 478 landmarks a perfect detector would report for this head and camera."""
    model, corr = load_head_model(), load_correspondence()
    k = len(identity)
    verts = (model.neutral + np.tensordot(identity, model.identity_deltas[:k], 1)
             + np.tensordot(expression, model.arkit_deltas, 1))  # fmt: skip
    pts = np.einsum("lk,lkc->lc", corr.bary, verts[model.triangles[corr.triangle]])
    uv, z = project(pts, intrinsics, w2c)
    return np.concatenate([uv, z[:, None]], 1)


def test_fit_recovers_a_known_head():
    rng = np.random.default_rng(0)
    model = load_head_model()
    identity = rng.normal(size=IDENTITY_COMPONENTS) * 0.8
    expression = np.zeros(52)
    expression[index_of("jawOpen")] = 0.5
    expression[index_of("mouthSmileLeft")] = 0.6
    expression[index_of("eyeBlinkRight")] = 0.7
    size = 640
    intr = intrinsics_from_fov(size, size, 24.0)
    w2c = orbit((0.0, -0.05, 0.0), 1.0, yaw_deg=15.0, pitch_deg=-5.0)
    lm = synthetic_landmarks(identity, expression, w2c, intr)
    fit = fit_geometry(model, load_correspondence(), lm, align(model, lm, (size, size)))
    assert fit.rms < 0.02 and fit.rms_initial > 0.05
    # ARKit shapes overlap (squint/blink, stretch/smile), so 478 points cannot pin every
    # weight; what they do pin: the jaw, and which side smiles and blinks
    e = {n: fit.expression[index_of(n)] for n in ("jawOpen", "mouthSmileLeft",
         "mouthSmileRight", "eyeBlinkLeft", "eyeBlinkRight")}  # fmt: skip
    assert abs(e["jawOpen"] - 0.5) < 0.15
    assert e["mouthSmileLeft"] > 0.3 > e["mouthSmileRight"]
    assert e["eyeBlinkRight"] > 0.2 > e["eyeBlinkLeft"]
    assert abs(fit.intrinsics[0] / intr[0] - 1) < 0.25  # focal trades off against depth
    cos = (np.trace(fit.world_to_camera[:3, :3].T @ w2c[:3, :3]) - 1) / 2
    assert np.degrees(np.arccos(np.clip(cos, -1, 1))) < 3.0


def test_correspondence_agrees_with_the_hand_picked_landmarks():
    """The dense MediaPipe→ICT table (from renders) and the sparse table (by hand) agree."""
    model, corr = load_head_model(), load_correspondence()
    assert corr.triangle.shape == (478,) and np.allclose(corr.bary.sum(1), 1, atol=1e-5)
    pts = np.einsum("lk,lkc->lc", corr.bary, model.neutral[model.triangles[corr.triangle]])
    gaps = [
        np.linalg.norm(pts[m] - model.neutral[model.landmarks68[i]])
        for m, i in MEDIAPIPE_TO_68.items()
    ]
    assert np.median(gaps) < 0.004 and max(gaps) < 0.01  # metres
    assert pts[33, 0] < 0 < pts[263, 0]  # MediaPipe 33 is the subject's right eye (-X)


#: MediaPipe's lid and inner-lip contours (subject's left eye: 384-388, image right).
UPPER_LID = {
    "Left": [466, 388, 387, 386, 385, 384, 398],
    "Right": [246, 161, 160, 159, 158, 157, 173],
}
LOWER_LID = {
    "Left": [249, 390, 373, 374, 380, 381, 382],
    "Right": [7, 163, 144, 145, 153, 154, 155],
}
UPPER_INNER_LIP = [191, 80, 81, 82, 13, 312, 311, 310, 415]
LOWER_INNER_LIP = [95, 88, 178, 87, 14, 317, 402, 318, 324]


def test_correspondence_puts_lid_and_lip_contours_on_the_right_lid_and_lip():
    """Upper-lid landmarks sit above the lower lid and close with that eye's blink; inner
    lower-lip landmarks go down with the jaw, inner upper-lip ones hardly move. (An asset
    made from closed-mouth renders put inner-lip points on the wrong lip, and the left
    upper lid on the lower lid.)"""
    from protocol.arkit import index_of

    model, corr = load_head_model(), load_correspondence()
    tri = model.triangles[corr.triangle]

    def at(v):
        return np.einsum("lk,lkc->lc", corr.bary, v[tri])

    pts = at(model.neutral)
    for side in ("Left", "Right"):
        up, low = UPPER_LID[side], LOWER_LID[side]
        assert pts[up, 2].mean() - pts[low, 2].mean() > 0.004  # metres, eye open at rest
        blink = at(model.arkit_deltas[index_of(f"eyeBlink{side}")])
        assert blink[up[1:-1], 2].max() < -0.002  # every mid upper-lid point comes down
        assert np.abs(blink[low, 2]).max() < np.abs(blink[up, 2]).max() / 2
    jaw = at(model.arkit_deltas[index_of("jawOpen")])
    assert jaw[LOWER_INNER_LIP, 2].max() < -0.02
    assert jaw[UPPER_INNER_LIP, 2].min() > -0.01
