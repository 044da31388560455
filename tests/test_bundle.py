"""The rigged bundle: a valid glb, posing re-implemented from the bundle and
docs/rigged-bundle.md alone, the rest .ply, and the zip's contents."""

from __future__ import annotations

import dataclasses
import io
import json
import re
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from plyfile import PlyData

from inference_service.avatar import Avatar, BoundGaussians
from inference_service.export.bundle import FILES, bundle_files, bundle_zip
from inference_service.export.gltf import mesh_glb
from inference_service.export.ply import srgb_sh
from inference_service.headmodel import load_head_model
from inference_service.posing import pose
from protocol.arkit import ARKIT_NAMES, index_of
from tests.test_store_ply_posing import tiny_avatar

DOC = Path(__file__).resolve().parents[1] / "docs" / "rigged-bundle.md"

# glTF constants, spelled out here rather than imported from the writer
COMPONENTS = {5126: ("<f4", 4), 5125: ("<u4", 4), 5123: ("<u2", 2), 5121: ("u1", 1)}
WIDTH = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4}


# ---------------------------------------------------------------- a minimal glb reader


class Glb:
    def __init__(self, data: bytes) -> None:
        assert len(data) >= 20 and len(data) % 4 == 0
        magic, version, length = struct.unpack_from("<III", data, 0)
        assert magic == 0x46546C67 and version == 2 and length == len(data)
        json_len, json_type = struct.unpack_from("<II", data, 12)
        assert json_type == 0x4E4F534A and json_len % 4 == 0
        self.gltf = json.loads(data[20 : 20 + json_len].decode("utf-8"))
        at = 20 + json_len
        bin_len, bin_type = struct.unpack_from("<II", data, at)
        assert bin_type == 0x004E4942 and bin_len % 4 == 0
        assert at + 8 + bin_len == len(data), "BIN must be the last chunk and fill the file"
        self.bin = data[at + 8 : at + 8 + bin_len]
        declared = self.gltf["buffers"][0]["byteLength"]
        assert declared <= bin_len < declared + 4  # only padding after the buffer

    def accessor(self, i: int) -> np.ndarray:
        acc = self.gltf["accessors"][i]
        view = self.gltf["bufferViews"][acc["bufferView"]]
        dtype, size = COMPONENTS[acc["componentType"]]
        width = WIDTH[acc["type"]]
        start = view.get("byteOffset", 0) + acc.get("byteOffset", 0)
        assert start % size == 0 and view.get("byteOffset", 0) % 4 == 0
        assert "byteStride" not in view or view["byteStride"] == width * size
        nbytes = acc["count"] * width * size
        assert acc.get("byteOffset", 0) + nbytes <= view["byteLength"]
        assert view["byteOffset"] + view["byteLength"] <= self.gltf["buffers"][0]["byteLength"]
        arr = np.frombuffer(self.bin, dtype, acc["count"] * width, start)
        return arr.reshape(acc["count"], width) if width > 1 else arr


def head_mesh_from_glb(data: bytes):
    """Rest vertices, triangles and deltas in the canonical frame, and the target names,
    following docs/rigged-bundle.md: (x, y, z)_canonical = (x, -z, y)_gltf."""
    glb = Glb(data)
    prim = glb.gltf["meshes"][0]["primitives"][0]

    def canonical(p):
        p = p.astype(np.float64)
        return np.stack([p[:, 0], -p[:, 2], p[:, 1]], axis=1)

    verts = canonical(glb.accessor(prim["attributes"]["POSITION"]))
    tris = glb.accessor(prim["indices"]).reshape(-1, 3).astype(np.int64)
    deltas = np.stack([canonical(glb.accessor(t["POSITION"])) for t in prim["targets"]])
    return verts, tris, deltas, glb.gltf["meshes"][0]["extras"]["targetNames"]


# ---------------------------------------------------------------- test avatars


def ict_avatar(n=3000, sh_degree=1, seed=1) -> Avatar:
    """The ICT head as rest mesh and rig, with random Gaussians on random triangles."""
    m = load_head_model()
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(n, 4))
    g = BoundGaussians(
        triangle=rng.integers(0, len(m.triangles), n).astype(np.int32),
        bary=rng.dirichlet(np.ones(3), n).astype(np.float32),
        offset=rng.normal(0, 0.002, n).astype(np.float32),
        rotation=(q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32),
        log_scale=np.log(rng.uniform(2e-4, 4e-3, (n, 3))).astype(np.float32),
        opacity_logit=rng.normal(0, 2, n).astype(np.float32),
        sh=rng.normal(0, 0.3, (n, (sh_degree + 1) ** 2, 3)).astype(np.float32),
        appear=(
            np.where(rng.random(n) < 0.2, rng.uniform(1.05, 2.0, n), 0) * rng.choice([-1, 1], n)
        ).astype(np.float32),  # fading in, fading out
    )
    return Avatar("a1b2c3d4e5f6", "ict", m.neutral.astype(np.float32), m.triangles,
                  m.arkit_deltas, g, np.array([500.0, 500, 256, 256]), np.eye(4),
                  {"created": "2026-01-01T00:00:00"}, vertex_part=m.vertex_part)  # fmt: skip


def textured_ict_avatar(n=3000) -> Avatar:
    """:func:`ict_avatar` with a texture: the builder's atlas, random texels."""
    from inference_service.build.texture import Texture, atlas

    at = atlas(load_head_model(), 64)
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (at.height, at.width, 3), dtype=np.uint8)
    source = rng.integers(0, 5, (at.height, at.width), dtype=np.uint8)
    return dataclasses.replace(
        ict_avatar(n), texture=Texture(image, source, at.uvs, at.triangle_uvs)
    )


@pytest.fixture(scope="module")
def ict():
    av = ict_avatar()
    return av, bundle_files(av)


@pytest.fixture(scope="module")
def textured():
    av = textured_ict_avatar()
    return av, bundle_files(av)


# ---------------------------------------------------------------- (a) the glb


def test_glb_follows_gltf_rules_and_holds_the_mesh_and_rig(ict):
    av, files = ict
    data = files["head.glb"]
    glb = Glb(data)
    gltf = glb.gltf
    assert gltf["asset"]["version"] == "2.0"
    scene = gltf["scenes"][gltf["scene"]]
    (node,) = [gltf["nodes"][i] for i in scene["nodes"]]
    assert node["mesh"] == 0 and not {"matrix", "rotation", "scale", "translation"} & set(node)
    (mesh,) = gltf["meshes"]
    (prim,) = mesh["primitives"]
    assert prim.get("mode", 4) == 4

    for view in gltf["bufferViews"]:
        assert view["byteOffset"] % 4 == 0 and view["buffer"] == 0
    v, t = len(av.vertices), len(av.triangles)
    for i, acc in enumerate(gltf["accessors"]):
        arr = glb.accessor(i)
        if "min" in acc:  # exactly the data's bounds, as float32
            flat = arr.reshape(len(arr), -1)
            np.testing.assert_array_equal(np.float32(acc["min"]), flat.min(0))
            np.testing.assert_array_equal(np.float32(acc["max"]), flat.max(0))

    attrs = prim["attributes"]
    pos_acc = gltf["accessors"][attrs["POSITION"]]
    assert pos_acc["componentType"] == 5126 and pos_acc["type"] == "VEC3"
    assert pos_acc["count"] == v and "min" in pos_acc and "max" in pos_acc
    pos = glb.accessor(attrs["POSITION"])
    ours = av.vertices
    expected = np.stack([ours[:, 0], ours[:, 2], -ours[:, 1]], axis=1)  # glTF: +Y up, +Z front
    np.testing.assert_array_equal(pos, expected)
    assert pos[:, 1].max() > pos[:, 1].min() + 0.15  # the head is tall along glTF's +Y

    if "NORMAL" in attrs:
        nrm = glb.accessor(attrs["NORMAL"])
        assert nrm.shape == (v, 3)
        np.testing.assert_allclose(np.linalg.norm(nrm, axis=1), 1, atol=1e-5)
        # the nose tip (most frontal vertex, +Z in glTF) faces the front
        assert nrm[np.argmax(pos[:, 2]), 2] > 0.5

    idx_acc = gltf["accessors"][prim["indices"]]
    assert idx_acc["componentType"] == 5125 and idx_acc["type"] == "SCALAR"
    assert idx_acc["count"] == 3 * t
    idx = glb.accessor(prim["indices"])
    assert idx.min() >= 0 and idx.max() < v
    np.testing.assert_array_equal(idx.reshape(-1, 3), av.triangles)

    targets = prim["targets"]
    assert len(targets) == 52 and mesh["extras"]["targetNames"] == list(ARKIT_NAMES)
    assert mesh["weights"] == [0] * 52
    for i, target in enumerate(targets):
        acc = gltf["accessors"][target["POSITION"]]
        assert acc["count"] == v and "min" in acc and "max" in acc
        d = glb.accessor(target["POSITION"])
        ours = av.shape_deltas[i]
        np.testing.assert_array_equal(d, np.stack([ours[:, 0], ours[:, 2], -ours[:, 1]], 1))
    # jawOpen moves the chin down: -Y in glTF
    jaw = glb.accessor(targets[index_of("jawOpen")]["POSITION"])
    assert jaw[:, 1].min() < -0.01


def test_all_zero_targets_are_still_valid_targets():
    av = tiny_avatar()  # only jawOpen moves anything
    glb = Glb(bundle_files(av)["head.glb"])
    prim = glb.gltf["meshes"][0]["primitives"][0]
    assert len(prim["targets"]) == 52
    for i, target in enumerate(prim["targets"]):
        acc = glb.gltf["accessors"][target["POSITION"]]
        d = glb.accessor(target["POSITION"])
        assert acc["count"] == 4 and d.shape == (4, 3)
        if i != index_of("jawOpen"):
            assert not d.any() and acc["min"] == [0, 0, 0] and acc["max"] == [0, 0, 0]
    assert glb.accessor(prim["targets"][index_of("jawOpen")]["POSITION"])[3, 1] < 0


def test_mesh_glb_refuses_inconsistent_input_and_writes_meshes_without_targets():
    v = np.eye(3, dtype=np.float32)
    t = np.array([[0, 1, 2]])
    with pytest.raises(ValueError, match="out of range"):
        mesh_glb(v, np.array([[0, 1, 3]]), np.zeros((0, 3, 3)), [])
    with pytest.raises(ValueError, match="names"):
        mesh_glb(v, t, np.zeros((2, 3, 3)), ["a"])
    with pytest.raises(ValueError, match="morph_deltas"):
        mesh_glb(v, t, np.zeros((1, 4, 3)), ["a"])
    with pytest.raises(ValueError, match="NaN"):
        mesh_glb(v * np.nan, t, np.zeros((0, 3, 3)), [])
    with pytest.raises(ValueError, match="texcoords"):
        mesh_glb(v, t, np.zeros((0, 3, 3)), [], texcoords=np.zeros((2, 3, 2)), png=b"png")
    with pytest.raises(ValueError, match="together"):
        mesh_glb(v, t, np.zeros((0, 3, 3)), [], texcoords=np.zeros((1, 3, 2)))
    glb = Glb(mesh_glb(v, t, np.zeros((0, 3, 3)), [], name="tri"))
    assert "targets" not in glb.gltf["meshes"][0]["primitives"][0]
    assert glb.gltf["meshes"][0]["name"] == "tri"


def test_textured_glb_splits_uv_seams_and_embeds_the_texture(textured):
    av, files = textured
    glb = Glb(files["head.glb"])
    gltf = glb.gltf
    (mesh,) = gltf["meshes"]
    (prim,) = mesh["primitives"]
    for i, acc in enumerate(gltf["accessors"]):
        if "min" in acc:
            flat = glb.accessor(i).reshape(acc["count"], -1)
            np.testing.assert_array_equal(np.float32(acc["min"]), flat.min(0))
            np.testing.assert_array_equal(np.float32(acc["max"]), flat.max(0))
    attrs = prim["attributes"]
    pos, nrm = glb.accessor(attrs["POSITION"]), glb.accessor(attrs["NORMAL"])
    uv_acc = gltf["accessors"][attrs["TEXCOORD_0"]]
    assert uv_acc["componentType"] == 5126 and uv_acc["type"] == "VEC2"
    uv = glb.accessor(attrs["TEXCOORD_0"])
    v = len(av.vertices)
    assert len(uv) == len(pos) == len(nrm) > v  # the atlas has seams: vertices split
    copies = np.array(mesh["extras"]["sourceVertices"])
    assert len(copies) == len(pos) - v and copies.min() >= 0 and copies.max() < v
    source = np.r_[np.arange(v), copies]

    def gltf_axes(p):
        return np.stack([p[:, 0], p[:, 2], -p[:, 1]], axis=1)

    # a copy is its vertex: the same position, normal and morph deltas
    np.testing.assert_array_equal(pos, gltf_axes(av.vertices)[source])
    np.testing.assert_array_equal(nrm, nrm[source])
    assert len(prim["targets"]) == 52
    for i, target in enumerate(prim["targets"]):
        d = glb.accessor(target["POSITION"])
        np.testing.assert_array_equal(d, gltf_axes(av.shape_deltas[i])[source])
    # the same triangles in the same corner order, each corner with the texture's UV
    tris = glb.accessor(prim["indices"]).reshape(-1, 3)
    np.testing.assert_array_equal(source[tris], av.triangles)
    np.testing.assert_array_equal(uv[tris], av.texture.corner_uvs())
    # and no vertex more than the distinct (vertex, UV) pairs need
    pairs = np.unique(np.column_stack([source, uv.view(np.int32)]), axis=0)
    assert len(pairs) == len(pos)

    material = gltf["materials"][prim["material"]]
    texture = gltf["textures"][material["pbrMetallicRoughness"]["baseColorTexture"]["index"]]
    if "sampler" in texture:
        assert 0 <= texture["sampler"] < len(gltf["samplers"])
    image = gltf["images"][texture["source"]]
    assert image["mimeType"] == "image/png" and "uri" not in image
    view = gltf["bufferViews"][image["bufferView"]]
    assert "target" not in view and "byteStride" not in view
    png = glb.bin[view["byteOffset"] : view["byteOffset"] + view["byteLength"]]
    decoded = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    np.testing.assert_array_equal(decoded, av.texture.image)


def test_textured_bundle_poses_like_the_service_gaze_included(textured):
    av, files = textured
    gaze = json.loads(files["bundle.json"])["gaze"]
    n = len(av.vertices)
    for eye, (ids, _) in zip(gaze["eyes"], av.eyes, strict=True):
        assert set(ids.tolist()) < set(eye["vertices"])  # its vertices and their copies
        assert max(eye["vertices"]) >= n
    weights = np.random.default_rng(0).uniform(0, 1, 52)
    mu, rot, sigma, alpha, _ = pose_from_bundle(files, weights)
    ref = pose(av, weights.astype(np.float32))
    np.testing.assert_allclose(mu, ref.means, rtol=0, atol=1e-6)
    np.testing.assert_allclose(sigma, ref.scales, rtol=1e-5, atol=1e-9)
    assert_same_quats(matrix_to_quat(rot), ref.quats, 1e-5)
    # exactly what the untextured bundle of the same avatar gives: the copies move as one
    plain = bundle_files(dataclasses.replace(av, texture=None))
    for a, b in zip((mu, rot, sigma, alpha), pose_from_bundle(plain, weights), strict=False):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- (b) posing from the doc


def quat_to_matrix(q):
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    ).transpose(2, 0, 1)


def matrix_to_quat(r):
    """Shepperd's method: the largest of w, x, y, z first, for stability."""
    out = np.empty((len(r), 4))
    for i, m in enumerate(r):
        tr = np.trace(m)
        diag = [tr, m[0, 0], m[1, 1], m[2, 2]]
        k = int(np.argmax(diag))
        if k == 0:
            s = 2 * np.sqrt(1 + tr)
            q = [s / 4, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
        elif k == 1:
            s = 2 * np.sqrt(1 + m[0, 0] - m[1, 1] - m[2, 2])
            q = [(m[2, 1] - m[1, 2]) / s, s / 4, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s]
        elif k == 2:
            s = 2 * np.sqrt(1 - m[0, 0] + m[1, 1] - m[2, 2])
            q = [(m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, s / 4, (m[1, 2] + m[2, 1]) / s]
        else:
            s = 2 * np.sqrt(1 - m[0, 0] - m[1, 1] + m[2, 2])
            q = [(m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, s / 4]
        out[i] = q
    return out


def frames_and_areas(p, tris):
    a, b, c = p[tris[:, 0]], p[tris[:, 1]], p[tris[:, 2]]
    e1, e2 = b - a, c - a
    m = np.cross(e1, e2)
    mlen = np.linalg.norm(m, axis=1, keepdims=True)
    t = e1 / np.maximum(np.linalg.norm(e1, axis=1, keepdims=True), 1e-20)
    n = m / np.maximum(mlen, 1e-20)
    s = np.cross(n, t)
    return np.stack([t, s, n], axis=2), mlen[:, 0] / 2


def turn_eyes(p, weights, gaze):
    w = dict(zip(ARKIT_NAMES, weights, strict=True))
    for eye in gaze["eyes"]:
        side = eye["side"].capitalize()
        sign = 1.0 if side == "Left" else -1.0
        yaw = sign * gaze["yaw_at_weight_1"] * (w[f"eyeLookOut{side}"] - w[f"eyeLookIn{side}"])
        pitch = gaze["pitch_at_weight_1"] * (w[f"eyeLookUp{side}"] - w[f"eyeLookDown{side}"])
        cy, sy, cp, sp = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch)
        g = np.array([[cy, -sy, 0], [sy, cy, 0], [0, 0, 1]]) @ np.array(
            [[1, 0, 0], [0, cp, sp], [0, -sp, cp]]
        )
        c, ids = np.array(eye["center"]), np.array(eye["vertices"])
        p[ids] = c + (p[ids] - c) @ g.T
    return p


def pose_from_bundle(files, weights, head=None):
    """docs/rigged-bundle.md, "Posing", using only the bundle's files."""
    rest, tris, deltas, names = head_mesh_from_glb(files["head.glb"])
    assert names == list(ARKIT_NAMES)
    with np.load(io.BytesIO(files["gaussians.npz"]), allow_pickle=False) as z:
        g = {k: z[k] for k in z.files}
    p = rest + np.einsum("i,ivc->vc", weights, deltas)  # 1. blend
    p = turn_eyes(p, weights, json.loads(files["bundle.json"])["gaze"])  # 2. eyes
    frames, area = frames_and_areas(p, tris)  # 3. frames
    _, rest_area = frames_and_areas(rest, tris)
    k = g["triangle"]
    corners = p[tris[k]]  # 4. carry
    normal = frames[k][:, :, 2]
    mu = np.einsum("nj,njc->nc", g["bary"].astype(np.float64), corners)
    mu = mu + g["offset"][:, None] * normal
    rot = frames[k] @ quat_to_matrix(g["rotation"].astype(np.float64))
    sigma = (
        np.exp(g["log_scale"].astype(np.float64))
        * np.sqrt(area[k] / np.maximum(rest_area[k], 1e-20))[:, None]
    )
    if head is not None:  # 5. head transform
        c = np.linalg.det(head[:3, :3]) ** (1 / 3)
        u = head[:3, :3] / c
        mu = c * mu @ u.T + head[:3, 3]
        rot = u @ rot
        sigma = c * sigma
    alpha = 1 / (1 + np.exp(-g["opacity_logit"].astype(np.float64)))
    growth = np.sqrt(area[k] / np.maximum(rest_area[k], 1e-20))
    ramp = np.clip(2 * (growth - 1) / (np.abs(g["appear"]) - 1) - 1, 0, 1)
    alpha[g["appear"] > 0] *= ramp[g["appear"] > 0]
    alpha[g["appear"] < 0] *= 1 - ramp[g["appear"] < 0]
    return mu, rot, sigma, alpha, g["sh"]


def assert_same_quats(a, b, atol):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    err = np.minimum(np.abs(a - b).max(1), np.abs(a + b).max(1))
    assert err.max() < atol, err.max()


def random_head(rng):
    q = rng.normal(size=(1, 4))
    h = np.eye(4)
    h[:3, :3] = 1.3 * quat_to_matrix(q)[0]
    h[:3, 3] = rng.normal(0, 0.5, 3)
    return h


@pytest.mark.parametrize("seed,with_head", [(0, False), (1, False), (2, True)])
def test_posing_from_the_bundle_matches_the_service(ict, seed, with_head):
    av, files = ict
    rng = np.random.default_rng(seed)
    weights = rng.uniform(0, 1, 52)
    head = random_head(rng) if with_head else None
    mu, rot, sigma, alpha, sh = pose_from_bundle(files, weights, head)
    ref = pose(av, weights.astype(np.float32), head)
    # the weights move things far beyond the tolerance, so this is not a rest-pose check
    assert np.abs(ref.means - pose(av, None, head).means).max() > 1e-3
    np.testing.assert_allclose(mu, ref.means, rtol=0, atol=1e-6)
    np.testing.assert_allclose(sigma, ref.scales, rtol=1e-5, atol=1e-9)
    assert_same_quats(matrix_to_quat(rot), ref.quats, 1e-5)
    # the glb holds float32 vertices; a fade-in multiplies their area error by up to 40
    np.testing.assert_allclose(alpha, ref.opacities, rtol=1e-6, atol=1e-4)
    np.testing.assert_array_equal(sh, ref.sh)


def test_a_takes_head_angles_turn_the_head_as_documented(ict):
    """From ``bundle.json``'s pivot and the doc's formula alone, a Live Link Face take's
    head angles give the head transform the CLI and the add-on render with."""
    from inference_service.cli import animation_heads
    from inference_service.store import bounding_sphere
    from protocol.animation import Animation

    av, files = ict
    yaw, pitch, roll = 0.3, 0.1, -0.2
    take = Animation(
        curves=np.zeros((1, 52), np.float32), head_angles=np.array([[yaw, pitch, roll]])
    )
    info = bounding_sphere(av)  # as the service's avatar info holds them
    served = animation_heads(take, info, True)[0]
    p = np.array(json.loads(files["bundle.json"])["head_motion"]["pivot"])
    c, s_ = np.cos, np.sin
    rz = np.array([[c(yaw), -s_(yaw), 0], [s_(yaw), c(yaw), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, c(pitch), -s_(pitch)], [0, s_(pitch), c(pitch)]])
    ry = np.array([[c(-roll), 0, s_(-roll)], [0, 1, 0], [-s_(-roll), 0, c(-roll)]])
    h = np.eye(4)
    h[:3, :3] = rz @ rx @ ry
    h[:3, 3] = p - h[:3, :3] @ p
    np.testing.assert_allclose(h, served, atol=1e-12)
    assert np.abs(p - av.center).max() > 0.01 * av.radius  # not the centre: the neck
    mu = pose_from_bundle(files, np.zeros(52), h)[0]
    np.testing.assert_allclose(mu, pose(av, None, served).means, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", ["eyeLookOutLeft", "eyeLookUpRight", "eyeLookInRight"])
def test_gaze_turns_the_eyeballs_as_documented(ict, shape):
    av, files = ict
    gaze = json.loads(files["bundle.json"])["gaze"]
    assert [e["side"] for e in gaze["eyes"]] == ["left", "right"]
    w = np.zeros(52)
    w[index_of(shape)] = 0.8
    mu, rot, sigma, _, _ = pose_from_bundle(files, w)
    ref = pose(av, w.astype(np.float32))
    rest = pose(av)
    moved = np.linalg.norm(ref.means - rest.means, axis=1) > 1e-4
    this, other = gaze["eyes"] if shape.endswith("Left") else gaze["eyes"][::-1]
    corners = av.triangles[av.gaussians.triangle]
    on_this = np.isin(corners, this["vertices"]).all(1)
    on_other = np.isin(corners, other["vertices"]).any(1)
    assert on_this.sum() > 20 and moved[on_this].all() and not moved[on_other].any()
    np.testing.assert_allclose(mu, ref.means, rtol=0, atol=1e-6)
    np.testing.assert_allclose(sigma, ref.scales, rtol=1e-5, atol=1e-9)
    assert_same_quats(matrix_to_quat(rot), ref.quats, 1e-5)


def test_posing_in_gltf_axes_gives_the_same_gaussians_rotated(ict):
    """The doc's "Working in glTF axes": frames from the glb's own coordinates."""
    av, files = ict
    glb = Glb(files["head.glb"])
    prim = glb.gltf["meshes"][0]["primitives"][0]
    rest = glb.accessor(prim["attributes"]["POSITION"]).astype(np.float64)
    tris = glb.accessor(prim["indices"]).reshape(-1, 3)
    w = np.zeros(52)
    w[index_of("jawOpen")] = 1.0
    p = rest + glb.accessor(prim["targets"][index_of("jawOpen")]["POSITION"])
    with np.load(io.BytesIO(files["gaussians.npz"]), allow_pickle=False) as z:
        k, bary, offset, quat = z["triangle"], z["bary"], z["offset"], z["rotation"]
    frames, _ = frames_and_areas(p, tris)
    mu = np.einsum("nj,njc->nc", bary, p[tris[k]]) + offset[:, None] * frames[k][:, :, 2]
    rot = frames[k] @ quat_to_matrix(quat.astype(np.float64))
    q = np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], np.float64)
    ref = pose(av, w.astype(np.float32))
    np.testing.assert_allclose(mu, ref.means @ q.T, atol=1e-6)
    np.testing.assert_allclose(rot, q @ quat_to_matrix(ref.quats), atol=1e-5)


# ---------------------------------------------------------------- (c) rest.ply


def test_rest_ply_is_the_rest_pose_in_inria_layout(ict):
    av, files = ict
    v = PlyData.read(io.BytesIO(files["rest.ply"]))["vertex"]
    ref = pose(av)
    assert v.count == len(av.gaussians)
    xyz = np.stack([v["x"], v["y"], v["z"]], 1)
    np.testing.assert_allclose(xyz, ref.means, atol=1e-6)
    scale = np.exp(np.stack([v[f"scale_{i}"] for i in range(3)], 1).astype(np.float64))
    np.testing.assert_allclose(scale, ref.scales, rtol=1e-5)
    assert_same_quats(np.stack([v[f"rot_{i}"] for i in range(4)], 1), ref.quats, 1e-6)
    alpha = 1 / (1 + np.exp(-v["opacity"].astype(np.float64)))
    np.testing.assert_allclose(alpha, ref.opacities, rtol=1e-5, atol=1e-6)  # ply clips at 1e-7
    sh = srgb_sh(ref.sh)  # sRGB, as every .ply the service writes (test_store_ply_posing)
    np.testing.assert_array_equal(np.stack([v[f"f_dc_{i}"] for i in range(3)], 1),
                                  sh[:, 0].astype(np.float32))  # fmt: skip
    rest = np.stack([v[f"f_rest_{i}"] for i in range(9)], 1).reshape(-1, 3, 3)  # channel-major
    np.testing.assert_array_equal(rest.transpose(0, 2, 1), sh[:, 1:].astype(np.float32))


# ---------------------------------------------------------------- (d) the zip and its doc


def documented_table(section: str) -> list[list[str]]:
    """Rows of the first table under ``## section`` in docs/rigged-bundle.md."""
    text = DOC.read_text(encoding="utf-8")
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in body.splitlines() if line.startswith("|")]
    return [[c.strip().strip("`") for c in row.strip("|").split("|")] for row in rows[2:]]


def test_zip_holds_exactly_the_documented_files_deterministically(ict):
    av, files = ict
    data = bundle_zip(av)
    assert data == bundle_zip(av)  # same avatar, same bytes
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        names = zf.namelist()
        assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in zf.infolist())
        assert zf.testzip() is None
        contents = {n: zf.read(n) for n in names}
    documented = [row[0] for row in documented_table("Files")]
    assert names == documented == list(FILES) == list(files)
    assert contents == files

    manifest = json.loads(contents["bundle.json"])
    assert manifest["format"] == "splatface-rigged-bundle" and manifest["version"] == 1
    assert manifest["arkit_names"] == list(ARKIT_NAMES)
    assert manifest["avatar"]["id"] == av.id and manifest["avatar"]["name"] == av.name
    assert manifest["counts"] == {"vertices": len(av.vertices), "triangles": len(av.triangles),
                                  "gaussians": len(av.gaussians), "morph_targets": 52}  # fmt: skip
    assert manifest["sh_degree"] == 1 and manifest["sh_bases"] == 4
    assert manifest["units"] == "metres" and manifest["frame"]["up"] == "+Z"
    q = np.array(manifest["gltf_axes"]["gltf_from_canonical"])
    np.testing.assert_array_equal(q @ [0.0, -1.0, 0.0], [0, 0, 1])  # our front → glTF's +Z
    np.testing.assert_array_equal(q @ [0.0, 0.0, 1.0], [0, 1, 0])  # our up → glTF's +Y
    np.testing.assert_array_equal(np.array(manifest["gltf_axes"]["canonical_from_gltf"]), q.T)
    documented_keys = set()
    for row in documented_table("`bundle.json`"):
        documented_keys |= {k.strip().strip("`") for k in row[0].split(",")}
    assert set(manifest) == documented_keys


def test_bundle_json_keeps_the_avatars_name_as_it_is():
    from inference_service.export.bundle import manifest

    av = dataclasses.replace(tiny_avatar(), name='Ada  [take  2] "q"')
    assert json.loads(bundle_files(av)["bundle.json"])["avatar"]["name"] == av.name
    assert manifest(av)["avatar"]["name"] == av.name


def test_gaussians_npz_matches_its_documented_table(ict):
    av, files = ict
    rows = documented_table("`gaussians.npz`")
    n = len(av.gaussians)
    sizes = {"N": n, "K": av.gaussians.sh.shape[1], "3": 3, "4": 4}
    with np.load(io.BytesIO(files["gaussians.npz"]), allow_pickle=False) as z:
        assert sorted(z.files) == sorted(row[0] for row in rows)
        for name, shape, dtype, _ in rows:
            arr = z[name]
            dims = tuple(sizes[d.strip()] for d in re.findall(r"[^\[\],]+", shape))
            assert arr.shape == dims and arr.dtype == np.dtype(dtype), name
            np.testing.assert_array_equal(arr, getattr(av.gaussians, name))
