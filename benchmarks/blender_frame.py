"""Per-frame cost of a ``SPLATFACE`` engine render at 512x512 on CPU, split into where the
time goes, against a direct service render of the same frame in the same run.

One private service (CPU), the astronaut built with the ``fast`` preset, added to a
headless-bpy scene; every frame sets ``jawOpen`` and ``eyeBlinkLeft`` by keyframes and
renders through ``bpy.ops.render.render`` (all four passes). Records:

- ``engine``: the whole F12 operator (``op_ms``: Blender's render pipeline included),
  the engine's own ``render`` (``engine_ms``), and its parts: ``blender_ms`` (camera,
  evaluated shape keys and head matrix: ``gather_ms``; pass conversion: ``convert_ms``;
  ``foreach_set`` into the result: ``store_ms``; those and ``end_result``: ``write_ms``),
  ``end_result_ms`` (Blender merging the result into its own, which every engine pays)
  and ``request_ms`` (the wait for the ``render`` reply, during which the engine has
  Blender allocate the result and touches its pages);
- ``direct``: ``Client.render`` with the same values and camera (``round_trip_ms``);
  ``service_ms``: the same ``render_frames`` call in this process, the service's compute;
  ``transport_ms`` = round trip - compute (codec, sockets, validation, worker pool);
- ``addon_overhead_ms`` = engine_ms - direct round trip (target: under 10 ms), and of
  it ``own_code_ms`` = gather + convert + store (the add-on's Python on the frame's path;
  the rest is Blender's ``end_result`` and the wait's handoff).
"""

from __future__ import annotations

import importlib
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import emit, machine

SIZE = 512
FRAMES = 20
FOV = 30.0


def main() -> None:
    import io

    import skimage.data
    from PIL import Image

    from inference_service.cli import private_service

    buf = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buf, format="PNG")
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        with private_service(store, device="cpu") as endpoint:
            run(endpoint, store, buf.getvalue())


def run(endpoint: str, store: Path, png: bytes) -> None:
    import bpy
    from mathutils import Matrix

    addon_utils = importlib.import_module("addon_utils")  # on the path once bpy is imported

    from blender_addon import avatar as avatar_module
    from blender_addon import engine, prefs, runtime
    from inference_service.render import render_frames
    from inference_service.store import Store
    from protocol import Client
    from protocol.camera import intrinsics_from_fov, orbit

    with Client(endpoint, timeout=300) as client:
        avatar_id = client.wait(client.build(png, preset="fast"), timeout=600)["avatar_id"]
    addon_utils.enable("blender_addon", default_set=True)
    p = prefs.preferences()
    p.endpoint, p.timeout = endpoint, 60.0
    scene = bpy.context.scene
    for ob in list(bpy.data.objects):
        bpy.data.objects.remove(ob)
    bpy.ops.splatface.import_avatar(avatar_id=avatar_id)
    runtime.settle(120)
    proxy = next(ob for ob in scene.objects if ob.splatface.role == "PROXY")
    keys = proxy.data.shape_keys.key_blocks
    for frame in range(1, FRAMES + 1):
        keys["jawOpen"].value = frame / FRAMES
        keys["jawOpen"].keyframe_insert("value", frame=frame)
        keys["eyeBlinkLeft"].value = 1 - frame / FRAMES
        keys["eyeBlinkLeft"].keyframe_insert("value", frame=frame)

    w2c = orbit(proxy.splatface.center, 0.9, yaw_deg=20)
    k = intrinsics_from_fov(SIZE, SIZE, FOV)
    cam = bpy.data.objects.new("cam", bpy.data.cameras.new("cam"))
    scene.collection.objects.link(cam)
    cam.data.sensor_fit, cam.data.sensor_width = "HORIZONTAL", 36.0
    cam.data.lens = 18.0 / np.tan(np.radians(FOV) / 2)
    cam.matrix_world = Matrix((np.linalg.inv(w2c) @ np.diag([1.0, -1, -1, 1])).tolist())
    scene.camera = cam
    scene.render.engine = "SPLATFACE"
    scene.render.resolution_x = scene.render.resolution_y = SIZE
    scene.render.resolution_percentage = 100

    scene.view_layers[0].use_pass_z = scene.view_layers[0].use_pass_normal = True
    client = runtime.client()
    avatar = Store(store).load(avatar_id)
    passes = engine.PASSES
    series: dict[str, list[float]] = {}

    def add(name: str, seconds: float) -> None:
        series.setdefault(name, []).append(seconds * 1000)

    # interleaved, so the three measurements share the machine's load at each moment
    for i in range(FRAMES + 3):
        scene.frame_set(1 + i % FRAMES)
        depsgraph = bpy.context.evaluated_depsgraph_get()
        curves = avatar_module.evaluated_curves(proxy.evaluated_get(depsgraph), depsgraph)[None]
        t = time.perf_counter()
        bpy.ops.render.render()
        t_op = time.perf_counter() - t
        t = time.perf_counter()
        client.render(avatar_id, k, w2c, SIZE, SIZE, curves=curves, passes=passes)
        t_direct = time.perf_counter() - t
        t = time.perf_counter()
        render_frames(avatar, k[None], w2c[None], SIZE, SIZE, curves, None, passes, backend="cpu")
        t_compute = time.perf_counter() - t
        if i < 3:  # warm-up
            continue
        tm = engine.last_render.timing
        add("op", t_op)
        add("engine", tm.blender + tm.request + tm.write)
        add("blender", tm.blender + tm.write)
        add("gather", tm.blender)
        add("write", tm.write)
        add("convert", tm.convert)
        add("store", tm.store)
        add("end_result", tm.write - tm.convert - tm.store)
        add("request", tm.request)
        add("direct", t_direct)
        add("compute", t_compute)
        add("overhead", tm.blender + tm.request + tm.write - t_direct)
        add("own", tm.blender + tm.convert + tm.store)

    def m(name: str) -> float:
        return round(statistics.median(series[name]), 3)

    emit(
        {
            "benchmark": "blender_frame",
            "size": SIZE,
            "frames": FRAMES,
            "gaussians": client.get(avatar_id, mesh=False, rig=False).header["avatar"]["gaussians"],
            "engine": {
                "op_ms": m("op"),
                "engine_ms": m("engine"),
                "blender_ms": m("blender"),
                "gather_ms": m("gather"),
                "write_ms": m("write"),
                "convert_ms": m("convert"),
                "store_ms": m("store"),
                "end_result_ms": m("end_result"),
                "request_ms": m("request"),
            },
            "direct": {
                "round_trip_ms": m("direct"),
                "service_ms": m("compute"),
                "transport_ms": round(m("direct") - m("compute"), 3),
            },
            "addon_overhead_ms": m("overhead"),
            "own_code_ms": m("own"),
            "machine": machine(),
        }
    )


if __name__ == "__main__":
    main()
