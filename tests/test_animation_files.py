"""Curves files: Live Link Face CSV read/write, splatface CSV, .npy, and the Client's paths."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest

from inference_service.curves import load_curves, save_curves_csv
from protocol import (
    ARKIT_NAMES,
    LLF_COLUMNS,
    Animation,
    animation,
    format_timecode,
    head_rotation,
    load_animation,
    parse_timecode,
    save_livelink_csv,
)
from protocol.animation import (
    EYE_COLUMNS,
    HEAD_COLUMNS,
    LLF_SHAPE_NAMES,
    MAX_HELD,
    infer_fps,
)
from protocol.arkit import index_of
from protocol.camera import framing_distance, intrinsics_from_fov, orbit

PASCAL = [n[0].upper() + n[1:] for n in ARKIT_NAMES]


def random_animation(frames: int, fps: float | None, seed: int = 0) -> Animation:
    rng = np.random.default_rng(seed)
    return Animation(
        curves=rng.random((frames, 52)),
        fps=fps,
        head_angles=rng.normal(scale=0.3, size=(frames, 3)),
        eye_angles=rng.normal(scale=0.2, size=(frames, 2, 3)),
    )


def write(tmp_path: Path, header: list[str], rows: list[list], name: str = "take.csv") -> Path:
    f = tmp_path / name
    lines = [",".join(header)] + [",".join(str(v) for v in row) for row in rows]
    f.write_text("\n".join(lines) + "\n")
    return f


def llf_row(timecode: str, values: dict[str, float] | None = None, count: int = 61) -> list:
    values = values or {}
    return [timecode, count, *(values.get(n, 0.0) for n in LLF_COLUMNS[2:])]


# -- round trips ------------------------------------------------------------------------


@pytest.mark.parametrize("fps", [15, 24, 25, 30, 50, 60, 90])
def test_livelink_round_trip(tmp_path, fps):
    src = random_animation(frames=int(fps * 1.5) + 3, fps=fps, seed=fps)
    f = tmp_path / "take.csv"
    save_livelink_csv(f, src)
    got = load_animation(f)
    assert got.fps == fps
    np.testing.assert_allclose(got.curves, src.curves, atol=1e-6)
    np.testing.assert_allclose(got.head_angles, src.head_angles, atol=1e-6)
    np.testing.assert_allclose(got.eye_angles, src.eye_angles, atol=1e-6)
    assert got.missing == ()
    assert got.timecodes[0] == "00:00:00:00.000" and got.timecodes[fps] == "00:00:01:00.000"
    # and a second round trip keeps the file's own timecodes
    save_livelink_csv(tmp_path / "again.csv", got)
    assert (tmp_path / "again.csv").read_text() == f.read_text()


@pytest.mark.parametrize(
    "rate", [24, 25, 30, 50, 60, 15, 48, 90, 100, 120, 30000 / 1001, 24000 / 1001, 12.5]
)
def test_our_takes_under_a_second_read_back_at_their_rate(tmp_path, rate):
    # the timecodes state no rate: a take that never wraps at a second read as 30 fps
    # (24 fps 25 % fast, 60 fps twice as slow), so ours start on a second's last label
    f = tmp_path / "take.csv"
    clock = math.ceil(rate)
    for frames in (2, 6, clock - 1):
        codes = save_livelink_csv(f, random_animation(frames, rate, seed=frames))
        got = load_animation(f)
        assert got.fps == clock and got.row_rate() == pytest.approx(rate, rel=1e-9)
        np.testing.assert_allclose(got.row_times(), np.arange(frames) / rate, atol=2e-5)
        assert got.fill_dropped()[1] == 0
        assert codes[0] == f"00:00:00:{clock - 1:02d}.000" and codes[1].startswith("00:00:01:")
    assert save_livelink_csv(f, np.zeros((1, 52)), fps=rate) == ("00:00:00:00.000",)


def test_row_times_follow_the_timecodes_through_dropped_frames(tmp_path):
    rows = [i for i in range(130) if i % 60 not in (20, 21)]  # 60 fps, two dropped a second
    codes = tuple(format_timecode(3600 + i / 60, 60) for i in rows)
    f = tmp_path / "take.csv"
    save_livelink_csv(f, Animation(curves=np.zeros((len(rows), 52)), timecodes=codes))
    got = load_animation(f)
    assert got.fps == 60
    np.testing.assert_allclose(got.row_times(), (np.array(rows) - rows[0]) / 60, atol=1e-9)
    assert load_animation(f).row_times()[-1] == pytest.approx(129 / 60)
    assert Animation(curves=np.zeros((2, 52)), fps=30.0).row_times() is None  # no timecodes
    twice = ("10:00:00:01.000", "10:00:00:01.000")  # no time can be told for the second row
    assert Animation(np.zeros((2, 52)), fps=60.0, timecodes=twice).row_times() is None


def test_a_take_across_midnight_keeps_its_rate_and_length():
    # 60 fps on the app's 30 fps clock (FF.000, FF.500), 23:59:59 into the next day: the
    # same take recorded at noon plays at 60 fps for 2 s; it read as 30 fps, 4 s long
    def take(start):
        codes = tuple(format_timecode(start + i / 60, 30) for i in range(120))
        return Animation(curves=np.zeros((120, 52)), fps=30.0, timecodes=codes)

    noon, night = take(12 * 3600.0 - 1), take(24 * 3600.0 - 1)
    assert night.timecodes[0] == "23:59:59:00.000" and night.timecodes[-1] == "24:00:00:29.500"
    wrapped = tuple(("00" + tc[2:]) if tc.startswith("24") else tc for tc in night.timecodes)
    night = Animation(curves=night.curves, fps=30.0, timecodes=wrapped)
    np.testing.assert_allclose(night.row_times(), noon.row_times(), atol=1e-9)
    assert night.row_times()[-1] == pytest.approx(119 / 60)
    assert night.row_rate() == noon.row_rate() == 60


def test_fill_dropped_repeats_the_row_before_each_dropped_frame():
    rows = [0, 1, 2, 5, 6, 9]  # 60 fps on the 30 fps clock, frames 3, 4, 7, 8 dropped
    curves = np.zeros((6, 52))
    curves[:, 0] = np.arange(6) / 10
    head = np.arange(18, dtype=float).reshape(6, 3) / 100
    codes = tuple(format_timecode(i / 60, 30) for i in rows)
    take = Animation(curves=curves, fps=30.0, head_angles=head, timecodes=codes,
                     missing=("tongueOut",))  # fmt: skip
    filled, added = take.fill_dropped()
    held = [0, 1, 2, 2, 2, 3, 4, 4, 4, 5]
    assert added == 4 and filled.frames == 10 and filled.fps == 60
    np.testing.assert_array_equal(filled.curves, take.curves[held])
    np.testing.assert_array_equal(filled.head_angles, head[held])
    assert filled.eye_angles is None and filled.missing == ("tongueOut",)
    assert filled.fill_dropped()[1] == 0 and filled.row_rate() == 60
    whole = Animation(curves=curves, fps=30.0, timecodes=codes[:3] + tuple(
        format_timecode(i / 60, 30) for i in (3, 4, 5)))  # fmt: skip
    assert whole.fill_dropped() == (whole, 0)  # nothing dropped: the take itself
    assert Animation(curves=curves).fill_dropped()[1] == 0  # no timecodes


def test_a_drop_frame_take_across_midnight_steps_one_frame():
    codes = ("23:59:59;28", "23:59:59;29", "00:00:00;00", "00:00:00;01")
    take = Animation(np.zeros((4, 52)), fps=30000 / 1001, timecodes=codes)
    np.testing.assert_allclose(take.row_times() * take.fps, [0, 1, 2, 3], atol=1e-6)
    assert take.fill_dropped()[1] == 0


@pytest.mark.parametrize("rate", [30000 / 1001, 60000 / 1001, 24000 / 1001, 12.5])
def test_our_own_files_at_rates_of_no_whole_frames_read_back_at_them(tmp_path, rate):
    # what track writes for a 29.97 video: counted at 29.97 on a 30 clock, its rows read
    # back as a 30 fps take with a frame dropped every 33 s
    f = tmp_path / "take.csv"
    codes = save_livelink_csv(f, np.zeros((3000, 52)), fps=rate)
    got = load_animation(f)
    assert got.row_rate() == pytest.approx(rate, rel=1e-9) and got.fill_dropped()[1] == 0
    np.testing.assert_allclose(got.row_times(), np.arange(3000) / rate, atol=2e-5)
    assert codes[1] == format_timecode(1 / rate, math.ceil(rate))


def test_a_gap_of_more_than_max_held_is_no_dropped_frame():
    def take(gap_s):
        codes = [format_timecode(3600 + i / 60, 60) for i in range(30)]
        codes += [format_timecode(3600 + gap_s + i / 60, 60) for i in range(30, 60)]
        return Animation(np.zeros((60, 52)), fps=60.0, timecodes=tuple(codes))

    assert take(4 * 3600).fill_dropped()[1] == 0  # two takes in one file: joined
    assert take(MAX_HELD + 1).fill_dropped()[1] == 0
    filled, added = take(5.0).fill_dropped()  # a phone's hiccup: held
    assert added == 5 * 60 and filled.frames == 60 + added


def test_a_timecode_written_twice_leaves_the_row_rate():
    codes = [format_timecode(i / 60, 30) for i in range(120)]
    codes[40] = codes[39]
    take = Animation(curves=np.zeros((120, 52)), fps=30.0, timecodes=tuple(codes))
    assert take.row_times() is None and take.row_rate() == 60


def test_drop_frame_timecodes_read_at_29_97(tmp_path):
    # SMPTE drop-frame: labels ;00 and ;01 skipped each minute but every tenth
    nominal, rate = 30, 30000 / 1001

    def label(n):  # frame count → drop-frame label
        tens, rest = divmod(n, 17982)
        extra = 0 if rest < 2 else 2 * ((rest - 2) // 1798)
        n += 18 * tens + extra
        f, s = n % nominal, n // nominal
        return f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d};{f:02d}"

    n = 17982 + 40  # ten minutes and a bit
    codes = [label(i) for i in range(n)]
    assert codes[1799:1801] == ["00:00:59;29", "00:01:00;02"] and codes[17982] == "00:10:00;00"
    f = tmp_path / "df.csv"
    save_livelink_csv(f, Animation(curves=np.zeros((n, 52)), timecodes=tuple(codes)))
    got = load_animation(f)
    assert got.fps == pytest.approx(rate) and infer_fps(codes) == pytest.approx(rate)
    np.testing.assert_allclose(got.row_times(), np.arange(n) / rate, atol=1e-9)
    assert got.row_rate() == pytest.approx(rate)
    # the same labels with ':' are a 30 fps clock's, read as they are
    assert infer_fps([c.replace(";", ":") for c in codes[:100]]) == 30


def test_written_layout_is_live_link_face(tmp_path):
    f = tmp_path / "take.csv"
    save_livelink_csv(f, np.zeros((3, 52), np.float32), fps=60)
    lines = f.read_text().splitlines()
    header = lines[0].split(",")
    assert header[:2] == ["Timecode", "BlendShapeCount"] and len(header) == 63
    assert header[2:54] == list(LLF_SHAPE_NAMES) and sorted(header[2:54]) == sorted(PASCAL)
    # Live Link Face's own order: Apple's, but Right before Left for jaw and mouth sideways
    assert header.index("JawRight") + 1 == header.index("JawLeft")
    assert header.index("MouthRight") + 1 == header.index("MouthLeft")
    assert header[54:] == [*HEAD_COLUMNS, *EYE_COLUMNS]
    # under a second: from a second's last frame, so the labels wrap and show the rate
    assert [line.split(",")[:2] for line in lines[1:]] == [
        ["00:00:00:59.000", "61"], ["00:00:01:00.000", "61"], ["00:00:01:01.000", "61"]
    ]  # fmt: skip
    assert all(len(line.split(",")) == 63 for line in lines)
    assert list(tmp_path.iterdir()) == [f]  # no temporary file left behind


def test_save_curves_csv_writes_livelink_face(tmp_path):
    curves = np.zeros((40, 52), np.float32)
    curves[:, index_of("jawOpen")] = np.linspace(0, 1, 40)
    curves[3, index_of("mouthLeft")] = 0.5
    f = tmp_path / "curves.csv"
    save_curves_csv(f, curves, fps=24)
    assert f.read_text().startswith("Timecode,BlendShapeCount,EyeBlinkLeft,")
    np.testing.assert_allclose(load_curves(f), curves, atol=1e-6)
    got = load_animation(f)
    assert got.fps == 24 and got.missing == ()
    np.testing.assert_array_equal(got.head_angles, 0)
    save_curves_csv(f, curves[:2])  # overwrites atomically, default 30 fps
    assert len(load_curves(f)) == 2


def test_npy_files(tmp_path):
    curves = np.random.default_rng(3).random((5, 52)).astype(np.float32)
    np.save(tmp_path / "c.npy", curves)
    got = load_animation(tmp_path / "c.npy")
    np.testing.assert_array_equal(got.curves, curves)
    assert got.fps is None and got.head_angles is None and got.timecodes is None
    np.save(tmp_path / "one.npy", curves[0].astype(np.float64))
    assert load_animation(tmp_path / "one.npy").curves.shape == (1, 52)


# -- reading other writers' files -------------------------------------------------------


def test_hand_written_livelink_sample_read_by_name(tmp_path):
    # A take at 60 fps as the app writes it: wall-clock timecodes with sub-frames, crossing
    # a second; columns in another order than ours (matched by name).
    frames = [
        ("14:03:52:57.207", {"JawOpen": 0.10, "MouthLeft": 0.02, "HeadYaw": 0.05}),
        ("14:03:52:58.213", {"JawOpen": 0.20, "EyeBlinkLeft": 0.9, "HeadPitch": -0.1}),
        ("14:03:52:59.198", {"JawOpen": 0.30, "TongueOut": 0.4, "LeftEyeYaw": 0.12}),
        ("14:03:53:00.204", {"JawOpen": 0.40, "BrowInnerUp": 0.7, "RightEyeRoll": -0.03}),
        ("14:03:53:01.211", {"JawOpen": 0.50, "MouthSmileRight": 0.6, "HeadRoll": 0.2}),
    ]
    columns = list(LLF_COLUMNS)
    random.Random(7).shuffle(columns)
    rows = []
    for tc, values in frames:
        cells = {"Timecode": tc, "BlendShapeCount": "61"}
        cells.update({name: f"{v:.8f}" for name, v in values.items()})
        rows.append([cells.get(c, "0.00000000") for c in columns])
    got = load_animation(write(tmp_path, columns, rows))
    assert got.fps == 60
    assert got.timecodes == tuple(tc for tc, _ in frames)
    assert got.missing == ()
    jaw = got.curves[:, index_of("jawOpen")]
    np.testing.assert_allclose(jaw, [0.1, 0.2, 0.3, 0.4, 0.5], atol=1e-7)
    assert got.curves[0, index_of("mouthLeft")] == pytest.approx(0.02)
    assert got.curves[1, index_of("eyeBlinkLeft")] == pytest.approx(0.9)
    assert got.curves[2, index_of("tongueOut")] == pytest.approx(0.4)
    assert got.curves[3, index_of("browInnerUp")] == pytest.approx(0.7)
    assert got.curves[4, index_of("mouthSmileRight")] == pytest.approx(0.6)
    assert got.curves.sum() == pytest.approx(1.5 + 0.02 + 0.9 + 0.4 + 0.7 + 0.6)
    np.testing.assert_allclose(got.head_angles[:, 0], [0.05, 0, 0, 0, 0])
    np.testing.assert_allclose(got.head_angles[:, 1], [0, -0.1, 0, 0, 0])
    np.testing.assert_allclose(got.head_angles[:, 2], [0, 0, 0, 0, 0.2])
    assert got.eye_angles[2, 0, 0] == pytest.approx(0.12)  # subject's left eye, yaw
    assert got.eye_angles[3, 1, 2] == pytest.approx(-0.03)  # right eye, roll


def test_splatface_csv_any_order_and_case_with_frame_column(tmp_path):
    f = write(tmp_path, ["frame", "JAWOPEN", "eyeblinkright", "TongueOut"],
              [[0, 0.5, 0.25, 1.0], [1, 0.0, 1.3, -0.1]])  # fmt: skip
    got = load_animation(f)
    assert got.fps is None and got.timecodes is None and got.head_angles is None
    assert got.curves[0, index_of("jawOpen")] == pytest.approx(0.5)
    assert got.curves[0, index_of("eyeBlinkRight")] == pytest.approx(0.25)
    assert got.curves[1, index_of("eyeBlinkRight")] == 1.0  # clamped
    assert got.curves[1, index_of("tongueOut")] == 0.0  # clamped
    assert len(got.missing) == 49 and "jawOpen" not in got.missing
    assert got.missing[0] == "eyeBlinkLeft"  # canonical order, Apple's spelling


def test_older_and_newer_livelink_variants(tmp_path):
    # older: no eye columns, a different BlendShapeCount, a one-digit sub-frame
    header = ["Timecode", "BlendShapeCount", *PASCAL, *HEAD_COLUMNS]
    row = ["00:00:00:01.0", "55"] + ["0"] * 52 + ["0.1", "0", "0"]
    row[2 + index_of("jawOpen")] = "0.75"
    got = load_animation(write(tmp_path, header, [row]))
    assert got.eye_angles is None and got.head_angles[0, 0] == pytest.approx(0.1)
    assert got.curves[0, index_of("jawOpen")] == pytest.approx(0.75) and got.fps == 30
    # eyes without roll columns; spelled BlendshapeCount; a trailing comma on every line
    header = ["Timecode", "BlendshapeCount", *PASCAL, "LeftEyeYaw", "LeftEyePitch",
              "RightEyeYaw", "RightEyePitch", ""]  # fmt: skip
    row = ["00:00:00:00.000", "61"] + ["0"] * 52 + ["0.1", "0.2", "0.3", "0.4", ""]
    got = load_animation(write(tmp_path, header, [row]))
    np.testing.assert_allclose(got.eye_angles[0], [[0.1, 0.2, 0], [0.3, 0.4, 0]])
    assert got.head_angles is None
    # newer: an extra bookkeeping column
    header = ["Frame", "Timecode", "BlendShapeCount", *PASCAL]
    got = load_animation(write(tmp_path, header, [["7", "00:00:00:00.000", "61"] + ["0.5"] * 52]))
    np.testing.assert_allclose(got.curves, 0.5)


def test_rows_without_a_face_hold_the_tracked_frame(tmp_path):
    header = ["Timecode", "BlendShapeCount", "JawOpen", "HeadYaw", "HeadPitch", "HeadRoll"]
    rows = [
        ["00:00:00:00.000", 0],  # no face yet: takes the first tracked frame
        ["00:00:00:01.000", 61, 0.2, 0.1, 0, 0],
        ["00:00:00:02.000", 0, 0, 0, 0, 0],  # lost the face: holds the frame before
        ["00:00:00:03.000", 61, 0.6, 0.3, 0, 0],
        ["00:00:00:04.000", 0, ""],  # a trailing comma, or empty cells: no face either
        ["00:00:00:05.000", 0, "", "", ""],
    ]
    got = load_animation(write(tmp_path, header, rows))
    np.testing.assert_allclose(got.curves[:, index_of("jawOpen")], [0.2, 0.2, 0.2, 0.6, 0.6, 0.6])
    np.testing.assert_allclose(got.head_angles[:, 0], [0.1, 0.1, 0.1, 0.3, 0.3, 0.3])
    assert len(got.timecodes) == 6
    with pytest.raises(ValueError, match="no frame has tracking data"):
        load_animation(write(tmp_path, header, [rows[0], rows[2]]))


@pytest.mark.parametrize("lead", ["", "\n", " \n\n"])
@pytest.mark.parametrize("sep", [";", "\t"])
def test_semicolon_and_tab_delimited_csv(tmp_path, lead, sep):
    f = tmp_path / "excel.csv"
    f.write_text(f"{lead}frame{sep}jawOpen\n0{sep}0.5\n")  # blank lines before the header
    assert load_animation(f).curves[0, index_of("jawOpen")] == pytest.approx(0.5)


# -- timecodes and frame rates -----------------------------------------------------------


def test_parse_and_format_timecode():
    assert parse_timecode("14:03:52:28.207") == (14, 3, 52, pytest.approx(28.207))
    assert parse_timecode("00:00:01:05") == (0, 0, 1, 5.0)
    assert format_timecode(0.0, 60) == "00:00:00:00.000"
    assert format_timecode(45 / 60, 60) == "00:00:00:45.000"
    assert format_timecode(3600 + 61 + 7 / 30, 30) == "01:01:01:07.000"
    assert format_timecode(1.5 / 30, 30) == "00:00:00:01.500"  # half a frame
    assert format_timecode(29 / 30 - 1e-12, 30) == "00:00:00:29.000"
    assert format_timecode(3 - 1e-12, 30) == "00:00:03:00.000"  # rounding carries
    for bad in ("1:2:3", "00:00:00:aa", "00:61:00:00", "12.5", ""):
        with pytest.raises(ValueError, match="timecode"):
            parse_timecode(bad)


def test_fps_inferred_from_timecodes():
    def codes(fps, n, start=0.0):
        return [format_timecode(start + i / fps, fps) for i in range(n)]

    for fps in (24, 25, 30, 48, 50, 60):
        assert infer_fps(codes(fps, fps + 5)) == fps  # FF wraps: largest FF + 1
    assert infer_fps(codes(60, 50)[10:] + []) == 60  # under a second, FF past 30: 60
    assert infer_fps(codes(60, 20)) == 30  # under a second, FF below 30: Epic's 30
    assert infer_fps(codes(60, 80)[1::2]) == 60  # dropped frames still wrap at 59
    assert infer_fps(codes(60, 80)[:58] + codes(60, 80)[60:]) == 60  # second's last frames lost
    for fps in (10, 15, 90, 240):  # what track writes for other videos reads back as it is
        assert infer_fps(codes(fps, fps + 5)) == fps
    assert infer_fps([]) is None


def test_row_rate_is_how_fast_the_rows_come():
    def take(codes, fps):
        return Animation(curves=np.zeros((len(codes), 52)), fps=fps, timecodes=tuple(codes))

    def stamped(capture, clock, n, step=1.0):
        return [format_timecode(i * step / capture, clock) for i in range(n)]

    assert take(stamped(30, 30, 90), 30).row_rate() == 30  # one timecode frame a row
    assert take(stamped(60, 30, 120), 30).row_rate() == 60  # FF.000, FF.500
    assert take(stamped(24, 30, 96), 30).row_rate() == 24  # FF.000, FF.250, ...
    ntsc = [format_timecode(i * 1.001 / 30, 30) for i in range(300)]  # 29.97 on a 30 clock
    assert ntsc[1] == "00:00:00:01.001"
    assert take(ntsc, 30).row_rate() == pytest.approx(30000 / 1001, abs=1e-12)
    dropped = stamped(60, 60, 200)
    del dropped[50:53], dropped[120]  # a capture that dropped frames: still 60
    assert take(dropped, 60).row_rate() == 60
    assert take(stamped(15, 15, 40), 15).row_rate() == 15  # track's own rates as they are
    assert Animation(curves=np.zeros((3, 52))).row_rate() is None
    assert Animation(curves=np.zeros((3, 52)), fps=25).row_rate() == 25  # no timecodes


def test_untracked_rows_may_leave_their_frame_number_out(tmp_path):
    """A take with a frame column whose untracked rows (count 0) stop after their count or
    leave the rest empty, as the loader takes them without the column."""
    header = ["Timecode", "BlendShapeCount", "Frame", "JawOpen"]
    rows = [["00:00:00:00.000", 61, 0, 0.1], ["00:00:00:01.000", 0],
            ["00:00:00:02.000", 61, 2, 0.3], ["00:00:00:03.000", 0, "", ""],
            ["00:00:00:04.000", 61, 4, 0.5]]  # fmt: skip
    anim = load_animation(write(tmp_path, header, rows))
    assert anim.curves[:, index_of("jawOpen")] == pytest.approx([0.1, 0.1, 0.3, 0.3, 0.5])
    rows[2][2] = 3  # the untracked row before was frame 1: this is 2
    with pytest.raises(ValueError, match="line 4: Frame 3 follows 1"):
        load_animation(write(tmp_path, header, rows))


def test_a_frame_column_must_count_up_by_one(tmp_path):
    header = ["frame", "jawOpen"]
    ok = write(tmp_path, header, [[1001, 0.1], [1002, 0.2], [1003, 0.3]])
    assert load_animation(ok).curves[:, index_of("jawOpen")].tolist() == pytest.approx(
        [0.1, 0.2, 0.3]
    )
    for frames, line, words in (
        ([0, 10, 20], 3, "frame 10 follows 0"),
        ([2, 1, 0], 3, "frame 1 follows 2"),
        ([0, 1, 1], 4, "frame 1 follows 1"),
        ([0, 1.5, 2], 3, "frame '1.5' is not a whole frame number"),
    ):
        f = write(tmp_path, header, [[n, 0.5] for n in frames])
        with pytest.raises(ValueError, match=f"line {line}: {words}"):
            load_animation(f)


# -- errors -----------------------------------------------------------------------------


def test_unknown_columns_list_the_valid_names(tmp_path):
    f = write(tmp_path, ["Timecode", "JawOpen", "JawOpenish"], [["00:00:00:00.000", 0, 0]])
    with pytest.raises(ValueError, match="take.csv: unknown column.*'JawOpenish'.*valid") as e:
        load_animation(f)
    assert "eyeBlinkLeft" in str(e.value) and "tongueOut" in str(e.value)
    assert "HeadYaw" in str(e.value)


@pytest.mark.parametrize(
    "header, rows, message",
    [
        (["JawOpen", "jawopen"], [[0, 0]], "'jawopen' appears twice"),
        (["Timecode", "BlendShapeCount", "JawOpen"], [["00:00:00:00.000", 61, 0.1, 0.2]],
         "line 2 has 4 values, the header has 3 columns"),
        (["frame", "JawOpen"], [[0, 0.1], [1]], "line 3 has 1 values"),
        (["frame", "JawOpen"], [[0, "abc"]], "line 2, column JawOpen: 'abc' is not a number"),
        (["frame", "JawOpen"], [[0, ""]], "line 2, column JawOpen: is empty"),
        # a frame of empty cells is not dropped: every later frame would play early
        (["JawOpen", "MouthLeft"], [[0.1, 0.2], ["", ""], [0.3, 0.4]],
         "line 3, column JawOpen: is empty"),
        (["frame", "JawOpen", "MouthLeft"], [[0, 0.1, 0.2], [1, 0.1, "nan"]],
         "NaN value for MouthLeft at frame 1 \\(line 3\\)"),
        (["HeadYaw", "HeadPitch", "HeadRoll", "JawOpen"], [[0, 0, "-inf", 0.1]],
         "infinite value for HeadRoll at frame 0"),
        (["frame", "JawOpen"], [[0, 0.5], [1, 75.0]],
         "weight 75 for jawOpen at frame 1 \\(line 3\\) is far outside \\[0, 1\\]"),
        (["JawOpen", "HeadYaw", "HeadPitch"], [[0, 0, 0]], "not HeadRoll"),
        (["JawOpen", "LeftEyeYaw", "RightEyeYaw"], [[0, 0, 0]], "eye angles need"),
        (["Timecode", "BlendShapeCount", "HeadYaw", "HeadPitch", "HeadRoll"],
         [["00:00:00:00.000", 61, 0, 0, 0]], "no ARKit shape columns"),
        (["Timecode", "JawOpen"], [["00:00:00", 0.1]], "line 2: timecode '00:00:00'"),
        (["Timecode", "BlendShapeCount", "JawOpen"], [["00:00:00:00.000", "x", 0.1]],
         "column BlendShapeCount: 'x' is not a number"),
        (["Timecode", "BlendShapeCount", "JawOpen"], [["00:00:00:00.000", 60.5, 0.1]],
         "BlendShapeCount '60.5' is not a count"),
        (["Timecode", "BlendShapeCount", "JawOpen"], [["00:00:00:00.000", "inf", 0.1]],
         "BlendShapeCount 'inf' is not a count"),
        (["frame", "JawOpen"], [[0, "0_5"]], "line 2, column JawOpen: '0_5' is not a number"),
        (["0.1"] * 52, [[0.1] * 52], "line 1 is numbers, not a header"),
        (["frame", "JawOpen"], [], "a header but no frames"),
        # an untracked row that stops before its timecode cannot be placed in time
        (["BlendShapeCount", "Timecode", "JawOpen"], [[61, "00:00:00:00.000", 0.1], [0]],
         "line 3 has 1 values, the header has 3 columns"),
    ],
)  # fmt: skip
def test_csv_errors_name_file_line_and_column(tmp_path, header, rows, message):
    f = write(tmp_path, header, rows, name="bad.csv")
    with pytest.raises(ValueError, match=f"bad.csv: .*{message}"):
        load_animation(f)


def test_missing_shapes_are_zero_and_recorded(tmp_path):
    names = [n for n in PASCAL if n not in ("TongueOut", "CheekPuff")]
    got = load_animation(write(tmp_path, names, [[0.3] * 50]))
    assert got.missing == ("cheekPuff", "tongueOut")
    assert got.curves[0, index_of("tongueOut")] == 0 and got.curves[0, 0] == pytest.approx(0.3)


def test_file_level_errors(tmp_path):
    (tmp_path / "empty.csv").write_text("\n\n")
    with pytest.raises(ValueError, match="empty.csv: the file is empty"):
        load_animation(tmp_path / "empty.csv")
    with pytest.raises(ValueError, match="nope.csv: no such file"):
        load_animation(tmp_path / "nope.csv")
    with pytest.raises(ValueError, match="take.json: curves must be a .csv"):
        load_animation(tmp_path / "take.json")
    (tmp_path / "empty.npy").write_bytes(b"")
    (tmp_path / "text.npy").write_text("jawOpen\n0.5\n")
    np.savez(tmp_path / "archive.npz", curves=np.zeros((2, 52)))
    (tmp_path / "archive.npz").rename(tmp_path / "archive.npy")
    no_header = "not a .npy array \\(it has no NumPy header\\): save curves with numpy.save"
    for name, message in (("empty", no_header), ("text", no_header),
                          ("archive", "a .npz archive, not a .npy array")):  # fmt: skip
        with pytest.raises(ValueError, match=f"{name}.npy: {message}"):
            load_animation(tmp_path / f"{name}.npy")
    (tmp_path / "utf16.csv").write_text("jawOpen\n0.5\n", encoding="utf-16")  # Excel's
    with pytest.raises(ValueError, match="utf16.csv: the file is UTF-16 text .*save it as CSV"):
        load_animation(tmp_path / "utf16.csv")
    np.save(tmp_path / "c51.npy", np.zeros((4, 51), np.float32))
    with pytest.raises(ValueError, match="c51.npy: wrong curve count.*\\[4, 51\\]"):
        load_animation(tmp_path / "c51.npy")
    nan = np.zeros((3, 52))
    nan[2, index_of("jawOpen")] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    with pytest.raises(ValueError, match="nan.npy: NaN weight at frame 2, shape jawOpen"):
        load_animation(tmp_path / "nan.npy")
    np.save(tmp_path / "pct.npy", np.full((2, 52), 50.0))
    with pytest.raises(ValueError, match="pct.npy: weight 50 for eyeBlinkLeft at frame 0"):
        load_animation(tmp_path / "pct.npy")
    np.save(tmp_path / "txt.npy", np.array([["a"] * 52]))
    with pytest.raises(ValueError, match="txt.npy: curves must be numbers"):
        load_animation(tmp_path / "txt.npy")
    np.save(tmp_path / "none.npy", np.zeros((0, 52)))
    with pytest.raises(ValueError, match="none.npy: the array has no frames"):
        load_animation(tmp_path / "none.npy")


def test_animation_validates_its_fields():
    with pytest.raises(ValueError, match="head_angles must have shape \\[2, 3\\]"):
        Animation(curves=np.zeros((2, 52)), head_angles=np.zeros((3, 3)))
    with pytest.raises(ValueError, match="1 timecodes for 2 frames"):
        Animation(curves=np.zeros((2, 52)), timecodes=("00:00:00:00.000",))
    with pytest.raises(ValueError, match="fps must be a positive number"):
        Animation(curves=np.zeros((2, 52)), fps=0)
    with pytest.raises(ValueError, match="shape eyeBlinkLeft"):
        Animation(curves=np.full((2, 52), np.nan))


# -- head transforms --------------------------------------------------------------------


def test_head_transforms_identity_at_zero_and_without_angles():
    anim = Animation(curves=np.zeros((3, 52)), head_angles=np.zeros((3, 3)))
    np.testing.assert_allclose(anim.head_transforms([0, 0.02, -0.1]), np.tile(np.eye(4), (3, 1, 1)))
    np.testing.assert_array_equal(Animation(curves=np.zeros((2, 52))).head_transforms([0, 0, 0]),
                                  np.tile(np.eye(4), (2, 1, 1)))  # fmt: skip


def apply(m: np.ndarray, p) -> np.ndarray:
    return m[:3, :3] @ np.asarray(p, float) + m[:3, 3]


def test_head_angle_signs():
    nose, top = [0, -1.0, 0], [0, 0, 1.0]
    angles = np.array([[0.3, 0, 0], [0, 0.3, 0], [0, 0, 0.3]])
    yaw, pitch, roll = Animation(curves=np.zeros((3, 52)), head_angles=angles).head_transforms(
        [0, 0, 0]
    )
    assert apply(yaw, nose)[0] > 0.25  # turns towards the subject's left (+X)
    assert apply(yaw, top) == pytest.approx(top)
    assert apply(pitch, nose)[2] < -0.25  # nods down
    assert apply(pitch, nose)[0] == pytest.approx(0)
    assert apply(roll, top)[0] < -0.25  # tilts towards the subject's right shoulder (-X)
    assert apply(roll, nose) == pytest.approx(nose)


def test_head_transforms_are_proper_rotations_about_the_pivot():
    rng = np.random.default_rng(5)
    angles = rng.uniform(-np.pi, np.pi, size=(50, 3))
    pivot = np.array([0.0, 0.03, -0.12])
    m = Animation(curves=np.zeros((50, 52)), head_angles=angles).head_transforms(pivot)
    r = m[:, :3, :3]
    np.testing.assert_allclose(r @ r.transpose(0, 2, 1), np.tile(np.eye(3), (50, 1, 1)), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(r), 1, atol=1e-12)
    np.testing.assert_allclose(m[:, 3], np.tile([0, 0, 0, 1.0], (50, 1)))
    for k in range(50):
        np.testing.assert_allclose(apply(m[k], pivot), pivot, atol=1e-12)
    # yaw, then pitch about the turned head's left axis, then roll about its forward axis
    y, p, rr = angles[0]
    expected = head_rotation(y, 0, 0) @ head_rotation(0, p, 0) @ head_rotation(0, 0, rr)
    np.testing.assert_allclose(r[0], expected, atol=1e-12)


# -- the Client takes paths ---------------------------------------------------------------


def test_client_accepts_a_curves_file(tmp_path, client, astronaut_id):
    curves = np.zeros((3, 52), np.float32)
    curves[:, index_of("jawOpen")] = [0, 0.5, 1]
    f = tmp_path / "take.csv"
    save_curves_csv(f, curves)
    np.save(tmp_path / "take.npy", curves)
    info = client.get(astronaut_id, mesh=False, rig=False).header["avatar"]
    k = intrinsics_from_fov(48, 48, 30.0)
    w2c = orbit(info["center"], framing_distance(info["radius"], 30.0))
    by_array = client.render(astronaut_id, k, w2c, 48, 48, curves=curves)
    for path in (f, str(tmp_path / "take.npy")):
        by_file = client.render(astronaut_id, k, w2c, 48, 48, curves=path)
        np.testing.assert_allclose(by_file["rgb"], by_array["rgb"], atol=1e-4)
    ply_file = client.export(astronaut_id, curves=str(f), frame=2).arrays["file"]
    ply_array = client.export(astronaut_id, curves=curves, frame=2).arrays["file"]
    assert ply_file.tobytes() == ply_array.tobytes()
    with pytest.raises(ValueError, match="curve_names cannot be given with a curves file"):
        client.render(astronaut_id, k, w2c, 48, 48, curves=f, curve_names=["jawOpen"])
    with pytest.raises(ValueError, match="missing.csv: no such file"):
        client.export(astronaut_id, curves=tmp_path / "missing.csv")


def test_blank_lines_and_trailing_empty_rows_are_not_frames(tmp_path):
    f = tmp_path / "spaced.csv"
    f.write_text("jawOpen,eyeBlinkLeft\n0.1,0.2\n   \n0.3,0.4\n,\n")
    curves = load_animation(f).curves
    assert curves.shape == (2, 52) and curves[1, index_of("jawOpen")] == pytest.approx(0.3)


# -- the one-pass reader ------------------------------------------------------------------


def _one_pass(path: Path) -> tuple[animation._Table | None, list[str], str]:
    """The table the one-pass reader makes of a file (None where it declines), and the
    file's lines and delimiter."""
    lines, plain = animation._read_lines(path)
    delimiter = animation._delimiter(lines)
    return (animation._plain_table(lines, delimiter) if plain else None), lines, delimiter


def _variant(text: str, variant: str) -> str:
    lines = text.splitlines()
    if variant == "crlf":
        return "\r\n".join(lines) + "\r\n"
    if variant == "bom":
        return "\ufeff" + text
    if variant == "semicolons":
        return text.replace(",", ";")
    if variant == "trailing commas":
        return "\n".join(line + "," for line in lines) + "\n"
    if variant == "spaced cells":
        return text.replace(",", " ,\t")
    if variant == "blank lines around":
        return "\n \n,,\n" + text + "\n,,\n\n"
    if variant == "untracked rows":  # count 0, the values left in (the first row's too)
        for i in (1, 5, 6):
            lines[i] = lines[i].replace(",61,", ",0,")
        return "\n".join(lines) + "\n"
    if variant == "frame column":
        return "\n".join(
            ["Frame," + lines[0]] + [f"{100 + i},{s}" for i, s in enumerate(lines[1:])]
        )
    return text


@pytest.mark.parametrize(
    "variant",
    ["as written", "crlf", "bom", "semicolons", "trailing commas", "spaced cells",
     "blank lines around", "untracked rows", "frame column"],
)  # fmt: skip
def test_the_one_pass_reader_reads_as_the_row_by_row_reader(tmp_path, variant):
    # Large takes are parsed by numpy in one pass; where it takes a file, its table must
    # be the row-by-row reader's to the bit (an untracked row's values are never read).
    f = tmp_path / "take.csv"
    save_livelink_csv(f, random_animation(40, None, seed=3), fps=30)
    f.write_bytes(_variant(f.read_text(), variant).encode())
    fast, lines, delimiter = _one_pass(f)
    assert fast is not None, "the one-pass reader declined the file"
    slow = animation._row_table(animation._read_rows(lines, delimiter))
    assert fast.columns == slow.columns and list(fast.lines) == list(slow.lines)
    assert fast.timecodes == slow.timecodes and fast.parsed == slow.parsed
    np.testing.assert_array_equal(fast.untracked, slow.untracked)
    tracked = ~slow.untracked
    assert fast.values[tracked].tobytes() == slow.values[tracked].tobytes()
    assert load_animation(f).curves.tobytes() == animation._animation(slow).curves.tobytes()


@pytest.mark.parametrize(
    "text",
    [
        # quotes: csv.reader's cells are not the line split at the delimiter (2 cells, not 3)
        'jawOpen,time,timestamp\n0.5,"a,b"\n',
        "jawOpen,time\n0.5,\u00e9\n",  # not ASCII
        "jawOpen\n0_5\n",  # float() reads it as 5
        "jawOpen\n0.1\n\n0.2\n",  # a blank line between frames: numpy skips it
        "jawOpen,mouthLeft\n0.1,0.2\n0.3,0.4,0.5\n",  # a row too long
        "jawOpen,time\n0.1,0\n0.2\n",  # too short, though numpy finds every number
        "jawOpen\nnan\n",
        "frame,jawOpen\n0,0.1\n2,0.2\n",
        "Timecode,BlendShapeCount,jawOpen\n00:00:00:00,0\n00:00:00:01,61,0.5\n",  # cut short
        "Timecode,BlendShapeCount,jawOpen\n00:00:00:00,0,\n00:00:00:01,61,0.5\n",  # left empty
        "Timecode,BlendShapeCount,jawOpen\n00:00:00:00,-1,0.5\n",
        "Timecode,jawOpen\n00:00:61:00,0.5\n",
    ],
)
def test_the_one_pass_reader_leaves_odd_files_to_the_row_by_row_reader(tmp_path, text):
    f = tmp_path / "odd.csv"
    f.write_bytes(text.encode())
    assert _one_pass(f)[0] is None
