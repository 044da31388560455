"""The add-on's paths that differ between Blender 4.5 LTS and 5.0, against a real service:
registration, shape keys, keyframes through slotted actions' channel bags (5.0 removed
``Action.fcurves``; 4.5 lacks ``action_ensure_channelbag_for_slot``), Live Link Face
curves and head rotation, engine renders matched against direct service renders, .ply
export.

Runs twice: under the main environment's bpy 5.0 with conftest's shared service, and
under ``.venv-bpy45`` (bpy 4.5) from ``test_blender_addon.py``'s launcher, which passes
the service's endpoint and a built avatar in ``SPLATFACE_TEST_ENDPOINT`` and
``SPLATFACE_TEST_AVATAR`` and runs pytest with ``--noconftest`` (that environment has
no service packages). So this module imports only bpy, numpy, plyfile, the protocol and
the add-on.
"""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys
import warnings
import zipfile

import bpy
import numpy as np
import pytest
from bpy_extras.object_utils import world_to_camera_view
from mathutils import Matrix, Vector

from protocol import ARKIT_NAMES, Animation, Client, load_animation, save_livelink_csv
from protocol.animation import format_timecode
from protocol.camera import intrinsics_from_fov, orbit
from tests.blender_util import (
    ADDON,
    add_camera_from_opencv,
    assert_close_renders,
    disable_addon,
    enable_addon,
    flat_world,
    import_avatar,
    reset_scene,
    settle,
)

pytestmark = pytest.mark.slow
ENDPOINT_ENV = "SPLATFACE_TEST_ENDPOINT"
AVATAR_ENV = "SPLATFACE_TEST_AVATAR"
#: "4.5" when launched for bpy 4.5: the version this run must be under.
BPY_VERSION_ENV = "SPLATFACE_TEST_BPY_VERSION"
SIZE = 192
FOV = 30.0


@pytest.fixture(scope="module")
def service_info(request) -> tuple[str, str]:
    """(endpoint, astronaut avatar id): the launcher's, else conftest's shared service."""
    endpoint = os.environ.get(ENDPOINT_ENV)
    if endpoint:
        return endpoint, os.environ[AVATAR_ENV]
    svc = request.getfixturevalue("service")
    return svc.endpoint, request.getfixturevalue("astronaut_id")


@pytest.fixture(scope="module")
def avatar_id(service_info) -> str:
    return service_info[1]


@pytest.fixture(scope="module")
def direct(service_info):
    """A client of our own, for the renders and exports the add-on's are compared with."""
    with Client(service_info[0], timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def addon(service_info):
    prefs = enable_addon(bpy, service_info[0])
    yield prefs
    disable_addon()


@pytest.fixture
def scene(addon):
    return reset_scene(bpy)


def test_runs_under_the_blender_asked_for():
    wanted = os.environ.get(BPY_VERSION_ENV)
    got = ".".join(map(str, bpy.app.version[:2]))
    if wanted:
        assert got == wanted, f"launched for bpy {wanted}, running bpy {bpy.app.version_string}"
    else:
        assert bpy.app.version >= (4, 5, 0), "the add-on supports Blender 4.5 LTS and 5.0"


@pytest.mark.parametrize(
    "script",
    ["blender_addon.register()",
     "blender_addon.register(); blender_addon.unregister(); blender_addon.register()"],
    ids=["registered", "registered-again"],
)  # fmt: skip
def test_a_script_that_registers_the_addon_itself_exits(script):
    """bpy as a module never exits while an add-on is registered: under 4.5 a script that
    called register() and ended without unregister() hung for ever."""
    code = f"import bpy, blender_addon\n{script}\nprint('ended')"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True,
                         text=True, timeout=180)  # fmt: skip
    assert out.returncode == 0 and "ended" in out.stdout, out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-2000:]


def test_register_connect_lists_avatars(scene, avatar_id):
    from blender_addon import props

    assert ADDON in bpy.context.preferences.addons
    assert scene.render.engine == "SPLATFACE"  # an unknown engine name would be refused
    assert bpy.ops.splatface.connect() == {"FINISHED"}
    settle()
    st = props.state()
    assert st.connected and st.backend in ("cpu", "cuda") and not st.error
    assert avatar_id in [a.avatar_id for a in st.avatars]


def _pivot(info: dict) -> np.ndarray:
    """The neck pivot, as ``inference_service.cli.head_pivot`` (checked equal in
    test_blender_core.py)."""
    from blender_addon._protocol import head_pivot

    return head_pivot(np.asarray(info["center"]), float(info["radius"]))


def test_proxy_has_52_arkit_shape_keys_and_head_empty_at_the_neck(scene, avatar_id, direct):
    proxy = import_avatar(bpy, avatar_id)
    names = [k.name for k in proxy.data.shape_keys.key_blocks]
    assert names == ["Basis", *ARKIT_NAMES]
    assert all(k.value == 0.0 for k in proxy.data.shape_keys.key_blocks[1:])  # rest pose
    head = proxy.parent
    assert head.type == "EMPTY" and head.splatface.role == "HEAD"
    assert head.splatface.avatar_id == proxy.splatface.avatar_id == avatar_id
    # at rest the proxy's world matrix (the head transform sent) is the identity
    assert np.allclose(np.array(proxy.matrix_world), np.eye(4), atol=1e-6)
    reply = direct.get(avatar_id)
    assert np.allclose(np.array(head.location), _pivot(reply.header["avatar"]), atol=1e-6)
    # the jawOpen key is the rest mesh plus the service's jawOpen delta
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


def _linear_keys(id_data) -> None:
    """Make the keys Blender inserted linear, read through the add-on's channel-bag path."""
    from blender_addon import anim

    fcurves = anim.find_fcurves(id_data)
    assert fcurves is not None and len(fcurves) > 0, f"{id_data.name} has no F-curves"
    for fc in fcurves:
        for kp in fc.keyframe_points:
            kp.interpolation = "LINEAR"


def _alpha(render, h: int | None = None, w: int | None = None) -> np.ndarray:
    """Alpha of a final render (``engine.last_render``): Combined's, rows from the bottom."""
    alpha = render.passes["Combined"].reshape(-1, 4)[:, 3]
    return alpha if h is None else alpha.reshape(h, w)


def _engine_passes(size: int) -> dict[str, np.ndarray]:
    """The last final render's passes, OpenCV layout (rows top-down)."""
    from blender_addon import engine

    got = engine.last_render
    assert (got.width, got.height) == (size, size) and got.timing.requests == 1
    p = got.passes
    return {
        "rgb": p["Combined"].reshape(size, size, 4)[::-1, :, :3],
        "alpha": p["Combined"].reshape(size, size, 4)[::-1, :, 3],
        "depth": p["Depth"].reshape(size, size)[::-1],
        "normal": p["Normal"].reshape(size, size, 3)[::-1],
    }


def _assert_same_render(got: dict, direct: dict, w2c: np.ndarray) -> None:
    """Engine passes equal a direct render's, up to float32 rounding of Blender's matrices
    (:func:`assert_close_renders`)."""
    assert got["alpha"].mean() > 0.05, "the avatar is not in view"
    for name in ("rgb", "alpha"):
        assert_close_renders(got[name], direct[name][0], name)
    # covered in both (a pixel at the edge of coverage, alpha under 1 %, may flip); depth
    # is the alpha-weighted mean z, so on the silhouette, where the float32 matrices move
    # a pixel's alpha by a few 1e-3 (as above), its depth moves by up to a millimetre or
    # so (seen: 1.09 mm at alpha 0.10, every other pixel within 0.03 mm)
    hit = np.isfinite(direct["depth"][0])
    both = hit & (got["depth"] != 1e10)
    depth_diff = np.abs(got["depth"][both] - direct["depth"][0][both])
    assert np.quantile(depth_diff, 0.999) < 1e-4 and depth_diff.max() < 5e-3
    flipped = both ^ hit | (~hit & (got["depth"] != 1e10))
    assert flipped.mean() < 1e-3 and (direct["alpha"][0][flipped] < 0.01).all()
    c2w = np.linalg.inv(w2c)[:3, :3]
    normal_diff = np.abs(got["normal"] - direct["normal"][0] @ c2w.T).max(-1)[~flipped]
    assert np.quantile(normal_diff, 0.999) < 2e-3 and normal_diff.max() < 0.1  # as depth's


def _direct_render(direct, avatar_id, w2c, size, curves, head) -> dict:
    return direct.render(
        avatar_id,
        intrinsics_from_fov(size, size, FOV),
        w2c,
        size,
        size,
        curves=np.asarray(curves, np.float32).reshape(1, 52),
        head=head,
        passes=("rgb", "alpha", "depth", "normal"),
    )


def test_engine_renders_keyframes_drivers_and_head_like_the_service(
    scene, avatar_id, direct, tmp_path
):
    proxy = import_avatar(bpy, avatar_id)
    key = proxy.data.shape_keys
    jaw = key.key_blocks["jawOpen"]
    for frame, v in ((1, 0.0), (5, 1.0)):
        jaw.value = v
        jaw.keyframe_insert("value", frame=frame)
    _linear_keys(key)
    arm = _drive_from_bone(scene, proxy)
    _linear_keys(arm)
    head = proxy.parent
    pivot = np.array(head.location)
    offset = np.array([0.02, 0.0, 0.01])
    head.rotation_euler = (0.0, 0.0, math.radians(20))
    head.location = pivot + offset
    w2c = orbit(proxy.splatface.center, 0.9, yaw_deg=15, pitch_deg=5)
    add_camera_from_opencv(bpy, scene, w2c, FOV, SIZE)
    scene.render.image_settings.file_format = "OPEN_EXR"
    scene.render.image_settings.color_depth = "32"

    for frame, jaw_v, blink_v in ((1, 0.0, 0.0), (3, 0.5, 0.4), (5, 1.0, 0.8)):
        scene.frame_set(frame)
        scene.render.filepath = str(tmp_path / f"frame_{frame}.exr")
        bpy.ops.render.render(write_still=True)
        got = _engine_passes(SIZE)
        curves = np.zeros(52, np.float32)
        curves[ARKIT_NAMES.index("jawOpen")] = jaw_v
        curves[ARKIT_NAMES.index("eyeBlinkLeft")] = blink_v
        # head-to-world: rotate about the neck pivot, then move by the offset
        rz = np.array(Matrix.Rotation(math.radians(20), 4, "Z"))
        head_m = rz.copy()
        head_m[:3, 3] = pivot + offset - rz[:3, :3] @ pivot
        ref = _direct_render(direct, avatar_id, w2c, SIZE, curves, head_m)
        _assert_same_render(got, ref, w2c)
        # the file Blender wrote holds the Combined pass
        from blender_addon import engine

        img = bpy.data.images.load(scene.render.filepath)
        px = np.empty(SIZE * SIZE * 4, np.float32)
        img.pixels.foreach_get(px)
        bpy.data.images.remove(img)
        assert np.abs(px - engine.last_render.passes["Combined"]).max() < 1e-3


def test_a_render_region_renders_that_region(scene, avatar_id, tmp_path):
    """Ctrl+B: the result holds the region alone, cropped or laid into the frame."""
    from blender_addon import engine

    import_avatar(bpy, avatar_id)
    size = 64
    add_camera_from_opencv(bpy, scene, orbit((0, 0, 0), 0.9), FOV, size)
    bpy.ops.render.render()
    full = _alpha(engine.last_render, size, size)  # rows from the bottom
    r = scene.render
    r.use_border = True
    r.border_min_x, r.border_max_x, r.border_min_y, r.border_max_y = 0.5, 1.0, 0.0, 0.75
    r.image_settings.file_format = "PNG"
    r.image_settings.color_mode = "RGBA"
    region = full[0:48, 32:64]
    assert region.sum() > 50 and region.sum() < full.sum() - 50  # the head spans the edge
    for crop in (True, False):
        r.use_crop_to_border = crop
        r.filepath = str(tmp_path / f"crop_{crop}.png")
        bpy.ops.render.render(write_still=True)
        got = engine.last_render
        assert (got.width, got.height) == (32, 48)
        np.testing.assert_allclose(_alpha(got, 48, 32), region, atol=2e-3)
        img = bpy.data.images.load(r.filepath)
        w, h = img.size
        px = np.empty(w * h * 4, np.float32)
        img.pixels.foreach_get(px)
        bpy.data.images.remove(img)
        assert (w, h) == ((32, 48) if crop else (size, size))
        alpha = px.reshape(h, w, 4)[..., 3]
        saved = alpha if crop else alpha[0:48, 32:64]
        assert np.abs(saved - region).max() < 2 / 255
        if not crop:
            assert alpha.sum() == pytest.approx(saved.sum())  # nothing outside the region


def test_a_render_region_is_as_tall_as_blender_cuts_it(scene, avatar_id, tmp_path):
    """A region whose edge Blender computes in single precision (0.7 × 120 is 84 there,
    83.99... in double): the saved crop is Blender's size, and every row of it, the top
    one too, is the full frame's."""
    from blender_addon import engine

    import_avatar(bpy, avatar_id)
    add_camera_from_opencv(bpy, scene, orbit((0, 0, 0), 0.9), FOV, 120)
    r = scene.render
    r.resolution_x = 160
    bpy.ops.render.render()
    full = _alpha(engine.last_render, 120, 160)  # rows from the bottom
    r.use_border = r.use_crop_to_border = True
    r.border_min_x, r.border_max_x, r.border_min_y, r.border_max_y = 0.0, 1.0, 0.25, 0.7
    r.image_settings.file_format, r.image_settings.color_mode = "PNG", "RGBA"
    r.filepath = str(tmp_path / "region.png")
    bpy.ops.render.render(write_still=True)
    img = bpy.data.images.load(r.filepath)
    w, h = img.size
    px = np.empty(w * h * 4, np.float32)
    img.pixels.foreach_get(px)
    bpy.data.images.remove(img)
    assert (w, h) == (160, 54)  # Blender's own cut: rows 30 to 83
    region = full[30:84]
    assert region[-1].sum() > 1.0  # the head reaches the region's top row
    assert np.abs(px.reshape(h, w, 4)[..., 3] - region).max() < 2 / 255


def test_an_opaque_film_shows_the_world_behind_the_avatar(scene, avatar_id, direct, tmp_path):
    """Film > Transparent off: the world's colour fills the frame behind the head and
    alpha is 1, as Cycles and EEVEE render it; without a world, black."""
    from blender_addon import engine

    import_avatar(bpy, avatar_id)
    size = 48
    w2c = orbit((0, 0, 0), 0.9)
    add_camera_from_opencv(bpy, scene, w2c, FOV, size)
    ref = direct.render(avatar_id, intrinsics_from_fov(size, size, FOV), w2c, size, size,
                        passes=("rgb", "alpha"))  # fmt: skip
    rgb, alpha = ref["rgb"][0][::-1], ref["alpha"][0][::-1]  # rows from the bottom
    world = flat_world(bpy)
    scene.render.film_transparent = False
    try:
        for w, colour in ((world, (0.1, 0.2, 0.4)), (None, (0.0, 0.0, 0.0))):
            scene.world = w
            bpy.ops.render.render()
            got = engine.last_render.passes["Combined"].reshape(size, size, 4)
            assert (got[..., 3] == 1.0).all()
            want = rgb + (1.0 - alpha)[..., None] * np.array(colour, np.float32)
            assert_close_renders(got[..., :3], want, f"over {colour}")
        # a keyed colour is the frame's in an animation render, as in a still
        scene.world = world
        tint = world.node_tree.nodes["Background"].inputs["Color"]
        for frame, value in ((1, (1.0, 0.0, 0.0, 1.0)), (3, (0.0, 0.0, 1.0, 1.0))):
            tint.default_value = value
            tint.keyframe_insert("default_value", frame=frame)
        scene.frame_start, scene.frame_end = 1, 3
        scene.render.filepath = str(tmp_path / "sky_")
        corners = {}

        def after(s, *_):
            corners[s.frame_current] = engine.last_render.passes["Combined"][:3].tolist()

        scene.frame_set(3)  # the original's colour is frame 3's while the take renders
        bpy.app.handlers.render_post.append(after)
        try:
            bpy.ops.render.render(animation=True)
        finally:
            bpy.app.handlers.render_post.remove(after)
        assert corners[1] == pytest.approx([0.5, 0.0, 0.0], abs=1e-6)  # strength 0.5
        assert corners[2] == pytest.approx([0.25, 0.0, 0.25], abs=1e-6)
        assert corners[3] == pytest.approx([0.0, 0.0, 0.5], abs=1e-6)
        # a textured world is not one colour: its viewport colour stands in, and says so
        texture = world.node_tree.nodes.new("ShaderNodeTexEnvironment")
        background = world.node_tree.nodes["Background"]
        world.node_tree.links.new(texture.outputs["Color"], background.inputs["Color"])
        world.color = (0.3, 0.3, 0.3)
        colour, flat = engine.world_background(world)
        assert not flat and colour == pytest.approx([0.3, 0.3, 0.3])
    finally:
        scene.world = None
        bpy.data.worlds.remove(world)


#: The working spaces a file's scene-linear colours may be in, as Blender names them.
REC709, ACESCG = "Linear Rec.709", "ACEScg"
COLOUR_SIZE = 64


def _colour_scene(avatar_id: str) -> bpy.types.Scene:
    """The avatar in front of the camera over :func:`flat_world`'s sky (its colour given
    in linear Rec.709, so the same colour in any working space), Film > Transparent off,
    the Standard view: what an 8-bit PNG of it shows depends on no working space."""
    from mathutils import Color

    scene = reset_scene(bpy)
    import_avatar(bpy, avatar_id)
    add_camera_from_opencv(bpy, scene, orbit((0, 0, 0), 0.9), FOV, COLOUR_SIZE)
    scene.world = flat_world(bpy)
    tint = scene.world.node_tree.nodes["Background"].inputs["Color"]
    tint.default_value[:3] = Color(tint.default_value[:3]).from_rec709_linear_to_scene_linear()
    scene.render.film_transparent = False
    scene.view_settings.view_transform, scene.view_settings.look = "Standard", "None"
    scene.view_settings.exposure, scene.view_settings.gamma = 0.0, 1.0
    return scene


def _render_png(scene: bpy.types.Scene, path: str) -> None:
    """F12 written to an 8-bit PNG at ``path`` (whatever format a test before set)."""
    settings = scene.render.image_settings
    settings.file_format, settings.color_mode, settings.color_depth = "PNG", "RGBA", "8"
    scene.render.filepath = path
    assert bpy.ops.render.render(write_still=True) == {"FINISHED"}


def _read_png(path: str) -> np.ndarray:
    """A PNG's bytes [H, W, channels] (rows from the bottom)."""
    img = bpy.data.images.load(path, check_existing=False)
    (w, h), channels = img.size, img.channels
    px = np.empty(w * h * channels, np.float32)
    img.pixels.foreach_get(px)  # a byte image's own values, no colour conversion
    bpy.data.images.remove(img)
    return np.rint(px.reshape(h, w, channels) * 255)


def _viewport_image(scene: bpy.types.Scene) -> np.ndarray:
    """The Rendered viewport's image through the scene's camera, [H*W, 4] RGBA, rows
    from the bottom (as Combined holds them)."""
    from blender_addon import engine

    depsgraph = bpy.context.evaluated_depsgraph_get()
    cam = scene.camera.evaluated_get(depsgraph)
    window = np.array(cam.calc_matrix_camera(depsgraph, x=COLOUR_SIZE, y=COLOUR_SIZE))
    view = np.linalg.inv(np.array(cam.matrix_world))
    state = engine.ViewportState()
    assert state.request_view(view, window, COLOUR_SIZE, COLOUR_SIZE, depsgraph) is not None
    settle()
    assert state.error == "", state.error
    return state.image.reshape(-1, 4)


def _ocio_acescg_config(folder) -> str:
    """Blender's own OCIO config with ACEScg as its scene_linear role (as a studio's
    ACES config has it), written into ``folder``; its LUTs stay where Blender has them."""
    source = bpy.utils.system_resource("DATAFILES", path="colormanagement")
    text = open(os.path.join(source, "config.ocio")).read()
    role, search = f"  scene_linear: {REC709}\n", 'search_path: "luts:filmic"\n'
    assert role in text and search in text, "Blender's config changed: update this test"
    text = text.replace(role, f"  scene_linear: {ACESCG}\n").replace(
        search, f'search_path: "{source}/luts:{source}/filmic"\n'
    )
    path = os.path.join(folder, "config.ocio")
    with open(path, "w") as f:
        f.write(text)
    return path


#: 5.0 added the per-file working space; an OCIO config's scene_linear role is in both.
WORKING_SPACES = ["working-space", "ocio-config"] if bpy.app.version >= (5, 0) else ["ocio-config"]


@pytest.mark.parametrize("how", WORKING_SPACES)
def test_renders_look_the_same_in_any_scene_linear_working_space(
    scene, avatar_id, service_info, tmp_path, how
):
    """The service's colours are linear Rec.709; Combined (and the viewport) holds the
    scene's working space (5.0's per-file one, or an OCIO config's scene_linear role).
    Written as they came, the head's skin saved redder by up to 31 levels in an ACEScg
    file, while Blender converts the world's colour behind it."""
    from mathutils import Color

    from blender_addon import engine

    view = scene.view_settings
    saved = (view.view_transform, view.look, view.exposure, view.gamma)
    try:
        _colour_scene(avatar_id)
        _render_png(scene, str(tmp_path / "rec709.png"))
        ref = _read_png(str(tmp_path / "rec709.png"))
        combined = engine.last_render.passes["Combined"].reshape(-1, 4).copy()
        assert (np.abs(ref - ref[0, 0]).max(-1) > 30).mean() > 0.2, "the head is not in view"
        if how == "working-space":
            assert bpy.data.colorspace.working_space == REC709
            bpy.ops.wm.set_working_color_space(working_space=ACESCG, convert_colors=True)
            _render_png(scene, str(tmp_path / "acescg.png"))
            # Combined in ACEScg: Blender's own conversion of the Rec.709 render
            want = [Color(c).from_rec709_linear_to_scene_linear() for c in combined[:, :3]]
            acescg = engine.last_render.passes["Combined"].reshape(-1, 4)
            assert np.abs(acescg[:, :3] - np.array(want)).max() < 1e-4
            assert np.array_equal(acescg[:, 3], combined[:, 3])
            # the viewport draws what the render writes (its shader expects scene-linear)
            assert_close_renders(_viewport_image(scene), acescg, "viewport")
        else:
            code = (
                "import sys, bpy, mathutils\n"
                "from tests.blender_util import enable_addon\n"
                "from tests.test_blender_compat import _colour_scene, _render_png\n"
                "enable_addon(bpy, sys.argv[1])\n"
                "_render_png(_colour_scene(sys.argv[2]), sys.argv[3])\n"
                "red = mathutils.Color((1, 0, 0)).from_rec709_linear_to_scene_linear()\n"
                "print('scene-linear red', *red)\n"
            )
            env = dict(os.environ, OCIO=_ocio_acescg_config(tmp_path))
            repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            args = [sys.executable, "-c", code, service_info[0], avatar_id,
                    str(tmp_path / "acescg.png")]  # fmt: skip
            out = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True,
                                 timeout=300)  # fmt: skip
            assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
            red = [float(x) for x in out.stdout.split("scene-linear red")[1].split()]
            assert red == pytest.approx([0.613, 0.070, 0.021], abs=1e-3), "OCIO was not read"
        diff = np.abs(_read_png(str(tmp_path / "acescg.png")) - ref)
        assert diff.max() <= 2, (how, diff.max(), np.argwhere(diff > 2)[:5])
    finally:
        if hasattr(bpy.data, "colorspace") and bpy.data.colorspace.working_space != REC709:
            bpy.ops.wm.set_working_color_space(working_space=REC709, convert_colors=True)
        view.view_transform, view.look, view.exposure, view.gamma = saved
        if scene.world is not None:
            world, scene.world = scene.world, None
            bpy.data.worlds.remove(world)


def test_a_holdout_avatar_renders_as_a_hole(scene, avatar_id):
    """The avatar's collection set to Holdout in the view layer, or the object's own
    Holdout: no colour and alpha 0, as Cycles renders a holdout."""
    from blender_addon import engine

    proxy = import_avatar(bpy, avatar_id)
    add_camera_from_opencv(bpy, scene, orbit(proxy.splatface.center, 0.9), FOV, 48)
    bpy.ops.render.render()
    assert _alpha(engine.last_render).max() > 0.5
    proxy.is_holdout = True
    bpy.ops.render.render()
    assert engine.last_render.passes["Combined"].max() == 0.0
    proxy.is_holdout = False
    coll = bpy.data.collections.new("Held")
    scene.collection.children.link(coll)
    try:
        for ob in (proxy, proxy.parent):
            scene.collection.objects.unlink(ob)
            coll.objects.link(ob)
        scene.view_layers[0].layer_collection.children[coll.name].holdout = True
        bpy.ops.render.render()
        assert engine.last_render.passes["Combined"].max() == 0.0
        # a held-out collection excluded from the view layer holds nothing out: the
        # avatar, also in an included one, renders (as holdout_get says)
        shown = bpy.data.collections.new("Shown")
        scene.collection.children.link(shown)
        for ob in (proxy, proxy.parent):
            shown.objects.link(ob)
        scene.view_layers[0].layer_collection.children[coll.name].exclude = True
        for keyed_off in (False, True):  # its own holdout off, or keyed off this frame
            proxy.is_holdout = keyed_off
            if keyed_off:
                proxy.keyframe_insert("is_holdout", frame=scene.frame_current - 1)
                proxy.is_holdout = False
                proxy.keyframe_insert("is_holdout", frame=scene.frame_current)
                proxy.is_holdout = True  # the original's flag, which the frame's keys undo
            bpy.ops.render.render()
            assert _alpha(engine.last_render).max() > 0.5, keyed_off
        proxy.animation_data_clear()
        proxy.is_holdout = False
        bpy.data.collections.remove(shown)
        scene.view_layers[0].layer_collection.children[coll.name].exclude = False
        # an instance of the held-out collection is held out as its instancer is: not
        # at all here (the camera sees it beside the hole)
        instancer = bpy.data.objects.new("cast_instance", None)
        instancer.instance_type, instancer.instance_collection = "COLLECTION", coll
        instancer.location = (0.25, 0.0, 0.0)
        scene.collection.objects.link(instancer)
        scene.camera.matrix_world = Matrix.Translation((0.125, 0, 0)) @ scene.camera.matrix_world
        bpy.ops.render.render()
        assert _alpha(engine.last_render).max() > 0.5
        bpy.data.objects.remove(instancer)
    finally:
        bpy.data.collections.remove(coll)


def test_keyed_visibility_and_holdout_change_during_an_animation_render(scene, avatar_id,
                                                                        tmp_path):  # fmt: skip
    """Disable in Renders and Holdout keyed over a take apply frame by frame, whatever
    frame the timeline was parked on when the render began (the original object's flags
    stay at that frame's)."""
    from blender_addon import engine

    proxy = import_avatar(bpy, avatar_id)
    add_camera_from_opencv(bpy, scene, orbit(proxy.splatface.center, 0.9), FOV, 32)
    for frame, hidden, held in ((1, True, False), (3, False, False), (5, False, True)):
        proxy.hide_render, proxy.is_holdout = hidden, held
        proxy.keyframe_insert("hide_render", frame=frame)
        proxy.keyframe_insert("is_holdout", frame=frame)
    scene.frame_start, scene.frame_end = 1, 6
    scene.render.filepath = str(tmp_path / "take_")
    seen = {}

    def after(s, *_):
        seen[s.frame_current] = float(_alpha(engine.last_render).max())

    for parked in (1, 4, 5):
        scene.frame_set(parked)
        seen.clear()
        bpy.app.handlers.render_post.append(after)
        try:
            bpy.ops.render.render(animation=True)
        finally:
            bpy.app.handlers.render_post.remove(after)
        shown = [f for f, alpha in sorted(seen.items()) if alpha > 0.5]
        assert shown == [3, 4], f"parked at {parked}: {seen}"


def test_the_compositor_offers_the_renders_alpha(scene):
    """A Render Layers node shows Image and Alpha as for Blender's own engines (a pass
    registered under the name Alpha took its Alpha socket away)."""
    if hasattr(scene, "compositing_node_group"):  # 5.0
        tree = bpy.data.node_groups.new("comp", "CompositorNodeTree")
        scene.compositing_node_group = tree
    else:
        scene.use_nodes = True
        tree = scene.node_tree
    node = tree.nodes.new("CompositorNodeRLayers")
    node.scene = scene
    shown = [o.name for o in node.outputs if o.enabled]
    assert shown[:2] == ["Image", "Alpha"] and {"Depth", "Normal"} <= set(shown), shown


def test_a_sequencer_strips_camera_is_the_one_rendered(scene, avatar_id):
    """An edit scene shows the shot through a Scene strip whose camera is not the shot's
    active one: Blender names it to the engine (``camera_override``)."""
    from blender_addon import engine

    proxy = import_avatar(bpy, avatar_id)
    front = add_camera_from_opencv(bpy, scene, orbit(proxy.splatface.center, 0.6), FOV, 48)
    away = bpy.data.objects.new("cam_away", front.data)
    scene.collection.objects.link(away)
    away.matrix_world = front.matrix_world @ Matrix.Rotation(math.pi, 4, "Y")  # turned round
    scene.camera = away
    edit = bpy.data.scenes.new("Edit")
    edit.render.resolution_x = edit.render.resolution_y = 48
    edit.render.use_sequencer = True
    editor = edit.sequence_editor_create()
    strips = editor.strips if hasattr(editor, "strips") else editor.sequences  # 5.0 / 4.5
    strip = strips.new_scene("shot", scene, 1, 1)
    strip.scene_camera = front
    try:
        bpy.ops.render.render(scene="Edit")
        assert _alpha(engine.last_render, 48, 48).max() > 0.5
    finally:
        bpy.data.scenes.remove(edit)
        bpy.data.objects.remove(away)


def test_an_instanced_collection_renders_where_the_instance_puts_it(scene, avatar_id, direct):
    """The avatar in a collection that is not in the scene, instanced into it twice
    (Add > Collection Instance, or a linked character): both render, as placed."""
    proxy = import_avatar(bpy, avatar_id)
    cast = bpy.data.collections.new("Character")
    for ob in (proxy, proxy.parent):
        scene.collection.objects.unlink(ob)
        cast.objects.link(ob)
    placed = []
    for x, turn in ((-0.12, 20.0), (0.12, -15.0)):
        inst = bpy.data.objects.new("shot_instance", None)
        inst.instance_type, inst.instance_collection = "COLLECTION", cast
        inst.location, inst.rotation_euler = (x, 0.3, 0.0), (0.0, 0.0, math.radians(turn))
        scene.collection.objects.link(inst)
        placed.append(inst)
    bpy.context.view_layer.update()
    w2c = orbit((0.0, 0.3, 0.0), 1.3)
    add_camera_from_opencv(bpy, scene, w2c, FOV, SIZE)
    bpy.ops.render.render()
    from blender_addon import engine
    from blender_addon.core.passes import Layer, composite

    assert engine.last_render.timing.requests == 2
    layers = []
    for inst in placed:
        head = np.array(inst.matrix_world) @ np.array(proxy.matrix_world)
        ref = _direct_render(direct, avatar_id, w2c, SIZE, np.zeros(52), head)
        layers.append(Layer.from_render(ref))
    ref = composite(layers)
    got = engine.last_render.passes["Combined"].reshape(SIZE, SIZE, 4)[::-1]
    assert ref.alpha.mean() > 0.05
    assert_close_renders(got[..., 3], ref.alpha, "alpha")
    assert_close_renders(got[..., :3], ref.rgb, "rgb")
    for inst in placed:
        bpy.data.objects.remove(inst)


def test_each_view_layer_gets_its_own_render(scene, avatar_id, tmp_path):
    """The avatar in a collection excluded from the first view layer and shown in a
    second: a multilayer EXR holds it in the second layer only."""
    from tests.blender_util import exr_channel_sums

    proxy = import_avatar(bpy, avatar_id)
    add_camera_from_opencv(bpy, scene, orbit((0, 0, 0), 0.9), FOV, 48)
    coll = bpy.data.collections.new("Cast")
    scene.collection.children.link(coll)
    for ob in (proxy, proxy.parent):
        scene.collection.objects.unlink(ob)
        coll.objects.link(ob)
    scene.view_layers[0].layer_collection.children["Cast"].exclude = True
    scene.view_layers.new("Avatar")
    settings = scene.render.image_settings
    if hasattr(settings, "media_type"):  # Blender 5.0 chooses the file kind first
        settings.media_type = "MULTI_LAYER_IMAGE"
    settings.file_format = "OPEN_EXR_MULTILAYER"
    settings.exr_codec, settings.color_depth = "NONE", "32"
    scene.render.filepath = str(tmp_path / "layers.exr")
    bpy.ops.render.render(write_still=True)
    sums = exr_channel_sums(scene.render.filepath)
    first = scene.view_layers[0].name
    assert sums["Avatar.Combined.A"] > 100, sums
    assert sums[f"{first}.Combined.A"] == 0.0, sums


def test_stereo_3d_renders_each_eye_from_its_own_place(scene, avatar_id, direct, tmp_path):
    """Stereo 3D, off-axis about the camera's centre: each eye's file shows the head as
    an OpenCV camera half the interocular distance along the camera's x sees it, its
    image shifted so that the convergence plane lines up in both (written from first
    principles, not from Blender's or the add-on's stereo code)."""
    proxy = import_avatar(bpy, avatar_id)
    size, distance, b, c = 96, 0.6, 0.065, 0.3
    w2c = orbit(proxy.splatface.center, distance)
    stereo = add_camera_from_opencv(bpy, scene, w2c, FOV, size).data.stereo
    stereo.convergence_mode, stereo.pivot = "OFFAXIS", "CENTER"
    stereo.interocular_distance, stereo.convergence_distance = b, c
    r = scene.render
    r.use_multiview, r.views_format = True, "STEREO_3D"
    # 16-bit PNGs hold alpha as rendered (4.5 writes each eye's EXR as a multi-view
    # file, whose pixels a script cannot read)
    settings = r.image_settings
    settings.file_format, settings.color_mode, settings.color_depth = "PNG", "RGBA", "16"
    settings.views_format = "INDIVIDUAL"
    r.filepath = str(tmp_path / "eye.png")
    bpy.ops.render.render(write_still=True)
    r.use_multiview = False  # else Blender loads a file named *_L as half a stereo pair
    k = intrinsics_from_fov(size, size, FOV)
    alphas = []
    for suffix, side in (("_L", -1.0), ("_R", 1.0)):
        eye_w2c = w2c.copy()
        eye_w2c[0, 3] -= side * b / 2  # the eye moved along the camera's x
        eye_k = k.copy()
        eye_k[2] += side * k[0] * b / (2 * c)  # a point at the convergence distance centred
        ref = direct.render(avatar_id, eye_k, eye_w2c, size, size, passes=("alpha",))
        img = bpy.data.images.load(str(tmp_path / f"eye{suffix}.png"))
        px = np.empty(size * size * 4, np.float32)
        img.pixels.foreach_get(px)
        bpy.data.images.remove(img)
        alpha = px.reshape(size, size, 4)[::-1, :, 3]  # rows from the top, as the service's
        assert_close_renders(alpha, ref["alpha"][0], f"alpha{suffix}")
        alphas.append(alpha)
    # the head lies beyond the convergence plane: the right eye sees it further right
    cols = np.arange(size)
    left, right = ((a.sum(0) * cols).sum() / a.sum() for a in alphas)
    expected = k[0] * b * (1 / c - 1 / distance)
    assert right - left == pytest.approx(expected, rel=0.2)


def test_camera_conversion_matches_blenders_own_projection(scene):
    from blender_addon import engine
    from blender_addon.core.camera import from_projection

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
            # the clip range read back from Blender's own matrix (calc_matrix_camera takes
            # the camera's clip_start and clip_end)
            assert (vc.near, vc.far) == pytest.approx((c.near, c.far), rel=2e-3), case  # float32


def test_the_cameras_clip_range_is_the_renders(scene, avatar_id):
    """A head 150 units away (a centimetre scene, an avatar scaled to life size) renders
    with the camera's clip_end of 1000; with clip_start past it, or clip_end short of it,
    it is clipped as Blender clips."""
    from blender_addon import engine

    proxy = import_avatar(bpy, avatar_id)
    proxy.parent.scale = (100.0, 100.0, 100.0)
    center = np.array(proxy.matrix_world) @ np.r_[proxy.splatface.center, 1.0]
    add_camera_from_opencv(bpy, scene, orbit(center[:3], 150.0), FOV, 48)
    cam = scene.camera.data
    seen = {}
    for start, end in ((0.1, 1000.0), (0.1, 120.0), (180.0, 1000.0)):
        cam.clip_start, cam.clip_end = start, end
        bpy.ops.render.render()
        seen[(start, end)] = float(_alpha(engine.last_render).sum())
    assert seen[(0.1, 1000.0)] > 100, seen
    assert seen[(0.1, 120.0)] == 0.0 and seen[(180.0, 1000.0)] == 0.0, seen


def test_add_to_scene_puts_the_avatar_in_the_active_collection_selected(scene, avatar_id):
    shot = bpy.data.collections.new("Shot")
    scene.collection.children.link(shot)
    layer = bpy.context.view_layer
    layer.active_layer_collection = layer.layer_collection.children["Shot"]
    try:
        proxy = import_avatar(bpy, avatar_id)
        assert proxy.name in shot.objects and proxy.parent.name in shot.objects
        assert proxy.select_get() and layer.objects.active == proxy
        # the head empty too: moved or turned, the avatar goes whole (the proxy alone,
        # moved off its head, swung round its old neck when a take turned the head)
        assert set(layer.objects.selected) == {proxy, proxy.parent}
    finally:
        layer.active_layer_collection = layer.layer_collection


def test_a_path_relative_to_an_unsaved_blend_is_refused(scene, avatar_id, tmp_path, monkeypatch):
    assert bpy.data.filepath == ""
    monkeypatch.chdir(tmp_path)  # where an unsaved file's "//" lands
    import_avatar(bpy, avatar_id)
    with pytest.raises(RuntimeError, match="relative to the .blend: save the file first"):
        with warnings.catch_warnings():  # 5.0 warns that file browsers give no "//" paths
            warnings.simplefilter("ignore", RuntimeWarning)
            bpy.ops.splatface.export_ply(filepath="//head.ply")
    assert list(tmp_path.iterdir()) == []


def test_a_script_exporting_a_range_gets_the_scenes_range_and_step(scene, avatar_id, tmp_path):
    proxy = import_avatar(bpy, avatar_id)
    bpy.context.view_layer.objects.active = proxy
    scene.frame_start, scene.frame_end, scene.frame_step = 2, 6, 2
    out = tmp_path / "head.ply"
    assert bpy.ops.splatface.export_ply(filepath=str(out), mode="RANGE") == {"FINISHED"}
    assert sorted(f.name for f in tmp_path.iterdir()) == [
        "head_0002.ply", "head_0004.ply", "head_0006.ply"]  # fmt: skip


def test_a_range_export_that_fails_leaves_none_of_its_frames(scene, avatar_id, tmp_path):
    import plyfile

    proxy = import_avatar(bpy, avatar_id)
    bpy.context.view_layer.objects.active = proxy
    (tmp_path / "head_0003.ply").mkdir()  # the last frame cannot be written
    with pytest.raises(RuntimeError, match="head_0003.ply"):
        bpy.ops.splatface.export_ply(filepath=str(tmp_path / "head.ply"), mode="RANGE",
                                     frame_start=1, frame_end=3)  # fmt: skip
    assert [f.name for f in tmp_path.iterdir()] == ["head_0003.ply"]
    # degree-3 SH for 3DGS's reference loader: its 45 f_rest values, zeros
    out = tmp_path / "full.ply"
    assert bpy.ops.splatface.export_ply(filepath=str(out), full_sh=True) == {"FINISHED"}
    v = plyfile.PlyData.read(str(out))["vertex"]
    assert len(v.properties) == 62 and not v["f_rest_44"].any()


def test_export_range_rereads_and_imports_as_point_attributes(scene, avatar_id, direct, tmp_path):
    import plyfile

    proxy = import_avatar(bpy, avatar_id)
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
    ref_bytes = direct.export(avatar_id, curves=curves, head=head).arrays["file"].tobytes()
    last = plyfile.PlyData.read(str(files[-1]))["vertex"]
    ref = plyfile.PlyData.read(io.BytesIO(ref_bytes))["vertex"]
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
    assert "bundle.json" in zipfile.ZipFile(bundle).namelist()


def test_import_keeps_the_artists_keys_outside_the_take_as_they_were(scene, avatar_id, tmp_path):
    """Keys after the take keep their handles, key type and easing, and the curve its
    extrapolation and modifiers; keys inside the take's frames are replaced."""
    from blender_addon import anim

    proxy = import_avatar(bpy, avatar_id)
    key = proxy.data.shape_keys
    jaw = key.key_blocks["jawOpen"]
    for frame, v in ((5, 0.3), (100, 0.2), (120, 0.9), (140, 0.1)):
        jaw.value = v
        jaw.keyframe_insert("value", frame=frame)
    fc = anim.find_fcurves(key).find('key_blocks["jawOpen"].value')
    k120 = fc.keyframe_points[2]
    k120.handle_left_type = k120.handle_right_type = "FREE"
    k120.handle_left, k120.handle_right = (110.0, 1.6), (131.0, 0.2)
    k120.type, fc.keyframe_points[3].easing = "BREAKDOWN", "EASE_IN"
    fc.keyframe_points[3].interpolation = "ELASTIC"
    fc.extrapolation = "LINEAR"
    fc.modifiers.new("NOISE")
    fc.update()

    def after_take(fc):
        points = [k for k in fc.keyframe_points if k.co[0] >= 100]
        return (
            [(tuple(k.co), tuple(k.handle_left), tuple(k.handle_right), k.handle_left_type,
              k.type, k.easing, k.interpolation) for k in points[1:]],
            fc.extrapolation, [m.type for m in fc.modifiers],
        )  # fmt: skip

    before = after_take(fc)
    curves = np.zeros((25, 52), np.float32)
    curves[:, ARKIT_NAMES.index("jawOpen")] = np.linspace(0.0, 1.0, 25)
    path = tmp_path / "take.csv"
    save_livelink_csv(path, curves, fps=24)
    bpy.context.view_layer.objects.active = proxy
    assert bpy.ops.splatface.import_curves(filepath=str(path), start_frame=1) == {"FINISHED"}
    fc = anim.find_fcurves(key).find('key_blocks["jawOpen"].value')
    assert after_take(fc) == before
    frames = [k.co[0] for k in fc.keyframe_points]
    assert frames == [*range(1, 26), 100, 120, 140]  # the key at 5 was inside the take
    assert fc.keyframe_points[4].co[1] == pytest.approx(4 / 24, abs=1e-6)


def test_a_renamed_shape_key_is_named_not_dropped_in_silence(scene, avatar_id, tmp_path, capfd):
    from blender_addon import avatar

    proxy = import_avatar(bpy, avatar_id)
    proxy.data.shape_keys.key_blocks["jawOpen"].name = "FACE_jawOpen"
    assert avatar.missing_shapes(proxy) == ["jawOpen"]
    path = tmp_path / "take.npy"
    np.save(path, np.full((3, 52), 0.5, np.float32))
    bpy.context.view_layer.objects.active = proxy
    capfd.readouterr()
    assert bpy.ops.splatface.import_curves(filepath=str(path)) == {"FINISHED"}
    out = "".join(capfd.readouterr())
    assert "no shape key named jawOpen" in out and "rendered as 0" in out, out


def test_import_starts_at_a_negative_frame_or_the_scenes_start(scene, avatar_id, tmp_path):
    from blender_addon import anim

    proxy = import_avatar(bpy, avatar_id)
    path = tmp_path / "take.npy"
    np.save(path, np.full((3, 52), 0.5, np.float32))
    bpy.context.view_layer.objects.active = proxy
    scene.frame_start = 7
    for asked, first in (({"start_frame": -20}, -20), ({}, 7), ({"start_frame": 0}, 0)):
        assert bpy.ops.splatface.import_curves(filepath=str(path), **asked) == {"FINISHED"}
        fc = anim.find_fcurves(proxy.data.shape_keys).find('key_blocks["jawOpen"].value')
        assert fc.keyframe_points[0].co[0] == first, asked
        for k in list(fc.keyframe_points)[::-1]:
            fc.keyframe_points.remove(k)
    scene.frame_start = 1


def test_import_live_link_face_csv_resamples_to_scene_fps(scene, avatar_id, tmp_path):
    from blender_addon import anim, avatar

    proxy = import_avatar(bpy, avatar_id)
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
    assert anim.shape_value(key, "jawOpen", 1) == pytest.approx(0.0, abs=1e-6)
    assert anim.shape_value(key, "jawOpen", 13) == pytest.approx(0.5, abs=1e-4)  # 12/24 s
    assert anim.shape_value(key, "jawOpen", 25) == pytest.approx(1.0, abs=1e-6)
    assert anim.shape_value(key, "mouthLeft", 13) == pytest.approx(0.5, abs=1e-4)
    fc = anim.find_fcurves(key).find('key_blocks["jawOpen"].value')
    assert len(fc.keyframe_points) == 25  # one per scene frame
    # the keys sit in the action's channel bag for the Key's own slot (4.4+ layout)
    action = key.animation_data.action
    assert key.animation_data.action_slot is not None
    assert len(action.layers) == 1 and len(action.layers[0].strips) == 1
    scene.frame_set(7)
    depsgraph = bpy.context.evaluated_depsgraph_get()
    values = avatar.evaluated_curves(proxy.evaluated_get(depsgraph), depsgraph)
    assert values[ARKIT_NAMES.index("jawOpen")] == pytest.approx(0.25, abs=1e-4)

    # a second import replaces the keys within its frames, it does not add a second curve;
    # keys before it (here the first take's) stay
    assert bpy.ops.splatface.import_curves(filepath=str(path), start_frame=11) == {"FINISHED"}
    fcurves = anim.find_fcurves(key)
    assert len([f for f in fcurves if f.data_path == 'key_blocks["jawOpen"].value']) == 1
    assert anim.shape_value(key, "jawOpen", 23) == pytest.approx(0.5, abs=1e-4)
    assert anim.shape_value(key, "jawOpen", 5) == pytest.approx(4 / 24, abs=1e-4)
    fc = anim.find_fcurves(key).find('key_blocks["jawOpen"].value')
    assert [k.co[0] for k in fc.keyframe_points] == list(range(1, 36))

    # a file without a shape's column leaves that shape's keys alone, and says so
    from blender_addon.ops import import_curves

    only_jaw = tmp_path / "jaw.csv"
    only_jaw.write_text("jawOpen\n0.2\n0.4\n")
    before = anim.shape_value(key, "mouthLeft", 13)
    done = import_curves(proxy, str(only_jaw), 100)
    assert "mouthLeft" in done.missing and "jawOpen" not in done.missing
    assert len(done.missing) == 51
    assert anim.shape_value(key, "mouthLeft", 13) == pytest.approx(before, abs=1e-6)
    assert anim.shape_value(key, "jawOpen", 100) == pytest.approx(0.2, abs=1e-6)

    bad = tmp_path / "bad.csv"
    bad.write_text("jawOpen,eyeBlinkMiddle\n0.1,0.2\n")
    with pytest.raises(RuntimeError, match="eyeBlinkMiddle"):
        bpy.ops.splatface.import_curves(filepath=str(bad))


def _head_take(path) -> Animation:
    """One second at 60 fps: the jaw opens while the head turns left, nods and tilts."""
    frames = 61
    t = np.linspace(0.0, 1.0, frames)
    curves = np.zeros((frames, 52), np.float32)
    curves[:, ARKIT_NAMES.index("jawOpen")] = 0.6 * t
    curves[:, ARKIT_NAMES.index("eyeBlinkRight")] = t
    angles = np.stack([0.5 * t, -0.3 * t, 0.25 * t], axis=1)  # yaw, pitch, roll (radians)
    save_livelink_csv(path, Animation(curves=curves, fps=60, head_angles=angles))
    return load_animation(path)  # the values as written (6 decimals)


def test_a_take_with_a_timecode_written_twice_keeps_its_length(scene, avatar_id, tmp_path):
    # 60 fps rows on the app's 30 fps clock, one timecode written twice: the rows still
    # come 60 a second (2 s, 48 keys at 24 fps), not the clock's 30 (96 keys, 4 s)
    from blender_addon import anim

    proxy = import_avatar(bpy, avatar_id)
    codes = [format_timecode(i / 60, 30) for i in range(120)]
    codes[40] = codes[39]
    curves = np.zeros((120, 52), np.float32)
    curves[:, ARKIT_NAMES.index("jawOpen")] = np.linspace(0.0, 1.0, 120)
    path = tmp_path / "twice.csv"
    save_livelink_csv(path, Animation(curves=curves, timecodes=tuple(codes)))
    bpy.context.view_layer.objects.active = proxy
    assert bpy.ops.splatface.import_curves(filepath=str(path), start_frame=1) == {"FINISHED"}
    fc = anim.find_fcurves(proxy.data.shape_keys).find('key_blocks["jawOpen"].value')
    assert len(fc.keyframe_points) == 48


def test_import_names_driven_shapes_and_a_proxy_moved_off_its_head(scene, avatar_id,
                                                                    tmp_path):  # fmt: skip
    # both override the take in silence: a driver's value wins over keys, and a proxy
    # moved apart from its head empty swings round the empty when the take turns the head
    from blender_addon import ops

    proxy = import_avatar(bpy, avatar_id)
    key = proxy.data.shape_keys
    driver = key.key_blocks["jawOpen"].driver_add("value").driver
    driver.expression = "0"
    key.key_blocks["eyeBlinkLeft"].driver_add("value").mute = True  # muted: no override
    n = 24
    head = np.zeros((n, 3))
    head[:, 0] = np.linspace(0, 0.3, n)
    path = tmp_path / "take.csv"
    save_livelink_csv(path, Animation(curves=np.full((n, 52), 0.5, np.float32), fps=24.0,
                                      head_angles=head))  # fmt: skip
    done = ops.import_curves(proxy, str(path), 1)
    assert done.driven_shapes == ("jawOpen",) and not done.apart
    proxy.location = (1.0, 0.0, 0.0)  # placed by the mesh, not by its head
    done = ops.import_curves(proxy, str(path), 1)
    assert done.apart
    assert not ops.import_curves(proxy, str(path), 1, head_motion=False).apart  # no turn
    # deleting its avatar from the service says what in this file uses it
    assert proxy.name in ops._in_use(ops._proxies_using(avatar_id))
    assert ops._in_use(ops._proxies_using("0" * 12)) == ""


def test_live_link_face_head_rotation_renders_like_the_service(scene, avatar_id, direct, tmp_path):
    from blender_addon import anim

    proxy = import_avatar(bpy, avatar_id)
    head = proxy.parent
    rest_location = np.array(head.location)
    path = tmp_path / "take.csv"
    take = _head_take(path)
    assert take.head_angles is not None and take.fps == 60
    bpy.context.view_layer.objects.active = proxy
    assert bpy.ops.splatface.import_curves(filepath=str(path), start_frame=1) == {"FINISHED"}
    # rotation keys on the head empty, one per scene frame, its location untouched
    fcurves = anim.find_fcurves(head)
    paths = sorted((f.data_path, f.array_index, len(f.keyframe_points)) for f in fcurves)
    assert paths == [("rotation_euler", i, 25) for i in range(3)]

    pivot = _pivot(direct.get(avatar_id, mesh=False, rig=False).header["avatar"])
    heads = take.head_transforms(pivot)
    w2c = orbit(proxy.splatface.center, 0.9, yaw_deg=-20, pitch_deg=5)
    add_camera_from_opencv(bpy, scene, w2c, FOV, SIZE)
    for frame, row in ((13, 30), (25, 60)):  # scene frame 13 is 0.5 s: take row 30 at 60 fps
        scene.frame_set(frame)
        assert np.allclose(np.array(head.location), rest_location)
        assert np.allclose(np.array(proxy.matrix_world), heads[row], atol=1e-5)
        bpy.ops.render.render()
        ref = _direct_render(direct, avatar_id, w2c, SIZE, take.curves[row], heads[row])
        _assert_same_render(_engine_passes(SIZE), ref, w2c)
    # the head did turn: the same frame without head motion is another picture
    still = _direct_render(direct, avatar_id, w2c, SIZE, take.curves[60], np.eye(4))
    assert np.abs(still["alpha"][0] - _engine_passes(SIZE)["alpha"]).max() > 0.5

    # head motion off: shapes keyed, the head's rotation keys left as they were
    other = import_avatar(bpy, avatar_id)
    bpy.context.view_layer.objects.active = other
    res = bpy.ops.splatface.import_curves(filepath=str(path), start_frame=1, head_motion=False)
    assert res == {"FINISHED"}
    assert anim.find_fcurves(other.parent) is None
    assert anim.shape_value(other.data.shape_keys, "jawOpen", 25) == pytest.approx(0.6, abs=1e-5)


def test_a_take_turns_the_head_from_where_the_artist_placed_it(scene, avatar_id, tmp_path):
    from blender_addon.core.curves import plan_keyframes
    from protocol import head_rotation

    path = tmp_path / "take.csv"
    take = _head_take(path)
    plan = plan_keyframes(take.head_angles, take.fps, 24.0, 1, take.row_times())
    for mode in ("XYZ", "QUATERNION"):
        proxy = import_avatar(bpy, avatar_id)
        head = proxy.parent
        head.rotation_mode = mode
        placement = Matrix.Rotation(math.radians(90), 3, "Z") @ Matrix.Rotation(0.4, 3, "X")
        if mode == "QUATERNION":
            head.rotation_quaternion = placement.to_quaternion()
        else:
            head.rotation_euler = placement.to_euler(mode)
        bpy.context.view_layer.objects.active = proxy
        assert bpy.ops.splatface.import_curves(filepath=str(path), start_frame=1) == {"FINISHED"}
        for frame in (1, 19):
            scene.frame_set(frame)
            want = np.array(placement) @ head_rotation(*plan.values[frame - 1])
            got = np.array(head.matrix_world)[:3, :3]
            assert np.allclose(got, want, atol=1e-5), (mode, frame)
        # a second take keys the rotation again, from the same placement
        assert bpy.ops.splatface.import_curves(filepath=str(path), start_frame=1) == {"FINISHED"}
        scene.frame_set(19)
        want = np.array(placement) @ head_rotation(*plan.values[18])
        assert np.allclose(np.array(head.matrix_world)[:3, :3], want, atol=1e-5), mode


def test_an_animated_head_rotation_is_not_taken_for_a_placement(scene, avatar_id, tmp_path):
    """A head empty turned by an NLA strip or a driver is animated, not placed: its value
    at the current frame does not move into the delta rotation (it turned the head twice),
    and a driver, which sets the rotation over the take's keys, is named."""
    from blender_addon.ops import import_curves

    path = tmp_path / "take.csv"
    _head_take(path)
    for nla in ("strip", "meta strip", "muted track"):
        proxy = import_avatar(bpy, avatar_id)
        head = proxy.parent
        for frame, turn in ((1, 0.0), (41, 1.0)):
            head.rotation_euler = (0.0, 0.0, turn)
            head.keyframe_insert("rotation_euler", frame=frame)
        anim_data = head.animation_data
        track = anim_data.nla_tracks.new()
        track.strips.new("turn", 1, anim_data.action)
        anim_data.action = None
        if nla == "meta strip":  # the strip inside a meta strip holds the action
            track.strips.new("turn again", 50, track.strips[0].action)
            window = bpy.context.window_manager.windows[0]
            area = window.screen.areas[0]
            area.type = "NLA_EDITOR"
            for strip in track.strips:
                strip.select = True
            with bpy.context.temp_override(window=window, area=area, region=area.regions[-1]):
                assert bpy.ops.nla.meta_add() == {"FINISHED"}
            assert [s.type for s in track.strips] == ["META"]
        track.mute = nla == "muted track"
        scene.frame_set(21)  # half-way through the strip's turn, where it plays
        turned = 0.0 if track.mute else 0.5
        if track.mute:  # an old take, muted; the artist placed the head
            head.rotation_euler = (0.0, 0.0, 1.2)
        assert head.rotation_euler.z == pytest.approx(turned or 1.2, abs=1e-3)
        done = import_curves(proxy, str(path), 100)
        assert done.placement_moved == track.mute and not done.driven, nla
        assert head.delta_rotation_euler.z == pytest.approx(1.2 if track.mute else 0.0), nla
    proxy = import_avatar(bpy, avatar_id)
    head = proxy.parent
    head["turn"] = 0.5
    driver = head.driver_add("rotation_euler", 2).driver
    driver.type = "AVERAGE"
    target = driver.variables.new().targets[0]
    target.id, target.data_path = head, '["turn"]'
    bpy.context.view_layer.update()
    done = import_curves(proxy, str(path), 100)
    assert done.driven and not done.placement_moved
    assert tuple(head.delta_rotation_euler) == (0.0, 0.0, 0.0)


def test_head_rotation_keys_follow_the_empty_rotation_mode(scene, avatar_id, tmp_path):
    from blender_addon import anim
    from blender_addon.core.curves import plan_keyframes
    from protocol import head_rotation

    path = tmp_path / "take.csv"
    take = _head_take(path)
    plan = plan_keyframes(take.head_angles, take.fps, 24.0, 1, take.row_times())
    for mode, data_path in (("QUATERNION", "rotation_quaternion"), ("ZYX", "rotation_euler")):
        proxy = import_avatar(bpy, avatar_id)
        proxy.parent.rotation_mode = mode
        bpy.context.view_layer.objects.active = proxy
        assert bpy.ops.splatface.import_curves(filepath=str(path), start_frame=1) == {"FINISHED"}
        assert {f.data_path for f in anim.find_fcurves(proxy.parent)} == {data_path}
        scene.frame_set(19)
        want = head_rotation(*plan.values[18])
        got = np.array(proxy.parent.matrix_basis)[:3, :3]
        assert np.allclose(got, want, atol=1e-5), mode
