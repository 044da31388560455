"""The avatar store (atomic, validated, confined), the .ply layout, and posing."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json

import numpy as np
import pytest
from plyfile import PlyData

from inference_service.avatar import Avatar, BoundGaussians
from inference_service.export.ply import ply_bytes, property_names
from inference_service.geometry import quat_to_rotmat, rotmat_to_quat
from inference_service.images import srgb_to_linear
from inference_service.posing import pose, split_transform
from inference_service.store import STALE_SECONDS, Store
from kernels.sh import C0, rgb_to_sh0
from protocol import errors
from protocol.arkit import index_of
from protocol.errors import ProtocolError
from protocol.files import atomic_write, atomic_write_all


def tiny_avatar(avatar_id="0123456789ab", sh_degree=0, n=5, seed=0) -> Avatar:
    rng = np.random.default_rng(seed)
    verts = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32) * 0.1
    tris = np.array([[0, 1, 2], [0, 3, 1]], np.int32)
    deltas = np.zeros((52, 4, 3), np.float32)
    deltas[index_of("jawOpen"), 3] = [0, 0, -0.05]  # moves vertex 3 down
    bary = rng.dirichlet(np.ones(3), n).astype(np.float32)
    g = BoundGaussians(
        triangle=(np.arange(n) % 2).astype(np.int32),
        bary=bary,
        offset=np.zeros(n, np.float32),
        rotation=np.tile(np.array([1, 0, 0, 0], np.float32), (n, 1)),
        log_scale=np.full((n, 3), np.log(0.01), np.float32),
        opacity_logit=np.zeros(n, np.float32),
        sh=rng.normal(size=(n, (sh_degree + 1) ** 2, 3)).astype(np.float32),
    )
    return Avatar(avatar_id, "tiny", verts, tris, deltas, g, np.array([100.0, 100, 32, 32]),
                  np.eye(4), {"created": "2026-01-01T00:00:00"})  # fmt: skip


def test_store_round_trip_and_listing(tmp_path):
    store = Store(tmp_path)
    av = tiny_avatar()
    store.save(av)
    back = store.load(av.id)
    np.testing.assert_array_equal(back.gaussians.sh, av.gaussians.sh)
    np.testing.assert_array_equal(back.vertices, av.vertices)
    (entry,) = store.list()
    assert entry["id"] == av.id and entry["name"] == "tiny" and len(entry["center"]) == 3
    assert store.resolve("tiny") == av.id and store.resolve(av.id) == av.id
    with pytest.raises(ProtocolError):
        store.save(av)  # an id is never overwritten
    store.delete(av.id)
    assert store.list() == []
    with pytest.raises(ProtocolError) as e:
        store.load(av.id)
    assert e.value.code == errors.NOT_FOUND


def test_a_listing_rereads_only_the_metas_that_changed(tmp_path, monkeypatch):
    """Names resolve through a listing; a store of thousands read every meta.json each
    time. What changed (a meta replaced, an avatar gone or added, even by another service
    on the store) still shows at once."""
    store = Store(tmp_path)
    for avatar_id in ("aaaaaaaaaaaa", "bbbbbbbbbbbb"):
        store.save(tiny_avatar(avatar_id))
    first = store.list()
    reads = []
    real = Store.meta
    monkeypatch.setattr(Store, "meta", lambda self, i: reads.append(i) or real(self, i))
    assert store.list() == first and reads == []
    first[0]["name"] = "changed by a caller"  # a caller's copy, not the store's
    meta_file = tmp_path / "bbbbbbbbbbbb" / "meta.json"
    meta = json.loads(meta_file.read_text())
    atomic_write(meta_file, json.dumps({**meta, "name": "renamed"}).encode())
    Store(tmp_path).save(tiny_avatar("cccccccccccc"))  # another service's
    listed = store.list()
    assert [m["name"] for m in listed] == ["tiny", "renamed", "tiny"]
    assert reads == ["bbbbbbbbbbbb", "cccccccccccc"]
    assert store.resolve("renamed") == "bbbbbbbbbbbb"
    store.delete("aaaaaaaaaaaa")
    assert [m["id"] for m in store.list()] == ["bbbbbbbbbbbb", "cccccccccccc"]


@pytest.mark.parametrize("ref", ["../etc", "/etc/passwd", "..", "0123456789ab/../../x", ".tmp-x"])
def test_ids_cannot_escape_the_store(tmp_path, ref):
    store = Store(tmp_path / "s")
    for call in (store.load, store.delete, store.resolve, store.meta):
        with pytest.raises(ProtocolError) as e:
            call(ref)
        assert e.value.code == errors.NOT_FOUND


def test_damaged_avatars_are_skipped_and_refused(tmp_path):
    store = Store(tmp_path)
    good, bad = tiny_avatar("aaaaaaaaaaaa"), tiny_avatar("bbbbbbbbbbbb")
    store.save(good)
    store.save(bad)
    npz = tmp_path / bad.id / "avatar.npz"
    data = bytearray(npz.read_bytes())
    data[len(data) // 2] ^= 0xFF
    npz.write_bytes(bytes(data))
    with pytest.raises(ProtocolError, match="damaged"):
        store.load(bad.id)
    (tmp_path / "cccccccccccc").mkdir()  # no meta.json
    (tmp_path / "dddddddddddd").mkdir()
    (tmp_path / "dddddddddddd" / "meta.json").write_text("{not json")
    for damaged, meta in (("eeeeeeeeeeee", {}), ("ffffffffffff", {"name": "x", "created": 5}),
                          ("999999999999", {"name": "x"})):  # fmt: skip
        (tmp_path / damaged).mkdir()
        (tmp_path / damaged / "meta.json").write_text(json.dumps({"id": damaged, **meta}))
    (tmp_path / "eeeeeeeeeeee" / "avatar.npz").write_bytes(b"x")
    (tmp_path / "ffffffffffff" / "avatar.npz").write_bytes(b"x")  # 999999999999 has none
    # summaries of the wrong types, as a meta.json edited by hand has them: clients frame
    # cameras with the centre and radius and show the warnings
    summary = json.loads((tmp_path / good.id / "meta.json").read_text())
    for damaged, wrong in (("777777777777", {"center": "abc"}), ("777777777778", {"radius": "r"}),
                           ("777777777779", {"center": [0, 0]}),
                           ("77777777777a", {"warnings": ["turned"]})):  # fmt: skip
        (tmp_path / damaged).mkdir()
        (tmp_path / damaged / "avatar.npz").write_bytes(npz.read_bytes())
        text = json.dumps({**summary, "id": damaged, "name": "y", **wrong})
        (tmp_path / damaged / "meta.json").write_text(text)
        with pytest.raises(ProtocolError, match="damaged meta.json"):
            store.meta(damaged)
    assert [m["id"] for m in store.list()] == ["aaaaaaaaaaaa"]
    # named as damaged, which the listing left out in silence (only the log said so); the
    # one whose load failed too, from then on (listings read no avatar.npz)
    listed, damaged = store.listing()
    assert [m["id"] for m in listed] == ["aaaaaaaaaaaa"]
    said = {d["id"]: d["message"] for d in damaged}
    assert set(said) == {"bbbbbbbbbbbb", "cccccccccccc", "dddddddddddd", "eeeeeeeeeeee",
                         "ffffffffffff", "999999999999", "777777777777", "777777777778",
                         "777777777779", "77777777777a"}  # fmt: skip
    assert "has no avatar.npz" in said["999999999999"] and "meta.json" in said["cccccccccccc"]
    assert said["bbbbbbbbbbbb"].endswith("is damaged and cannot be loaded: checksum mismatch")
    store.save(tiny_avatar("aaaaaaaaaaab"))
    with pytest.raises(ProtocolError, match="2 avatars are named 'tiny'"):  # past the damaged
        store.resolve("tiny")
    with pytest.raises(ProtocolError, match="no avatar with id or name 'nobody'"):
        store.resolve("nobody")


def test_odd_files_in_a_store_are_damaged_avatars_not_a_hang_or_a_crash(tmp_path):
    """A hand-edited meta.json with a number msgpack cannot hold stopped the service at
    the next list; a FIFO for a meta.json hung list (and every client behind it); a link
    to /dev/zero was read until memory ran out. Each is a damaged avatar now."""
    import os
    import threading

    store = Store(tmp_path)
    good = tiny_avatar("aaaaaaaaaaaa")
    store.save(good)
    summary = json.loads((tmp_path / good.id / "meta.json").read_text())
    for damaged, wrong in (("111111111111", {"gaussians": 10**20}),
                           ("111111111112", {"radius": -(10**30)}),
                           ("111111111113", {"center": [0, 0, 2**64]}),
                           ("111111111114", {"preset": 10**20}),
                           ("111111111115", {"warnings": [{"code": 10**20, "message": ""}]}),
                           ):  # fmt: skip
        (tmp_path / damaged).mkdir()
        (tmp_path / damaged / "meta.json").write_text(
            json.dumps({**summary, "id": damaged, **wrong})
        )
        with pytest.raises(ProtocolError, match="damaged meta.json"):
            store.meta(damaged)
    (tmp_path / "222222222222").mkdir()
    os.mkfifo(tmp_path / "222222222222" / "meta.json")
    (tmp_path / "333333333333").mkdir()
    os.symlink("/dev/zero", tmp_path / "333333333333" / "meta.json")
    listed: list = []
    lister = threading.Thread(target=lambda: listed.append(store.list()), daemon=True)
    lister.start()
    lister.join(timeout=20)
    assert listed and [m["id"] for m in listed[0]] == [good.id]
    for damaged in ("222222222222", "333333333333"):
        with pytest.raises(ProtocolError, match="is damaged: meta.json is not a regular file"):
            store.meta(damaged)
    npz = tmp_path / good.id / "avatar.npz"
    npz.unlink()
    os.symlink("/dev/zero", npz)
    with pytest.raises(ProtocolError, match="avatar.npz is not a regular file"):
        store.load(good.id)


def test_an_avatar_deleted_while_it_loads_is_not_found_not_damaged(tmp_path):
    class Racing(Store):
        def meta(self, avatar_id):
            meta = super().meta(avatar_id)
            self.delete(avatar_id)  # another request deletes it between the two reads
            return meta

    store = Racing(tmp_path)
    store.save(tiny_avatar())
    with pytest.raises(ProtocolError) as e:
        store.load("0123456789ab")
    assert e.value.code == errors.NOT_FOUND


def rewrite_npz(folder, arrays=None, data=None) -> None:
    """Replace an avatar's ``avatar.npz`` by ``arrays`` (or the bytes ``data``) and
    checksum it again in its meta.json, as someone editing the file by hand would."""
    if data is None:
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        data = buf.getvalue()
    (folder / "avatar.npz").write_bytes(data)
    meta = json.loads((folder / "meta.json").read_text())
    meta["sha256"] = hashlib.sha256(data).hexdigest()
    (folder / "meta.json").write_text(json.dumps(meta))


#: Hand edits that passed the checksum and every check, failing only at the first render
#: as an ``internal`` error (or refused naming nothing): each change to a tiny avatar's
#: arrays, and what its refusal says.
HAND_EDITS = {
    "float triangle ids": (
        lambda a: {"g_triangle": a["g_triangle"].astype(np.float32)},
        "g_triangle must hold integers, not float32",
    ),
    "zero quaternions": (
        lambda a: {"g_rotation": np.zeros_like(a["g_rotation"])},
        "g_rotation: 5 of 5 quaternions are zero",
    ),
    "float rotations": (
        lambda a: {"g_rotation": a["g_rotation"].astype(np.int32)},
        "g_rotation must hold floats, not int32",
    ),
    "bary of a wrong shape": (
        lambda a: {"g_bary": a["g_bary"][:, :2]},
        "g_bary must be shaped [N, 3] = [5, 3], not [5, 2]",
    ),
    "triangle ids as a column": (
        lambda a: {"g_triangle": a["g_triangle"][:, None]},
        "g_triangle must be shaped [N], not [5, 1]",
    ),
    "SH of no degree": (
        lambda a: {"g_sh": np.zeros((5, 2, 3), np.float32)},
        "g_sh must be shaped [N, K, 3] = [5, K, 3], K = (degree + 1)^2",
    ),
    "no Gaussians": (
        lambda a: {k: v[:0] for k, v in a.items() if k.startswith("g_")},
        "no Gaussians (g_triangle is empty)",
    ),
    "NaN positions": (
        lambda a: {"vertices": np.where(np.arange(4)[:, None] == 1, np.nan, a["vertices"])},
        "vertices has NaN or inf",
    ),
    "triangle ids out of range": (
        lambda a: {"g_triangle": a["g_triangle"] + 2},
        "g_triangle: Gaussian triangle out of range (ids in [0, 2), found 2 to 3)",
    ),
    "bary out of range": (
        lambda a: {"g_bary": a["g_bary"] * 3},
        "g_bary: barycentric coordinates out of range (each in [0, 1], each row summing to 1",
    ),
    "float mesh triangles": (
        lambda a: {"triangles": a["triangles"] + 0.5},
        "triangles must hold integers, not float64",
    ),
    "mesh ids past int32": (  # cast to int32, they wrapped into ids in range
        lambda a: {"triangles": a["triangles"].astype(np.int64) + 2**32},
        "triangles holds ids past int32 (4294967296 to 4294967299)",
    ),
    "float vertex parts": (
        lambda a: {"vertex_part": np.zeros(4, np.float32)},
        "vertex_part must hold integers, not float32",
    ),
}


@pytest.mark.parametrize("edit", [*HAND_EDITS, "truncated"])
def test_arrays_edited_by_hand_are_refused_as_damaged_when_loaded(tmp_path, edit):
    """Each is refused by load, as the damaged avatar it is, naming the array and what it
    must be; a truncated file (checksummed as truncated) says so rather than zipfile's
    bare "File is not a zip file", which reached clients as an internal error."""
    store = Store(tmp_path)
    good, bad = tiny_avatar("aaaaaaaaaaaa"), tiny_avatar("bbbbbbbbbbbb")
    store.save(good)
    store.save(bad)
    if edit == "truncated":
        data = (tmp_path / bad.id / "avatar.npz").read_bytes()
        rewrite_npz(tmp_path / bad.id, data=data[: len(data) // 2])
        said = "avatar.npz is truncated or not an .npz archive (File is not a zip file)"
    else:
        change, said = HAND_EDITS[edit]
        arrays = bad.to_arrays()
        rewrite_npz(tmp_path / bad.id, {**arrays, **change(arrays)})
    with pytest.raises(ProtocolError) as e:
        store.load(bad.id)
    assert e.value.code == errors.INTERNAL and e.value.remote_traceback is None
    assert e.value.message.startswith(f"avatar {bad.id} is damaged and cannot be loaded: ")
    assert said in e.value.message
    assert store.load(good.id).id == good.id


def test_an_avatar_found_damaged_when_loaded_is_listed_as_damaged(tmp_path):
    """Listings read no avatar.npz (a listing resolves every name): one edited by hand
    stayed listed as valid however often its loads failed. From its first failed load it
    is named among the damaged, its name still finds it (to be refused saying why, not
    ``not_found``), and once its files change it is offered again."""
    store = Store(tmp_path)
    bad = dataclasses.replace(tiny_avatar("bbbbbbbbbbbb"), name="edited")
    store.save(tiny_avatar("aaaaaaaaaaaa"))
    store.save(bad)
    arrays = bad.to_arrays()
    rewrite_npz(tmp_path / bad.id, {**arrays, "g_triangle": arrays["g_triangle"] + 0.0})
    with pytest.raises(ProtocolError, match="g_triangle must hold integers"):
        store.load(store.resolve("edited"))
    listed, damaged = store.listing()
    assert [m["id"] for m in listed] == ["aaaaaaaaaaaa"]
    assert [d["id"] for d in damaged] == [bad.id]
    assert damaged[0]["message"] == (
        f"avatar {bad.id} is damaged and cannot be loaded: invalid avatar {bad.id}: "
        "g_triangle must hold integers, not float64"
    )
    assert store.resolve("edited") == bad.id
    with pytest.raises(ProtocolError) as e:
        store.load(store.resolve("edited"))
    assert e.value.code == errors.INTERNAL and "is damaged" in e.value.message
    rewrite_npz(tmp_path / bad.id, arrays)  # put right
    assert [m["id"] for m in store.list()] == ["aaaaaaaaaaaa", bad.id]
    assert store.load(store.resolve("edited")).name == "edited"


def test_an_avatar_whose_read_failed_is_not_remembered_as_damaged(tmp_path, monkeypatch):
    """A read that fails (an I/O error, a mount dropped for a moment) says nothing of what
    the files hold: the avatar stays listed, and loads once reads work again."""
    import errno

    import inference_service.store as store_module

    store = Store(tmp_path)
    store.save(tiny_avatar("aaaaaaaaaaaa"))
    read = store_module.read_regular

    def failing(path, limit):
        if path.name == "avatar.npz":
            raise OSError(errno.EIO, "Input/output error")
        return read(path, limit)

    monkeypatch.setattr(store_module, "read_regular", failing)
    with pytest.raises(ProtocolError, match="Input/output error"):
        store.load("aaaaaaaaaaaa")
    monkeypatch.undo()
    listed, damaged = store.listing()
    assert ([m["id"] for m in listed], damaged) == (["aaaaaaaaaaaa"], [])
    assert store.load("aaaaaaaaaaaa").id == "aaaaaaaaaaaa"


def test_unfinished_saves_are_removed_on_start(tmp_path):
    import os
    import time

    for name in ("dead", "live"):
        (tmp_path / f".tmp-0123456789ab-{name}").mkdir()
        (tmp_path / f".tmp-0123456789ab-{name}" / "avatar.npz").write_bytes(b"half")
    old = time.time() - STALE_SECONDS - 60
    for f in (tmp_path / ".tmp-0123456789ab-dead", tmp_path / ".tmp-0123456789ab-dead/avatar.npz"):
        os.utime(f, (old, old))
    store = Store(tmp_path)
    # another service on the store may be saving into the fresh one: it stays
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-0123456789ab-live"]
    assert store.list() == []


def test_invalid_avatar_is_not_saved(tmp_path):
    av = tiny_avatar()
    broken = Avatar(av.id, av.name, av.vertices, av.triangles, av.shape_deltas,
                    BoundGaussians(**{**av.gaussians.__dict__,
                                      "triangle": np.full(5, 99, np.int32)}),
                    av.photo_intrinsics, av.photo_world_to_camera, av.meta)  # fmt: skip
    with pytest.raises(ValueError, match="triangle out of range"):
        Store(tmp_path).save(broken)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["a" * 246 + ".ply", "頭" * 81 + ".ply"])
def test_atomic_write_takes_any_name_the_file_system_takes(tmp_path, name):
    """Names of up to 255 bytes (250 here, and 81 three-byte characters) are written,
    though the temporary file is named after them; a longer one fails naming itself."""
    atomic_write(tmp_path / name, b"splat")
    assert (tmp_path / name).read_bytes() == b"splat"
    assert [p.name for p in tmp_path.iterdir()] == [name]
    with pytest.raises(OSError) as exc:
        atomic_write(tmp_path / ("b" * 256), b"splat")
    assert exc.value.filename == str(tmp_path / ("b" * 256))
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left


def test_files_written_together_replace_none_when_one_fails(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"old a")
    (tmp_path / "b.bin").mkdir()  # cannot become a file
    with pytest.raises(OSError) as exc:
        atomic_write_all([(tmp_path / "a.bin", b"new a"), (tmp_path / "b.bin", b"new b")])
    assert exc.value.filename == str(tmp_path / "b.bin")
    assert (tmp_path / "a.bin").read_bytes() == b"old a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.bin"]
    atomic_write_all([(tmp_path / "a.bin", b"new a"), (tmp_path / "c" / "c.bin", b"new c")])
    assert (tmp_path / "a.bin").read_bytes() == b"new a"
    assert (tmp_path / "c" / "c.bin").read_bytes() == b"new c"


def test_atomic_write_through_a_link_replaces_what_it_points_to(tmp_path):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "head.ply"
    target.write_bytes(b"old")
    link = tmp_path / "head.ply"
    link.symlink_to(target)
    atomic_write(link, b"new")
    assert link.is_symlink() and target.read_bytes() == b"new"


def test_ply_has_inria_layout_and_values():
    av = tiny_avatar(sh_degree=1)
    posed = pose(av)
    ply = PlyData.read(io.BytesIO(ply_bytes(posed)))
    v = ply["vertex"]
    names = [p.name for p in v.properties]
    assert names == property_names(4)
    assert names[:9] == ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    assert names[9:18] == [f"f_rest_{i}" for i in range(9)]
    assert names[-8:] == [
        "opacity",
        "scale_0",
        "scale_1",
        "scale_2",
        "rot_0",
        "rot_1",
        "rot_2",
        "rot_3",
    ]
    assert all(p.val_dtype in ("f4", "float32") for p in v.properties)
    assert ply.text is False and ply.byte_order == "<"
    np.testing.assert_allclose(np.stack([v["x"], v["y"], v["z"]], 1), posed.means, atol=1e-6)
    sh = av.gaussians.sh.astype(np.float64)
    # colour in sRGB, as viewers of the layout show 0.5 + C0 * f_dc; higher degrees scaled by
    # the sRGB curve's slope at the DC colour (a central difference here)
    linear = np.clip(C0 * sh[:, 0] + 0.5, 0, 1)
    shown = 0.5 + C0 * np.stack([v[f"f_dc_{i}"] for i in range(3)], 1)
    np.testing.assert_allclose(shown, textbook_srgb(linear), atol=1e-6)
    slope = (textbook_srgb(linear + 1e-6) - textbook_srgb(linear - 1e-6)) / 2e-6
    rest = sh[:, 1:] * slope[:, None, :]
    # f_rest is channel-major: all red coefficients first, then green, then blue
    np.testing.assert_allclose(v["f_rest_0"], rest[:, 0, 0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(v["f_rest_2"], rest[:, 2, 0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(v["f_rest_3"], rest[:, 0, 1], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(v["f_rest_8"], rest[:, 2, 2], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(1 / (1 + np.exp(-v["opacity"])), posed.opacities, atol=1e-6)
    np.testing.assert_allclose(np.exp(v["scale_0"]), posed.scales[:, 0], rtol=1e-5)
    q = np.stack([v[f"rot_{i}"] for i in range(4)], 1)
    np.testing.assert_allclose(np.abs((q * posed.quats).sum(1)), 1, atol=1e-6)


def test_ply_holds_the_sh_degree_asked_for():
    """Degree 3 for loaders that take only that (3DGS's reference code): the avatar's
    coefficients where they were, per channel, and zeros after them; degree 0 drops them.
    Nothing else changes."""
    posed = pose(tiny_avatar(sh_degree=1))
    own = PlyData.read(io.BytesIO(ply_bytes(posed)))["vertex"]
    for degree in (3, 0):
        v = PlyData.read(io.BytesIO(ply_bytes(posed, degree)))["vertex"]
        k = (degree + 1) ** 2
        assert [p.name for p in v.properties] == property_names(k)
        for name in property_names(1):
            np.testing.assert_array_equal(v[name], own[name], err_msg=name)
        for c in range(3):  # channel-major: each channel's k - 1 coefficients in a row
            for i in range(k - 1):
                want = own[f"f_rest_{3 * c + i}"] if i < 3 else 0.0
                np.testing.assert_array_equal(v[f"f_rest_{(k - 1) * c + i}"], want)


def textbook_srgb(c: np.ndarray) -> np.ndarray:
    """IEC 61966-2-1's encoding, written out for the tests."""
    c = np.asarray(c, np.float64)
    return np.where(c <= 0.0031308, 12.92 * c, 1.055 * np.abs(c) ** (1 / 2.4) - 0.055)


def test_ply_shows_the_photos_colour_in_viewers():
    """A texel the photo shows as sRGB (200, 150, 120) is stored linear in the avatar; a
    viewer of the .ply (0.5 + C0 * f_dc, no decoding) must show (200, 150, 120) again."""
    av = tiny_avatar(n=1)
    photo = np.array([[200, 150, 120]]) / 255.0
    sh = av.gaussians.sh.copy()
    sh[:, 0] = rgb_to_sh0(srgb_to_linear(photo))
    posed = dataclasses.replace(pose(av), sh=sh)
    v = PlyData.read(io.BytesIO(ply_bytes(posed)))["vertex"]
    shown = 0.5 + C0 * np.stack([v[f"f_dc_{i}"] for i in range(3)], 1)
    np.testing.assert_allclose(shown * 255, [[200, 150, 120]], atol=0.01)


def test_quaternion_round_trip():
    rng = np.random.default_rng(3)
    q = rng.normal(size=(100, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    back = rotmat_to_quat(quat_to_rotmat(q))
    np.testing.assert_allclose(np.abs((back * q).sum(1)), 1, atol=1e-9)


def test_rest_pose_puts_gaussians_on_their_triangles():
    av = tiny_avatar()
    p = pose(av)
    corners = av.vertices[av.triangles[av.gaussians.triangle]]
    np.testing.assert_allclose(
        p.means, np.einsum("nk,nkc->nc", av.gaussians.bary, corners), atol=1e-7
    )
    np.testing.assert_allclose(p.opacities, 0.5)
    np.testing.assert_allclose(p.scales, 0.01, rtol=1e-6)


def test_shape_weights_move_gaussians_with_their_triangles():
    av = tiny_avatar(n=40)
    w = np.zeros(52, np.float32)
    w[index_of("jawOpen")] = 1.0
    rest, posed = pose(av), pose(av, w)
    on_moving = av.gaussians.triangle == 1  # triangle 1 uses vertex 3
    dz = posed.means[:, 2] - rest.means[:, 2]
    expect = -0.05 * av.gaussians.bary[:, 1]  # vertex 3 is corner 1 of triangle [0, 3, 1]
    np.testing.assert_allclose(dz[on_moving], expect[on_moving], atol=1e-7)
    assert np.all(dz[~on_moving] == 0)


def test_head_transform_moves_rotates_and_scales():
    av = tiny_avatar()
    rest = pose(av)
    angle = np.pi / 3
    r = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    m = np.eye(4)
    m[:3, :3] = 2.0 * r
    m[:3, 3] = [1, 2, 3]
    p = pose(av, None, m)
    np.testing.assert_allclose(p.means, 2.0 * rest.means @ r.T + [1, 2, 3], atol=1e-9)
    np.testing.assert_allclose(p.scales, 2.0 * rest.scales, rtol=1e-9)
    np.testing.assert_allclose(quat_to_rotmat(p.quats), r @ quat_to_rotmat(rest.quats), atol=1e-9)


@pytest.mark.parametrize(
    "m, words",
    [
        (np.diag([1.0, 1.0, -1.0, 1.0]), "mirror"),
        (np.diag([1.0, 2.0, 1.0, 1.0]), "uniform scale"),
        (np.array([[1, 0.5, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]), "uniform scale"),
        (np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1.0]]), "last row"),
    ],
)
def test_bad_head_transforms(m, words):
    with pytest.raises(ValueError, match=words):
        split_transform(m)


def test_meta_json_is_plain_json(tmp_path):
    store = Store(tmp_path)
    av = tiny_avatar()
    store.save(av)
    meta = json.loads((tmp_path / av.id / "meta.json").read_text())
    assert meta["format_version"] == 2 and len(meta["sha256"]) == 64


def test_an_avatar_of_a_newer_format_is_refused_by_name_and_older_ones_load(tmp_path):
    """The format's version was written and never read: a newer splatface's avatar
    would have been read as this one's. Older ones (and those with no version) load."""
    store = Store(tmp_path)
    store.save(tiny_avatar())
    path = tmp_path / tiny_avatar().id / "meta.json"
    meta = json.loads(path.read_text())
    for version in (1, None):
        path.write_text(json.dumps({**meta, "format_version": version}))
        assert store.load(tiny_avatar().id).id == tiny_avatar().id
    path.write_text(json.dumps({**meta, "format_version": 3}))
    with pytest.raises(ProtocolError) as e:
        store.load(tiny_avatar().id)
    assert e.value.code == errors.UNSUPPORTED_VERSION
    assert "written by a newer splatface (format 3; this service reads up to 2)" in e.value.message
    listed, damaged = store.listing()  # not offered as one a client could load
    assert listed == [] and "written by a newer splatface" in damaged[0]["message"]
