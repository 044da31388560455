"""``splatface``: the command line pipelines script against.

Every command but ``serve``, ``keys`` and ``track`` talks to a service: the one at ``--endpoint``,
or, without it, a private service started on a free loopback port for the command and
stopped afterwards (the same code path Blender uses).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import zmq

from protocol import Client, CurveKeys, ProtocolError, errors, messages
from protocol.animation import NTSC_FPS
from protocol.camera import intrinsics_from_fov, orbit, outline_distance
from protocol.launch import READY_PREFIX, wait_for_endpoint

from .build.diffusion import EnhanceModels, ModelFolderError, comma_hint
from .track import add_parser as add_track_parser

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"
RENDER_CHUNK = 8  # frames per render request
#: Passes of two chunks, at most, held at once so that one is written while the next
#: renders; larger chunks (4096 px frames) are written before the next is asked for.
OVERLAP_BYTES = 512 << 20
REPLY_TIMEOUT = 30.0  # seconds a command waits for a reply (--timeout)
RENDER_TIMEOUT = 600.0  # ... for a render request of up to RENDER_CHUNK frames on a CPU
CANCEL_WAIT = 60.0  # seconds a cancelled build has to reach its next check and end


STORE_HELP = "$SPLATFACE_STORE, else $XDG_DATA_HOME (~/.local/share)/splatface/avatars"


def default_store() -> Path:
    """``$SPLATFACE_STORE``, else ``$XDG_DATA_HOME/splatface/avatars`` (~/.local/share)."""
    if os.environ.get("SPLATFACE_STORE"):
        return Path(os.environ["SPLATFACE_STORE"]).expanduser()
    base = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share"))
    return base / "splatface" / "avatars"


# -- talking to a service -------------------------------------------------------------


@contextlib.contextmanager
def private_service(store: Path, device: str = "auto") -> Iterator[str]:
    """Start ``splatface serve`` on a free loopback port; yield its endpoint; stop it."""
    cmd = [sys.executable, "-m", "inference_service", "serve", "--endpoint",
           "tcp://127.0.0.1:0", "--store", str(store), "--device", device,
           "--log-level", "warning"]  # fmt: skip
    store.mkdir(parents=True, exist_ok=True)
    log_path, log_file = _service_log(store)
    # a session of its own: a terminal's Ctrl-C reaches this command alone, which cancels
    # its work and then stops the service (signalled too, the service went before the
    # cancel, which then waited out every attempt, 90 s, and blamed the service)
    with log_file:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log_file, text=True,
                                start_new_session=True)  # fmt: skip
    try:
        endpoint = wait_ready(proc, timeout=120, log_path=log_path)
        yield endpoint
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _service_log(store: Path) -> tuple[Path, Any]:
    """Where a private service logs, opened: ``STORE/service.log``; where the store is
    read-only (a farm's shared one), a file of this user's in the temporary folder; as a
    last resort, nowhere."""
    import tempfile

    user = getattr(os, "getuid", lambda: "")()  # per user where /tmp is shared
    for path in (
        store / "service.log",
        Path(tempfile.gettempdir()) / f"splatface-service{user}.log",
    ):
        try:
            return path, open(path, "ab")  # noqa: SIM115 (closed by the caller)
        except OSError:
            continue
    return Path(os.devnull), open(os.devnull, "ab")  # noqa: SIM115


def wait_ready(proc: subprocess.Popen, timeout: float, log_path: Path) -> str:
    """The endpoint a starting ``splatface serve`` prints, or SystemExit with its log."""
    endpoint = wait_for_endpoint(proc, timeout)
    if endpoint is None:
        try:  # exited (a bad --device, say), or still starting
            code = proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            code = None
        proc.kill()
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        what = f"exited ({code})" if code is not None else f"did not start within {timeout:.0f} s"
        raise SystemExit(
            f"splatface: the private service {what}; its log ({log_path}) ends with:\n"
            + "\n".join(tail)
        )
    return endpoint


@contextlib.contextmanager
def connect(args: argparse.Namespace) -> Iterator[Client]:
    try:
        curve = CurveKeys.from_dir(args.curve_keys) if args.curve_keys is not None else None
    except ValueError as exc:
        raise SystemExit(f"splatface {args.command}: {exc}") from None
    if args.endpoint:
        with Client(args.endpoint, timeout=args.timeout or REPLY_TIMEOUT, curve=curve) as c:
            yield c
        return
    store = store_folder(args.command, Path(args.store or default_store()))
    with private_service(store, args.device) as endpoint:
        with Client(endpoint, timeout=args.timeout or REPLY_TIMEOUT) as c:
            yield c


# -- output helpers -------------------------------------------------------------------


def print_json_error(code: str, message: str) -> None:
    """The last line ``--json`` promises on failure: ``{"error": {"code", "message"}}``."""
    print(json.dumps({"error": {"code": code, "message": message}}))


def refuse(args: argparse.Namespace, message: str, status: int = 2) -> int:
    """Report what the command itself finds wrong (as JSON too under ``--json``, code
    ``cli``); returns the exit status."""
    if getattr(args, "json", False):
        print_json_error("cli", message)
    print(f"splatface {args.command}: {message}", file=sys.stderr)
    return status


def out_folder(command: str, out: Path) -> Path:
    """``--out`` as a folder to write into, refused before any work where it cannot be
    one (a file, or a path through a file)."""
    if out.exists() and not out.is_dir():
        raise SystemExit(f"splatface {command}: --out {out} is a file, not a folder")
    _reachable(command, out)
    return out


def out_file(command: str, out: Path) -> Path:
    """``--out`` as a file to write, refused before any work where it is a folder or a
    path through a file."""
    if out.is_dir():
        raise SystemExit(f"splatface {command}: --out {out} is a folder; name the file to write")
    _reachable(command, out)
    return out


def _reachable(command: str, out: Path) -> None:
    """The nearest folder of ``out`` that exists must be a folder that takes a file (not
    read-only, not another user's, not a full disk): a byte written there and removed,
    so that the command fails now, not after its minutes of work."""
    from protocol.files import check_writable

    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise SystemExit(f"splatface {command}: --out {out} lies under {parent}, a file")
            try:
                check_writable(parent)
            except OSError as exc:
                raise SystemExit(
                    f"splatface {command}: cannot write --out {out}: {parent}: {exc.strerror}"
                ) from None
            return


class Progress:
    """A tqdm bar on stderr in a terminal; silent under ``--json`` or when piped."""

    def __init__(self, total: float, desc: str, enabled: bool) -> None:
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                desc=desc,
                file=sys.stderr,
                leave=False,
                bar_format="{desc} {bar} {percentage:3.0f}% {postfix}",
            )

    def update_to(self, value: float, note: str = "") -> None:
        if self.bar is not None:
            self.bar.n = value
            self.bar.set_postfix_str(note)
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def emit(args: argparse.Namespace, record: dict[str, Any], text: str) -> None:
    print(json.dumps(record) if args.json else text, flush=True)


def linear_to_srgb8(c: np.ndarray) -> np.ndarray:
    from inference_service.images import linear_to_srgb

    return (linear_to_srgb(c) * 255 + 0.5).astype(np.uint8)


def save_png(path: Path, img: np.ndarray) -> None:
    import io

    from PIL import Image

    from protocol.files import atomic_write

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    atomic_write(path, buf.getvalue())


def save_npy(path: Path, arr: np.ndarray) -> None:
    import io

    from protocol.files import atomic_write

    buf = io.BytesIO()
    np.save(buf, arr)
    atomic_write(path, buf.getvalue())


def write_passes(
    out: Path,
    start: int,
    passes: dict[str, np.ndarray],
    last: int = 0,
    names: tuple[str, ...] | None = None,
) -> list[str]:
    """Frames ``start..`` as ``rgb_NNNN.png`` (RGBA, sRGB, straight alpha: ``passes``
    must hold ``alpha`` with ``rgb``), ``alpha_NNNN.png``, ``depth_NNNN.npy`` (metres,
    inf = empty), ``normal_NNNN.npy``, of the passes ``names`` (all of ``passes`` when
    None); numbers padded to four digits, or to the take's ``last`` frame's width if
    wider, so the files sort by name in frame order."""
    out.mkdir(parents=True, exist_ok=True)
    names = tuple(passes) if names is None else names
    digits = max(4, len(str(last)))
    files = []
    n = len(next(iter(passes.values())))
    for k in range(n):
        number = f"{start + k:0{digits}d}"
        if "rgb" in names:
            rgb, a = passes["rgb"][k], passes["alpha"][k]
            straight = np.where(a[..., None] > 1e-6, rgb / np.maximum(a[..., None], 1e-6), 0)
            rgba = np.concatenate(
                [linear_to_srgb8(straight), (a[..., None] * 255 + 0.5).astype(np.uint8)], -1
            )
            save_png(out / f"rgb_{number}.png", rgba)
            files.append(str(out / f"rgb_{number}.png"))
        if "alpha" in names:
            alpha8 = (passes["alpha"][k] * 255 + 0.5).astype(np.uint8)
            save_png(out / f"alpha_{number}.png", alpha8)
            files.append(str(out / f"alpha_{number}.png"))
        for name in ("depth", "normal"):
            if name in names:
                save_npy(out / f"{name}_{number}.npy", passes[name][k])
                files.append(str(out / f"{name}_{number}.npy"))
    return files


def read_animation(path: str | None):
    """The ``--curves`` file as a ``protocol.Animation`` (None without one), one row per
    frame: frames a capture dropped are filled (``Animation.fill_dropped``). Bad files end
    the command with the reader's message. Shapes the file lacks, and dropped frames, are
    reported."""
    if path is None:
        return None
    from protocol.animation import load_animation

    try:
        anim = load_animation(path)
    except ValueError as exc:
        raise SystemExit(f"splatface: {exc}") from None
    if anim.missing:
        print(
            f"splatface: {path} has no column for {len(anim.missing)} shape(s), held at 0: "
            + ", ".join(anim.missing),
            file=sys.stderr,
        )
    anim, dropped = anim.fill_dropped()
    if dropped:
        print(
            f"splatface: {path}'s timecodes skip {dropped} frame(s) the capture dropped; "
            f"each repeats the row before it, so the take keeps its length ({anim.frames} "
            f"frames at {anim.fps:g} fps)",
            file=sys.stderr,
        )
    return anim


def head_pivot(info: dict[str, Any]) -> np.ndarray:
    """Where recorded head rotations turn the head (``protocol.animation.head_pivot``)."""
    from protocol.animation import head_pivot as pivot

    return pivot(info["center"], info["radius"])


def animation_heads(anim, info: dict[str, Any], enabled: bool) -> np.ndarray | None:
    """Per-frame head transforms from the file's head angles (Live Link Face), if any."""
    if anim is None or anim.head_angles is None or not enabled:
        return None
    return anim.head_transforms(head_pivot(info))


class Mp4Writer:
    """An H.264 preview built frame by frame with the packaged ffmpeg (imageio-ffmpeg),
    written next to its final name and renamed when complete (never half a file)."""

    def __init__(self, path: Path, fps: float, background: float = 0.18) -> None:
        self.path, self.fps, self.background = path, fps, background
        self.tmp = path.with_name(f".{path.name}.tmp.mp4")
        self.gen = None
        self.process: subprocess.Popen | None = None

    def add(self, rgb: np.ndarray, alpha: np.ndarray) -> None:
        """One frame from premultiplied linear ``rgb`` ``[H, W, 3]`` and ``alpha``."""
        img = linear_to_srgb8(rgb + (1.0 - alpha[..., None]) * self.background)
        h, w = img.shape[:2]
        img = np.pad(img, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")  # yuv420p: even
        if self.gen is None:
            import imageio_ffmpeg

            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.gen = imageio_ffmpeg.write_frames(
                str(self.tmp), (img.shape[1], img.shape[0]), fps=self.fps, codec="libx264",
                pix_fmt_out="yuv420p", quality=8, macro_block_size=1,
                output_params=["-movflags", "+faststart"], ffmpeg_log_level="error",
            )  # fmt: skip
            self.gen.send(None)
            # imageio-ffmpeg does not say how ffmpeg ended: a full disk fails its trailer
            # (exit 1) and left a broken file that replaced a good one
            self.process = self.gen.gi_frame.f_locals.get("p")
        self.gen.send(np.ascontiguousarray(img))

    def close(self) -> Path | None:
        """Finish the file and put it in place; OSError (the old file kept) where ffmpeg
        could not finish it."""
        if self.gen is None:
            return None
        self.gen.close()
        status = None if self.process is None else self.process.wait()
        if status:
            self.tmp.unlink(missing_ok=True)
            how = f"exit status {status}" if status > 0 else f"stopped by signal {-status}"
            raise OSError(errno.EIO, f"ffmpeg could not finish the preview ({how}; is the disk "
                                     "full?)", str(self.path))  # fmt: skip
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        if self.gen is not None:
            with contextlib.suppress(Exception):
                self.gen.close()
        self.tmp.unlink(missing_ok=True)


def positive_float(text: str) -> float:
    """argparse type: a finite number above 0 (seconds to wait)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def frame_rate(text: str) -> float:
    """argparse type: frames per second, a number or a fraction (``30000/1001``). The NTSC
    rates written short (23.976, 23.98, 29.97, 59.94, 119.88) mean n × 1000/1001, as video
    tools take them."""
    num, slash, den = text.partition("/")
    try:
        value = float(num) / float(den) if slash else float(text)
    except (ValueError, ZeroDivisionError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(
            f"must be a positive number or a fraction such as 30000/1001, got {text!r}"
        )
    if not slash:
        value = next((r for r in NTSC_FPS if abs(value - r) < 0.006), value)
    return value


def degrees(text: str) -> float:
    """argparse type: an angle in degrees, a finite number."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a number of degrees, got {text!r}")
    return value


def field_of_view(text: str) -> float:
    """argparse type: degrees a pinhole camera can see, over 0 and under 180."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (0 < value < 180):
        raise argparse.ArgumentTypeError(f"must be over 0 and under 180 degrees, got {text!r}")
    return value


def frame_number(text: str) -> int:
    """argparse type: a row of the curves, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a frame number, 0 or more, got {text!r}")
    return value


def parse_box(text: str) -> tuple[float, float, float, float]:
    """argparse type: ``X0,Y0,X1,Y1`` in pixels, X0 < X1 and Y0 < Y1."""
    try:
        box = tuple(float(v) for v in text.split(","))
    except ValueError:
        box = ()
    if (
        len(box) != 4
        or not all(math.isfinite(v) for v in box)
        or not (box[0] < box[2] and box[1] < box[3])
    ):
        raise argparse.ArgumentTypeError(f"must be X0,Y0,X1,Y1 with X0 < X1, Y0 < Y1: {text!r}")
    return box


def parse_range(text: str) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"range must be A:B (inclusive frame numbers), got {text!r}"
        ) from None
    if not 0 <= a <= b:
        raise argparse.ArgumentTypeError(f"range must have 0 <= A <= B, got {text!r}")
    return a, b


def orbit_distance(info: dict[str, Any], fov: float) -> float:
    """How far :func:`orbit_camera`'s camera stands from the head's centre: where the
    head's bounding sphere fills 90 % of the frame."""
    return outline_distance(float(info["radius"]), fov, fill=0.9)


def orbit_camera(info: dict[str, Any], size: int, yaw: float, pitch: float, fov: float):
    center = np.asarray(info["center"], np.float64)
    distance = orbit_distance(info, fov)
    return intrinsics_from_fov(size, size, fov), orbit(center, distance, yaw, pitch)


def orbit_far(info: dict[str, Any], fov: float) -> float | None:
    """The far clip plane :func:`orbit_camera`'s camera needs where the service's default
    (100 m) would cut the head away: a very narrow ``--fov`` stands far back."""
    far = orbit_distance(info, fov) + 2 * float(info["radius"])
    return far if far > messages.OPS["render"].fields["far"].default else None


def avatar_info(client: Client, ref: str) -> dict[str, Any]:
    return client.get(ref, mesh=False, rig=False).header["avatar"]


# -- commands ---------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import Service

    try:
        service = Service(
            store=store_folder("serve", Path(args.store or default_store())),
            endpoint=args.endpoint or DEFAULT_ENDPOINT,
            device=args.device,
            curve_keys=args.curve_keys,
            exports=args.exports,
            enhance=EnhanceModels.parse(args.enhance) if args.enhance else None,
        )
    except ValueError as exc:
        folders = isinstance(exc, ModelFolderError) and args.enhance
        hint = comma_hint(args.enhance) if folders else ""
        print(f"splatface serve: {exc}{hint}", file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: service.stop())
    service.serve(ready=lambda ep: print(READY_PREFIX + ep, flush=True))
    return 0


#: What ``splatface keys`` writes into its folder; secret keys are readable by their owner only.
KEY_FILES = ("server.key", "server.key_secret", "client.key", "client.key_secret",
             "authorized_clients/client.key")  # fmt: skip


def cmd_keys(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    import zmq.auth

    folder = Path(args.folder)
    existing = [name for name in KEY_FILES if (folder / name).exists()]
    if existing and not args.force:
        return refuse(args, f"{folder} already holds {', '.join(existing)}; nothing was "
                            "written (--force replaces them)")  # fmt: skip
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        (folder / "authorized_clients").mkdir(mode=0o700, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".tmp-keys-", dir=folder) as tmp:
            for name in ("server", "client"):
                zmq.auth.create_certificates(tmp, name)
            made = Path(tmp)
            (made / "authorized_clients").mkdir()
            shutil.copy(made / "client.key", made / "authorized_clients" / "client.key")
            for name in KEY_FILES:
                (made / name).chmod(0o600 if name.endswith("_secret") else 0o644)
            # secrets first: a public key never lands without its pair
            for name in sorted(KEY_FILES, key=lambda n: not n.endswith("_secret")):
                os.replace(made / name, folder / name)
    except OSError as exc:
        return refuse(args, f"cannot write keys into {folder}: {exc}")
    emit(
        args,
        {"folder": str(folder)},
        f"keys written to {folder}:\n  service: --curve-keys {folder} (server.key_secret, "
        f"authorized_clients/)\n  clients: copy server.key and client.key_secret into a "
        f"folder and pass it as --curve-keys",
    )
    return 0


def enhance_folders(text: str | None) -> list[str] | None:
    """``--enhance``: None (the service's choice), ``none`` ([]: off) or
    ``MODEL_DIR[,CONTROLNET_DIR]`` made absolute (the folders must be on the service's
    machine; a private service is this machine)."""
    if text is None:
        return None
    if text == "none":
        return []
    try:
        models = EnhanceModels.parse(text)
    except ModelFolderError as exc:
        raise SystemExit(f"splatface build: {exc}") from None
    return list(models.to_dict().values())


def default_name(photo: Path) -> str:
    """An avatar's name from its photo's file name: as the file system gave it, bytes that
    are not UTF-8 replaced, cut to the protocol's longest name."""
    stem = photo.stem.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return stem[: messages.MAX_NAME].strip() or "avatar"


def read_photo(command: str, photo: Path) -> bytes:
    """The bytes of a photo file, refused here (code ``cli``) naming the file where it
    cannot be read or is empty: the service's error would name no file."""
    try:
        data = photo.read_bytes()
    except OSError as exc:
        raise SystemExit(f"splatface {command}: cannot read {photo}: {exc}") from None
    if not data:
        raise SystemExit(f"splatface {command}: {photo} is empty (0 bytes)")
    return data


def cmd_build(args: argparse.Namespace) -> int:
    photo = Path(args.photo)
    data = read_photo("build", photo)
    box = None
    if args.face_box:
        box = list(args.face_box)
    enhance = enhance_folders(args.enhance)
    t0 = time.monotonic()
    with connect(args) as client:
        try:
            job = client.build(
                data, name=args.name or default_name(photo), preset=args.preset,
                face=args.face, face_box=box, enhance=enhance,
            )  # fmt: skip
        except ProtocolError as exc:
            if exc.details.get("field") != "enhance" or not enhance:
                raise
            raise ProtocolError(exc.code, exc.message + comma_hint(args.enhance),
                                exc.details) from None  # fmt: skip
        st = wait_for_build(client, job, not args.json)
        avatar_id = st["avatar_id"]
        info = avatar_info(client, avatar_id)
        namesakes = sum(a["name"] == info["name"] for a in client.avatars())
    record = {
        "avatar_id": avatar_id,
        "name": info["name"],
        "job": job,
        "gaussians": info.get("gaussians"),
        "seconds": round(time.monotonic() - t0, 2),
        "warnings": info.get("warnings", []),
        "same_name": namesakes,
        "enhanced": bool(info.get("enhanced")),
    }
    emit(args, record, build_text(record))
    return 0


def build_text(record: dict[str, Any]) -> str:
    """What ``build`` prints without ``--json``: the avatar, then a line per warning."""
    fill = ", the diffusion fill painting what the photo never saw" * record.get("enhanced", False)
    lines = [f"built avatar {record['avatar_id']} ({record['name']}): {record['gaussians']} "
             f"Gaussians in {record['seconds']} s{fill}"]  # fmt: skip
    lines += [f"warning: {w['message']}" for w in record["warnings"]]
    if record.get("same_name", 1) > 1:  # a build adds an avatar; it never replaces one
        lines.append(
            f"note: {record['same_name']} avatars are now named {record['name']!r}: "
            f"give this one's id ({record['avatar_id']}), or build with --name"
        )
    return "\n".join(lines)


def render_chunk(size: int, passes: tuple[str, ...]) -> int:
    """Frames per render request: :data:`RENDER_CHUNK`, fewer where that many frames of
    ``size`` x ``size`` would pass the protocol's limit on a reply (4096 px frames with
    every pass take 256 MiB each)."""
    return min(RENDER_CHUNK, messages.frames_per_render(size, size, passes))


def render_to_folder(
    client: Client,
    ref: str,
    out: Path,
    curves: np.ndarray | None,
    cameras: list[tuple[np.ndarray, np.ndarray]],
    size: int,
    passes: tuple[str, ...],
    show: bool,
    heads: np.ndarray | None = None,
    preview: Mp4Writer | None = None,
    timeout: float | None = None,
    far: float | None = None,
) -> list[str]:
    """Render len(cameras) frames (curves and heads row i, or the rest pose) in chunks;
    write the passes, and feed ``preview`` (which needs rgb and alpha) as frames arrive.
    ``timeout``: seconds per chunk (default :data:`RENDER_TIMEOUT`); ``far``: the far clip
    plane (None: the service's).

    A chunk is written (PNG encoding, the preview's frames) on a thread of its own while
    the service renders the next, where two chunks fit in :data:`OVERLAP_BYTES`: at
    1024 px the writing took as long as the rendering, with the service idle meanwhile."""
    from concurrent.futures import Future, ThreadPoolExecutor

    n = len(cameras)
    files: list[str] = []
    bar = Progress(n, "rendering", show)
    asked = passes
    if preview is not None:  # rendered for the preview, written only where asked
        passes = tuple(dict.fromkeys((*passes, "rgb", "alpha")))
    elif "rgb" in passes and "alpha" not in passes:  # straight colour needs the alpha
        passes = (*passes, "alpha")
    chunk = render_chunk(size, passes)
    channels = sum(messages.PASS_CHANNELS.get(p, 0) for p in passes)
    overlap = 2 * chunk * size * size * max(1, channels) * 4 <= OVERLAP_BYTES
    interrupted = threading.Event()  # the writer ends at its next frame

    def write(start: int, result: dict[str, np.ndarray]) -> list[str]:
        written = []
        for k in range(len(next(iter(result.values())))):
            if interrupted.is_set():
                break
            frame = {name: result[name][k : k + 1] for name in result}
            written += write_passes(out, start + k, frame, last=n - 1, names=asked)
            if preview is not None:
                preview.add(result["rgb"][k], result["alpha"][k])
        return written

    writing: tuple[Future, int] | None = None  # a chunk being written, and its end

    def finish_writing() -> None:
        nonlocal writing
        if writing is not None:
            future, end = writing
            writing = None
            files.extend(future.result())
            bar.update_to(end, f"{end}/{n} frames")

    try:
        with ThreadPoolExecutor(1, thread_name_prefix="splatface-write") as pool:
            try:
                parts = client.render_chunks(
                    ref, np.stack([c[0] for c in cameras]), np.stack([c[1] for c in cameras]),
                    size, size, curves=curves, head=heads, passes=passes,
                    timeout=timeout or RENDER_TIMEOUT, far=far, frames=chunk,
                )  # fmt: skip
                for start, _, result in parts:
                    finish_writing()  # the chunk before, and its errors
                    end = start + len(next(iter(result.values())))
                    writing = pool.submit(write, start, result), end
                    if not overlap:
                        finish_writing()
                finish_writing()
            except BaseException:
                interrupted.set()
                raise
        if preview is not None and (path := preview.close()) is not None:
            files.append(str(path))
    except BaseException:
        if preview is not None:
            preview.abort()
        raise
    finally:
        bar.close()
    return files


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM, SIGHUP) with what came of the command's work, for ``main`` to
    report (on stderr, and as the ``--json`` error) and exit ``status``."""

    def __init__(self, message: str = "stopped by Ctrl-C", status: int = 130) -> None:
        super().__init__(message)
        self.message, self.status = message, status


def wait_for_build(client: Client, job: str, show: bool) -> dict[str, Any]:
    """Build ``job``'s final status, with a progress bar where ``show``; Ctrl-C (SIGTERM,
    SIGHUP) cancels it on the service, which would finish it regardless, and raises
    :class:`Interrupted` saying how it ended."""
    bar = Progress(1.0, "building", show)
    try:
        return client.wait(job, progress=lambda ev: bar.update_to(ev["fraction"], ev["message"]))
    except KeyboardInterrupt as exc:
        bar.close()  # before the cancel's wait, which may take a while
        raise Interrupted(say_cancelled(client, job), getattr(exc, "status", 130)) from None
    finally:
        bar.close()


def say_cancelled(client: Client, job: str) -> str:
    """Cancel build ``job``; returns how it ended: cancelled, or, where Ctrl-C came while
    it was saving (past its last check), the avatar it kept. A second Ctrl-C stops the
    wait."""
    try:
        client.cancel(job)
        st = client.wait(job, timeout=CANCEL_WAIT)
    except ProtocolError as exc:  # cancelled; or it failed, or the service is gone
        return "build cancelled" if exc.code == errors.CANCELLED else exc.message
    kept = st.get("avatar_id")
    return (f"too late to cancel: the build was saving, and kept avatar {kept} "
            f"(splatface rm {kept} removes it)")  # fmt: skip


def cmd_render(args: argparse.Namespace) -> int:
    out = out_folder("render", Path(args.out))
    anim = read_animation(args.curves)
    curves = None if anim is None else anim.curves
    passes = tuple(dict.fromkeys(p.strip() for p in args.passes.split(",") if p.strip()))
    n = 1 if curves is None else len(curves)
    fps = args.fps or (anim is not None and anim.row_rate()) or 30.0
    preview = None
    if n > 1 and not args.no_preview:
        preview = Mp4Writer(out / "preview.mp4", fps)
    with connect(args) as client:
        info = avatar_info(client, args.avatar)
        cam = orbit_camera(info, args.size, args.yaw, args.pitch, args.fov)
        heads = animation_heads(anim, info, not args.no_head_motion)
        files = render_to_folder(
            client, info["id"], out, curves, [cam] * n, args.size, passes, not args.json,
            heads=heads, preview=preview, timeout=args.timeout, far=orbit_far(info, args.fov),
        )  # fmt: skip
    record = {"avatar_id": info["id"], "out": str(out), "frames": n, "fps": fps, "files": files}
    text = f"rendered {n} frame(s) of {info['name']} into {out}"
    if preview is not None:
        record["preview"] = str(preview.path)
        text += f" (preview: {preview.path}, {fps:g} fps)"
    written = [*files, *([record["preview"]] if preview is not None else [])]
    text += earlier_take(out, RENDER_FILES, written, record)
    emit(args, record, text)
    return 0


#: What ``render`` writes into its folder (``export --range``: ``frame_*.ply``).
RENDER_FILES = ("rgb_*.png", "alpha_*.png", "depth_*.npy", "normal_*.npy", "preview.mp4")


def earlier_take(out: Path, patterns: tuple[str, ...], written: list[str], record: dict) -> str:
    """A note naming the files in ``out`` like the command's own (``patterns``) that it
    did not write (an earlier, longer take's frames, which read as part of this one; an
    earlier render's other passes). Their count goes into ``record`` as
    ``other_frames``; "" when there are none."""
    mine = {Path(p).resolve() for p in written}
    found = {p for pattern in patterns for p in out.glob(pattern)}
    others = sorted(p for p in found if p.resolve() not in mine)
    if not others:
        return ""
    record["other_frames"] = len(others)
    return (f"\nnote: {out} also holds {len(others)} file(s) like these that this command did "
            f"not write ({others[0].name} ...), left by an earlier command")  # fmt: skip


def cmd_export(args: argparse.Namespace) -> int:
    from protocol.files import atomic_write_all

    from .export.ply import frame_file_name

    if args.bundle:
        return export_bundle(args)
    if args.range and args.frame is not None:
        raise SystemExit("splatface export: give --frame or --range, not both")
    out = (out_folder if args.range else out_file)("export", Path(args.out))
    anim = read_animation(args.curves)
    if anim is None and (args.range or args.frame is not None):
        raise SystemExit("splatface export: --frame and --range pick rows of --curves; give it")
    curves = None if anim is None else anim.curves
    if args.range:
        frames = list(range(args.range[0], args.range[1] + 1))
        paths = [out / frame_file_name(i, frames[-1]) for i in frames]
    else:
        frames, paths = [args.frame or 0], [out]
    if curves is not None and frames[-1] >= len(curves):
        raise SystemExit(
            f"splatface export: frame {frames[-1]} asked for, the curves have {len(curves)} "
            f"(0 to {len(curves) - 1})"
        )
    with connect(args) as client:
        info = avatar_info(client, args.avatar)
        heads = animation_heads(anim, info, not args.no_head_motion)
        bar = Progress(len(frames), "exporting", not args.json)

        def posed() -> Iterator[tuple[Path, bytes]]:
            for k, (i, path) in enumerate(zip(frames, paths, strict=True)):
                reply = client.export(
                    info["id"],
                    curves=None if curves is None else curves[[i]],
                    head=None if heads is None else heads[[i]],
                    sh_degree=args.sh_degree,
                )
                yield path, reply.arrays["file"].tobytes()
                bar.update_to(k + 1)

        try:  # staged, then renamed together: a range that fails leaves none of its frames
            atomic_write_all(posed())
        finally:
            bar.close()
    files = [str(p) for p in paths]
    record: dict[str, Any] = {"avatar_id": info["id"], "files": files}
    text = f"wrote {len(files)} .ply file(s): {files[0]}" + (" ..." if len(files) > 1 else "")
    if args.range:
        text += earlier_take(out, ("frame_*.ply",), files, record)
    emit(args, record, text)
    return 0


def export_bundle(args: argparse.Namespace) -> int:
    """``export --bundle``: the rigged bundle, unpacked into the folder ``--out`` (or kept
    as one zip when ``--out`` ends in .zip). The files appear whole or not at all, and
    together: a failure leaves an earlier bundle there as it was, never half replaced."""
    import io
    import zipfile

    from protocol.files import atomic_write, atomic_write_all

    if args.curves or args.range or args.frame is not None or args.sh_degree is not None:
        raise SystemExit(
            "splatface export: --bundle is the rig itself; drop --curves/--range/--frame/"
            "--sh-degree"
        )
    out = Path(args.out)
    (out_file if out.suffix.lower() == ".zip" else out_folder)("export", out)
    with connect(args) as client:
        info = avatar_info(client, args.avatar)
        data = client.export(info["id"], format="bundle").arrays["file"].tobytes()
    if out.suffix.lower() == ".zip":
        atomic_write(out, data)
        files = [str(out)]
    else:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            # the manifest last: it names the others
            names = sorted(z.namelist(), key=lambda n: n == "bundle.json")
            atomic_write_all([(out / n, z.read(n)) for n in names])
        files = [str(out / n) for n in names]
    emit(
        args,
        {"avatar_id": info["id"], "files": files},
        f"wrote the rigged bundle of {info['name']} ({len(files)} file(s)) to {out}",
    )
    return 0


def cmd_avatars(args: argparse.Namespace) -> int:
    with connect(args) as client:
        listed = client.request("list").header
    avatars, damaged = listed["avatars"], listed.get("damaged", [])
    for entry in damaged:  # left out of the list: say so, rather than lose them unseen
        print(f"splatface avatars: damaged, not listed: {entry['message']}", file=sys.stderr)
    if args.json:
        print(json.dumps({"avatars": avatars, "damaged": damaged}))
    elif not avatars:
        print("no avatars yet: splatface build PHOTO")
    else:
        for a in avatars:
            print(
                f"{a['id']}  {a['name']:<24} {a.get('gaussians', '?'):>7} Gaussians  "
                f"{a.get('created', '')}{'  diffusion fill' * bool(a.get('enhanced'))}"
            )
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    with connect(args) as client:
        reply = client.delete(args.avatar)
    deleted, exports = reply["deleted"], reply.get("exports")
    kept = f"; its exports stay in {exports}" if exports else ""
    record = {"deleted": deleted, **({"exports": exports} if exports else {})}
    emit(args, record, f"deleted avatar {deleted}{kept}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate
    from .images import decode_image

    path = Path(args.photo)
    try:  # decoded here, not by the service: a file that is no image is the CLI's to refuse
        photo = decode_image(read_photo("eval", path))
    except ProtocolError as exc:
        if exc.code != errors.BAD_IMAGE:  # too_large keeps its code, as from the service
            raise ProtocolError(exc.code, f"{path}: {exc.message}", exc.details) from None
        raise SystemExit(f"splatface eval: {path}: {exc.message}") from None
    with connect(args) as client:
        info = avatar_info(client, args.avatar)
        out = out_folder("eval", Path(args.out or f"eval-{info['id']}"))
        try:
            m = evaluate(client, info["id"], photo, out, size=args.size,
                         timeout=args.timeout or RENDER_TIMEOUT)  # fmt: skip
        except ValueError as exc:
            raise SystemExit(f"splatface eval: {exc}") from None
    views = m["views"]
    text = (f"{info['name']}: input view PSNR {m['input_view']['psnr_db']} dB, SSIM "
            f"{m['input_view']['ssim']}; coverage at ±60° {views['+60']['coverage']}/"
            f"{views['-60']['coverage']}; face found at ±30°: {views['+30'].get('face_found')}/"
            f"{views['-30'].get('face_found')}\nwrote {', '.join(m['files'])}")  # fmt: skip
    emit(args, m, text)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    out = out_folder("demo", Path(args.out))
    own_store = not args.endpoint and not args.store
    if own_store:
        args.store = str(out / "store")
    with connect(args) as client:
        record = run_demo(client, out, preset=args.preset, size=args.size, show=not args.json,
                          replace=own_store)  # fmt: skip
    if not args.endpoint:  # a private service's: here
        record["store"] = str(Path(args.store or default_store()))
        record["summary"] += f"\n  avatar store (and the service's log): {record['store']}"
    else:
        record["summary"] += f"\n  avatar stored by the service at {args.endpoint}"
    emit(args, record, record["summary"])
    return 0


# -- argument parsing ---------------------------------------------------------------------


def image_side(text: str) -> int:
    """``--size``: a whole number of pixels the service renders (1 to its MAX_SIZE)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= messages.MAX_SIZE:
        raise argparse.ArgumentTypeError(f"{value} is not in 1..{messages.MAX_SIZE} pixels")
    return value


class _Parser(argparse.ArgumentParser):
    """Usage errors answer ``--json`` too (as JSON on stdout, besides the usage on stderr).

    ``argv`` is what is being parsed (``sys.argv[1:]`` when None): argparse does not hand
    it to ``error``, and a usage error may come before ``--json`` itself is parsed.
    """

    def __init__(self, *args: Any, argv: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.argv = argv

    def error(self, message: str) -> NoReturn:
        argv = sys.argv[1:] if self.argv is None else self.argv
        if any(len(a) > 3 and "--json".startswith(a) for a in argv):  # argparse takes --js
            print_json_error("cli", message)
        super().error(message)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The CLI's parser; ``argv`` as ``main`` takes it, for ``--json`` usage errors."""
    p = _Parser(
        argv=argv,
        prog="splatface",
        description="One portrait photo to an animatable 3D Gaussian-splat head.",
    )
    sub = p.add_subparsers(
        dest="command",
        required=True,
        metavar="COMMAND",
        parser_class=functools.partial(_Parser, argv=argv),
    )

    def common(
        sp: argparse.ArgumentParser,
        store_default: str = STORE_HELP,
    ) -> None:
        g = sp.add_argument_group("service")
        g.add_argument(
            "--endpoint",
            help="service to use, e.g. tcp://127.0.0.1:5555; without it "
            "a private service is started for this command and stopped after",
        )
        g.add_argument(
            "--store",
            help=f"avatar folder of the private service (default: {store_default})",
        )
        g.add_argument(
            "--device",
            default="auto",
            choices=("auto", "cpu", "cuda"),
            help="device of the private service (default: auto)",
        )
        g.add_argument(
            "--curve-keys",
            metavar="DIR",
            help="folder with server.key and client.key_secret for a CurveZMQ service",
        )
        g.add_argument(
            "--timeout",
            type=positive_float,
            help=f"seconds to wait for each reply (default: {REPLY_TIMEOUT:g}; for each of "
            f"render's requests of up to {RENDER_CHUNK} frames: {RENDER_TIMEOUT:g})",
        )
        sp.add_argument(
            "--json",
            action="store_true",
            help="print one JSON object on the last line instead of text",
        )

    sp = sub.add_parser(
        "serve",
        help="run the service in the foreground",
        description="Run the service until SIGINT/SIGTERM.",
    )
    sp.add_argument(
        "--endpoint",
        help=f"where to listen (default: {DEFAULT_ENDPOINT}); "
        "non-loopback addresses need --curve-keys",
    )
    sp.add_argument(
        "--store",
        help=f"avatar folder (default: {STORE_HELP})",
    )
    sp.add_argument(
        "--exports", help="folder for exports written by the service (default: STORE/exports)"
    )
    sp.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="cuda when available with auto (default)",
    )
    sp.add_argument(
        "--curve-keys",
        metavar="DIR",
        help="require CurveZMQ: DIR holds server.key_secret and authorized_clients/",
    )
    sp.add_argument(
        "--enhance",
        metavar="MODEL_DIR[,CONTROLNET_DIR]",
        help="diffusion weights every build uses to paint what the photo never saw, unless "
        "a request names its own (checked at start; see `splatface build --enhance`)",
    )
    sp.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="what the service logs to stderr (default: info)",
    )
    sp.set_defaults(func=cmd_serve)

    sp = sub.add_parser("keys", help="make CurveZMQ keys for a service and a client")
    sp.add_argument("folder", help="folder to write the keys into")
    sp.add_argument("--force", action="store_true", help="overwrite existing keys")
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.set_defaults(func=cmd_keys)

    sp = sub.add_parser("build", help="build an avatar from a portrait photo")
    sp.add_argument("photo", help="image file: JPEG, PNG, WebP, TIFF, BMP...")
    which = sp.add_mutually_exclusive_group()  # one way of naming the face
    which.add_argument(
        "--face", type=int, help="which face when there are several (0 = largest, default)"
    )
    which.add_argument(
        "--face-box",
        type=parse_box,
        metavar="X0,Y0,X1,Y1",
        help="use the face overlapping this pixel box",
    )
    sp.add_argument(
        "--preset",
        default="default",
        choices=("fast", "default", "high"),
        help="quality/speed trade-off (default: default)",
    )
    sp.add_argument("--name", help="avatar name (default: the photo's file name)")
    sp.add_argument(
        "--enhance",
        metavar="MODEL_DIR[,CONTROLNET_DIR]",
        help="paint the parts of the head the photo never saw with local diffusion weights: "
        "a Stable Diffusion inpainting folder and optionally a depth ControlNet folder "
        "(see the README; needs splatface[enhance]; a path holding a comma is taken whole "
        "where it exists and its pieces are not both folders); 'none' turns off the "
        "service's own (default: the service's choice)",
    )
    common(sp)
    sp.set_defaults(func=cmd_build)

    sp = sub.add_parser("render", help="render passes of an avatar into a folder")
    sp.add_argument("avatar", help="avatar id or name")
    sp.add_argument(
        "--curves",
        help="ARKit curves: a Live Link Face CSV (also what `splatface track` writes), a CSV "
        "with ARKit-named columns, or a .npy [frames, 52]; one frame per row. Default: rest pose",
    )
    sp.add_argument(
        "--no-head-motion",
        action="store_true",
        help="ignore the head rotation a Live Link Face CSV records (default: apply it)",
    )
    sp.add_argument(
        "--fps",
        type=frame_rate,
        help="frame rate of the MP4 preview, a number or a fraction such as 30000/1001 "
        "(29.97 means that too; default: the curves file's rows per second, else 30)",
    )
    sp.add_argument(
        "--no-preview",
        action="store_true",
        help="do not write preview.mp4 (written for more than one frame by default)",
    )
    sp.add_argument(
        "--yaw",
        type=degrees,
        default=0.0,
        help="degrees; positive turns the camera to the subject's left (default: 0, front)",
    )
    sp.add_argument("--pitch", type=degrees, default=0.0, help="degrees; positive looks from above")
    sp.add_argument(
        "--fov",
        type=field_of_view,
        default=30.0,
        help="field of view in degrees, over 0 and under 180 (default: 30)",
    )
    sp.add_argument(
        "--size", type=image_side, default=512, help="image width and height (default: 512)"
    )
    sp.add_argument(
        "--passes",
        default="rgb,alpha,depth",
        help="comma-separated from rgb,alpha,depth,normal (default: rgb,alpha,depth)",
    )
    sp.add_argument(
        "--out",
        required=True,
        help="folder for rgb_NNNN.png, alpha_NNNN.png, depth_NNNN.npy, normal_NNNN.npy",
    )
    common(sp)
    sp.set_defaults(func=cmd_render)

    sp = sub.add_parser(
        "export", help="export world-space Gaussians as INRIA .ply, or the rigged bundle"
    )
    sp.add_argument("avatar", help="avatar id or name")
    sp.add_argument(
        "--out", required=True, help="FILE.ply; a folder with --range or --bundle (or .zip)"
    )
    sp.add_argument(
        "--curves", help="ARKit curves to pose with (Live Link Face CSV, named CSV or .npy)"
    )
    sp.add_argument(
        "--no-head-motion",
        action="store_true",
        help="ignore the head rotation a Live Link Face CSV records (default: apply it)",
    )
    sp.add_argument(
        "--bundle",
        action="store_true",
        help="the rigged bundle instead: head.glb (52 ARKit morph targets), gaussians.npz "
        "(triangle bindings), rest.ply, bundle.json; see docs/rigged-bundle.md",
    )
    sp.add_argument("--frame", type=frame_number, help="frame of --curves to export (default: 0)")
    sp.add_argument(
        "--range",
        type=parse_range,
        metavar="A:B",
        help="frames A to B inclusive, one frame_NNNNN.ply each, into the folder --out",
    )
    sp.add_argument(
        "--sh-degree",
        type=int,
        choices=range(4),
        metavar="{0,1,2,3}",
        help="SH degree the .ply holds (default: the avatar's own, 0 for builds: 17 floats a "
        "Gaussian); 3 adds the 45 f_rest_* values, as zeros (the same colours), that 3DGS's "
        "reference loader and tools built on its code require",
    )
    common(sp)
    sp.set_defaults(func=cmd_export)

    add_track_parser(sub)

    sp = sub.add_parser("avatars", help="list stored avatars")
    common(sp)
    sp.set_defaults(func=cmd_avatars)

    sp = sub.add_parser("rm", help="delete an avatar")
    sp.add_argument("avatar", help="avatar id or name")
    common(sp)
    sp.set_defaults(func=cmd_rm)

    sp = sub.add_parser("eval", help="measure an avatar against its photo: contact sheet + JSON")
    sp.add_argument("avatar", help="avatar id or name")
    sp.add_argument("--photo", required=True, help="the photo the avatar was built from")
    sp.add_argument("--out", help="folder for contact_sheet.png and metrics.json "
                    "(default: eval-AVATAR_ID)")  # fmt: skip
    sp.add_argument("--size", type=image_side, default=384, help="size of each view (default: 384)")
    common(sp)
    sp.set_defaults(func=cmd_eval)

    sp = sub.add_parser("demo", help="build, animate, render and export a sample portrait")
    sp.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    sp.add_argument(
        "--preset",
        default="default",
        choices=("fast", "default", "high"),
        help="build preset (default: default)",
    )
    sp.add_argument(
        "--size", type=image_side, default=384, help="frame size in pixels (default: 384)"
    )
    common(sp, store_default="OUT/store, the demo's own: a rerun replaces its avatar")
    sp.set_defaults(func=cmd_demo)
    return p


def endpoint_error(endpoint: str | None, exc: zmq.ZMQError) -> str:
    """What was wrong with an endpoint ZeroMQ refused: in use, not this machine's, or
    not an endpoint at all."""
    endpoint = endpoint or DEFAULT_ENDPOINT
    if exc.errno == errno.EADDRINUSE:
        return (f"{endpoint} is in use: another service or program listens there; stop it, "
                "or give another port")  # fmt: skip
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{endpoint} names an address that is not this machine's"
    return (f"ZeroMQ cannot use the endpoint {endpoint!r} ({exc.strerror}); give one such as "
            f"{DEFAULT_ENDPOINT}")  # fmt: skip


def store_folder(command: str, path: Path) -> Path:
    """``path`` for ``--store``, or SystemExit where it is a file or a link to nothing (it
    read 'File exists')."""
    if path.is_symlink() and not path.exists():
        raise SystemExit(f"splatface {command}: --store {path} is a link to "
                         f"{os.readlink(path)}, which does not exist")  # fmt: skip
    if path.exists() and not path.is_dir():
        raise SystemExit(f"splatface {command}: --store {path} is a file, not a folder")
    return path


def _stop_on(signum: int, frame: Any) -> None:
    """SIGTERM or SIGHUP (a closed terminal) stop a command as Ctrl-C does: its build is
    cancelled and its private service, in a session of its own, stopped."""
    raise Interrupted(f"stopped by {signal.Signals(signum).name}", 128 + signum)


def main(argv: list[str] | None = None) -> int:
    argv = None if argv is None else [str(a) for a in argv]
    args = build_parser(argv).parse_args(argv)
    level = getattr(args, "log_level", "warning").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with _stopping_on_signals(args.command != "serve"):  # serve stops itself on these
        return _run(args)


@contextlib.contextmanager
def _stopping_on_signals(wanted: bool) -> Iterator[None]:
    """SIGTERM and SIGHUP handled by :func:`_stop_on` for the command, as they were
    after it (``main`` called in a script or a test leaves no handler behind)."""
    signals = [getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n)]
    main_thread = threading.current_thread() is threading.main_thread()
    before = (
        {sig: signal.signal(sig, _stop_on) for sig in signals} if wanted and main_thread else {}
    )
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def _run(args: argparse.Namespace) -> int:
    """The command, its failures reported as the README's error contract says."""
    try:
        return args.func(args)
    except ProtocolError as exc:
        if getattr(args, "json", False):
            print_json_error(exc.code, exc.message)
        print(f"splatface {args.command}: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except SystemExit as exc:
        if isinstance(exc.code, str) and getattr(args, "json", False):
            print_json_error("cli", exc.code)
        raise
    except zmq.ZMQError as exc:  # an endpoint ZeroMQ cannot use ("localhost:5555")
        return refuse(args, endpoint_error(getattr(args, "endpoint", None), exc), status=1)
    except OSError as exc:  # a file the command could not read or write: say which
        logging.getLogger(__name__).debug("%s failed", args.command, exc_info=True)
        where = f": {exc.filename}" if exc.filename else ""
        return refuse(args, f"{exc.strerror or exc}{where}", status=1)
    except KeyboardInterrupt as exc:
        message = getattr(exc, "message", "stopped by Ctrl-C")
        status = getattr(exc, "status", 130)
        if getattr(args, "json", False):
            print_json_error(errors.CANCELLED, message)
        print(f"splatface {args.command}: {message}", file=sys.stderr)
        return status
