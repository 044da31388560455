"""Avatar objects in the scene: a head empty and a proxy mesh with 52 ARKit shape keys.

The proxy's mesh is in the avatar's canonical frame (metres, +Z up, facing −Y), parented
to the head empty with a parent inverse that puts the empty at the top of the neck
(``protocol.animation.head_pivot``), so the proxy's world matrix is the head-to-world
transform the service takes, and rotating the empty turns the head about the neck, as a
Live Link Face take's head rotation turns it in ``splatface render``. Renders read the
*evaluated* shape-key values and matrices, so keyframes, drivers, NLA and constraints all
count.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

import bpy
import numpy as np
from mathutils import Matrix

from ._protocol import ARKIT_NAMES, NUM_SHAPES, head_pivot


@dataclass(frozen=True)
class AvatarFrame:
    """One avatar's state at one frame, as the service takes it.

    Attributes:
        avatar_id: the service's id.
        curves: float32 ``[52]`` evaluated shape-key values, canonical order.
        head: float64 ``[4, 4]`` head-to-world.
        name: the proxy object's name (for messages).
        holdout: a holdout in the view layer (the object's or its collection's): it
            renders as a hole, alpha 0, hiding what lies behind it.
        warning: what of the proxy's shape-key settings the render cannot follow (see
            :func:`ignored_settings`), "" where nothing.
    """

    avatar_id: str
    curves: np.ndarray
    head: np.ndarray
    name: str
    holdout: bool = False
    warning: str = ""


def create_avatar(
    collection: bpy.types.Collection,
    summary: dict[str, Any],
    vertices: np.ndarray,
    triangles: np.ndarray,
    shape_deltas: np.ndarray,
    shape_names: list[str],
) -> tuple[bpy.types.Object, bpy.types.Object]:
    """Make the head empty and proxy mesh of an avatar; returns (proxy, head).

    Args:
        summary: the ``avatar`` map of a ``get`` reply (``id``, ``name``, ``center``...).
        vertices: float32 ``[V, 3]`` rest mesh, metres.
        triangles: int32 ``[T, 3]``.
        shape_deltas: float32 ``[52, V, 3]`` in ``shape_names`` order.
    """
    if shape_deltas.shape != (len(shape_names), len(vertices), 3):
        raise ValueError(f"shape_deltas {shape_deltas.shape} do not match {len(vertices)} vertices")
    name = summary.get("name") or summary["id"]
    center = np.asarray(summary.get("center", (0.0, 0.0, 0.0)), np.float64)
    radius = float(summary.get("radius", 0.15))
    pivot = head_pivot(center, radius)
    mesh = bpy.data.meshes.new(name)
    mesh.vertices.add(len(vertices))
    mesh.vertices.foreach_set("co", np.ascontiguousarray(vertices, np.float32).ravel())
    tris = np.ascontiguousarray(triangles, np.int32)
    mesh.loops.add(tris.size)
    mesh.loops.foreach_set("vertex_index", tris.ravel())
    mesh.polygons.add(len(tris))
    mesh.polygons.foreach_set("loop_start", np.arange(0, tris.size, 3, dtype=np.int32))
    mesh.update()
    mesh.validate()

    head = bpy.data.objects.new(f"{name}_head", None)
    head.empty_display_type = "ARROWS"  # axes at the neck: what turning it turns about
    head.empty_display_size = 0.5 * radius
    head.location = pivot
    proxy = bpy.data.objects.new(name, mesh)
    collection.objects.link(head)
    collection.objects.link(proxy)
    proxy.parent = head
    proxy.matrix_parent_inverse = Matrix.Translation(-pivot)
    for ob, role in ((proxy, "PROXY"), (head, "HEAD")):
        ob.splatface.avatar_id = summary["id"]
        ob.splatface.avatar_name = name
        ob.splatface.role = role
        ob.splatface.center = center

    mesh[REST_PROPERTY] = np.ascontiguousarray(vertices, np.float32).ravel()

    proxy.shape_key_add(name="Basis", from_mix=False)
    flat = np.ascontiguousarray(vertices, np.float32)
    for i, shape in enumerate(shape_names):
        block = proxy.shape_key_add(name=shape, from_mix=False)
        block.data.foreach_set("co", (flat + shape_deltas[i]).ravel())
        block.slider_min, block.slider_max = 0.0, 1.0
        block.value = 0.0  # shape_key_add leaves new keys at 1
    mesh.shape_keys.name = f"{name}_arkit"
    return proxy, head


#: The avatar's rest mesh, float32 ``[V * 3]``, kept on the proxy's mesh (shared by its
#: linked duplicates): what :func:`mesh_transform` compares the Basis with.
REST_PROPERTY = "splatface_rest"
#: Metres a vertex of the proxy's Basis may stray from an affine map of the rest mesh
#: before the mesh counts as edited, plus a millionth of its coordinates' size (float32
#: coordinates 300 m out are good to 3e-5 m).
EDIT_TOLERANCE = 1e-5
#: Modifiers that leave the vertices where they are (normals, UVs, weights, topology).
KEEPS_VERTICES = {"EDGE_SPLIT", "NORMAL_EDIT", "TRIANGULATE", "UV_PROJECT", "UV_WARP",
                  "VERTEX_WEIGHT_EDIT", "VERTEX_WEIGHT_MIX", "VERTEX_WEIGHT_PROXIMITY",
                  "WEIGHTED_NORMAL"}  # fmt: skip


#: Rest meshes fetched from the service, by avatar id (an id's avatar never changes),
#: for proxies an older add-on added without :data:`REST_PROPERTY`.
fetched_rest: dict[str, np.ndarray] = {}
#: When fetching an avatar's rest mesh last failed (monotonic seconds): a service that is
#: down is not asked again for :data:`FETCH_RETRY` seconds, so every frame of a render
#: does not wait for it twice (the fetch, then the render's own request).
fetch_failed: dict[str, float] = {}
FETCH_RETRY = 60.0


def fetch_rest(client: Any, objects: Any, timeout: float) -> None:
    """Fetch into :data:`fetched_rest` the rest mesh of each proxy among ``objects`` that
    lacks one (added by an older add-on, whose Set Origin and Apply moved the splats off
    the mesh unseen). A service that cannot answer leaves them unchecked: the render's
    own request then says why."""
    now = time.monotonic()
    wanted = {
        ob.original.splatface.avatar_id
        for ob in proxies(objects)
        if REST_PROPERTY not in ob.original.data
        and ob.original.splatface.avatar_id not in fetched_rest
        and now - fetch_failed.get(ob.original.splatface.avatar_id, -FETCH_RETRY) >= FETCH_RETRY
    }
    for avatar_id in sorted(wanted):
        try:
            reply = client.request("get", {"avatar": avatar_id, "mesh": True, "rig": False},
                                   timeout=min(timeout, 10.0), retries=0)  # fmt: skip
        except Exception:  # noqa: BLE001 (unchecked, as before; the render says why)
            fetch_failed.update(dict.fromkeys(wanted, now))  # the others would wait too
            return
        fetched_rest[avatar_id] = np.ascontiguousarray(reply.arrays["vertices"], np.float32)


#: :func:`mesh_transform`'s answers by (mesh, its Basis's digest, rest mesh): the
#: viewport asks on every update, and a moved mesh's fit takes milliseconds.
_transforms: dict[tuple, tuple[np.ndarray, str]] = {}


def mesh_transform(proxy: bpy.types.Object) -> tuple[np.ndarray, str]:
    """(``[4, 4]`` map from the avatar's rest mesh to the proxy's Basis as it is now,
    what the render cannot follow or ""). Set Origin, Apply Rotation & Scale and the like
    move the mesh inside its object, and the splats, posed by the object's matrix alone,
    stayed behind: rendered at ``matrix_world @`` this map they go with it. A map the
    service cannot pose a head by (a stretch, a mirror), vertices added or deleted, and
    edits no map of the whole mesh explains (sculpting) are named instead, and the splats
    keep the avatar's own shape and place."""
    mesh = proxy.original.data
    stored = mesh.get(REST_PROPERTY)
    if stored is None:  # added by an older add-on: the service's copy, where fetched
        stored = fetched_rest.get(proxy.original.splatface.avatar_id)
    if stored is None:
        return np.eye(4), ""
    rest = np.asarray(stored, np.float32).reshape(-1)
    if 3 * len(mesh.vertices) != len(rest):
        return np.eye(4), "vertices added to or deleted from its mesh"
    now = _basis(mesh)
    tolerance = EDIT_TOLERANCE + 1e-6 * float(np.abs(now).max(initial=0.0))
    if float(np.abs(now - rest).max(initial=0.0)) <= tolerance:  # at rest: nothing to fit
        return np.eye(4), ""
    digest = (mesh.as_pointer(), hashlib.blake2b(now, digest_size=16).digest(),
              hashlib.blake2b(rest, digest_size=16).digest())  # fmt: skip
    if digest not in _transforms:
        if len(_transforms) > 256:
            _transforms.clear()
        _transforms[digest] = _fit_transform(rest.reshape(-1, 3), now.reshape(-1, 3), tolerance)
    to_mesh, warning = _transforms[digest]
    return to_mesh.copy(), warning


def _basis(mesh: bpy.types.Mesh) -> np.ndarray:
    """float32 ``[V * 3]``: the mesh's Basis shape key (its vertices without keys). Read
    from the vertex positions, which Blender keeps equal to the Basis (0.1 ms where the
    key's own points take 3.6, every viewport update), unless points sampled across the
    Basis differ (a script that wrote the key alone): then from the key."""
    now = np.empty(3 * len(mesh.vertices), np.float32)
    mesh.attributes["position"].data.foreach_get("vector", now)
    key = mesh.shape_keys
    if key is None:
        return now
    points = key.reference_key.data
    step = max(1, len(points) // 64)
    if len(points) == len(mesh.vertices) and all(
        tuple(points[i].co) == tuple(now[3 * i : 3 * i + 3]) for i in range(0, len(points), step)
    ):
        return now
    now = np.empty(3 * len(points), np.float32)
    points.foreach_get("co", now)
    return now


def _fit_transform(
    rest32: np.ndarray, now32: np.ndarray, tolerance: float
) -> tuple[np.ndarray, str]:
    """:func:`mesh_transform`'s answer for a rest mesh and a Basis that moved from it,
    ``[V, 3]`` each; ``tolerance`` in metres, as there."""
    eye = np.eye(4)
    rest, now = rest32.astype(np.float64), now32.astype(np.float64)
    homogeneous = np.concatenate([rest, np.ones((len(rest), 1))], axis=1)
    fitted, *_ = np.linalg.lstsq(homogeneous, now, rcond=None)
    if np.abs(homogeneous @ fitted - now).max() > tolerance:
        return eye, "edits to its mesh (the splats keep the avatar's shape)"
    linear = fitted[:3].T
    u, sigma, vt = np.linalg.svd(linear)
    if np.linalg.det(linear) <= 0 or sigma.max() - sigma.min() > 1e-4 * sigma.mean():
        return eye, "a stretch or mirror of its mesh (the splats keep the avatar's shape)"
    out = eye.copy()  # the nearest rotation and uniform scale, which the service takes
    out[:3, :3] = sigma.mean() * (u @ vt)
    out[:3, 3] = (now - rest @ out[:3, :3].T).mean(axis=0)
    return out, ""


def modifiers_shown(proxy: bpy.types.Object, final_render: bool) -> list[str]:
    """Names of the proxy's modifiers that show in a render (or the viewport) and may
    move its vertices: the splats follow the shape keys and the object's transform, not
    a modifier's mesh. Shade Auto Smooth's node group only sets normals."""
    return [
        m.name
        for m in proxy.original.modifiers
        if (m.show_render if final_render else m.show_viewport)
        and m.type not in KEEPS_VERTICES
        and not (
            m.type == "NODES" and m.node_group and m.node_group.name.startswith("Smooth by Angle")
        )
    ]


def proxies(objects: Any) -> list[bpy.types.Object]:
    """Avatar proxy meshes among ``objects``."""
    return [
        ob
        for ob in objects
        if ob.type == "MESH" and ob.splatface.role == "PROXY" and ob.splatface.avatar_id
    ]


def proxy_of(ob: bpy.types.Object | None) -> bpy.types.Object | None:
    """The proxy of an avatar object (the proxy itself, or a child of its head empty)."""
    if ob is None:
        return None
    if ob.splatface.role == "PROXY":
        return ob
    if ob.splatface.role == "HEAD":
        return next((c for c in ob.children if c.splatface.role == "PROXY"), None)
    return None


def missing_shapes(proxy: bpy.types.Object) -> list[str]:
    """The ARKit names ``proxy`` has no shape key for (renamed or deleted): they render
    as 0 whatever the artist keys on a renamed block."""
    key = proxy.data.shape_keys
    blocks = () if key is None else key.key_blocks
    return [name for name in ARKIT_NAMES if name not in blocks]


def evaluated_curves(ob: bpy.types.Object, depsgraph: bpy.types.Depsgraph) -> np.ndarray:
    """float32 ``[52]``: the proxy's evaluated shape-key values, canonical order.

    Read from the evaluated Key, so drivers, NLA and keyframes are already applied; a
    muted or missing block counts as 0.
    """
    original = ob.original
    key = original.data.shape_keys
    out = np.zeros(NUM_SHAPES, np.float32)
    if key is None:
        return out
    blocks = key.evaluated_get(depsgraph).key_blocks
    for i, name in enumerate(ARKIT_NAMES):
        block = blocks.get(name)
        if block is not None and not block.mute:
            out[i] = block.value
    return np.clip(out, 0.0, 1.0)


def held_by_collection(ob: bpy.types.Object, view_layer: bpy.types.ViewLayer) -> bool:
    """Whether a collection holding ``ob`` (an original) is set to Holdout in
    ``view_layer``, which holds out everything inside it, child collections included;
    an excluded collection holds nothing out, as in Blender."""
    if not ob.is_holdout:  # Blender's answer is then its collections' alone
        return ob.holdout_get(view_layer=view_layer)
    homes = list(ob.users_collection)
    stack = [(view_layer.layer_collection, False)]
    while stack:
        lc, held = stack.pop()
        if lc.exclude:
            continue
        held = held or lc.holdout
        if held and lc.collection in homes:
            return True
        stack.extend((child, held) for child in lc.children)
    return False


def ignored_settings(ob: bpy.types.Object, depsgraph: bpy.types.Depsgraph) -> list[str]:
    """What of ``ob``'s shape keys the render cannot follow, though the proxy mesh does:
    a vertex-group mask, a key relative to another than the basis, a value outside 0..1
    (rendered clamped), Absolute keys, a key of another name than the 52 ARKit ones (an
    artist's own, or an ARKit key renamed) set above 0. The splats follow the rig's own
    shapes at one weight each."""
    key = ob.original.data.shape_keys
    if key is None:
        return []
    if not key.use_relative:  # the proxy blends the keys by time, key to key
        return ["the shape keys' Evaluation Time (Relative is off; the splats follow each "
                "key's Value)"]  # fmt: skip
    basis = key.reference_key.name
    out = []
    for block in key.evaluated_get(depsgraph).key_blocks:
        if block.mute or block.name == basis:
            continue
        if block.name not in ARKIT_NAMES:
            if block.value != 0.0:
                lacking = missing_shapes(ob.original)
                named = ", ".join(lacking[:3]) + ", ..." * (len(lacking) > 3)
                why = f"; the proxy has no {named}" if lacking else ""
                out.append(f"{block.name} at {block.value:.3g} (not an ARKit name{why})")
            continue
        if block.vertex_group:
            out.append(f"{block.name}'s vertex group")
        if block.relative_key.name != basis:
            out.append(f"{block.name} relative to {block.relative_key.name}")
        if not 0.0 <= block.value <= 1.0:
            out.append(
                f"{block.name} at {block.value:.3g} (rendered at {min(max(block.value, 0), 1):g})"
            )
    return out


def gather(
    depsgraph: bpy.types.Depsgraph,
    final_render: bool,
    client: Any = None,
    timeout: float = 10.0,
) -> list[AvatarFrame]:
    """Every visible avatar in ``depsgraph`` at its current frame, each instance of one
    (a collection instanced or linked into the shot) where the instance puts it. With a
    ``client``, the rest meshes of proxies an older add-on added are fetched first
    (:func:`fetch_rest`), in the same pass over the instances."""
    # (the original proxy, head-to-world, name, holdout, curves) per instance: what the
    # iterator hands over is only sure to be valid until it moves on
    shown = []
    for inst in depsgraph.object_instances:
        ob = inst.object
        if not proxies([ob]) or not inst.show_self:
            continue
        # the evaluated object's flags: keyed visibility and holdout change per frame,
        # and an animation render does not update the original's
        if final_render and ob.hide_render:
            continue
        head = np.array(inst.matrix_world, np.float64)  # copied: the iterator reuses it
        name = f"{inst.parent.name_full}/{ob.name_full}" if inst.is_instance else ob.name_full
        # an instance is held out as its instancer is, whatever its source collection is
        owner = inst.parent if inst.is_instance else ob
        holdout = final_render and (
            owner.is_holdout or held_by_collection(owner.original, depsgraph.view_layer)
        )
        shown.append((ob.original, head, name, bool(holdout), evaluated_curves(ob, depsgraph)))
    if client is not None:
        fetch_rest(client, [ob for ob, *_ in shown], timeout)
    # per proxy, however many instances it has: (rest-to-mesh map, warning); keyed by
    # the full name, as a linked proxy may share a local one's name
    states: dict[str, tuple[np.ndarray, str]] = {}
    out = []
    for ob, head, name, holdout, curves in shown:
        if ob.name_full not in states:
            states[ob.name_full] = proxy_state(ob, depsgraph, final_render)
        to_mesh, warning = states[ob.name_full]
        out.append(AvatarFrame(ob.splatface.avatar_id, curves, head @ to_mesh, name, holdout,
                               warning))  # fmt: skip
    return out


def proxy_state(
    ob: bpy.types.Object,
    depsgraph: bpy.types.Depsgraph,
    final_render: bool,
    what: str = "render",
) -> tuple[np.ndarray, str]:
    """(``mesh_transform``'s map, a warning naming all the ``what`` (render, export)
    cannot follow of ``ob`` or "")."""
    to_mesh, edited = mesh_transform(ob)
    ignored = ignored_settings(ob, depsgraph) + [edited] * bool(edited)
    shown = modifiers_shown(ob, final_render)
    if shown:
        ignored.append(f"its modifiers {', '.join(shown)} (the splats follow the shape keys "
                       "and the object's transform)")  # fmt: skip
    said = f"{ob.name_full}: the {what} ignores {', '.join(ignored)}" if ignored else ""
    return to_mesh, said
