"""The add-on in headless bpy against a real service: register, import, drive, render,
export, curves, and what happens when the service is down or restarts."""

from __future__ import annotations

import importlib
import math
import socket
import time

import bpy
import numpy as np
import pytest
from bpy_extras.object_utils import world_to_camera_view
from mathutils import Matrix, Vector

from protocol import ARKIT_NAMES, save_livelink_csv
from protocol.camera import intrinsics_from_fov, orbit
from tests.blender_util import add_camera_from_opencv, clear_scene
from tests.conftest import ServiceProcess

addon_utils = importlib.import_module("addon_utils")  # importable once bpy is imported

pytestmark = pytest.mark.slow
ADDON = "blender_addon"
SIZE = 192
FOV = 30.0


@pytest.fixture(scope="module")
def addon(service):
    addon_utils.enable(ADDON, default_set=True, handle_error=_raise)
    from blender_addon import prefs

    p = prefs.preferences()
    p.endpoint, p.timeout = service.endpoint, 60.0
    yield p
    addon_utils.disable(ADDON, default_set=True)


def _raise(exc: BaseException) -> None:
    raise exc


@pytest.fixture
def scene(addon):
    clear_scene(bpy)
    sc = bpy.context.scene
    sc.render.engine = "SPLATFACE"
    sc.render.fps, sc.render.fps_base = 24, 1.0
    sc.frame_start, sc.frame_end = 1, 10
    sc.frame_set(1)
    sc.view_layers[0].use_pass_z = sc.view_layers[0].use_pass_normal = True
    return sc


def _settle() -> None:
    from blender_addon import runtime

    runtime.settle(timeout=120)


def _import(avatar_id: str):
    from blender_addon import avatar

    assert bpy.ops.splatface.import_avatar(avatar_id=avatar_id) == {"FINISHED"}
    _settle()
    proxies = avatar.proxies(bpy.context.scene.objects)
    assert proxies, "no proxy was created"
    return proxies[-1]


def test_register_connect_lists_avatars(scene, astronaut_id):
    from blender_addon import props

    assert ADDON in bpy.context.preferences.addons
    assert scene.render.engine == "SPLATFACE"  # an unknown engine name would be refused
    assert bpy.ops.splatface.connect() == {"FINISHED"}
    _settle()
    st = props.state()
    assert st.connected and st.backend in ("cpu", "cuda") and not st.error
    assert astronaut_id in [a.avatar_id for a in st.avatars]


def test_proxy_has_52_arkit_shape_keys_and_head_empty(scene, astronaut_id, client):
    proxy = _import(astronaut_id)
    names = [k.name for k in proxy.data.shape_keys.key_blocks]
    assert names == ["Basis", *ARKIT_NAMES]
    assert all(k.value == 0.0 for k in proxy.data.shape_keys.key_blocks[1:])  # rest pose
    head = proxy.parent
    assert head.type == "EMPTY" and head.splatface.role == "HEAD"
    assert head.splatface.avatar_id == proxy.splatface.avatar_id == astronaut_id
    # at rest the proxy's world matrix (the head transform sent) is the identity
    assert np.allclose(np.array(proxy.matrix_world), np.eye(4), atol=1e-6)
    # the jawOpen key is the rest mesh plus the service's jawOpen delta
    reply = client.get(astronaut_id)
    verts, deltas = reply.arrays["vertices"], reply.arrays["shape_deltas"]
    jaw = np.empty(len(verts) * 3, np.float32)
    proxy.data.shape_keys.key_blocks["jawOpen"].data.foreach_get("co", jaw)
    i = ARKIT_NAMES.index("jawOpen")
    assert np.allclose(jaw.reshape(-1, 3), verts + deltas[i], atol=1e-6)


def _drive_from_bone(scene, proxy) -> bpy.types.Object:
    """eyeBlinkLeft = the bone's local Z location, keyed 0 → 0.8 over frames 1..5."""
    arm = bpy.data.objects.new("rig", bpy.data.armatures.new("rig"))
    scene.collection.objects.link(arm)
    bpy.context.view_layer.objects.active = arm
    bpy.ops.object.mode_set(mode="EDIT")
    bone = arm.data.edit_bones.new("blink")
    bone.head, bone.tail = (0, 0, 0), (0, 0, 0.1)
    bpy.ops.object.mode_set(mode="OBJECT")
    block = proxy.data.shape_keys.key_blocks["eyeBlinkLeft"]
    driver = block.driver_add("value").driver
    driver.type = "AVERAGE"
    var = driver.variables.new()
    var.type = "TRANSFORMS"
    var.targets[0].id = arm
    var.targets[0].bone_target = "blink"
    var.targets[0].transform_type = "LOC_Z"
    var.targets[0].transform_space = "LOCAL_SPACE"
    pb = arm.pose.bones["blink"]
    for frame, z in ((1, 0.0), (5, 0.8)):
        pb.location.z = z
        pb.keyframe_insert("location", index=2, frame=frame)
    return arm


def _linear_keys(fcurves) -> None:
    for fc in fcurves:
        for kp in fc.keyframe_points:
            kp.interpolation = "LINEAR"


def test_engine_renders_keyframes_drivers_and_head_like_the_service(
    scene, astronaut_id, client, tmp_path
):
    from blender_addon import anim, engine

    proxy = _import(astronaut_id)
    jaw = proxy.data.shape_keys.key_blocks["jawOpen"]
    for frame, v in ((1, 0.0), (5, 1.0)):
        jaw.value = v
        jaw.keyframe_insert("value", frame=frame)
    _linear_keys(anim.shape_key_fcurves(proxy.data.shape_keys, "unused"))
    arm = _drive_from_bone(scene, proxy)
    _linear_keys(anim.shape_key_fcurves(arm, "unused"))
    head = proxy.parent
    center = np.array(proxy.splatface.center)
    offset = np.array([0.02, 0.0, 0.01])
    head.rotation_euler = (0.0, 0.0, math.radians(20))
    head.location = center + offset
    w2c = orbit(proxy.splatface.center, 0.9, yaw_deg=15, pitch_deg=5)
    add_camera_from_opencv(bpy, scene, w2c, FOV, SIZE)
    scene.render.image_settings.file_format = "OPEN_EXR"
    scene.render.image_settings.color_depth = "32"

    for frame, jaw_v, blink_v in ((1, 0.0, 0.0), (3, 0.5, 0.4), (5, 1.0, 0.8)):
        scene.frame_set(frame)
        scene.render.filepath = str(tmp_path / f"frame_{frame}.exr")
        bpy.ops.render.render(write_still=True)
        got = engine.last_render
        assert (got.width, got.height) == (SIZE, SIZE) and got.timing.requests == 1

        curves = np.zeros((1, 52), np.float32)
        curves[0, ARKIT_NAMES.index("jawOpen")] = jaw_v
        curves[0, ARKIT_NAMES.index("eyeBlinkLeft")] = blink_v
        # head-to-world: rotate about the head's centre, then move by the offset
        rz = np.array(Matrix.Rotation(math.radians(20), 4, "Z"))
        head_m = rz.copy()
        head_m[:3, 3] = center + offset - rz[:3, :3] @ center
        direct = client.render(
            astronaut_id,
            intrinsics_from_fov(SIZE, SIZE, FOV),
            w2c,
            SIZE,
            SIZE,
            curves=curves,
            head=head_m,
            passes=("rgb", "alpha", "depth", "normal"),
        )
        rgb = got.passes["Combined"].reshape(SIZE, SIZE, 4)[::-1]
        alpha = got.passes["Alpha"].reshape(SIZE, SIZE)[::-1]
        depth = got.passes["Depth"].reshape(SIZE, SIZE)[::-1]
        normal = got.passes["Normal"].reshape(SIZE, SIZE, 3)[::-1]
        assert alpha.mean() > 0.05, "the avatar is not in view"
        # Same inputs up to float rounding of the matrices Blender stores (float32).
        assert np.abs(rgb[..., :3] - direct["rgb"][0]).max() < 2e-3
        assert np.abs(alpha - direct["alpha"][0]).max() < 2e-3
        hit = np.isfinite(direct["depth"][0])
        assert np.abs(depth[hit] - direct["depth"][0][hit]).max() < 1e-3
        assert (depth[~hit] == 1e10).all()
        c2w = np.linalg.inv(w2c)[:3, :3]
        assert np.abs(normal - direct["normal"][0] @ c2w.T).max() < 2e-2
        # the file Blender wrote holds the Combined pass
        img = bpy.data.images.load(scene.render.filepath)
        px = np.empty(SIZE * SIZE * 4, np.float32)
        img.pixels.foreach_get(px)
        bpy.data.images.remove(img)
        assert np.abs(px - got.passes["Combined"]).max() < 1e-3


def test_camera_conversion_matches_blenders_own_projection(scene):
    from blender_addon import engine

    cam_data = bpy.data.cameras.new("c")
    ob = bpy.data.objects.new("c", cam_data)
    scene.collection.objects.link(ob)
    scene.camera = ob
    ob.matrix_world = Matrix.Translation((0.3, -2.0, 0.4)) @ Matrix.Rotation(1.3, 4, "X")
    rng = np.random.default_rng(1)
    cases = [
        dict(fit="AUTO", res=(640, 480), shift=(0.0, 0.0), pa=(1, 1), pct=100),
        dict(fit="AUTO", res=(480, 640), shift=(0.1, -0.05), pa=(1, 1), pct=100),
        dict(fit="HORIZONTAL", res=(480, 640), shift=(0.0, 0.2), pa=(1, 1), pct=50),
        dict(fit="VERTICAL", res=(640, 480), shift=(-0.1, 0.1), pa=(1, 1), pct=100),
        dict(fit="AUTO", res=(640, 480), shift=(0.05, 0.1), pa=(1, 2), pct=100),
        dict(fit="VERTICAL", res=(300, 500), shift=(0.1, 0.1), pa=(3, 2), pct=75),
    ]
    for case in cases:
        cam_data.sensor_fit, cam_data.lens = case["fit"], 42.0
        cam_data.sensor_width, cam_data.sensor_height = 36.0, 20.0
        cam_data.shift_x, cam_data.shift_y = case["shift"]
        r = scene.render
        r.resolution_x, r.resolution_y = case["res"]
        r.pixel_aspect_x, r.pixel_aspect_y = case["pa"]
        r.resolution_percentage = case["pct"]
        depsgraph = bpy.context.evaluated_depsgraph_get()
        c = engine.scene_camera(depsgraph)
        pts = (
            np.array(ob.matrix_world)
            @ np.c_[rng.uniform(-0.5, 0.5, (20, 2)), -2 * np.ones(20), np.ones(20)].T
        )
        for p in pts.T[:, :3]:
            ndc = world_to_camera_view(scene, ob, Vector(p))
            x = c.world_to_camera @ np.r_[p, 1.0]
            k = c.intrinsics
            u, v = k[0] * x[0] / x[2] + k[2], k[1] * x[1] / x[2] + k[3]
            assert u == pytest.approx(ndc.x * c.width, abs=1e-3), case
            assert v == pytest.approx((1 - ndc.y) * c.height, abs=1e-3), case
            assert x[2] == pytest.approx(ndc.z, abs=1e-5)
        # the viewport path: Blender's projection matrix for this camera, same intrinsics
        from blender_addon.core.camera import from_projection

        ob_eval = ob.evaluated_get(depsgraph)
        proj = ob_eval.calc_matrix_camera(
            depsgraph,
            x=r.resolution_x,
            y=r.resolution_y,
            scale_x=r.pixel_aspect_x,
            scale_y=r.pixel_aspect_y,
        )
        if case["pct"] == 100:
            view = np.linalg.inv(np.array(ob.matrix_world))
            vc = from_projection(view, np.array(proj), c.width, c.height)
            assert vc.intrinsics == pytest.approx(c.intrinsics, abs=1e-3), case


def test_export_range_rereads_and_imports_as_point_attributes(
    scene, astronaut_id, client, tmp_path
):
    plyfile = pytest.importorskip("plyfile")
    proxy = _import(astronaut_id)
    jaw = proxy.data.shape_keys.key_blocks["jawOpen"]
    jaw.value = 0.0
    jaw.keyframe_insert("value", frame=1)
    jaw.value = 1.0
    jaw.keyframe_insert("value", frame=3)
    proxy.parent.location.x += 0.5
    bpy.context.view_layer.objects.active = proxy
    out = tmp_path / "head.ply"
    res = bpy.ops.splatface.export_ply(filepath=str(out), mode="RANGE", frame_start=1, frame_end=3)
    assert res == {"FINISHED"}
    files = sorted(tmp_path.glob("head_*.ply"))
    assert [f.name for f in files] == ["head_0001.ply", "head_0002.ply", "head_0003.ply"]
    curves = np.zeros((1, 52), np.float32)
    curves[0, ARKIT_NAMES.index("jawOpen")] = 1.0
    head = np.eye(4)
    head[0, 3] = 0.5
    direct = client.export(astronaut_id, curves=curves, head=head).arrays["file"].tobytes()
    last = plyfile.PlyData.read(str(files[-1]))["vertex"]
    ref = plyfile.PlyData.read(__import__("io").BytesIO(direct))["vertex"]
    assert np.allclose(last["x"], ref["x"], atol=1e-5) and np.allclose(last["z"], ref["z"])
    first = plyfile.PlyData.read(str(files[0]))["vertex"]
    assert not np.allclose(first["z"], last["z"])  # the jaw moved
    assert np.mean(last["x"]) > 0.4  # world space: the head moved +0.5 in x

    # what KIRI / ReshotAI do: Blender's own PLY importer keeps the splat attributes
    bpy.ops.wm.ply_import(filepath=str(files[-1]))
    imported = bpy.context.selected_objects[0]
    attrs = set(imported.data.attributes.keys())
    for name in ("f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_2", "rot_0", "rot_3"):
        assert name in attrs, sorted(attrs)
    assert len(imported.data.vertices) == len(last)

    bundle = tmp_path / "rig.zip"
    assert bpy.ops.splatface.export_ply(filepath=str(bundle), mode="BUNDLE") == {"FINISHED"}
    import zipfile

    assert "bundle.json" in zipfile.ZipFile(bundle).namelist()


def test_import_live_link_face_csv_resamples_to_scene_fps(scene, astronaut_id, tmp_path):
    from blender_addon import anim

    proxy = _import(astronaut_id)
    frames = 61  # one second at 60 fps
    curves = np.zeros((frames, 52), np.float32)
    ramp = np.linspace(0.0, 1.0, frames)
    curves[:, ARKIT_NAMES.index("jawOpen")] = ramp
    curves[:, ARKIT_NAMES.index("mouthLeft")] = 1.0 - ramp  # LLF swaps Left/Right columns
    path = tmp_path / "take.csv"
    save_livelink_csv(path, curves, fps=60)
    header = path.read_text().splitlines()[0].split(",")
    assert header[:3] == ["Timecode", "BlendShapeCount", "EyeBlinkLeft"]
    bpy.context.view_layer.objects.active = proxy
    assert bpy.ops.splatface.import_curves(filepath=str(path), start_frame=1) == {"FINISHED"}
    key = proxy.data.shape_keys
    assert anim.keyed_value(key, "jawOpen", 1) == pytest.approx(0.0, abs=1e-6)
    assert anim.keyed_value(key, "jawOpen", 13) == pytest.approx(0.5, abs=1e-4)  # 12/24 s
    assert anim.keyed_value(key, "jawOpen", 25) == pytest.approx(1.0, abs=1e-6)
    assert anim.keyed_value(key, "mouthLeft", 13) == pytest.approx(0.5, abs=1e-4)
    fc = anim.shape_key_fcurves(key, "unused").find('key_blocks["jawOpen"].value')
    assert len(fc.keyframe_points) == 25  # one per scene frame
    scene.frame_set(7)
    from blender_addon import avatar

    depsgraph = bpy.context.evaluated_depsgraph_get()
    values = avatar.evaluated_curves(proxy.evaluated_get(depsgraph), depsgraph)
    assert values[ARKIT_NAMES.index("jawOpen")] == pytest.approx(0.25, abs=1e-4)

    bad = tmp_path / "bad.csv"
    bad.write_text("jawOpen,eyeBlinkMiddle\n0.1,0.2\n")
    with pytest.raises(RuntimeError, match="eyeBlinkMiddle"):
        bpy.ops.splatface.import_curves(filepath=str(bad))


def test_build_from_photo_with_progress(scene, astronaut_png, tmp_path):
    from blender_addon import avatar, props

    photo = tmp_path / "portrait.png"
    photo.write_bytes(astronaut_png)
    fractions: list[float] = []
    assert bpy.ops.splatface.build(filepath=str(photo), preset="fast") == {"FINISHED"}
    st = props.state()
    assert st.building and not bpy.ops.splatface.build.poll()
    from blender_addon import runtime

    deadline = time.monotonic() + 300
    while st.building and time.monotonic() < deadline:
        runtime.main_queue.drain()
        fractions.append(st.build_fraction)
        time.sleep(0.05)
    _settle()
    assert not st.building and st.build_stage == "done" and not st.error, st.error
    assert max(fractions) > 0 and len(st.faces) >= 1
    proxy = avatar.proxies(scene.objects)[-1]
    assert proxy.name.startswith("portrait") and len(proxy.data.shape_keys.key_blocks) == 53


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_service_down_and_restart_is_a_clear_error_not_a_hang(
    scene, addon, astronaut_png, tmp_path
):
    from blender_addon import props

    port = _free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    store = tmp_path / "store"
    svc = ServiceProcess(store, endpoint=endpoint)
    old = addon.endpoint, addon.timeout
    addon.endpoint, addon.timeout = endpoint, 5.0
    try:
        with svc.client() as c:
            avatar_id = c.wait(c.build(astronaut_png, preset="fast"), timeout=300)["avatar_id"]
        _import(avatar_id)
        add_camera_from_opencv(bpy, scene, orbit((0, 0, 0), 0.9), FOV, 64)
        bpy.ops.render.render()
        svc.kill()
        addon.timeout = 0.5
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match=f"splatface service \\({endpoint}\\).*timeout"):
            bpy.ops.render.render()
        bpy.ops.splatface.connect()
        _settle()
        assert time.monotonic() - t0 < 10
        st = props.state()
        assert not st.connected and "cannot reach" in st.error and "timeout" in st.error
        svc = ServiceProcess(store, endpoint=endpoint)  # same port, same store
        addon.timeout = 30.0
        bpy.ops.render.render()  # picked up again
        bpy.ops.splatface.connect()
        _settle()
        assert st.connected and not st.error
    finally:
        svc.stop()
        addon.endpoint, addon.timeout = old


def test_two_avatars_composite_by_depth(scene, astronaut_id, client):
    from blender_addon import engine
    from blender_addon.core.passes import Layer, composite

    a, b = _import(astronaut_id), _import(astronaut_id)
    b.parent.location.x += 0.12
    b.parent.location.y += 0.25  # further from a camera on -Y
    w2c = orbit((0.06, 0.1, 0.0), 1.2)
    add_camera_from_opencv(bpy, scene, w2c, FOV, 128)
    bpy.ops.render.render()
    got = engine.last_render
    assert got.timing.requests == 2
    k = intrinsics_from_fov(128, 128, FOV)
    layers = []
    for ob in (a, b):
        r = client.render(
            astronaut_id,
            k,
            w2c,
            128,
            128,
            curves=np.zeros((1, 52), np.float32),
            head=np.array(ob.matrix_world),
            passes=("rgb", "alpha", "depth", "normal"),
        )
        layers.append(Layer.from_render(r))
    ref = composite(layers)
    combined = got.passes["Combined"].reshape(128, 128, 4)[::-1]
    assert np.abs(combined[..., 3] - ref.alpha).max() < 2e-3
    assert np.abs(combined[..., :3] - ref.rgb).max() < 2e-3
    both = (layers[0].alpha > 0.5) & (layers[1].alpha > 0.5)
    assert both.any(), "the heads should overlap in the image"
    # where both cover a pixel, the nearer head (a) wins
    assert np.allclose(ref.depth[both], layers[0].depth[both])


def test_endpoint_from_environment(monkeypatch, addon):
    from blender_addon import runtime

    monkeypatch.setenv("SPLATFACE_ENDPOINT", "tcp://127.0.0.1:1")
    assert runtime.settings().endpoint == "tcp://127.0.0.1:1"
    assert runtime.client().endpoint == "tcp://127.0.0.1:1"
    monkeypatch.delenv("SPLATFACE_ENDPOINT")
    assert runtime.client().endpoint == addon.endpoint
