"""The ICT-FaceKit head model the project carries (see ``assets/``), loaded once.

Canonical head frame: metres, right-handed, +Z up, face towards -Y, subject's left at +X.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources

import numpy as np

from protocol.arkit import ARKIT_NAMES

#: ARKit names ICT splits into halves; each drives both.
_SPLIT = {"browInnerUp": ("browInnerUp_L", "browInnerUp_R"),
          "cheekPuff": ("cheekPuff_L", "cheekPuff_R")}  # fmt: skip

#: Points on the tongue's upper and lower surfaces: the ICT UV islands nearest them are the
#: tongue (ICT keeps gums and tongue in one material; its UV islands separate them).
TONGUE_SEEDS = ((0.0, -0.075, -0.03), (0.0, -0.075, -0.05))
#: ``tongueOut`` at weight 1: the tip moves this far forward (-Y) and down (-Z), metres,
#: and the jaw opens by this fraction of ``jawOpen`` so the tongue clears the teeth.
TONGUE_OUT = (0.04, 0.008)
TONGUE_OUT_JAW = 0.3

#: Vertex parts (``HeadModel.vertex_part``) that posing treats specially.
PART_OTHER, PART_EYE_LEFT, PART_EYE_RIGHT, PART_TONGUE = 0, 1, 2, 3

#: MediaPipe face-mesh landmark → ICT 68-point landmark index (Multi-PIE numbering).
#: Chosen points lie on the face, not on its silhouette, so they correspond in 3-D.
MEDIAPIPE_TO_68 = {
    33: 36, 133: 39, 362: 42, 263: 45,  # eye corners (subject's right outer/inner, left)
    168: 27, 4: 30, 2: 33, 98: 31, 327: 35,  # nose bridge, tip, base, alae
    61: 48, 291: 54, 0: 51, 17: 57, 13: 62, 14: 66,  # mouth corners, lips
    152: 8,  # chin
}  # fmt: skip
#: MediaPipe's outer eye corners, subject's right then left.
EYE_CORNERS = (33, 263)


def eye_distance(landmarks: np.ndarray) -> float:
    """Image distance between the outer eye corners of MediaPipe landmarks ``[478, 2+]``:
    the face's scale, in which every landmark error here is stated (builder, tracker,
    ``eval``), so that figures compare across photo sizes."""
    a, b = EYE_CORNERS
    return float(np.linalg.norm(landmarks[a, :2] - landmarks[b, :2]))


def ict_to_arkit_name(ict: str) -> str:
    """``eyeBlink_L`` → ``eyeBlinkLeft``; names without a side stay as they are."""
    if ict.endswith("_L"):
        return ict[:-2] + "Left"
    if ict.endswith("_R"):
        return ict[:-2] + "Right"
    return ict


@dataclass(frozen=True)
class HeadModel:
    """ICT geometry in the canonical frame.

    Attributes:
        neutral: ``[V, 3]`` float32 metres.
        triangles: ``[T, 3]`` int32, counter-clockwise seen from outside.
        triangle_region: ``[T]`` uint8 index into ``region_names``.
        region_names: names such as ``face``, ``teeth``, ``eyeball_left``.
        landmarks68: ``[68]`` int32 vertex of each Multi-PIE landmark.
        identity_deltas: ``[100, V, 3]`` float16 metres.
        arkit_deltas: ``[52, V, 3]`` float32 metres in ``ARKIT_NAMES`` order
            (``tongueOut`` is made here: ICT has no tongue shape).
        vertex_part: ``[V]`` uint8, ``PART_*``: eyeballs (gaze rotates them), tongue.
        triangle_uvs: ``[T, 3]`` int32 index into ``uvs`` per triangle corner.
        uvs: ``[UV, 2]`` float32 texture coordinates.
    """

    neutral: np.ndarray
    triangles: np.ndarray
    triangle_region: np.ndarray
    region_names: tuple[str, ...]
    landmarks68: np.ndarray
    identity_deltas: np.ndarray
    arkit_deltas: np.ndarray
    vertex_part: np.ndarray
    triangle_uvs: np.ndarray
    uvs: np.ndarray

    def region(self, name: str) -> int:
        return self.region_names.index(name)


@dataclass(frozen=True)
class Correspondence:
    """Where each of MediaPipe's 478 face-mesh landmarks lies on the ICT surface
    (built by ``tools/make_mediapipe_correspondence.py``).

    Attributes:
        triangle: ``[478]`` int32 triangle of :class:`HeadModel`.
        bary: ``[478, 3]`` float32 barycentric coordinates.
        weight: ``[478]`` float32 in (0, 1]: low where the landmark moved between views.
    """

    triangle: np.ndarray
    bary: np.ndarray
    weight: np.ndarray


@functools.cache
def load_correspondence() -> Correspondence:
    path = resources.files("inference_service") / "assets" / "mediapipe_ict.npz"
    with resources.as_file(path) as p, np.load(p, allow_pickle=False) as d:
        return Correspondence(d["triangle"], d["bary"], d["weight"])


@functools.cache
def load_head_model() -> HeadModel:
    path = resources.files("inference_service") / "assets" / "ict_head.npz"
    with resources.as_file(path) as p, np.load(p, allow_pickle=False) as d:
        names = [str(n) for n in d["expression_names"]]
        deltas = d["expression_deltas"]
        by_name = {ict_to_arkit_name(n): deltas[i] for i, n in enumerate(names)}
        by_ict = {n: deltas[i] for i, n in enumerate(names)}
        arkit = np.zeros((len(ARKIT_NAMES), *deltas.shape[1:]), np.float32)
        for i, name in enumerate(ARKIT_NAMES):
            if name in _SPLIT:
                arkit[i] = sum(by_ict[h].astype(np.float32) for h in _SPLIT[name])
            elif name in by_name:
                arkit[i] = by_name[name]
        regions = tuple(str(n) for n in d["region_names"])
        neutral, triangles, region = d["neutral"], d["triangles"], d["triangle_region"]
        part = np.zeros(len(neutral), np.uint8)
        for name, value in (("eyeball_left", PART_EYE_LEFT), ("eyeball_right", PART_EYE_RIGHT)):
            part[np.unique(triangles[region == regions.index(name)])] = value
        gums = region == regions.index("gums_tongue")
        tongue, root = _tongue_vertices(neutral, triangles[gums], d["triangle_uvs"][gums])
        part[tongue] = PART_TONGUE
        arkit[ARKIT_NAMES.index("tongueOut")] = (
            _tongue_out(neutral, tongue, root)
            + TONGUE_OUT_JAW * arkit[ARKIT_NAMES.index("jawOpen")]
        )
        return HeadModel(
            neutral=neutral,
            triangles=triangles,
            triangle_region=region,
            region_names=regions,
            landmarks68=d["landmarks68"],
            identity_deltas=d["identity_deltas"],
            arkit_deltas=arkit,
            vertex_part=part,
            triangle_uvs=d["triangle_uvs"],
            uvs=d["uvs"],
        )


def _tongue_vertices(
    neutral: np.ndarray, triangles: np.ndarray, triangle_uvs: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Tongue vertices, and those of them it shares with the gums (its root)."""
    from scipy.sparse.csgraph import connected_components

    from .geometry import edge_adjacency

    n = int(triangle_uvs.max()) + 1
    _, label = connected_components(edge_adjacency(triangle_uvs, n))
    island = label[triangle_uvs[:, 0]]
    picked = set()
    for seed in TONGUE_SEEDS:
        dist = np.linalg.norm(neutral[triangles] - np.asarray(seed), axis=2).min(axis=1)
        picked.add(island[np.argmin(dist)])
    is_tongue = np.isin(island, list(picked))
    tongue = np.unique(triangles[is_tongue])
    root = np.intersect1d(tongue, np.unique(triangles[~is_tongue]))
    return tongue, root


def _tongue_out(neutral: np.ndarray, tongue: np.ndarray, root: np.ndarray) -> np.ndarray:
    """``tongueOut`` deltas ``[V, 3]``: the tongue slides forward and tips down, more
    towards its tip (smoothstep along its length); the root stays attached."""
    y = neutral[tongue, 1]
    back, tip = float(y.max()), float(y.min())
    t = np.clip((back - y) / (back - tip), 0.0, 1.0)
    w = t * t * (3 - 2 * t)
    w[np.isin(tongue, root)] = 0.0
    delta = np.zeros(neutral.shape, np.float32)
    delta[tongue, 1] = -TONGUE_OUT[0] * w
    delta[tongue, 2] = -TONGUE_OUT[1] * w**2
    return delta
