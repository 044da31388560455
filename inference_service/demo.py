"""``splatface demo``: the whole path on a portrait that ships in a package."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from protocol import Client
from protocol.arkit import index_of
from protocol.files import atomic_write

from .cli import Mp4Writer, orbit_camera, render_to_folder, save_png, wait_for_build
from .curves import save_curves_csv

TURNTABLE_FRAMES = 12
DEMO_FPS = 24.0  # frame rate of the animation preview and its curves.csv
DEMO_FRAMES = 36  # 1.5 s
NAME = "astronaut"


def demo_portrait() -> np.ndarray:
    """scikit-image's astronaut (Eileen Collins, NASA, public domain), 512x512 RGB."""
    import skimage.data

    return skimage.data.astronaut()


def demo_curves(frames: int = DEMO_FRAMES) -> np.ndarray:
    """Open the jaw, smile, then blink: a short clip that exercises the rig."""
    t = np.linspace(0, 1, frames)
    bump = lambda a, b: np.clip(np.sin(np.pi * np.clip((t - a) / (b - a), 0, 1)), 0, 1)  # noqa: E731
    curves = np.zeros((frames, 52), np.float32)
    curves[:, index_of("jawOpen")] = 0.7 * bump(0.0, 0.45)
    curves[:, index_of("mouthSmileLeft")] = bump(0.35, 0.8)
    curves[:, index_of("mouthSmileRight")] = bump(0.35, 0.8)
    curves[:, index_of("eyeBlinkLeft")] = bump(0.7, 1.0)
    curves[:, index_of("eyeBlinkRight")] = bump(0.7, 1.0)
    return curves


def contact_sheet(paths: list[Path], columns: int) -> np.ndarray:
    from PIL import Image

    tiles = [np.asarray(Image.open(p).convert("RGBA")) for p in paths]
    h, w = tiles[0].shape[:2]
    rows = -(-len(tiles) // columns)
    sheet = np.full((rows * h, columns * w, 3), 40, np.uint8)
    for k, t in enumerate(tiles):
        a = t[..., 3:] / 255.0
        r, c = divmod(k, columns)
        sheet[r * h : (r + 1) * h, c * w : (c + 1) * w] = (t[..., :3] * a + 40 * (1 - a)).astype(
            np.uint8
        )
    return sheet


def run_demo(
    client: Client, out: Path, preset: str, size: int, show: bool, replace: bool = False
) -> dict[str, Any]:
    """Build, animate, render and export the astronaut into ``out``. ``replace``: the
    service's store is the demo's own, and an earlier run's avatar is deleted once the
    new one is built (a second ``astronaut`` would make the name ambiguous)."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    photo_path = out / "input" / "astronaut.png"
    photo_path.parent.mkdir(exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(demo_portrait()).save(buf, format="PNG")
    atomic_write(photo_path, buf.getvalue())

    job = client.build(buf.getvalue(), name=NAME, preset=preset)
    status = wait_for_build(client, job, show)
    avatar_id = status["avatar_id"]
    if replace:
        for earlier in client.avatars():
            if earlier["name"] == NAME and earlier["id"] != avatar_id:
                client.delete(earlier["id"])
    info = client.get(avatar_id, mesh=False, rig=False).header["avatar"]

    yaws = np.linspace(0, 360, TURNTABLE_FRAMES, endpoint=False)
    cams = [orbit_camera(info, size, float(y), 5.0, 30.0) for y in yaws]
    turn_dir = out / "turntable"
    render_to_folder(client, avatar_id, turn_dir, None, cams, size, ("rgb", "alpha"), show)

    curves = demo_curves()
    stated = save_curves_csv(out / "animation" / "curves.csv", curves, fps=DEMO_FPS)
    assert stated == DEMO_FPS, f"curves.csv reads back at {stated} fps"
    anim_dir = out / "animation"
    front = orbit_camera(info, size, 0.0, 0.0, 30.0)
    mp4 = Mp4Writer(anim_dir / "preview.mp4", DEMO_FPS)
    render_to_folder(
        client,
        avatar_id,
        anim_dir,
        curves,
        [front] * len(curves),
        size,
        ("rgb", "alpha", "depth", "normal"),
        show,
        preview=mp4,
    )

    ply_dir = out / "ply"
    ply_dir.mkdir(exist_ok=True)
    rest = client.export(avatar_id)
    atomic_write(ply_dir / "astronaut_rest.ply", rest.arrays["file"].tobytes())
    peak = int(np.argmax(curves[:, index_of("jawOpen")]))
    posed = client.export(avatar_id, curves=curves[[peak]])
    atomic_write(ply_dir / f"astronaut_frame{peak:02d}.ply", posed.arrays["file"].tobytes())

    bundle = client.export(avatar_id, format="bundle").arrays["file"].tobytes()
    atomic_write(out / "astronaut-rig.zip", bundle)

    turn_pngs = sorted(turn_dir.glob("rgb_*.png"))
    anim_pngs = sorted(anim_dir.glob("rgb_*.png"))
    sheet = contact_sheet(turn_pngs + anim_pngs[::4], columns=6)
    save_png(out / "preview.png", sheet)
    frames = [Image.fromarray(contact_sheet([p], 1)) for p in turn_pngs + anim_pngs]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=120, loop=0)
    atomic_write(out / "preview.gif", gif.getvalue())

    record = {
        "avatar_id": avatar_id,
        "out": str(out),
        "input": str(photo_path),
        "turntable": str(turn_dir),
        "animation": str(anim_dir),
        "ply": sorted(str(p) for p in ply_dir.glob("*.ply")),
        "preview": [str(out / "preview.png"), str(out / "preview.gif"), str(mp4.path)],
        "bundle": str(out / "astronaut-rig.zip"),
        "build_seconds": status["events"][-1]["time"] if status.get("events") else None,
    }
    record["summary"] = "\n".join(
        [
            f"splatface demo: avatar {avatar_id} built from {photo_path}",
            f"  turntable ({TURNTABLE_FRAMES} frames, rgb+alpha PNG): {turn_dir}",
            f"  animation ({len(curves)} frames; rgb/alpha PNG, depth/normal .npy; "
            f"curves.csv): {anim_dir}",
            f"  Gaussian splats (.ply, world space): {', '.join(record['ply'])}",
            f"  rigged bundle (glTF head with 52 ARKit morph targets + bound Gaussians): "
            f"{out / 'astronaut-rig.zip'}",
            f"  preview: {out / 'preview.png'}, {out / 'preview.gif'} and {mp4.path}",
        ]
    )
    return record
