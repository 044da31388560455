"""A render-farm worker: the extension installed from ``make addon``'s zip into a fresh
Blender user folder, a saved ``.blend`` opened in a fresh process, ``render(animation=True)``
with the endpoint taken from ``SPLATFACE_ENDPOINT`` (the preference points elsewhere).

The PyPI ``bpy`` module does not read the user preferences at import, as the ``blender``
binary does at startup, so the worker script calls ``wm.read_userpref`` first: from then on
it is what ``blender -b scene.blend -a`` does, with the add-on enabled by the preferences
that ``extensions.package_install_files`` (``blender --command extension install-file``)
saved, not by the script.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import bpy
import numpy as np
import pytest

from blender_addon import packaging
from protocol import ARKIT_NAMES
from protocol.camera import intrinsics_from_fov, orbit
from tests.blender_util import (
    add_camera_from_opencv,
    assert_close_renders,
    disable_addon,
    enable_addon,
    import_avatar,
    reset_scene,
)
from tests.conftest import REPO

pytestmark = pytest.mark.slow
SIZE = 128
FOV = 30.0
JAW = (0.0, 0.5, 1.0)  # frames 1, 2, 3
#: Run once per worker image: install the zip, enable it, point the preference at a dead
#: port with a short timeout, save the preferences.
INSTALL = """
import sys
import bpy
ok = bpy.ops.extensions.package_install_files(
    filepath=sys.argv[1], repo="user_default", enable_on_install=True)
assert ok == {"FINISHED"}, ok
p = bpy.context.preferences.addons["bl_ext.user_default.splatface"].preferences
p.endpoint, p.timeout = sys.argv[2], 3.0
bpy.ops.wm.save_userpref()
"""
#: Each job: what ``blender -b scene.blend [-o OUT] -a`` does.
WORKER = """
import sys
import bpy
bpy.ops.wm.read_userpref()
assert "bl_ext.user_default.splatface" in bpy.context.preferences.addons, "not enabled"
assert "blender_addon" not in sys.modules
bpy.ops.wm.open_mainfile(filepath=sys.argv[1])
if len(sys.argv) > 2:
    bpy.context.scene.render.filepath = sys.argv[2]
bpy.ops.render.render(animation=True)
print("RENDERED", bpy.context.scene.render.engine)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(user: Path, endpoint: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["BLENDER_USER_RESOURCES"] = str(user)
    env["SPLATFACE_ENDPOINT"] = endpoint
    return env


def _python(code: str, args: list[str], env: dict, cwd: Path, timeout: float = 300):
    """``.venv``'s Python on ``code`` away from the checkout (cwd and sys.path without it)."""
    prelude = f"import sys; sys.path = [p for p in sys.path if p not in ('', {str(REPO)!r})]\n"
    cmd = [sys.executable, "-c", prelude + code, *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def worker_user(tmp_path_factory) -> tuple[Path, str]:
    """A worker's Blender user folder with the extension installed from the zip; returns
    it and the (dead) endpoint its preferences hold."""
    root = tmp_path_factory.mktemp("farm")
    zip_path = packaging.build(root / "dist")
    dead = f"tcp://127.0.0.1:{_free_port()}"
    out = _python(INSTALL, [str(zip_path), dead], _env(root / "user", ""), root, 120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (root / "user" / "extensions" / "user_default" / "splatface" / "engine.py").is_file()
    return root / "user", dead


@pytest.fixture(scope="module")
def farm_scene(service, astronaut_id, tmp_path_factory):
    """scene.blend: the astronaut, jawOpen keyed 0 → 0.5 → 1 over frames 1-3, a camera,
    engine SPLATFACE, 32-bit EXR output into ``out/``; returns (blend, out, w2c, head)."""
    root = tmp_path_factory.mktemp("scene")
    enable_addon(bpy, service.endpoint)
    try:
        scene = reset_scene(bpy)
        scene.frame_start, scene.frame_end = 1, 3
        proxy = import_avatar(bpy, astronaut_id)
        jaw = proxy.data.shape_keys.key_blocks["jawOpen"]
        for frame, v in enumerate(JAW, start=1):
            jaw.value = v
            jaw.keyframe_insert("value", frame=frame)
        w2c = orbit(proxy.splatface.center, 0.9)
        add_camera_from_opencv(bpy, scene, w2c, FOV, SIZE)
        scene.render.image_settings.file_format = "OPEN_EXR"
        scene.render.image_settings.color_depth = "32"
        scene.render.filepath = str(root / "out" / "frame_")
        scene.frame_set(1)
        head = np.array(proxy.matrix_world, np.float64)
        blend = root / "scene.blend"
        assert bpy.ops.wm.save_as_mainfile(filepath=str(blend), copy=True) == {"FINISHED"}
    finally:
        disable_addon()
    return blend, root / "out", w2c, head


def _read_exr(path: Path) -> np.ndarray:
    """RGBA float32 ``[H, W, 4]``, rows top-down (premultiplied, as the engine wrote it)."""
    img = bpy.data.images.load(str(path))
    try:
        px = np.empty(SIZE * SIZE * 4, np.float32)
        img.pixels.foreach_get(px)
    finally:
        bpy.data.images.remove(img)
    return px.reshape(SIZE, SIZE, 4)[::-1]


def test_worker_renders_the_animation_from_the_environment_endpoint(
    worker_user, farm_scene, service, client, astronaut_id
):
    """The farm case: no add-on code in the job, the preference wrong, the env var right,
    and the frames on disk equal to direct service renders of the same values."""
    user, dead = worker_user
    blend, out, w2c, head = farm_scene
    env = _env(user, service.endpoint)
    assert dead != service.endpoint
    run = _python(WORKER, [str(blend)], env, blend.parent)
    assert run.returncode == 0 and "RENDERED SPLATFACE" in run.stdout, run.stderr[-3000:]
    files = [out / f"frame_{f:04d}.exr" for f in (1, 2, 3)]
    assert sorted(out.iterdir()) == files
    frames = [_read_exr(f) for f in files]
    k = intrinsics_from_fov(SIZE, SIZE, FOV)
    for got, v in zip(frames, JAW, strict=True):
        curves = np.zeros((1, 52), np.float32)
        curves[0, ARKIT_NAMES.index("jawOpen")] = v
        ref = client.render(
            astronaut_id, k, w2c, SIZE, SIZE, curves=curves, head=head, passes=("rgb", "alpha")
        )
        assert got[..., 3].mean() > 0.05, "the avatar is not in view"
        assert_close_renders(got[..., :3], ref["rgb"][0], "rgb")
        assert_close_renders(got[..., 3], ref["alpha"][0], "alpha")
    # the jaw moved: frames differ around the mouth (centred below the middle of the
    # image), hardly on the forehead or hair (the top quarter)
    for a, b in ((0, 1), (1, 2)):
        moved = np.abs(frames[a] - frames[b]).max(axis=2) > 0.05
        rows = np.nonzero(moved)[0]
        assert rows.size > 20, (a, b, rows.size)
        # (ICT's jawOpen also moves the scalp by up to 0.7 mm: a silhouette pixel may flip)
        assert (rows <= SIZE // 4).mean() < 0.02 and np.median(rows) > SIZE // 2, rows


def test_worker_with_the_service_down_fails_fast_with_a_clear_error(
    worker_user, farm_scene, tmp_path
):
    """A farm job whose service is gone must fail (non-zero exit) within the preference's
    timeout and name the endpoint, not hang the worker or write frames."""
    user, _ = worker_user
    blend = farm_scene[0]
    down = f"tcp://127.0.0.1:{_free_port()}"
    t0 = time.monotonic()
    run = _python(
        WORKER, [str(blend), str(tmp_path / "out" / "frame_")], _env(user, down), tmp_path, 120
    )
    elapsed = time.monotonic() - t0
    assert run.returncode != 0 and "RENDERED" not in run.stdout
    assert f"splatface service ({down})" in run.stderr and "timeout" in run.stderr, run.stderr[
        -3000:
    ]
    assert elapsed < 60, elapsed
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
