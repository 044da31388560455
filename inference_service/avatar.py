"""The ``Avatar``: everything a built head is, saved, loaded, posed, rendered, exported.

Canonical head frame everywhere: metres, +Z up, face towards -Y, subject's left at +X.
"""

from __future__ import annotations

import dataclasses
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

#: How far barycentric coordinates may stray past [0, 1], and their sums from 1: float32
#: rounding, not a Gaussian moved off its triangle.
BARY_TOLERANCE = 1e-3

#: The dtype kind each stored array must have (``"iu"`` integers, ``"f"`` floats), checked
#: before any cast: triangle ids edited into floats passed every check and failed at the
#: first render as an internal error (the texture's uint8 images check their own).
ARRAY_KINDS = {
    "vertices": "f", "triangles": "iu", "shape_deltas": "f", "photo_intrinsics": "f",
    "photo_world_to_camera": "f", "vertex_part": "iu", "g_triangle": "iu", "g_bary": "f",
    "g_offset": "f", "g_rotation": "f", "g_log_scale": "f", "g_opacity_logit": "f",
    "g_sh": "f", "g_appear": "f", "tex_uvs": "f", "tex_triangle_uvs": "iu",
}  # fmt: skip
_KIND_NAMES = {"iu": "integers", "f": "floats"}
#: ``g_sh``'s ``[K, 3]`` per Gaussian: K = (degree + 1)^2 for the degrees 0..3 kernels draw.
SH_SHAPES = ((1, 3), (4, 3), (9, 3), (16, 3))


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
        """The arrays as stored (``shape_deltas`` as float16)."""
        out = self._named_arrays()
        out["shape_deltas"] = self.shape_deltas.astype(np.float16)
        return out

    def _named_arrays(self) -> dict[str, np.ndarray]:
        """The arrays under their stored names, as held (no copies: validation reads them
        on every load, and casting the rig to float16 was half its time)."""
        out = {
            "vertices": self.vertices,
            "triangles": self.triangles,
            "shape_deltas": self.shape_deltas,
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
        problem = _kind_problem(arrays)
        if problem is not None:  # before the casts below hide it
            raise ValueError(f"invalid avatar {id}: {problem}")
        try:
            optional = {"appear"}  # absent from avatars stored before it existed
            g = BoundGaussians(**{
                f.name: arrays.get("g_" + f.name) if f.name in optional else arrays["g_" + f.name]
                for f in fields(BoundGaussians)
            })  # fmt: skip
            g = dataclasses.replace(g, triangle=_int32(id, "g_triangle", g.triangle))
            av = cls(
                id=id,
                name=name,
                vertices=arrays["vertices"].astype(np.float32),
                triangles=_int32(id, "triangles", arrays["triangles"]),
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
        """Raise ``ValueError`` naming the first array that is wrong, and how: an avatar
        file edited by hand (and checksummed again) is refused as damaged when loaded,
        not at its first render as an internal error."""
        problem = self._problem()
        if problem is not None:
            raise ValueError(f"invalid avatar {self.id}: {problem}")

    def _problem(self) -> str | None:
        """What :meth:`validate` refuses, or None. In order: dtypes, shapes, NaN, ranges,
        each check relying on those before it. Vectorised: it runs on every load."""
        arrays = self._named_arrays()
        problem = _kind_problem(arrays)
        if problem is not None:
            return problem
        v, t, g = self.vertices, self.triangles, self.gaussians
        for name, arr, symbol in (("vertices", v, "V"), ("triangles", t, "T")):
            if arr.ndim != 2 or arr.shape[1] != 3 or len(arr) == 0:
                return f"{name} must be shaped [{symbol}, 3] with {symbol} > 0, not {_dims(arr)}"
        if g.triangle.ndim != 1:
            return f"g_triangle must be shaped [N], not {_dims(g.triangle)}"
        if len(g.triangle) == 0:
            return "no Gaussians (g_triangle is empty)"
        nv, nt, n = len(v), len(t), len(g.triangle)
        shapes = {
            "shape_deltas": ("[52, V, 3]", (NUM_SHAPES, nv, 3)),
            "photo_intrinsics": ("[4]", (4,)),
            "photo_world_to_camera": ("[4, 4]", (4, 4)),
            "vertex_part": ("[V]", (nv,)),
            "g_bary": ("[N, 3]", (n, 3)),
            "g_offset": ("[N]", (n,)),
            "g_rotation": ("[N, 4]", (n, 4)),
            "g_log_scale": ("[N, 3]", (n, 3)),
            "g_opacity_logit": ("[N]", (n,)),
            "g_appear": ("[N]", (n,)),
        }
        for name, (symbolic, shape) in shapes.items():
            arr = arrays.get(name)
            if arr is not None and arr.shape != shape:
                wanted = symbolic if symbolic == str(list(shape)) else f"{symbolic} = {list(shape)}"
                return f"{name} must be shaped {wanted}, not {_dims(arr)}"
        if g.sh.ndim != 3 or g.sh.shape[0] != n or g.sh.shape[1:] not in SH_SHAPES:
            return (
                f"g_sh must be shaped [N, K, 3] = [{n}, K, 3], K = (degree + 1)^2 for a "
                f"degree in 0..3, not {_dims(g.sh)}"
            )
        if self.texture is not None:
            problem = self.texture.validate(nt)
            if problem is not None:
                return problem
        for name, arr in arrays.items():
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                return f"{name} has NaN or inf"
        for name, ids, bound in (("triangles", t, nv), ("g_triangle", g.triangle, nt)):
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= bound:
                what = "vertex" if name == "triangles" else "Gaussian triangle"
                return f"{name}: {what} out of range (ids in [0, {bound}), found {lo} to {hi})"
        lo, hi = float(g.bary.min()), float(g.bary.max())
        off = float(np.abs(g.bary.sum(axis=1, dtype=np.float64) - 1).max())
        if lo < -BARY_TOLERANCE or hi > 1 + BARY_TOLERANCE or off > BARY_TOLERANCE:
            return (
                f"g_bary: barycentric coordinates out of range (each in [0, 1], each row "
                f"summing to 1, within {BARY_TOLERANCE:g}; found {lo:.4g} to {hi:.4g}, "
                f"sums off by up to {off:.4g})"
            )
        length2 = np.einsum("nk,nk->n", g.rotation, g.rotation, dtype=np.float64)
        if not (length2 > 0).all():
            zero = int(np.count_nonzero(length2 == 0))
            return (
                f"g_rotation: {zero} of {n} quaternions are zero (each (w, x, y, z) must have "
                "a length: readers normalise it)"
            )
        if not np.all((g.appear == 0) | (np.abs(g.appear) > 1)):
            return "g_appear must be, for each Gaussian, 0, above 1 or below -1"
        return None


def _kind_problem(arrays: dict[str, np.ndarray]) -> str | None:
    """The first array of :data:`ARRAY_KINDS` stored as another dtype kind, or None."""
    for name, kind in ARRAY_KINDS.items():
        arr = arrays.get(name)
        if arr is not None and arr.dtype.kind not in kind:
            return f"{name} must hold {_KIND_NAMES[kind]}, not {arr.dtype}"
    return None


def _int32(avatar_id: str, name: str, ids: np.ndarray) -> np.ndarray:
    """``ids`` as int32, refusing values past int32, which the cast would wrap into ids
    that look valid."""
    if not np.can_cast(ids.dtype, np.int32) and ids.size:
        info = np.iinfo(np.int32)
        lo, hi = int(ids.min()), int(ids.max())
        if lo < info.min or hi > info.max:
            raise ValueError(
                f"invalid avatar {avatar_id}: {name} holds ids past int32 ({lo} to {hi})"
            )
    return ids.astype(np.int32, copy=False)


def _dims(arr: np.ndarray) -> str:
    """A shape as the messages write them: ``[16700, 3]``."""
    return str(list(arr.shape))


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
