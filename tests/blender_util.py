"""Helpers for the add-on's tests in headless ``bpy`` (not fixtures: see test modules).

Only numpy and the add-on here: tests/test_blender_compat.py imports this under the bpy
4.5 environment too, which has neither the service nor tests/conftest.py.
"""

from __future__ import annotations

import math

import numpy as np

#: OpenCV camera axes → Blender camera axes (and back: the matrix is its own inverse).
FLIP_YZ = np.diag([1.0, -1.0, -1.0, 1.0])
ADDON = "blender_addon"


def clear_scene(bpy) -> None:
    """Remove every object and the data blocks tests create, keep the add-on registered."""
    for ob in list(bpy.data.objects):
        bpy.data.objects.remove(ob)
    for coll in (
        bpy.data.meshes,
        bpy.data.cameras,
        bpy.data.armatures,
        bpy.data.actions,
        bpy.data.shape_keys,
    ):
        for block in list(coll):
            if block.users == 0:
                coll.remove(block)


def add_camera_from_opencv(bpy, scene, world_to_camera: np.ndarray, fov_deg: float, size: int):
    """A Blender camera equal to an OpenCV camera with ``intrinsics_from_fov(size, size,
    fov_deg)``, written from first principles (not the add-on's conversion)."""
    from mathutils import Matrix

    data = bpy.data.cameras.new("cam")
    data.sensor_fit = "HORIZONTAL"
    data.sensor_width = 36.0
    data.lens = 18.0 / math.tan(math.radians(fov_deg) / 2)
    ob = bpy.data.objects.new("cam", data)
    scene.collection.objects.link(ob)
    # a Matrix: a nested list would be read column-major by RNA
    ob.matrix_world = Matrix((np.linalg.inv(world_to_camera) @ FLIP_YZ).tolist())
    scene.camera = ob
    scene.render.resolution_x = scene.render.resolution_y = size
    scene.render.resolution_percentage = 100
    scene.render.pixel_aspect_x = scene.render.pixel_aspect_y = 1.0
    return ob


def enable_addon(bpy, endpoint: str, timeout: float = 60.0):
    """Enable the add-on from the checkout the way Blender does and point it at
    ``endpoint``; returns its preferences."""
    import importlib

    addon_utils = importlib.import_module("addon_utils")  # importable once bpy is
    addon_utils.enable(ADDON, default_set=True, handle_error=_raise)
    from blender_addon import prefs

    p = prefs.preferences()
    p.endpoint, p.timeout = endpoint, timeout
    return p


def disable_addon() -> None:
    import importlib

    importlib.import_module("addon_utils").disable(ADDON, default_set=True)


def _raise(exc: BaseException) -> None:
    raise exc


def reset_scene(bpy):
    """A cleared scene rendered by splatface at 24 fps, frames 1-10, with depth and
    normal passes on, one view layer, no child collections, no render region, one view
    (no stereo), a transparent film, PNG output."""
    clear_scene(bpy)
    sc = bpy.context.scene
    sc.render.engine = "SPLATFACE"
    sc.render.fps, sc.render.fps_base = 24, 1.0
    sc.frame_start, sc.frame_end, sc.frame_step = 1, 10, 1
    sc.frame_set(1)
    sc.view_layers[0].use_pass_z = sc.view_layers[0].use_pass_normal = True
    for layer in list(sc.view_layers)[1:]:
        sc.view_layers.remove(layer)
    for coll in list(sc.collection.children):
        sc.collection.children.unlink(coll)
    sc.render.use_border = sc.render.use_crop_to_border = False
    sc.render.use_multiview = False
    sc.render.film_transparent = True
    settings = sc.render.image_settings
    settings.views_format = "INDIVIDUAL"
    if hasattr(settings, "media_type"):  # 5.0: a multilayer EXR test leaves its kind
        settings.media_type = "IMAGE"
    settings.file_format = "PNG"
    return sc


def flat_world(bpy):
    """A new world whose Background node is a plain colour (0.2, 0.4, 0.8) at strength
    0.5: linear (0.1, 0.2, 0.4) behind the avatars where the film is opaque."""
    world = bpy.data.worlds.new("sky")
    if bpy.app.version < (5, 0):  # 5.0 always uses the world's nodes
        world.use_nodes = True
    background = next(n for n in world.node_tree.nodes if n.bl_idname == "ShaderNodeBackground")
    background.inputs["Color"].default_value = (0.2, 0.4, 0.8, 1.0)
    background.inputs["Strength"].default_value = 0.5
    return world


def settle() -> None:
    """Run the add-on's queued work to the end (timers do not fire in background mode)."""
    from blender_addon import runtime

    runtime.settle(timeout=120)


def import_avatar(bpy, avatar_id: str):
    """``splatface.import_avatar`` run to completion; returns the new proxy."""
    from blender_addon import avatar

    assert bpy.ops.splatface.import_avatar(avatar_id=avatar_id) == {"FINISHED"}
    settle()
    proxies = avatar.proxies(bpy.context.scene.objects)
    assert proxies, "no proxy was created"
    return proxies[-1]


def assert_close_renders(got: np.ndarray, ref: np.ndarray, what: str = "") -> None:
    """An engine render against a direct one, up to float32 rounding of Blender's
    matrices: all but one pixel in a thousand within 2e-3, every pixel within 1e-2. A
    Gaussian a fraction of a pixel wide on a silhouette changes a pixel by a few 1e-3
    when a float32 matrix moves it by a millionth of a metre; a wrong camera or pose
    changes whole regions by far more."""
    diff = np.abs(np.asarray(got, np.float64) - np.asarray(ref, np.float64))
    assert np.quantile(diff, 0.999) < 2e-3 and diff.max() < 1e-2, (what, diff.max())


def exr_channel_sums(path) -> dict[str, float]:
    """{channel: sum of its values} of an uncompressed scanline OpenEXR file, single- or
    multi-part (Blender 4.5 writes a multilayer file as one part, 5.0 as one part per
    layer); channels are named ``Layer.Pass.X``. Only what the tests write is read."""
    import struct

    data = open(path, "rb").read()
    multipart = bool(struct.unpack_from("<i", data, 4)[0] & 0x1000)
    pos, headers = 8, []
    while True:  # headers: attributes (name, type, size, value) up to an empty name
        attrs = {}
        while data[pos] != 0:
            name, kind, rest = data[pos:].split(b"\0", 2)
            pos += len(name) + len(kind) + 2
            (size,) = struct.unpack_from("<i", data, pos)
            attrs[name.decode()] = data[pos + 4 : pos + 4 + size]
            pos += 4 + size
        pos += 1
        headers.append(attrs)
        if not multipart or data[pos] == 0:
            pos += multipart
            break
    parts = []
    for attrs in headers:
        assert attrs["compression"] == b"\0", "write the EXR uncompressed (exr_codec NONE)"
        chl, p, channels = attrs["channels"], 0, []
        while chl[p] != 0:
            end = chl.index(b"\0", p)
            channels.append((chl[p:end].decode(), struct.unpack_from("<i", chl, end + 1)[0]))
            p = end + 17
        x0, y0, x1, y1 = struct.unpack("<4i", attrs["dataWindow"])
        chunks = struct.unpack("<i", attrs["chunkCount"])[0] if multipart else y1 - y0 + 1
        parts.append((channels, x1 - x0 + 1, struct.unpack_from(f"<{chunks}Q", data, pos)))
        pos += 8 * chunks
    sums: dict[str, float] = {}
    for channels, width, offsets in parts:
        for offset in offsets:
            q = offset + (12 if multipart else 8)  # [part,] y, size
            for name, kind in channels:
                dtype, nbytes = (np.float16, 2) if kind == 1 else (np.float32, 4)
                row = np.frombuffer(data, dtype, width, q).astype(np.float64)
                sums[name] = sums.get(name, 0.0) + float(row.sum())
                q += nbytes * width
    return sums
