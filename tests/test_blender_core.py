"""The add-on's bpy-free core: camera conversion, compositing, keyframe plans, jobs."""

from __future__ import annotations

import ctypes
import sys
import threading
import time
from dataclasses import replace

import numpy as np
import pytest

from blender_addon._protocol import head_pivot
from blender_addon._protocol import is_loopback_endpoint as is_loopback
from blender_addon.core import camera as cam
from blender_addon.core.curves import plan_keyframes
from blender_addon.core.jobs import MainQueue, Worker, on_main_thread
from blender_addon.core.memory import FrameMemory
from blender_addon.core.passes import EMPTY_DEPTH, Layer, composite, to_blender
from blender_addon.core.service import (
    ConnectionSettings,
    may_start_local,
    run_build,
)
from protocol import ProtocolError
from protocol.camera import project

from .conftest import REPO

# -- camera: hand-computed cases (Blender's view-plane rules, see core/camera.py) ---------


def _k(**kw) -> np.ndarray:
    kw.setdefault("matrix_world", np.eye(4))
    kw.setdefault("lens", 50.0)
    return cam.intrinsics(cam.BlenderCamera(**kw))[0]


def test_auto_fit_landscape_uses_sensor_width_on_width():
    fx, fy, cx, cy = _k(resolution_x=1920, resolution_y=1080)
    assert fx == pytest.approx(50 / 36 * 1920) and fy == pytest.approx(fx)
    assert (cx, cy) == (960, 540)


def test_auto_fit_portrait_puts_sensor_width_on_height():
    fx, fy, *_ = _k(resolution_x=1080, resolution_y=1920)
    assert fx == pytest.approx(50 / 36 * 1920) and fy == pytest.approx(fx)


def test_vertical_and_horizontal_fit():
    fx, *_ = _k(resolution_x=1920, resolution_y=1080, sensor_fit="VERTICAL", sensor_height=24)
    assert fx == pytest.approx(50 / 24 * 1080)
    fx, *_ = _k(resolution_x=1080, resolution_y=1920, sensor_fit="HORIZONTAL")
    assert fx == pytest.approx(50 / 36 * 1080)


def test_shift_moves_principal_point_by_the_larger_side():
    _, _, cx, cy = _k(resolution_x=1920, resolution_y=1080, shift_x=0.1, shift_y=0.1)
    assert cx == pytest.approx(960 - 192) and cy == pytest.approx(540 + 192)
    _, _, cx, cy = _k(resolution_x=1080, resolution_y=1920, shift_x=0.1, shift_y=-0.1)
    assert cx == pytest.approx(540 - 192) and cy == pytest.approx(960 - 192)


def test_non_square_pixels():
    # pixels twice as tall as wide: ycor = 2; 1*1000 >= 2*500 → horizontal fit
    fx, fy, cx, cy = _k(
        resolution_x=1000, resolution_y=500, pixel_aspect_y=2.0, shift_y=0.1, sensor_width=40
    )
    assert fx == pytest.approx(50 / 40 * 1000) and fy == pytest.approx(fx / 2)
    assert cx == 500 and cy == pytest.approx(250 + 0.1 * 1000 / 2)
    # 1*1000 < 2*600 → vertical fit: view_px = ycor * height, sensor width still
    fx, fy, *_ = _k(resolution_x=1000, resolution_y=600, pixel_aspect_y=2.0, sensor_width=40)
    assert fx == pytest.approx(50 / 40 * 1200) and fy == pytest.approx(fx / 2)


def test_resolution_percentage_truncates_like_blender():
    k, w, h = cam.intrinsics(
        cam.BlenderCamera(
            np.eye(4), 50.0, resolution_x=1001, resolution_y=501, resolution_percentage=50
        )
    )
    assert (w, h) == (500, 250)
    assert k[0] == pytest.approx(50 / 36 * 500) and k[2] == 250


def test_axes_blender_minus_z_forward_plus_y_up():
    c = cam.convert(cam.BlenderCamera(np.eye(4), 50.0, resolution_x=100, resolution_y=100))
    uv, z = project([[0, 0, -2], [0, 1, -2], [1, 0, -2]], c.intrinsics, c.world_to_camera)
    assert z == pytest.approx([2, 2, 2])
    assert uv[0] == pytest.approx([50, 50])
    assert uv[1][1] < 50 and uv[1][0] == pytest.approx(50)  # up in Blender = up in the image
    assert uv[2][0] > 50  # +X right


def test_camera_scale_is_ignored_and_round_trip():
    m = np.eye(4)
    m[:3, :3] *= 3.0
    m[:3, 3] = (1, 2, 3)
    w2c = cam.blender_to_opencv_world_to_camera(m)
    assert np.allclose(w2c[:3, :3] @ w2c[:3, :3].T, np.eye(3))
    back = cam.opencv_to_blender_matrix_world(w2c)
    assert np.allclose(back[:3, :3], np.eye(3)) and np.allclose(back[:3, 3], (1, 2, 3))
    # a parent's uneven scale shears a turned camera: the nearest rotation is sent (the
    # service refuses anything else), and a mirrored camera is refused by name
    turn = np.array([[0.8, -0.6, 0], [0.6, 0.8, 0], [0, 0, 1.0]])
    m[:3, :3] = np.diag([1.0, 3.0, 1.0]) @ turn
    w2c = cam.blender_to_opencv_world_to_camera(m)
    assert np.allclose(w2c[:3, :3] @ w2c[:3, :3].T, np.eye(3)) and np.linalg.det(w2c[:3, :3]) > 0
    m[:3, :3] = np.diag([-1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="mirrored"):
        cam.blender_to_opencv_world_to_camera(m)


def test_bad_camera_values_are_refused():
    with pytest.raises(ValueError, match="sensor_fit"):
        _k(sensor_fit="DIAGONAL")
    with pytest.raises(ValueError, match="positive"):
        _k(lens=0.0)


def test_listening_tells_a_local_endpoint_with_nobody_there(tmp_path):
    import socket

    from blender_addon.core.service import listening

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert listening(f"tcp://127.0.0.1:{port}")
    assert not listening(f"tcp://127.0.0.1:{port}")  # closed: refused at once
    assert not listening(f"ipc://{tmp_path / 'nobody'}")
    assert listening("tcp://127.0.0.1:*")  # cannot be told: say yes, start nothing


def test_clip_ranges_are_held_to_what_the_protocol_takes():
    assert cam.clip_range(0.1, 1000.0) == (0.1, 1000.0)
    assert cam.clip_range(1e-6, 1e9) == (cam.NEAR_RANGE[0], cam.FAR_RANGE[1])
    near, far = cam.clip_range(2000.0, 1500.0)  # Blender allows end before start
    assert near == cam.NEAR_RANGE[1] and near < far <= cam.FAR_RANGE[1]
    assert cam.clip_range(None, None) == (None, None)


def test_from_projection_matches_intrinsics():
    k = np.array([400.0, 380.0, 170.0, 110.0])
    w, h, near, far = 320, 240, 0.1, 100.0
    p = np.zeros((4, 4))  # OpenGL projection built from the intrinsics
    p[0, 0], p[1, 1] = 2 * k[0] / w, 2 * k[1] / h
    p[0, 2], p[1, 2] = 1 - 2 * k[2] / w, 2 * k[3] / h - 1
    p[2, 2], p[2, 3], p[3, 2] = -(far + near) / (far - near), -2 * far * near / (far - near), -1
    c = cam.from_projection(np.eye(4), p, w, h)
    assert c.intrinsics == pytest.approx(k)
    assert (c.near, c.far) == pytest.approx((near, far))
    ortho = np.eye(4)
    with pytest.raises(ValueError, match="orthographic"):
        cam.from_projection(np.eye(4), ortho, w, h)


# -- passes --------------------------------------------------------------------------


def _layer(color: float, alpha: float, depth: float, h: int = 2, w: int = 3) -> Layer:
    return Layer(
        np.full((h, w, 3), color * alpha, np.float32),
        np.full((h, w), alpha, np.float32),
        np.full((h, w), depth, np.float32),
        np.tile(np.array([0, 0, -1], np.float32), (h, w, 1)) * (depth < np.inf),
    )


def test_composite_puts_the_nearer_avatar_over_the_farther():
    near, far = _layer(1.0, 0.5, 1.0), _layer(0.2, 1.0, 2.0)
    for layers in ([near, far], [far, near]):
        out = composite(layers)
        assert out.rgb[0, 0, 0] == pytest.approx(0.5 + 0.5 * 0.2)
        assert out.alpha[0, 0] == pytest.approx(1.0)
        assert out.depth[0, 0] == 1.0
    empty = _layer(0.0, 0.0, np.inf)
    out = composite([empty, far])
    assert out.depth[0, 0] == 2.0 and out.rgb[0, 0, 0] == pytest.approx(0.2)


def composite_everywhere(layers: list[Layer]) -> Layer:
    """The obvious composite: every pixel's layers sorted by depth and blended front to
    back (what ``composite`` does only where two or more layers reach)."""
    depth = np.stack([lay.depth for lay in layers])
    order = np.argsort(depth, axis=0, kind="stable")
    held_in = [np.zeros_like(lay.alpha) if lay.held is None else lay.held for lay in layers]
    take = np.take_along_axis
    rgb = take(np.stack([lay.rgb for lay in layers]), order[..., None], axis=0)
    alpha = take(np.stack([lay.alpha for lay in layers]), order, axis=0)
    held = take(np.stack(held_in), order, axis=0)
    normal = take(np.stack([lay.normal for lay in layers]), order[..., None], axis=0)
    out_rgb, out_alpha, out_held = np.zeros_like(rgb[0]), np.zeros_like(alpha[0]), 0 * alpha[0]
    for k in range(len(layers)):
        through = 1.0 - out_alpha - out_held
        out_rgb += through[..., None] * rgb[k]
        out_alpha += through * alpha[k]
        out_held += through * held[k]
    return Layer(out_rgb, out_alpha, take(depth, order, axis=0)[0], normal[0], held=out_held)


@pytest.mark.parametrize("seed", range(4))
def test_composite_matches_sorting_every_pixel(seed):
    """Heads as discs of random place, size, depth and alpha (some held out, two at one
    depth; for two seeds as flipped, read-only views, as replies decoded bottom-up come):
    the same frame as blending every pixel's sorted layers, bit for bit."""
    rng = np.random.default_rng(seed)
    h, w = 48, 64
    rows, cols = np.mgrid[0:h, 0:w]
    layers = []
    for k in range(int(rng.integers(2, 7))):
        disc = np.hypot(rows - rng.uniform(0, h), cols - rng.uniform(0, w)) < rng.uniform(5, 25)
        alpha = np.where(disc, rng.uniform(0.05, 1.0, (h, w)), 0).astype(np.float32)
        depth = np.where(disc, rng.choice([1.0, 1.5, rng.uniform(1, 3)]), np.inf)
        rgb = alpha[..., None] * rng.uniform(0, 1, (h, w, 3)).astype(np.float32)
        normal = np.where(disc[..., None], rng.normal(size=(h, w, 3)), 0).astype(np.float32)
        arrays = [rgb, alpha, depth.astype(np.float32), normal]
        if seed >= 2:
            arrays = [np.flipud(a) for a in arrays]
            for a in arrays:
                a.flags.writeable = False
        lay = Layer(*arrays)
        layers.append(lay.held_out() if k == 1 and seed % 2 else lay)
    got, want = composite(layers), composite_everywhere(layers)
    for name in ("rgb", "alpha", "depth", "normal"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    if seed % 2:
        np.testing.assert_array_equal(got.held, want.held)
    else:
        assert got.held is None


def test_a_holdout_hides_what_is_behind_it_and_shows_nothing():
    """Blender's holdout: no colour and no alpha where it covers, and what lies behind
    it hidden as by any avatar; over an opaque film it stays a hole (Cycles, EEVEE)."""
    near, far = _layer(1.0, 0.5, 1.0), _layer(0.2, 1.0, 2.0)
    for layers in ([near.held_out(), far], [far, near.held_out()]):
        out = composite(layers)
        assert out.rgb[0, 0, 0] == pytest.approx(0.5 * 0.2)  # far, through the half hole
        assert out.alpha[0, 0] == pytest.approx(0.5) and out.held[0, 0] == pytest.approx(0.5)
        filled = out.over(np.array([0.1, 0.2, 0.3]))
        assert filled.alpha[0, 0] == pytest.approx(0.5)  # the hole stays one
        assert filled.rgb[0, 0] == pytest.approx([0.1, 0.1, 0.1])  # nothing of it behind
    out = composite([near, far.held_out()])  # a holdout behind shows through the near one
    assert out.rgb[0, 0, 0] == pytest.approx(0.5)
    assert out.alpha[0, 0] == pytest.approx(0.5) and out.held[0, 0] == pytest.approx(0.5)
    alone = near.held_out()
    assert alone.alpha.max() == 0 and alone.rgb.max() == 0 and alone.held[0, 0] == 0.5
    assert composite([near, far]).held is None


def test_a_frame_over_the_world_is_opaque():
    lay = _layer(1.0, 0.25, 1.0).over(np.array([0.0, 0.5, 1.0]))
    assert (lay.alpha == 1.0).all()
    assert lay.rgb[0, 0] == pytest.approx([0.25, 0.25 + 0.75 * 0.5, 0.25 + 0.75])


def test_to_blender_flips_rows_and_rotates_normals():
    wire = np.dtype("f4").newbyteorder("<")  # how arrays arrive from the protocol
    src = _layer(1.0, 1.0, 1.0)
    lay = Layer(*(a.astype(wire) for a in (src.rgb, src.alpha, src.depth, src.normal)))
    lay.depth[0, :] = np.inf  # top row empty
    lay.rgb[0, 0] = (9, 9, 9)
    lay.alpha[0, 1] = 0.25
    out = to_blender(lay, np.diag([1.0, -1.0, -1.0]))
    h, w = 2, 3
    depth = out["Depth"].reshape(h, w)
    assert (depth[1] == EMPTY_DEPTH).all() and (depth[0] == 1.0).all()  # bottom-up rows
    assert out["Combined"].reshape(h, w, 4)[1, 0, 0] == 9
    assert out["Combined"].reshape(h, w, 4)[1, 1, 3] == 0.25
    assert set(out) == {"Combined", "Depth", "Normal"}  # alpha is Combined's, as Blender's
    assert out["Normal"].reshape(h, w, 3)[0, 0] == pytest.approx([0, 0, 1])
    # Blender's foreach_set crashes on the explicit "<f" buffer format
    assert {memoryview(v).format for v in out.values()} == {"f"}

    # a layer rendered bottom-up (rows="bottom_up") gives the same passes, unflipped
    flipped = Layer(*(a[::-1].copy() for a in (lay.rgb, lay.alpha, lay.depth, lay.normal)),
                    bottom_up=True)  # fmt: skip
    again = to_blender(flipped, np.diag([1.0, -1.0, -1.0]))
    for name, value in out.items():
        assert np.array_equal(again[name], value), name
    assert {memoryview(v).format for v in again.values()} == {"f"}
    assert np.array_equal(flipped.top_down().alpha, lay.alpha)
    with pytest.raises(ValueError, match="row order"):
        composite([lay, flipped])


def test_passes_decoded_at_an_odd_offset_reach_blender_as_plain_floats():
    """A reply's arrays are decoded in place, at whatever offset the header's length
    puts them; numpy exports an unaligned float32 as ``=f``, which ``foreach_set`` also
    refuses (a 32x48 region of the astronaut failed so)."""
    h, w = 4, 5
    raw = bytearray(1 + h * w * 4 * 8)

    def unaligned(shape, offset):
        n = int(np.prod(shape))
        a = np.frombuffer(raw, np.dtype("<f4"), n, 1 + offset * 4).reshape(shape)
        assert not a.flags.aligned
        return a

    n = h * w
    frames = {
        "rgb": unaligned((1, h, w, 3), 0),
        "alpha": unaligned((1, h, w), 3 * n),
        "depth": unaligned((1, h, w), 4 * n),
        "normal": unaligned((1, h, w, 3), 5 * n),
    }
    for bottom_up in (True, False):
        out = to_blender(Layer.from_render(frames, bottom_up=bottom_up), np.eye(3))
        assert {memoryview(v).format for v in out.values()} == {"f"}, bottom_up


# -- keyframe plans ------------------------------------------------------------------


def test_plan_same_rate_keys_every_row():
    curves = np.random.default_rng(0).random((5, 52), np.float32)
    plan = plan_keyframes(curves, 30.0, 30.0, start_frame=10)
    assert plan.frames.tolist() == [10, 11, 12, 13, 14] and np.array_equal(plan.values, curves)


def test_plan_resamples_60_fps_take_to_24_fps_scene():
    t = np.arange(61) / 60.0  # one second at 60 fps, a linear ramp
    curves = np.tile(t[:, None], (1, 52)).astype(np.float32)
    plan = plan_keyframes(curves, 60.0, 24.0, start_frame=1)
    assert len(plan.frames) == 25 and plan.frames[-1] == 25
    assert plan.values[:, 0] == pytest.approx(np.arange(25) / 24.0, abs=1e-6)


def test_plan_places_rows_at_their_times_so_dropped_frames_keep_the_length():
    t = np.arange(601) / 60.0  # ten seconds at 60 fps, a linear ramp
    kept = np.arange(601) % 60 < 58  # the last two frames of every second dropped
    curves = np.tile(t[kept, None], (1, 3)).astype(np.float32)
    plan = plan_keyframes(curves, 60.0, 24.0, start_frame=1, times=t[kept])
    assert plan.frames[-1] == 1 + int(np.floor(t[kept][-1] * 24 + 1e-9))  # 9.95 s, not 9.63
    assert plan.values[:, 0] == pytest.approx(np.arange(len(plan.frames)) / 24.0, abs=1e-6)
    short = plan_keyframes(curves, 60.0, 24.0, start_frame=1)  # rows counted: plays short
    assert len(short.frames) < len(plan.frames)
    with pytest.raises(ValueError, match="increasing"):
        plan_keyframes(curves[:3], 60.0, 24.0, times=[0.0, 0.1, 0.1])


def test_plan_keeps_float64_angles_and_any_column_count():
    angles = np.stack([np.linspace(0, 0.6, 61), np.zeros(61), np.linspace(0, -0.3, 61)], 1)
    plan = plan_keyframes(angles, 60.0, 24.0, start_frame=1)
    assert plan.values.dtype == np.float64 and plan.values.shape == (25, 3)
    assert plan.values[12] == pytest.approx([0.3, 0.0, -0.15])  # 0.5 s


def test_the_addons_head_pivot_is_the_clis():
    from inference_service.cli import head_pivot as cli_head_pivot

    for info in (
        {"center": [0.0, 0.0, 0.0], "radius": 0.1},
        {"center": [0.01, -0.2, 1.6], "radius": 0.12},
    ):
        assert head_pivot(info["center"], info["radius"]) == pytest.approx(cli_head_pivot(info))
    # top of the neck: behind (+Y, the face looks to -Y) and below the centre
    p = head_pivot([0.0, 0.0, 0.0], 0.1)
    assert p[1] > 0 and p[2] < 0


def test_plan_rejects_bad_input():
    with pytest.raises(ValueError):
        plan_keyframes(np.zeros((0, 52)), 30, 24)
    with pytest.raises(ValueError):
        plan_keyframes(np.zeros((3, 52)), -1, 24)


# -- jobs ----------------------------------------------------------------------------


def test_worker_results_come_back_only_through_drain():
    main, worker = MainQueue(), Worker()
    seen: list[tuple[str, int]] = []
    fut = worker.submit(lambda: (threading.current_thread().name, 42))
    on_main_thread(fut, main, lambda f: seen.append(f.result()))
    fut.result(5)
    time.sleep(0.05)
    assert seen == []  # nothing touched "Blender" from the worker thread
    assert main.drain() == 1
    assert seen == [("splatface-worker", 42)]
    worker.stop()


def test_worker_keeps_only_the_latest_keyed_request():
    worker, gate, ran = Worker(), threading.Event(), []
    worker.submit(gate.wait)
    futures = [worker.submit(lambda i=i: ran.append(i), key="view") for i in range(5)]
    gate.set()
    futures[-1].result(5)
    assert ran == [4] and all(f.cancelled() for f in futures[:-1])
    worker.stop()


def test_failing_callback_does_not_stop_the_queue():
    main, out = MainQueue(), []
    main.post(lambda: 1 / 0)
    main.post(out.append, 1)
    assert main.drain() == 2 and out == [1]


# -- frame memory ------------------------------------------------------------------


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


def _mallinfo() -> _Mallinfo2:
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _Mallinfo2
    return libc.mallinfo2()


def test_frame_memory_keeps_a_frames_blocks_mapped_until_released():
    """Run in a fresh process: where earlier tests left a free hole of a frame's size in
    this one's heap, glibc fills a new block from it under any threshold."""
    import subprocess

    code = "from tests.test_blender_core import frame_memory_checks; frame_memory_checks()"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


def frame_memory_checks() -> None:
    memory = FrameMemory()
    if not sys.platform.startswith("linux"):
        assert not memory.available and not memory.keep(1 << 20)
        return
    assert memory.available  # CI and this project's machines run glibc
    size = 24 << 20  # a frame's result, as one block
    try:
        assert memory.keep(size) is False  # nothing kept before the first frame
        mapped = _mallinfo().hblkhd
        block = np.ones(size // 8)
        assert _mallinfo().hblkhd - mapped < size // 2, "a frame's block was mmapped"
        del block
        assert _mallinfo().fordblks >= size, "the freed block went back to the system"
        assert memory.keep(size) is True and memory.active
    finally:
        memory.release()
    assert not memory.active
    mapped = _mallinfo().hblkhd
    block = np.ones(size // 8)
    assert _mallinfo().hblkhd - mapped >= size, "glibc's default threshold was not restored"
    del block


# -- service glue ------------------------------------------------------------------


def test_endpoint_from_environment_overrides_preferences():
    s = ConnectionSettings(endpoint="tcp://127.0.0.1:5555")
    assert s.resolved({}).endpoint == "tcp://127.0.0.1:5555"
    env = {"SPLATFACE_ENDPOINT": "tcp://farm:6000"}
    assert s.resolved(env).endpoint == "tcp://farm:6000"
    assert is_loopback("tcp://127.0.0.1:1") and not is_loopback("tcp://farm:6000")


@pytest.mark.parametrize(
    ("endpoint", "words"),
    [("tcp://127.0.0.1", "needs a port"), ("tcp://:5555", "needs a host"),
     ("tcp://127.0.0.1:5555/", "has '/' after its port"),
     ("tcp://*:5555", "how a service listens on every address"),
     ("tcp://farm:70000", "from 1 to 65535"), ("127.0.0.1:5555", "must start with tcp://")],
)  # fmt: skip
def test_a_mistyped_endpoint_is_named_for_its_mistake(endpoint, words):
    """A farm's SPLATFACE_ENDPOINT with a trailing '/', or a service's own bind address,
    was refused as 'needs a port', which it has."""
    with pytest.raises(ValueError) as e:
        ConnectionSettings(endpoint=endpoint).client()
    assert str(e.value).startswith(f"service endpoint {endpoint!r}") and words in str(e.value)
    for fine in ("tcp://127.0.0.1:5555", "tcp://[::1]:5555", "tcp://farm.example:65535",
                 "tcp://127.0.0.1:05555", " tcp://127.0.0.1:5555 "):  # fmt: skip
        ConnectionSettings(endpoint=fine).client().close()  # a pasted space is stripped


def test_a_service_is_started_only_on_this_machine_and_without_keys():
    assert is_loopback("tcp://[::1]:5555") and is_loopback("tcp://localhost:5555")
    assert not is_loopback("tcp://127.farm.example:5555")  # a host name, not 127.x
    local = ConnectionSettings(endpoint="tcp://127.0.0.1:5555", auto_start=True)
    assert may_start_local(local)
    assert not may_start_local(replace(local, auto_start=False))
    assert not may_start_local(replace(local, endpoint="tcp://farm:6000"))
    # a service started here would run without keys and refuse the keyed client
    assert not may_start_local(replace(local, curve_keys="/keys"))


def test_unreachable_service_times_out_with_a_clear_error():
    s = ConnectionSettings(endpoint="tcp://127.0.0.1:9", timeout=0.3)
    t0 = time.monotonic()
    with pytest.raises(ProtocolError, match="is the service running") as info:
        s.client().hello()
    assert info.value.code == "timeout" and time.monotonic() - t0 < 3


def test_a_build_cancelled_after_it_failed_ends_cancelled(client, astronaut_png):
    """A build of a face the photo lacks, cancelled at once, failed (bad_request) where the
    failure reached the service before the cancel did: the user asked it to stop, and was
    shown an error."""
    cancel = threading.Event()

    def on_status(st: dict) -> None:
        if not cancel.is_set():  # the failure comes first, then the cancel
            while client.status(st["job"])["state"] != "failed":
                time.sleep(0.05)
            cancel.set()

    with pytest.raises(ProtocolError) as info:
        run_build(client, astronaut_png, preset="fast", face=5, on_status=on_status, cancel=cancel)
    assert info.value.code == "cancelled"
    with pytest.raises(ProtocolError) as info:  # not cancelled: the failure, as it is
        run_build(client, astronaut_png, preset="fast", face=5)
    assert info.value.code == "bad_request" and "face 5" in info.value.message


@pytest.mark.slow
def test_run_build_reports_progress_and_cancels(client, astronaut_png):
    statuses: list[dict] = []
    cancel = threading.Event()

    def on_status(st: dict) -> None:
        statuses.append(st)
        if st.get("stage") in ("landmarks", "align", "fit"):
            cancel.set()

    with pytest.raises(ProtocolError) as info:
        run_build(client, astronaut_png, preset="fast", on_status=on_status, cancel=cancel)
    assert info.value.code == "cancelled"
    assert statuses and statuses[0]["job"]
