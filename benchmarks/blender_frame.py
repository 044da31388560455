"""Per-frame cost of a ``SPLATFACE`` engine render at 512x512 on CPU, split into where the
time goes, against a direct service render of the same frame in the same run.

One private service (CPU), the astronaut built with the ``fast`` preset, added to a
headless-bpy scene with ``jawOpen`` and ``eyeBlinkLeft`` keyframed over FRAMES frames;
all four passes. Two ways of rendering, each a record:

- ``animation`` (the headline): one animation render (``render(animation=True)``) of
  FRAMES frames, the first left out (it allocates what later frames reuse);
- ``still``: STILLS separate F12 renders (``op_ms``: the whole operator, Blender's render
  pipeline and its start-up included).

Each frame's engine figures: the engine's own ``render`` (``engine_ms``) and its parts:
``blender_ms`` (camera, evaluated shape keys and head matrix: ``gather_ms``; pass
conversion: ``convert_ms``; ``foreach_set`` into the result: ``store_ms``; those and
``end_result``: ``write_ms``), ``end_result_ms`` (Blender merging the result into its
own, which every engine pays) and ``request_ms`` (the wait for the ``render`` reply,
during which Blender allocates the result). Against them, the same frame ``direct``:
``Client.render`` with the same values and camera (``round_trip_ms``); ``service_ms``:
the same ``render_frames`` call in this process, the service's compute;
``transport_ms`` = round trip - compute (codec, sockets, validation, worker pool).
``addon_overhead_ms`` = engine_ms - direct round trip, per frame, median (target: under
10 ms), and of it ``own_code_ms`` = gather + convert + store (the add-on's Python on the
frame's path; the rest is Blender's ``end_result`` and the wait's handoff).
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
FRAMES = 40
STILLS = 12
WARMUP = 3
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

    from blender_addon import engine, prefs, runtime
    from inference_service.render import render_frames
    from inference_service.store import Store
    from protocol import Client
    from protocol.arkit import ARKIT_NAMES, index_of
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
        for name, value in keyed(frame).items():
            keys[name].value = value
            keys[name].keyframe_insert("value", frame=frame)

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

    def direct(frame: int) -> tuple[float, float]:
        """The same frame straight from the service, then computed in this process (the
        frame's values as keyed: a key on every frame, so no interpolation)."""
        curves = np.zeros((1, len(ARKIT_NAMES)), np.float32)
        for name, value in keyed(frame).items():
            curves[0, index_of(name)] = value
        t = time.perf_counter()
        client.render(avatar_id, k, w2c, SIZE, SIZE, curves=curves, passes=passes)
        t_direct = time.perf_counter() - t
        t = time.perf_counter()
        render_frames(avatar, k[None], w2c[None], SIZE, SIZE, curves, None, passes, backend="cpu")
        return t_direct, time.perf_counter() - t

    # stills: one F12 per frame, interleaved with the direct renders so they share the
    # machine's load at each moment
    stills = Series()
    for i in range(STILLS + WARMUP):
        scene.frame_set(1 + i % FRAMES)
        t = time.perf_counter()
        bpy.ops.render.render()
        t_op = time.perf_counter() - t
        t_direct, t_compute = direct(scene.frame_current)
        if i >= WARMUP:
            stills.add_frame(engine.last_render.timing, t_direct, t_compute, op=t_op)

    # animation: one render job of FRAMES frames; each frame's direct renders run from
    # render_post, inside the job, right after the engine's
    animation = Series()

    def after_frame(scene_: bpy.types.Scene, *_args: object) -> None:
        timing = engine.last_render.timing
        t_direct, t_compute = direct(scene_.frame_current)
        if scene_.frame_current > scene_.frame_start:
            animation.add_frame(timing, t_direct, t_compute)

    with tempfile.TemporaryDirectory() as out:
        scene.frame_start, scene.frame_end = 1, FRAMES
        scene.render.filepath = str(Path(out) / "frame_")
        scene.render.image_settings.file_format = "PNG"
        scene.render.image_settings.compression = 0
        bpy.app.handlers.render_post.append(after_frame)
        try:
            bpy.ops.render.render(animation=True)
        finally:
            bpy.app.handlers.render_post.remove(after_frame)

    emit(
        {
            "benchmark": "blender_frame",
            "size": SIZE,
            "frames": FRAMES,
            "gaussians": client.get(avatar_id, mesh=False, rig=False).header["avatar"]["gaussians"],
            "animation": animation.record(),
            "still": stills.record(),
            "addon_overhead_ms": animation.median("overhead"),
            "own_code_ms": animation.median("own"),
            "machine": machine(),
        }
    )


def keyed(frame: int) -> dict[str, float]:
    """The shape keys' values keyed at ``frame``."""
    return {"jawOpen": frame / FRAMES, "eyeBlinkLeft": 1 - frame / FRAMES}


class Series:
    """Per-frame timings (ms) of one way of rendering, and their medians."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}
        self.memory_kept = 0

    def add(self, name: str, seconds: float) -> None:
        self.values.setdefault(name, []).append(seconds * 1000)

    def add_frame(self, tm: object, t_direct: float, t_compute: float, op: float = 0.0) -> None:
        if op:
            self.add("op", op)
        engine_s = tm.blender + tm.request + tm.write
        self.add("engine", engine_s)
        self.add("blender", tm.blender + tm.write)
        self.add("gather", tm.blender)
        self.add("write", tm.write)
        self.add("convert", tm.convert)
        self.add("store", tm.store)
        self.add("end_result", tm.write - tm.convert - tm.store)
        self.add("request", tm.request)
        self.memory_kept += tm.memory_kept
        self.add("direct", t_direct)
        self.add("compute", t_compute)
        self.add("overhead", engine_s - t_direct)
        self.add("own", tm.blender + tm.convert + tm.store)

    def median(self, name: str) -> float:
        return round(statistics.median(self.values[name]), 3)

    def record(self) -> dict:
        engine_names = ("op", "engine", "blender", "gather", "write", "convert", "store")
        engine_names += ("end_result", "request")
        return {
            "frames": len(self.values["engine"]),
            "frames_with_memory_kept": self.memory_kept,
            "engine": {f"{n}_ms": self.median(n) for n in engine_names if n in self.values},
            "direct": {
                "round_trip_ms": self.median("direct"),
                "service_ms": self.median("compute"),
                "transport_ms": round(self.median("direct") - self.median("compute"), 3),
            },
            "addon_overhead_ms": self.median("overhead"),
            "own_code_ms": self.median("own"),
        }


if __name__ == "__main__":
    main()
