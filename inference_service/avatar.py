"""The ``Avatar``: everything a built head is, saved, loaded, posed, rendered, exported.

Canonical head frame everywhere: metres, +Z up, face towards -Y, subject's left at +X.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from protocol.arkit import NUM_SHAPES

if TYPE_CHECKING:
    from .build.texture import Texture

#: The avatar files' format: 2 since ``appear`` holds negative factors (Gaussians that
#: fade out as their triangles stretch), which version 1's readers refuse or misread.
#: Stores read every version up to this one and refuse a newer one by name.
FORMAT_VERSION = 2


@dataclass(frozen=True)
class BoundGaussians:
    """N Gaussians bound to the triangles of the avatar's mesh.

    A Gaussian sits at barycentric ``bary`` on triangle ``triangle``, pushed ``offset``
    metres along the triangle's normal; its rotation is ``rotation`` in the triangle's
    frame (edge, bitangent, normal). So posing the mesh poses the Gaussians.

    Attributes:
        triangle: ``[N]`` int32 triangle index.
        bary: ``[N, 3]`` float32 barycentric coordinates (sum 1).
        offset: ``[N]`` float32 metres along the normal.
        rotation: ``[N, 4]`` float32 unit quaternion (w, x, y, z), triangle-local.
        log_scale: ``[N, 3]`` float32 log of metres at rest.
        opacity_logit: ``[N]`` float32 logit of opacity.
        sh: ``[N, K, 3]`` float32 SH coefficients, K = (degree + 1)^2, linear colour.
        appear: ``[N]`` float32; 0 for an ordinary Gaussian. Above 1, the Gaussian is
            transparent at rest and fades in as its triangle grows: from halfway to
            ``appear`` on, fully opaque once the triangle's edge lengths have grown by
            ``appear`` (opacity times ``clip(2 (stretch - 1) / (appear - 1) - 1, 0, 1)``,
            stretch = sqrt of the area ratio), so shapes that stretch it a little (brows)
            leave it unseen.
            Below -1, the reverse: opaque at rest, fading out from halfway to
            ``-appear`` and gone at ``-appear``.
            Closing lids are drawn this way: one colour per Gaussian cannot be both the
            lashes and iris an open lid's fold lies over and the skin a closed lid shows,
            so the fold fades out as a skin layer over it fades in.
    """

    triangle: np.ndarray
    bary: np.ndarray
    offset: np.ndarray
    rotation: np.ndarray
    log_scale: np.ndarray
    opacity_logit: np.ndarray
    sh: np.ndarray
    appear: np.ndarray | None = None  # None: all 0 (files from before it existed)

    def __post_init__(self) -> None:
        if self.appear is None:
            object.__setattr__(self, "appear", np.zeros(len(self.triangle), np.float32))

    def __len__(self) -> int:
        return len(self.triangle)

    def take(self, index: np.ndarray | slice) -> BoundGaussians:
        """The Gaussians at ``index`` (a bool mask, ids or a slice), in that order."""
        return BoundGaussians(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @classmethod
    def concat(cls, parts: list[BoundGaussians]) -> BoundGaussians:
        """One set from several (their SH degrees must match)."""
        return cls(
            **{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)}
        )


@dataclass(frozen=True)
class Avatar:
    """A built head.

    Attributes:
        id: store id (12 hex digits).
        name: user-facing name.
        vertices: ``[V, 3]`` float32 rest mesh, metres.
        triangles: ``[T, 3]`` int32.
        shape_deltas: ``[52, V, 3]`` float32 ARKit shape deltas, metres, protocol order.
        gaussians: the Gaussians bound to the mesh.
        photo_intrinsics: ``[4]`` (fx, fy, cx, cy) of the input photo's camera, pixels.
        photo_world_to_camera: ``[4, 4]`` that camera's pose, OpenCV convention.
        meta: JSON-able facts about the build (source size, preset, faces found, ...).
        vertex_part: ``[V]`` uint8 ``headmodel.PART_*`` (eyeballs turn with gaze), or None
            for a mesh without eyes.
        texture: the head's colour as the photo showed it, in the atlas of
            ``build/texture.py`` (UVs per triangle corner); None for avatars from before
            textures, or meshes without UVs. The Gaussians' colours start from it.
    """

    id: str
    name: str
    vertices: np.ndarray
    triangles: np.ndarray
    shape_deltas: np.ndarray
    gaussians: BoundGaussians
    photo_intrinsics: np.ndarray
    photo_world_to_camera: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    vertex_part: np.ndarray | None = None
    texture: Texture | None = None

    @functools.cached_property
    def bound_triangles(self) -> tuple[np.ndarray, np.ndarray]:
        """Triangles that carry Gaussians ``[U]`` and each Gaussian's index into them ``[N]``
        (posing needs frames only for these)."""
        used, index = np.unique(self.gaussians.triangle, return_inverse=True)
        return used, index

    @functools.cached_property
    def rest_area(self) -> np.ndarray:
        """Rest-pose area ``[U]`` of each triangle in :attr:`bound_triangles`."""
        from .geometry import triangle_frames

        return triangle_frames(self.vertices, self.triangles[self.bound_triangles[0]])[1]

    @functools.cached_property
    def local_rotation(self) -> np.ndarray:
        """Each Gaussian's rotation in its triangle's frame as matrices ``[N, 3, 3]``."""
        from .geometry import quat_to_rotmat

        return quat_to_rotmat(self.gaussians.rotation.astype(np.float64))

    @functools.cached_property
    def pose_static(self):
        """What posing's fast path needs that never changes between frames
        (``posing._Static``: vertex ids, rest scales, opacities)."""
        from .posing import static_arrays

        return static_arrays(self)

    @functools.cached_property
    def eyes(self) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
        """Per eye (subject's left, right): its vertex ids and the centre of the sphere
        that fits them at rest; empty when the mesh has no eyeballs."""
        from .headmodel import PART_EYE_LEFT, PART_EYE_RIGHT

        if self.vertex_part is None:
            return ()
        out = []
        for part in (PART_EYE_LEFT, PART_EYE_RIGHT):
            ids = np.flatnonzero(self.vertex_part == part)
            if len(ids) < 4:
                return ()
            out.append((ids, sphere_center(self.vertices[ids].astype(np.float64))))
        return tuple(out)

    @property
    def center(self) -> np.ndarray:
        """Centre of the rest mesh's bounding box ``[3]``."""
        return 0.5 * (self.vertices.min(0) + self.vertices.max(0))

    @property
    def radius(self) -> float:
        """Radius of the sphere about :attr:`center` that holds the rest mesh."""
        return float(np.linalg.norm(self.vertices - self.center, axis=1).max())

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {
            "vertices": self.vertices,
            "triangles": self.triangles,
            "shape_deltas": self.shape_deltas.astype(np.float16),
            "photo_intrinsics": self.photo_intrinsics,
            "photo_world_to_camera": self.photo_world_to_camera,
        }
        if self.vertex_part is not None:
            out["vertex_part"] = self.vertex_part
        for f in fields(BoundGaussians):
            out["g_" + f.name] = getattr(self.gaussians, f.name)
        if self.texture is not None:
            for f in fields(self.texture):
                out["tex_" + f.name] = getattr(self.texture, f.name)
        return out

    @classmethod
    def from_arrays(
        cls, id: str, name: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]
    ) -> Avatar:
        """Build and validate; raises ``ValueError`` naming what is inconsistent."""
        try:
            optional = {"appear"}  # absent from avatars stored before it existed
            g = BoundGaussians(**{
                f.name: arrays.get("g_" + f.name) if f.name in optional else arrays["g_" + f.name]
                for f in fields(BoundGaussians)
            })  # fmt: skip
            av = cls(
                id=id,
                name=name,
                vertices=arrays["vertices"].astype(np.float32),
                triangles=arrays["triangles"].astype(np.int32),
                shape_deltas=arrays["shape_deltas"].astype(np.float32),
                gaussians=g,
                photo_intrinsics=arrays["photo_intrinsics"].astype(np.float64),
                photo_world_to_camera=arrays["photo_world_to_camera"].astype(np.float64),
                meta=meta,
                vertex_part=arrays.get("vertex_part"),
                texture=_texture(arrays),
            )
        except KeyError as exc:
            raise ValueError(f"avatar arrays lack {exc.args[0]!r}") from None
        av.validate()
        return av

    def validate(self) -> None:
        v, t, g = self.vertices, self.triangles, self.gaussians
        n = len(g.triangle)
        checks = [
            (v.ndim == 2 and v.shape[1] == 3, "vertices must be [V, 3]"),
            (t.ndim == 2 and t.shape[1] == 3, "triangles must be [T, 3]"),
            (t.size > 0 and t.min() >= 0 and t.max() < len(v), "triangle index out of range"),
            (self.shape_deltas.shape == (NUM_SHAPES, *v.shape), "shape_deltas must be [52, V, 3]"),
            (n > 0, "no Gaussians"),
            (g.triangle.min() >= 0 and g.triangle.max() < len(t), "Gaussian triangle out of range"),
            (g.bary.shape == (n, 3) and g.offset.shape == (n,), "bad bary/offset shape"),
            (g.rotation.shape == (n, 4) and g.log_scale.shape == (n, 3), "bad rotation/scale"),
            (g.opacity_logit.shape == (n,), "bad opacity shape"),
            (
                g.appear.shape == (n,) and bool(np.all((g.appear == 0) | (np.abs(g.appear) > 1))),
                "appear must be [N], each 0, above 1 or below -1",
            ),
            (g.sh.ndim == 3 and g.sh.shape[0] == n and g.sh.shape[2] == 3, "bad SH shape"),
            (self.photo_intrinsics.shape == (4,), "bad photo intrinsics"),
            (self.photo_world_to_camera.shape == (4, 4), "bad photo camera"),
            (self.vertex_part is None or self.vertex_part.shape == (len(v),), "bad vertex_part"),
        ]
        problem = None if self.texture is None else self.texture.validate(len(t))
        checks.append((problem is None, str(problem)))
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid avatar {self.id}: {message}")
        for name, arr in self.to_arrays().items():
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise ValueError(f"invalid avatar {self.id}: {name} has NaN or inf")


def _texture(arrays: dict[str, np.ndarray]) -> Texture | None:
    """The stored texture (``tex_*`` arrays), or None for avatars saved without one."""
    if "tex_image" not in arrays:
        return None
    from .build.texture import Texture

    return Texture(**{f.name: arrays["tex_" + f.name] for f in fields(Texture)})


def sphere_center(points: np.ndarray) -> np.ndarray:
    """Centre ``[3]`` of the least-squares sphere through ``points`` ``[P, 3]``."""
    a = np.concatenate([2 * points, np.ones((len(points), 1))], axis=1)
    b = (points**2).sum(axis=1)
    return np.linalg.lstsq(a, b, rcond=None)[0][:3]
