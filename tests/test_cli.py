"""The ``splatface`` command line, as pipelines call it."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from plyfile import PlyData

from inference_service.cli import build_parser, build_text, frame_rate, linear_to_srgb8, main
from inference_service.curves import load_curves, save_curves_csv
from protocol import Client, ProtocolError
from protocol.animation import load_animation
from protocol.arkit import ARKIT_NAMES, index_of

from .conftest import REPO, encode_png


def run(*args, check=True, timeout=600, file_size=None):
    """``file_size``: bytes any file the command writes stops at, as on a full disk."""
    limit = None if file_size is None else lambda: resource.setrlimit(
        resource.RLIMIT_FSIZE, (file_size, resource.RLIM_INFINITY))  # fmt: skip
    r = subprocess.run([sys.executable, "-m", "inference_service", *map(str, args)],
                       cwd=REPO, capture_output=True, text=True, timeout=timeout,
                       preexec_fn=limit)  # fmt: skip
    if check and r.returncode != 0:
        raise AssertionError(f"splatface {args} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r


def last_json(r) -> dict:
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_private_service_build_then_list_and_remove(tmp_path, astronaut, env_store):
    photo = tmp_path / "portrait.png"
    photo.write_bytes(encode_png(astronaut[60:]))  # the top of her hair cut off
    built = last_json(run("build", photo, "--preset", "fast", "--json"))
    assert built["name"] == "portrait" and len(built["avatar_id"]) == 12
    assert [w["code"] for w in built["warnings"]] == ["cut"], built["warnings"]
    # a second command starts another private service on the same default store
    listed = last_json(run("avatars", "--json"))["avatars"]
    assert [a["id"] for a in listed] == [built["avatar_id"]]
    assert listed[0]["warnings"] == built["warnings"]
    assert last_json(run("rm", "portrait", "--json")) == {"deleted": built["avatar_id"]}
    assert last_json(run("avatars", "--json"))["avatars"] == []
    assert (env_store / "service.log").exists()


def test_a_store_the_private_service_cannot_log_into_still_serves(tmp_path):
    """A farm's shared store mounted read-only (here: its service.log cannot be opened,
    being a folder): the command's private service logs to the temporary folder."""
    store = tmp_path / "store"
    (store / "service.log").mkdir(parents=True)
    temp = tmp_path / "temp"
    temp.mkdir()
    r = subprocess.run([sys.executable, "-m", "inference_service", "avatars", "--store",
                        str(store), "--json"], cwd=REPO, capture_output=True, text=True,
                       timeout=600, env={**os.environ, "TMPDIR": str(temp)})  # fmt: skip
    assert r.returncode == 0 and last_json(r) == {"avatars": [], "damaged": []}, r.stderr
    assert [p.name for p in temp.iterdir()] == [f"splatface-service{os.getuid()}.log"]


def test_build_prints_each_warning_on_its_own_line():
    record = {"avatar_id": "0123456789ab", "name": "me", "gaussians": 9, "seconds": 1.5,
              "warnings": [{"code": "cut", "message": "the photo's top edge cuts off the head"},
                           {"code": "small", "message": "the head is 70 px across"}]}  # fmt: skip
    assert build_text(record).splitlines() == [
        "built avatar 0123456789ab (me): 9 Gaussians in 1.5 s",
        "warning: the photo's top edge cuts off the head",
        "warning: the head is 70 px across",
    ]
    # a second build of the same photo adds an avatar of the same name: say so
    assert build_text({**record, "warnings": [], "same_name": 2}).splitlines()[1] == (
        "note: 2 avatars are now named 'me': give this one's id (0123456789ab), or build "
        "with --name"
    )
    assert build_text({**record, "warnings": []}).count("\n") == 0
    # whether the diffusion fill painted the unseen head (only meta.json said so)
    assert build_text({**record, "warnings": [], "enhanced": True}) == (
        "built avatar 0123456789ab (me): 9 Gaussians in 1.5 s, the diffusion fill painting "
        "what the photo never saw"
    )


def test_a_preview_ffmpeg_cannot_finish_fails_and_keeps_the_old_one(tmp_path):
    """ffmpeg stopped short (here by a file-size limit, as a full disk stops it): the
    writer says so, and the last good preview stays (it was replaced by a broken file,
    and the render reported success)."""
    import resource

    from inference_service.cli import Mp4Writer

    path = tmp_path / "preview.mp4"
    path.write_bytes(b"the last good preview")
    writer = Mp4Writer(path, 30)
    ramp = np.linspace(0.2, 0.6, 64, dtype=np.float32)[None, :, None]
    frames = [np.broadcast_to(ramp + 0.01 * i, (64, 64, 3)) for i in range(60)]
    alpha = np.ones((64, 64), np.float32)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2000, hard))
    try:
        writer.add(frames[0], alpha)  # ffmpeg starts here, and keeps the limit
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    with pytest.raises(OSError, match="ffmpeg could not finish the preview") as err:
        for frame in frames[1:]:
            writer.add(frame, alpha)
        writer.close()
    writer.abort()  # as render_to_folder does
    assert err.value.filename == str(path)
    assert path.read_bytes() == b"the last good preview"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preview.mp4"]


def test_a_frame_that_cannot_be_written_ends_the_render_and_its_preview(
    tmp_path, service, astronaut_id
):
    """Frames are written on a thread while the next chunk renders: a file it cannot
    write (here a folder in its place) still ends the command, naming it, with no
    preview left behind."""
    curves = np.zeros((12, 52), np.float32)
    csv = tmp_path / "curves.csv"
    save_curves_csv(csv, curves)
    out = tmp_path / "frames"
    (out / "rgb_0010.png").mkdir(parents=True)  # in the second chunk of eight
    r = run("render", astronaut_id, "--endpoint", service.endpoint, "--curves", csv,
            "--size", 32, "--out", out, "--json", check=False)  # fmt: skip
    assert r.returncode == 1, r.stderr
    assert str(out / "rgb_0010.png") in last_json(r)["error"]["message"]
    assert not (out / "preview.mp4").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporaries


def test_render_with_curves_csv(tmp_path, service, astronaut_id):
    curves = np.zeros((3, 52), np.float32)
    curves[:, index_of("jawOpen")] = [0, 0.5, 1]
    csv = tmp_path / "curves.csv"
    save_curves_csv(csv, curves)
    out = tmp_path / "frames"
    r = last_json(run("render", astronaut_id, "--endpoint", service.endpoint, "--curves", csv,
                      "--size", 64, "--yaw", 20, "--passes", "rgb,alpha,depth,normal",
                      "--out", out, "--json"))  # fmt: skip
    assert r["frames"] == 3
    for i in range(3):
        rgba = np.asarray(Image.open(out / f"rgb_{i:04d}.png"))
        assert rgba.shape == (64, 64, 4) and rgba[..., 3].max() == 255
        assert np.asarray(Image.open(out / f"alpha_{i:04d}.png")).shape == (64, 64)
        assert np.load(out / f"depth_{i:04d}.npy").shape == (64, 64)
        assert np.load(out / f"normal_{i:04d}.npy").shape == (64, 64, 3)
    a, b = (np.asarray(Image.open(out / f"rgb_{i:04d}.png")) for i in (0, 2))
    assert np.abs(a.astype(int) - b).sum() > 0  # the jaw moved
    # --passes names what is written: the preview's colour is rendered, not written
    only = tmp_path / "normals"
    run("render", astronaut_id, "--endpoint", service.endpoint, "--curves", csv, "--size", 16,
        "--passes", "normal", "--out", only)  # fmt: skip
    assert sorted(p.name for p in only.iterdir()) == [
        "normal_0000.npy", "normal_0001.npy", "normal_0002.npy", "preview.mp4"]  # fmt: skip
    assert "other_frames" not in r
    # one frame into the folder of that take: its other frames and preview are named
    again = last_json(run("render", astronaut_id, "--endpoint", service.endpoint, "--size", 16,
                          "--passes", "normal", "--out", only, "--json"))  # fmt: skip
    assert again["other_frames"] == 3  # normal_0001, normal_0002, preview.mp4
    # another pass of the same take is named as left there, not as an earlier take's
    text = run("render", astronaut_id, "--endpoint", service.endpoint, "--curves", csv,
               "--size", 16, "--passes", "alpha", "--out", only).stdout  # fmt: skip
    assert "that this command did not write (normal_0000.npy ...), left by an earlier command" in (
        text
    )


def test_render_live_link_face_take_with_head_motion_and_mp4(tmp_path, service, astronaut_id):
    import imageio_ffmpeg

    from protocol.animation import Animation, format_timecode, save_livelink_csv

    # 1.2 s captured at 60 fps and stamped with a 30 fps timecode (FF.000, FF.500): the
    # preview plays the rows at 60
    n = 72
    curves = np.zeros((n, 52), np.float32)
    curves[:, index_of("jawOpen")] = np.linspace(0, 1, n)
    head = np.zeros((n, 3), np.float32)
    head[:, 0] = np.radians(np.linspace(0, 25, n))  # yaw
    take = tmp_path / "take.csv"
    codes = tuple(format_timecode(i / 60, 30) for i in range(n))
    assert codes[1] == "00:00:00:00.500"
    save_livelink_csv(take, Animation(curves=curves, fps=30.0, head_angles=head, timecodes=codes))
    moving, still = tmp_path / "moving", tmp_path / "still"
    r = last_json(run("render", astronaut_id, "--endpoint", service.endpoint, "--curves", take,
                      "--size", 64, "--passes", "alpha,depth", "--out", moving,
                      "--json"))  # fmt: skip
    assert r["fps"] == 60 and r["frames"] == n
    # the preview's rgb is rendered for it, not written: --passes says what is
    assert len(list(moving.glob("alpha_*.png"))) == n and len(list(moving.glob("depth_*.npy"))) == n
    assert not list(moving.glob("rgb_*"))
    reader = imageio_ffmpeg.read_frames(r["preview"])
    meta = next(reader)
    assert meta["size"] == (64, 64) and meta["fps"] == pytest.approx(60)
    assert sum(1 for _ in reader) == n
    assert not list(moving.glob(".*tmp*"))
    run("render", astronaut_id, "--endpoint", service.endpoint, "--curves", take, "--size", 64,
        "--no-head-motion", "--no-preview", "--out", still)  # fmt: skip
    assert not (still / "preview.mp4").exists()

    def alpha(folder, i):
        return np.asarray(Image.open(folder / f"alpha_{i:04d}.png")).astype(int)

    # frame 0 has no yaw: the same either way; the last one turned the head
    assert np.abs(alpha(moving, 0) - alpha(still, 0)).max() <= 1
    assert np.abs(alpha(moving, n - 1) - alpha(still, n - 1)).mean() > 2


def test_frames_a_capture_dropped_are_held_so_the_take_keeps_its_length(
    tmp_path, service, astronaut_id
):
    from protocol.animation import Animation, format_timecode, save_livelink_csv

    # 30 fps, frames 5 and 6 dropped: 20 rows over 22 frames' time; one frame a row made
    # the preview 2 frames short, out of time with the take's sound
    rows = [i for i in range(22) if i not in (5, 6)]
    curves = np.zeros((len(rows), 52), np.float32)
    curves[:, index_of("jawOpen")] = np.array(rows) / 21
    take = tmp_path / "dropped.csv"
    codes = tuple(format_timecode(7200 + i / 30, 30) for i in rows)
    save_livelink_csv(take, Animation(curves=curves, timecodes=codes))
    out = tmp_path / "out"
    r = run("render", astronaut_id, "--endpoint", service.endpoint, "--curves", take,
            "--size", 16, "--passes", "alpha", "--out", out, "--json")  # fmt: skip
    assert last_json(r)["frames"] == 22 and last_json(r)["fps"] == 30
    assert "skip 2 frame(s) the capture dropped" in r.stderr
    assert len(list(out.glob("alpha_*.png"))) == 22
    # export's frames count the same way: frame 6 is frame 4's row held
    ply = {i: tmp_path / f"f{i}.ply" for i in (4, 6, 7)}
    for i, path in ply.items():
        run("export", astronaut_id, "--endpoint", service.endpoint, "--curves", take,
            "--frame", i, "--out", path)  # fmt: skip
    assert ply[4].read_bytes() == ply[6].read_bytes() != ply[7].read_bytes()


def test_an_out_the_command_cannot_write_is_refused_before_work(tmp_path, service, astronaut_id):
    folder, file, csv_folder = tmp_path / "folder", tmp_path / "file.ply", tmp_path / "c.csv"
    folder.mkdir()
    csv_folder.mkdir()
    file.write_text("")
    served = ("--endpoint", service.endpoint)
    video = tmp_path / "clip"  # track refuses --out before it looks for the video
    cases = [
        (("export", astronaut_id, *served, "--out", folder), "is a folder"),
        (("export", astronaut_id, *served, "--out", file / "x.ply"), "a file"),
        (("export", astronaut_id, *served, "--out", file, "--curves", "c.npy", "--range", "0:1"),
         "is a file, not a folder"),
        (("export", astronaut_id, *served, "--bundle", "--out", file), "is a file, not a folder"),
        (("export", astronaut_id, *served, "--bundle", "--out", folder, "--frame", 2),
         "drop --curves"),
        (("render", astronaut_id, *served, "--out", file), "is a file, not a folder"),
        (("track", video, "--out", csv_folder), "is a folder"),
        (("track", video, "--out", file / "c.csv"), "a file"),
    ]  # fmt: skip
    for args, message in cases:
        r = run(*args, "--json", check=False)
        assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, args
        assert json.loads(r.stdout.splitlines()[-1])["error"]["code"] == "cli", args
    assert file.read_text() == "" and list(folder.iterdir()) == []
    # a folder that takes no file (a full disk here) is refused before the work too
    r = run("track", video, "--out", folder / "c.csv", "--json", check=False, file_size=0)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"cannot write --out {folder / 'c.csv'}: {folder}: File too large" in r.stderr
    assert list(folder.iterdir()) == []
    # a file the command cannot write after all is one line naming it, not a traceback
    r = run("export", astronaut_id, *served, "--out", folder / "x.ply", "--json", check=False,
            file_size=1)  # fmt: skip
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.rstrip().endswith(f": {folder / 'x.ply'}"), r.stderr  # not its temporary
    assert json.loads(r.stdout.splitlines()[-1])["error"]["code"] == "cli"
    assert list(folder.iterdir()) == []


def test_render_requests_stay_under_the_reply_limit_and_names_fit_the_protocol(tmp_path):
    from inference_service.cli import default_name, render_chunk
    from protocol.messages import MAX_NAME, MAX_RENDER_BYTES

    assert render_chunk(512, ("rgb", "alpha")) == 8
    for passes in (("rgb", "alpha"), ("rgb", "alpha", "depth", "normal")):
        chunk = render_chunk(4096, passes)  # 8 such frames are 512 MiB to 1 GiB and more
        frame = 4096 * 4096 * 4 * (4 if len(passes) == 2 else 8)
        assert 1 <= chunk < 8 and chunk * frame <= MAX_RENDER_BYTES < (chunk + 1) * frame
    assert len(default_name(tmp_path / ("x" * 300 + ".png"))) == MAX_NAME
    odd = Path(os.fsdecode(b"caf\xe9.png"))  # a Latin-1 name on a UTF-8 file system
    assert default_name(odd) == "caf\ufffd" and default_name(Path(".png")) == ".png"


def test_render_checks_its_field_of_view_and_asks_each_pass_once(tmp_path, service, astronaut_id):
    served = ("--endpoint", service.endpoint)
    # --timeout is render's too: a 2048 px frame with every pass takes far longer than
    # 0.25 s on a CPU, the avatar's lookup about 10 ms (render waited 600 s whatever it said)
    r = run("render", astronaut_id, *served, "--out", tmp_path / "t", "--size", 2048,
            "--passes", "rgb,alpha,depth,normal", "--timeout", "0.25", check=False)  # fmt: skip
    assert r.returncode == 1 and "timeout" in r.stderr, r.stderr
    for fov in ("0", "-30", "180", "nan"):
        r = run("render", astronaut_id, *served, "--out", tmp_path / "x", "--fov", fov,
                check=False)  # fmt: skip
        assert r.returncode == 2 and "over 0 and under 180" in r.stderr, (fov, r.stderr)
    for option, angle in (("--yaw", "nan"), ("--pitch", "inf"), ("--yaw", "left")):
        r = run("render", astronaut_id, *served, "--out", tmp_path / "x", option, angle,
                check=False)  # fmt: skip
        assert r.returncode == 2 and f"argument {option}: must be a number of degrees" in r.stderr
    # the head is framed from outside it at either end of the fov range (the
    # small-angle framing put a 120° camera inside the head, and a 0.2° one past far)
    cover = {}
    for fov in ("30", "120", "0.2"):
        run("render", astronaut_id, *served, "--out", tmp_path / fov, "--size", 32,
            "--fov", fov)  # fmt: skip
        alpha = np.asarray(Image.open(tmp_path / fov / "alpha_0000.png"), np.float32) / 255
        depth = np.load(tmp_path / fov / "depth_0000.npy")
        cover[fov] = (alpha > 0.5).mean()
        assert depth[np.isfinite(depth)].min() > 0.05, fov
    assert 0.3 < cover["30"] < 0.7 and cover["120"] > 0.1
    assert cover["0.2"] == pytest.approx(cover["30"], rel=0.25), cover
    out = tmp_path / "passes"
    run("render", astronaut_id, *served, "--out", out, "--size", 16,
        "--passes", "rgb,alpha,depth,normal,rgb")  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == [
        "alpha_0000.png", "depth_0000.npy", "normal_0000.npy", "rgb_0000.png"]  # fmt: skip
    # rgb alone: its PNG is still straight RGBA (the alpha is rendered, not written)
    alone = tmp_path / "rgb_only"
    run("render", astronaut_id, *served, "--out", alone, "--size", 16, "--passes", "rgb")
    assert sorted(p.name for p in alone.iterdir()) == ["rgb_0000.png"]
    got = np.asarray(Image.open(alone / "rgb_0000.png"))
    assert np.array_equal(got, np.asarray(Image.open(out / "rgb_0000.png")))
    assert got[..., 3].min() == 0  # transparent around the head


def test_a_private_service_that_exits_at_once_says_so(env_store):
    import torch

    r = run("avatars", "--device", "cuda", check=False)
    if torch.cuda.is_available():  # a GPU machine serves it
        assert r.returncode == 0, r.stderr
        return
    assert r.returncode == 1 and "the private service exited (2)" in r.stderr, r.stderr
    assert "no CUDA device" in r.stderr and "within" not in r.stderr


def test_an_endpoint_zeromq_cannot_use_is_one_line_not_a_traceback():
    for endpoint in ("localhost:47611", "tcp://localhost"):
        r = run("avatars", "--endpoint", endpoint, "--json", check=False)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        error = json.loads(r.stdout.splitlines()[-1])["error"]
        assert (
            error["code"] == "cli" and f"cannot use the endpoint '{endpoint}'" in error["message"]
        )


@pytest.mark.parametrize(
    ("command", "signal_name"), [("build", "SIGINT"), ("build", "SIGTERM"), ("demo", "SIGINT")]
)
def test_ctrl_c_during_a_build_cancels_it_on_the_service(
    tmp_path, astronaut_png, command, signal_name
):
    """Ctrl-C, and SIGTERM (a job scheduler, a closed terminal's SIGHUP likewise), cancel
    the build on the service; SIGTERM left it running, and so did Ctrl-C in demo."""
    import signal
    import time

    from .conftest import ServiceProcess

    signum = getattr(signal, signal_name)
    photo = tmp_path / "portrait.png"
    photo.write_bytes(astronaut_png)
    svc = ServiceProcess(tmp_path / "store")
    try:
        first = [str(photo)] if command == "build" else ["--out", str(tmp_path / "demo")]
        cmd = [sys.executable, "-m", "inference_service", command, *first, "--endpoint",
               svc.endpoint, "--preset", "default", "--json"]  # fmt: skip
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while " started" not in svc.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        # the job starts as its reply goes out: a signal before the command has its id
        # stops the command and cannot cancel a job it does not know
        time.sleep(1.0)
        proc.send_signal(signum)
        assert proc.wait(timeout=60) == 128 + signum
        assert f"splatface {command}: build cancelled" in proc.stderr.read().decode()
        # --json's last line on failure, here too (it printed nothing)
        assert json.loads(proc.stdout.read().decode().splitlines()[-1]) == {
            "error": {"code": "cancelled", "message": "build cancelled"}
        }
        while "cancelled" not in svc.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "cancelled" in svc.log.read_text()
        with svc.client() as c:
            assert c.avatars() == []
    finally:
        svc.stop()


def test_avatars_names_the_damaged_ones_it_leaves_out(tmp_path):
    store = tmp_path / "store"
    (store / "0123456789ab").mkdir(parents=True)
    (store / "0123456789ab" / "meta.json").write_text("{not json")
    r = run("avatars", "--store", store, "--json")
    (damaged,) = last_json(r)["damaged"]
    assert damaged["id"] == "0123456789ab" and "is damaged" in damaged["message"]
    assert "splatface avatars: damaged, not listed: avatar 0123456789ab is damaged" in r.stderr


def test_a_port_in_use_and_a_store_that_is_a_file_are_named_as_such(tmp_path):
    """A port another program holds read as a malformed endpoint ('give one such as
    tcp://127.0.0.1:5555'), a --store that is a file as 'File exists'."""
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        endpoint = f"tcp://127.0.0.1:{held.getsockname()[1]}"
        r = run("serve", "--endpoint", endpoint, "--store", tmp_path / "store", check=False)
    assert r.returncode == 1, r.stderr
    assert f"splatface serve: {endpoint} is in use: another service or program listens" in r.stderr
    (tmp_path / "file").write_text("")
    said = f"--store {tmp_path / 'file'} is a file, not a folder"
    r = run("serve", "--store", tmp_path / "file", "--endpoint", "tcp://127.0.0.1:0", check=False)
    assert r.returncode == 1 and f"splatface serve: {said}" in r.stderr, r.stderr
    r = run("avatars", "--store", tmp_path / "file", "--json", check=False)
    assert r.returncode == 1 and said in last_json(r)["error"]["message"]
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")  # a link to nothing
    r = run("avatars", "--store", tmp_path / "gone", check=False)
    assert r.returncode == 1, r.stderr
    assert f"--store {tmp_path / 'gone'} is a link to {tmp_path / 'nowhere'}, which does not" in (
        r.stderr
    )


def test_ctrl_c_too_late_to_cancel_names_the_avatar_kept(client, astronaut_png, capsys):
    """Ctrl-C while the service saves (past the build's last check) cannot stop it: the
    CLI said nothing and left the avatar behind unnamed."""
    from inference_service.cli import say_cancelled

    job = client.build(astronaut_png, name="late", preset="fast")
    kept = client.wait(job, timeout=300)["avatar_id"]
    said = say_cancelled(client, job)  # the job ended as a cancel reached it: as if saving
    assert f"too late to cancel: the build was saving, and kept avatar {kept}" in said
    assert f"splatface rm {kept} removes it" in said
    client.delete(kept)


def test_ctrl_c_in_a_terminal_cancels_a_build_on_a_private_service(tmp_path, astronaut_png):
    """A terminal's Ctrl-C signals the command's whole process group: the private service
    went with it, and the cancel then waited out every attempt (90 s) and blamed the
    service. Now the command cancels the build, stops its service, and says so."""
    import signal
    import time

    photo, store = tmp_path / "portrait.png", tmp_path / "store"
    photo.write_bytes(astronaut_png)
    cmd = [sys.executable, "-m", "inference_service", "build", str(photo), "--store", str(store),
           "--preset", "default", "--json"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)  # fmt: skip
    log, deadline = store / "service.log", time.monotonic() + 180
    try:
        # the build has begun once MediaPipe, which detects the face, logs its delegate
        # (the service itself logs warnings only)
        while not (log.is_file() and "XNNPACK" in log.read_text(errors="replace")):
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
            time.sleep(0.2)
        started = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal does
        assert proc.wait(timeout=60) == 130
        assert time.monotonic() - started < 30
        assert "splatface build: build cancelled" in proc.stderr.read().decode()
        assert json.loads(proc.stdout.read().decode().splitlines()[-1]) == {
            "error": {"code": "cancelled", "message": "build cancelled"}
        }
        serving = []  # and the private service is gone
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            with contextlib.suppress(OSError):  # a process that ended meanwhile
                if str(store).encode() in cmdline.read_bytes():
                    serving.append(cmdline)
        assert serving == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_pass_files_sort_in_frame_order_past_frame_9999(tmp_path):
    from inference_service.cli import write_passes

    passes = {"alpha": np.zeros((2, 4, 4), np.float32)}
    assert [Path(f).name for f in write_passes(tmp_path, 7, passes, last=8)] == [
        "alpha_0007.png", "alpha_0008.png"]  # fmt: skip
    names = [Path(f).name for f in write_passes(tmp_path, 9999, passes, last=10000)]
    assert names == ["alpha_09999.png", "alpha_10000.png"] and names == sorted(names)


def test_export_rigged_bundle(tmp_path, service, astronaut_id):
    import zipfile

    folder = tmp_path / "rig"
    r = last_json(run("export", astronaut_id, "--endpoint", service.endpoint, "--bundle",
                      "--out", folder, "--json"))  # fmt: skip
    names = sorted(Path(f).name for f in r["files"])
    assert names == ["bundle.json", "gaussians.npz", "head.glb", "rest.ply"]
    manifest = json.loads((folder / "bundle.json").read_text())
    assert manifest["arkit_names"] == list(ARKIT_NAMES)
    assert (folder / "head.glb").read_bytes()[:4] == b"glTF"
    with np.load(folder / "gaussians.npz", allow_pickle=False) as g:
        assert len(g["triangle"]) == PlyData.read(folder / "rest.ply")["vertex"].count
    zipped = tmp_path / "rig.zip"
    run("export", astronaut_id, "--endpoint", service.endpoint, "--bundle", "--out", zipped)
    with zipfile.ZipFile(zipped) as z:
        assert z.read("bundle.json") == (folder / "bundle.json").read_bytes()
    bad = run("export", astronaut_id, "--endpoint", service.endpoint, "--bundle", "--range",
              "0:1", "--out", folder, check=False)  # fmt: skip
    assert bad.returncode != 0 and "--bundle" in bad.stderr
    # a bundle that cannot be written whole leaves the one there as it was, not half new
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    (folder / "bundle.json").write_text("{}")
    before["bundle.json"] = b"{}"
    (folder / "gaussians.npz").unlink()
    (folder / "gaussians.npz").mkdir()
    bad = run("export", astronaut_id, "--endpoint", service.endpoint, "--bundle", "--out", folder,
              check=False)  # fmt: skip
    assert bad.returncode == 1 and "gaussians.npz" in bad.stderr, bad.stderr
    assert (folder / "bundle.json").read_bytes() == b"{}"
    assert (folder / "head.glb").read_bytes() == before["head.glb"]
    assert sorted(p.name for p in folder.iterdir()) == names  # no temporary file left


def test_export_frame_and_range(tmp_path, service, astronaut_id):
    curves = np.zeros((4, 52), np.float32)
    curves[:, index_of("mouthSmileLeft")] = np.linspace(0, 1, 4)
    npy = tmp_path / "curves.npy"
    np.save(npy, curves)
    one = tmp_path / "one.ply"
    run("export", astronaut_id, "--endpoint", service.endpoint, "--out", one,
        "--curves", npy, "--frame", 3)  # fmt: skip
    assert PlyData.read(one)["vertex"].count > 1000
    three = tmp_path / "three.ply"
    run("export", astronaut_id, "--endpoint", service.endpoint, "--out", three,
        "--curves", npy, "--frame", 3, "--sh-degree", 3)  # fmt: skip
    a, b = PlyData.read(one)["vertex"], PlyData.read(three)["vertex"]
    assert len(b.properties) == 62 and len(a.properties) == 17  # 3DGS's training output's
    assert not any(b[f"f_rest_{i}"].any() for i in range(45))
    for p in a.properties:
        np.testing.assert_array_equal(a[p.name], b[p.name])
    folder = tmp_path / "seq"
    r = last_json(run("export", astronaut_id, "--endpoint", service.endpoint, "--out", folder,
                      "--curves", npy, "--range", "1:3", "--json"))  # fmt: skip
    assert [Path(f).name for f in r["files"]] == [
        "frame_00001.ply",
        "frame_00002.ply",
        "frame_00003.ply",
    ]
    a, b = (PlyData.read(folder / f"frame_0000{i}.ply")["vertex"] for i in (1, 3))
    assert not np.allclose(a["x"], b["x"])
    # a shorter take into the same folder: the earlier take's other frames are named
    r = run("export", astronaut_id, "--endpoint", service.endpoint, "--out", folder,
            "--curves", npy, "--range", "2:2")  # fmt: skip
    assert "also holds 2 file(s) like these that this command did not write (frame_00001.ply" in (
        r.stdout
    )
    bad = run("export", astronaut_id, "--endpoint", service.endpoint, "--out", folder,
              "--curves", npy, "--range", "2:9", check=False)  # fmt: skip
    assert bad.returncode != 0 and "the curves have 4 (0 to 3)" in bad.stderr
    # a folder where the last frame goes: none of the range is written, the old files stay
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    blocked = tmp_path / "blocked"
    (blocked / "frame_00003.ply").mkdir(parents=True)
    bad = run("export", astronaut_id, "--endpoint", service.endpoint, "--out", blocked,
              "--curves", npy, "--range", "0:3", check=False)  # fmt: skip
    assert bad.returncode != 0 and "frame_00003.ply" in bad.stderr
    assert [p.name for p in blocked.iterdir()] == ["frame_00003.ply"]
    (folder / "frame_00003.ply").unlink()
    (folder / "frame_00003.ply").mkdir()
    np.save(tmp_path / "reversed.npy", curves[::-1])  # other poses: frames 1-2 would change
    bad = run("export", astronaut_id, "--endpoint", service.endpoint, "--out", folder,
              "--curves", tmp_path / "reversed.npy", "--range", "1:3", check=False)  # fmt: skip
    assert bad.returncode != 0
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == {
        k: v for k, v in before.items() if k != "frame_00003.ply"
    }
    for extra, message in (
        (("--curves", npy, "--frame", 4), "the curves have 4 (0 to 3)"),
        (("--curves", npy, "--frame", -1), "0 or more, got '-1'"),
        (("--frame", 1), "give it"),
        (("--curves", npy, "--frame", 1, "--range", "0:1"), "not both"),
    ):
        bad = run("export", astronaut_id, "--endpoint", service.endpoint, "--out", one, *extra,
                  check=False)  # fmt: skip
        assert bad.returncode != 0 and message in bad.stderr, (extra, bad.stderr)
    bad = run("render", astronaut_id, "--endpoint", service.endpoint, "--out", folder, "--curves",
              npy, "--fps", "nan", check=False)  # fmt: skip
    assert bad.returncode != 0 and "positive number or a fraction such as" in bad.stderr


def test_errors_are_clear_and_typed(tmp_path, service):
    r = run("render", "nobody", "--endpoint", service.endpoint, "--out", tmp_path, check=False)
    assert r.returncode == 1 and "not_found" in r.stderr
    r = run("render", "nobody", "--endpoint", service.endpoint, "--out", tmp_path, "--json",
            check=False)  # fmt: skip
    assert last_json(r)["error"]["code"] == "not_found"
    bad = tmp_path / "bad.csv"
    bad.write_text("jawOpen,smileHarder\n0.1,0.2\n")
    r = run("render", "nobody", "--endpoint", service.endpoint, "--curves", bad, "--out", tmp_path,
            check=False)  # fmt: skip
    assert r.returncode != 0 and "smileHarder" in r.stderr and "eyeBlinkLeft" in r.stderr
    r = run("build", tmp_path / "missing.jpg", "--endpoint", service.endpoint, check=False)
    assert r.returncode != 0 and "cannot read" in r.stderr
    (tmp_path / "empty.jpg").write_bytes(b"")  # named, not "array 'image' is empty"
    r = run("build", tmp_path / "empty.jpg", "--endpoint", service.endpoint, check=False)
    assert r.returncode != 0 and "empty.jpg is empty (0 bytes)" in r.stderr
    for box in ("1,2,x,4", "1 2 3 4", "10,10,5,20"):
        r = run("build", tmp_path / "missing.jpg", "--face-box", box, check=False)
        assert r.returncode == 2 and "X0,Y0,X1,Y1" in r.stderr and "Traceback" not in r.stderr
    r = run("build", tmp_path / "missing.jpg", "--face", 1, "--face-box", "1,2,3,4", check=False)
    assert r.returncode == 2 and "not allowed with argument" in r.stderr
    # usage errors answer --json as JSON too
    r = run("render", "anyone", "--size", 0, "--out", tmp_path / "r", "--json", check=False)
    assert r.returncode == 2 and "usage:" in r.stderr
    assert "--size: 0 is not in 1..4096" in json.loads(r.stdout)["error"]["message"]


def test_demo_writes_what_it_names(tmp_path):
    out = tmp_path / "demo"
    r = last_json(run("demo", "--out", out, "--preset", "fast", "--size", 64, "--json"))
    for key in ("input", "turntable", "animation"):
        assert Path(r[key]).exists()
    assert len(list(Path(r["turntable"]).glob("rgb_*.png"))) == 12
    assert len(list(Path(r["animation"]).glob("depth_*.npy"))) == 36
    assert load_animation(Path(r["animation"]) / "curves.csv").fps == 24  # as it was made
    assert len(r["ply"]) == 2 and all(PlyData.read(p)["vertex"].count > 1000 for p in r["ply"])
    assert all(Path(p).stat().st_size > 0 for p in r["preview"])
    assert zipfile.ZipFile(r["bundle"]).namelist()[0] == "bundle.json"
    assert str(out) in r["summary"]
    assert r["store"] == str(out / "store") and r["store"] in r["summary"]
    assert (out / "store" / "service.log").exists()
    # a rerun replaces its avatar: the name stays unambiguous for eval and the rest
    again = last_json(run("demo", "--out", out, "--preset", "fast", "--size", 32, "--json"))
    listed = last_json(run("avatars", "--store", out / "store", "--json"))
    assert [a["id"] for a in listed["avatars"]] == [again["avatar_id"]]
    (tmp_path / "file").write_text("")
    for args in (("--out", tmp_path / "file"), ("--size", 0)):
        r = run("demo", *args, "--json", check=False)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr


def test_frame_rates_take_fractions_and_ntsc_shorthand():
    assert frame_rate("25") == 25.0 and frame_rate("12.5") == 12.5
    assert frame_rate("30000/1001") == 30000 / 1001
    for short, base in (("23.976", 24), ("23.98", 24), ("29.97", 30), ("59.94", 60),
                        ("119.88", 120)):  # fmt: skip
        assert frame_rate(short) == base * 1000 / 1001
    for bad in ("0", "-24", "1/0", "nan", "inf", "30/", "x", "24fps"):
        with pytest.raises(argparse.ArgumentTypeError, match="fraction such as 30000/1001"):
            frame_rate(bad)


def test_usage_errors_answer_json_in_process(tmp_path, capsys):
    """``main(argv)`` reads ``--json`` from the argv it is given, not from ``sys.argv``."""
    with pytest.raises(SystemExit) as exc:
        main(["render", "anyone", "--size", "0", "--out", str(tmp_path / "r"), "--json"])
    assert exc.value.code == 2
    out = capsys.readouterr()
    assert "--size: 0 is not in 1..4096" in json.loads(out.out)["error"]["message"]
    assert "usage:" in out.err


def test_every_option_is_documented():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    expected = {"serve", "keys", "build", "render", "export", "track", "avatars", "rm", "demo",
                "eval"}  # fmt: skip
    assert set(sub.choices) == expected
    for name, sp in sub.choices.items():
        for action in sp._actions:
            if action.dest != "help":
                assert action.help, f"splatface {name}: {action.dest} has no help text"
    assert "--range" in run("export", "--help").stdout


def test_live_link_face_style_csv(tmp_path):
    header = (
        ["Timecode", "BlendShapeCount"]
        + [n[0].upper() + n[1:] for n in ARKIT_NAMES]
        + ["HeadYaw", "HeadPitch", "HeadRoll"]
    )
    row = ["00:00:00:01.0", "61"] + ["0"] * 52 + ["0.1", "0", "0"]
    row[2 + index_of("jawOpen")] = "0.75"
    f = tmp_path / "llf.csv"
    f.write_text(",".join(header) + "\n" + ",".join(row) + "\n")
    curves = load_curves(f)
    assert curves.shape == (1, 52) and curves[0, index_of("jawOpen")] == pytest.approx(0.75)
    assert curves.sum() == pytest.approx(0.75)


@pytest.mark.parametrize(
    "portrait, min_psnr",
    # whole head mask at the input view, fast preset: measured 25.3 and 19.6 dB
    [("astronaut", 22.0), ("hopper", 18.0)],
)
def test_eval_metrics_of_the_sample_portraits(request, tmp_path, service, portrait, min_psnr):
    avatar = request.getfixturevalue(f"{portrait}_id")
    photo = tmp_path / "photo.png"
    photo.write_bytes(request.getfixturevalue(f"{portrait}_png"))
    out = tmp_path / "eval"
    m = last_json(run("eval", avatar, "--endpoint", service.endpoint, "--photo", photo,
                      "--out", out, "--size", 128, "--json"))  # fmt: skip
    sheet = np.asarray(Image.open(out / "contact_sheet.png"))
    assert sheet.shape == (256, 640, 3)  # 9 views, 5 per row, 128 px each
    assert json.loads((out / "metrics.json").read_text())["input_view"] == m["input_view"]
    assert m["input_view"]["psnr_db"] > min_psnr and m["input_view"]["mask_pixels"] > 5000
    with service.client() as c:  # measured in the person mask the build fitted to
        box = c.get(avatar, mesh=False, rig=False).header["meta"]["photo_head_box"]
    assert m["input_view"]["head_box"] == pytest.approx(box, abs=0.01)
    assert set(m["views"]) == {"+30", "-30", "+60", "-60", "profile", "back", "top"}
    for name, v in m["views"].items():
        # measured 0.988-1.0 and <= 0.0002: no holes, no floaters
        assert v["coverage"] >= 0.97 and v["stray"] < 0.005, name
        assert v["floaters"] <= v["stray"] and v["stray_reach_px"] >= 0, name
    for side in ("+30", "-30"):
        view = m["views"][side]
        assert view["face_found"] and view["landmark_rms"] < 0.1, side  # measured 0.05-0.07


def test_eval_refuses_another_photo_and_a_file_for_a_folder(tmp_path, service, astronaut_id,
                                                            astronaut, hopper):  # fmt: skip
    other = tmp_path / "other.png"  # the same size as hers: only the pixels tell
    Image.fromarray(np.ascontiguousarray(hopper[:512, :512])).save(other)
    same = tmp_path / "same.jpg.png"  # hers, in another file: still hers
    Image.fromarray(astronaut).save(same)
    (tmp_path / "file").write_text("")
    cases = [(other, tmp_path / "e1", "not the one avatar"), (same, tmp_path / "file", "is a file")]
    for photo, out, message in cases:
        r = run("eval", astronaut_id, "--endpoint", service.endpoint, "--photo", photo,
                "--out", out, "--size", 32, "--json", check=False)  # fmt: skip
        assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr
        assert message in json.loads(r.stdout.splitlines()[-1])["error"]["message"]
    assert not (tmp_path / "e1").exists()


def test_eval_refuses_a_photo_file_that_is_no_image_itself(tmp_path, capsys):
    """The CLI decodes eval's photo, so a file that is no image is its own error (``cli``,
    naming the file), as build's unreadable or empty photo is; it was ``bad_image``,
    naming no file. Refused before any service is asked (nothing listens there)."""
    (tmp_path / "notes.txt").write_text("not a photo\n")
    (tmp_path / "empty.jpg").write_bytes(b"")
    cases = [("notes.txt", "notes.txt: not a readable image"),
             ("empty.jpg", "empty.jpg is empty (0 bytes)"),
             ("missing.jpg", "cannot read " + str(tmp_path / "missing.jpg"))]  # fmt: skip
    for name, message in cases:
        with pytest.raises(SystemExit) as exc:
            main(["eval", "0" * 12, "--photo", str(tmp_path / name), "--endpoint",
                  "tcp://127.0.0.1:58101", "--out", str(tmp_path / "e"), "--json"])  # fmt: skip
        assert message in str(exc.value.code)
        error = json.loads(capsys.readouterr().out.splitlines()[-1])["error"]
        assert error["code"] == "cli" and message in error["message"]
    assert not (tmp_path / "e").exists()


def test_eval_keeps_too_large_and_waits_for_a_render_as_timeout_says(
    tmp_path, capsys, service, astronaut_id, astronaut
):
    """A photo over the pixel limit keeps its ``too_large`` code (the CLI's own check made
    it ``cli``); each render waits ``timeout`` (600 s whatever ``--timeout`` said)."""
    from inference_service.evaluate import evaluate

    huge = tmp_path / "huge.png"
    Image.new("L", (9000, 9000)).save(huge)
    assert main(["eval", "0" * 12, "--photo", str(huge), "--endpoint", "tcp://127.0.0.1:58102",
                 "--json"]) == 1  # fmt: skip
    error = json.loads(capsys.readouterr().out.splitlines()[-1])["error"]
    assert error["code"] == "too_large" and str(huge) in error["message"]
    with Client(service.endpoint) as client:  # its own timeout: the default 30 s
        with pytest.raises(ProtocolError) as exc:
            evaluate(client, astronaut_id, astronaut, tmp_path / "e", size=2048, timeout=0.3)
    assert exc.value.code == "timeout" and "'render'" in exc.value.message


def test_main_in_a_script_leaves_its_signal_handlers_as_they_were(tmp_path):
    """main() handles SIGTERM and SIGHUP while a command runs (they stop it as Ctrl-C
    does); a script or test calling it keeps its own handlers afterwards."""
    import signal

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    with pytest.raises(SystemExit):
        main(["eval", "0" * 12, "--photo", str(tmp_path / "missing.jpg"), "--endpoint",
              "tcp://127.0.0.1:58103"])  # fmt: skip
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_eval_tells_floaters_from_a_soft_edge():
    """``stray`` counts every faint pixel more than 3 px outside the silhouette;
    ``floaters`` only those in blobs that do not touch it."""
    from inference_service.evaluate import _silhouette_stats

    yy, xx = np.mgrid[:200, :200]
    r = np.hypot(yy - 100.0, xx - 100.0)
    disc = np.clip((60.5 - r) / 1.0, 0.0, 1.0)  # a hard edge: nothing outside
    clean = _silhouette_stats(disc)
    assert clean["coverage"] == 1.0 and clean["stray"] == clean["floaters"] == 0.0
    assert clean["stray_reach_px"] == 0.0
    soft = np.maximum(disc, 0.5 * np.exp(-np.maximum(r - 60.0, 0.0) / 2.5))  # reaches ~9 px
    blob = np.hypot(yy - 20.0, xx - 20.0) <= 3.0  # a 29-pixel puff in the air
    m = _silhouette_stats(np.where(blob, 0.3, soft))
    outside = 200 * 200 - (r <= 63.5).sum()  # roughly: beyond the 3-px band
    assert m["floaters"] == pytest.approx(blob.sum() / outside, rel=0.05)
    assert m["stray"] > 5 * m["floaters"]  # the soft edge is most of it
    assert 5.0 < m["stray_reach_px"] < 60.0  # the puff is ~50 px out
    edge_only = _silhouette_stats(soft)
    assert edge_only["floaters"] == 0.0 and edge_only["stray"] > 0
    assert 6.0 <= edge_only["stray_reach_px"] <= 10.0


def test_eval_lays_the_render_over_the_photo():
    """Input-view PSNR compares the render laid over the photo: where the avatar covers
    nothing the photo shows through unchanged, where it covers all only its colour is
    seen, and a half-covered pixel is the linear mean of the two."""
    from inference_service.evaluate import _srgb8
    from inference_service.images import srgb_to_linear

    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (6, 7, 3)).astype(np.uint8)
    under = srgb_to_linear(photo / 255.0)
    colour = rng.random((6, 7, 3))
    for a in (0.0, 0.5, 1.0):
        alpha = np.full((6, 7), a)
        got = _srgb8(a * colour, alpha, under).astype(int)
        want = a * colour + (1 - a) * under
        assert np.abs(got - linear_to_srgb8(want).astype(int)).max() <= 1, a
    assert np.array_equal(_srgb8(0 * colour, np.zeros((6, 7)), under), photo)


def test_eval_measures_a_photo_over_4096_px_scaled_down(tmp_path, service, astronaut_id,
                                                        astronaut):  # fmt: skip
    """Builds take photos to 8k, renders are at most 4096 px a side: eval renders the
    input view scaled down (it asked for the photo's size and was refused). Her avatar,
    as if built from her photo 9 times as large (4608 px), measures as she does."""
    import shutil

    from inference_service.images import pixels_sha256

    from .conftest import ServiceProcess

    k = 9
    big = np.repeat(np.repeat(astronaut, k, 0), k, 1)
    shutil.copytree(service.store / astronaut_id, tmp_path / "store" / astronaut_id)
    meta_file = tmp_path / "store" / astronaut_id / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["source"] = {"width": 512 * k, "height": 512 * k}
    meta["photo_sha256"] = pixels_sha256(big)
    meta["photo_camera"]["intrinsics"] = [k * v for v in meta["photo_camera"]["intrinsics"]]
    meta["photo_head_box"] = [k * v for v in meta["photo_head_box"]]
    meta_file.write_text(json.dumps(meta))
    photo, small = tmp_path / "big.png", tmp_path / "small.png"
    Image.fromarray(big).save(photo)
    Image.fromarray(astronaut).save(small)
    svc = ServiceProcess(tmp_path / "store")
    try:
        big_view = last_json(run("eval", astronaut_id, "--endpoint", svc.endpoint, "--photo",
                                 photo, "--out", tmp_path / "b", "--size", 32,
                                 "--json"))["input_view"]  # fmt: skip
    finally:
        svc.stop()
    small_view = last_json(run("eval", astronaut_id, "--endpoint", service.endpoint, "--photo",
                               small, "--out", tmp_path / "s", "--size", 32,
                               "--json"))["input_view"]  # fmt: skip
    assert big_view["scale"] == round(4096 / 4608, 5) and small_view["scale"] == 1.0
    assert big_view["psnr_db"] == pytest.approx(small_view["psnr_db"], abs=1.0)
    assert big_view["mask_pixels"] == pytest.approx(small_view["mask_pixels"] * 8**2, rel=0.05)


def test_eval_refuses_a_different_photo(tmp_path, service, astronaut_id):
    wrong = tmp_path / "small.png"
    Image.fromarray(np.zeros((100, 120, 3), np.uint8)).save(wrong)
    r = run("eval", astronaut_id, "--endpoint", service.endpoint, "--photo", wrong, check=False)
    assert r.returncode != 0 and "built from a 512x512 photo" in r.stderr


def test_rm_keeps_an_avatars_exports_and_says_where(tmp_path, service, astronaut_id):
    import shutil

    from .conftest import ServiceProcess

    shutil.copytree(service.store / astronaut_id, tmp_path / "store" / astronaut_id)
    svc = ServiceProcess(tmp_path / "store")
    try:
        with svc.client() as c:
            files = c.export(astronaut_id, to="folder").header["files"]
        removed = last_json(run("rm", astronaut_id, "--endpoint", svc.endpoint, "--json"))
        folder = tmp_path / "store" / "exports" / astronaut_id
        assert removed == {"deleted": astronaut_id, "exports": str(folder)}
        assert all(Path(f).is_file() for f in files) and not (svc.store / astronaut_id).exists()
        shutil.copytree(service.store / astronaut_id, tmp_path / "store" / astronaut_id)
        text = run("rm", astronaut_id, "--endpoint", svc.endpoint).stdout
        assert f"its exports stay in {folder}" in text
    finally:
        svc.stop()
