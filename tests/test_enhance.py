"""The optional ``enhance`` stage with tiny diffusion models built here (no downloads):
the stage end to end at 64x64, what it may and may not change, depth-guided consistency
between views, determinism, the loader's errors, and the option from the CLI, the
protocol and the add-on's client glue to the service."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from inference_service.build import diffusion
from inference_service.build.diffusion import EnhanceModels, ModelFolderError, check_models
from inference_service.build.enhance import (
    EnhanceSettings,
    depth_condition,
    enhance_views,
    inside,
    paint,
    visit_order,
    working_size,
)
from inference_service.build.views import SOURCE_GENERATED, SOURCE_VIEW, warp
from protocol import ProtocolError, errors

from .conftest import REPO, encode_png
from .tiny_diffusion import make_tiny_models, sphere_views

#: Two denoising steps at the views' own 64 px: enough to run every part of the pipeline.
FAST = EnhanceSettings(steps=2, size=64)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> EnhanceModels:
    model, controlnet = make_tiny_models(tmp_path_factory.mktemp("tiny-diffusion"))
    return EnhanceModels(model, controlnet)


@pytest.fixture(scope="module")
def around():
    """Photo at the front, pseudo-views at the side and the back."""
    return sphere_views(64, (0.0, 90.0, 180.0))


@pytest.fixture(scope="module")
def enhanced(tiny, around):
    return enhance_views(around, tiny, FAST, seed=0)


def unsure(view, settings=FAST) -> np.ndarray:
    return inside(view) & (view.confidence < settings.threshold)


def test_stage_runs_and_changes_only_unsure_pixels(tiny, around, enhanced):
    assert enhanced[0] is around[0]
    painted = 0
    for before, after in zip(around[1:], enhanced[1:], strict=True):
        todo = unsure(before)
        assert todo.any()
        for name in ("image", "confidence", "source"):
            assert np.array_equal(getattr(after, name)[~todo], getattr(before, name)[~todo]), name
        assert np.isin(after.source[todo], (SOURCE_GENERATED, SOURCE_VIEW)).all()
        generated = after.source == SOURCE_GENERATED
        assert (after.confidence[generated] == FAST.generated_confidence).all()
        assert after.confidence[todo].max() <= np.float32(FAST.generated_confidence)
        # the flat grey fill was painted over with the model's picture
        assert np.abs(after.image[generated] - before.image[generated]).max() > 0.01
        assert after.image.dtype == np.float32 and np.isfinite(after.image).all()
        painted += generated.sum()
    assert painted > 0
    assert diffusion.load(tiny).controlnet is not None


def test_pixels_a_finished_view_sees_are_warped_not_painted(around, enhanced):
    side, back = enhanced[1], enhanced[2]
    # what the finished side view shows of the back view's unsure pixels
    carried, valid = warp(side.image, side.depth, side.camera, back.depth, back.camera, 0.01)
    # its settled pixels (each bilinear tap on one), so the colour is the side view's own
    settled, _ = warp(inside(side).astype(np.float32), side.depth, side.camera, back.depth,
                      back.camera, 0.01)  # fmt: skip
    region = unsure(around[2]) & valid & (settled > 0.999)
    assert region.sum() > 100
    assert (back.source[region] == SOURCE_VIEW).all()
    np.testing.assert_allclose(back.image[region], carried[region], atol=1e-6)
    # diffusion painted only what no finished view saw
    assert (back.source == SOURCE_GENERATED).sum() < unsure(around[2]).sum() - region.sum() + 1


def test_same_seed_same_pixels(tiny, around, enhanced):
    again = enhance_views(around, tiny, FAST, seed=0)
    other = enhance_views(around, tiny, FAST, seed=1)
    for a, b, c in zip(enhanced[1:], again[1:], other[1:], strict=True):
        assert np.array_equal(a.image, b.image) and np.array_equal(a.source, b.source)
        generated = a.source == SOURCE_GENERATED
        assert not np.allclose(a.image[generated], c.image[generated])


def test_depth_reaches_the_model(tiny, around):
    pipe = diffusion.load(tiny)
    mask = unsure(around[2])
    on = paint(pipe, around[2], mask, FAST, seed=3)
    off = paint(pipe, around[2], mask, EnhanceSettings(steps=2, size=64, control_scale=0.0), 3)
    assert on.shape == (64, 64, 3) and not np.allclose(on[mask], off[mask])


def test_without_a_controlnet(tiny, around):
    models = EnhanceModels(tiny.model)
    out = enhance_views(around[:2], models, EnhanceSettings(steps=1, size=64), seed=0)
    assert diffusion.load(models).__class__.__name__ == "StableDiffusionInpaintPipeline"
    assert (out[1].source == SOURCE_GENERATED).any()


def test_progress_per_view_and_step_and_cancel(tiny, around):
    seen: list[str] = []

    def progress(fraction: float, message: str) -> None:
        seen.append(message)
        if "step 2/2" in message:
            raise ProtocolError(errors.CANCELLED, "the build was cancelled")

    with pytest.raises(ProtocolError, match="cancelled"):
        enhance_views(around, tiny, FAST, seed=0, progress=progress)
    assert any("view 1/2 (" in m for m in seen) and any("step 1/2" in m for m in seen)
    assert not any("view 2/2" in m for m in seen)


def test_visit_order_goes_out_from_the_front():
    views = sphere_views(16, (0.0, 180.0, 60.0, -120.0, -60.0, 120.0))
    assert [views[i].yaw for i in visit_order(views)] == [-60.0, 60.0, -120.0, 120.0, 180.0]


def test_depth_condition_and_working_size():
    depth = np.array([[1.0, 2.0], [np.inf, 1.5]], np.float32)
    cond = depth_condition(depth)
    assert cond.shape == (2, 2, 3)
    assert cond[0, 0, 0] == 1.0 and cond[0, 1, 0] == pytest.approx(0.2) and cond[1, 0, 0] == 0
    assert working_size(64, 64, 512) == (512, 512) and working_size(300, 200, 512) == (512, 344)


# -- the loader's checks -----------------------------------------------------------------


def _drop(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


BROKEN = {
    "no model_index.json": (lambda m, c: _drop(m / "model_index.json"), "model_index.json"),
    "no unet": (lambda m, c: _drop(m / "unet"), "unet/"),
    "no vae weights": (
        lambda m, c: _drop(m / "vae" / "diffusion_pytorch_model.safetensors"),
        "vae/ lacks its weights",
    ),
    "pickled text encoder": (
        lambda m, c: (m / "text_encoder" / "model.safetensors").rename(
            m / "text_encoder" / "pytorch_model.bin"
        ),
        "pickled",
    ),
    "no tokenizer files": (lambda m, c: _drop(m / "tokenizer" / "tokenizer.json"), "merges.txt"),
    "no scheduler": (lambda m, c: _drop(m / "scheduler"), "scheduler/"),
    "broken unet config": (
        lambda m, c: (m / "unet" / "config.json").write_text("{"),
        "not readable JSON",
    ),
    "truncated unet weights": (
        lambda m, c: _truncate(m / "unet" / "diffusion_pytorch_model.safetensors", 1000),
        "unet/diffusion_pytorch_model.safetensors are truncated (1000 bytes of",
    ),
    "controlnet weights cut in their length": (
        lambda m, c: _truncate(c / "diffusion_pytorch_model.safetensors", 5),
        "diffusion_pytorch_model.safetensors are truncated (5 bytes of",
    ),
    "controlnet weights with a garbled header": (
        lambda m, c: _garble(c / "diffusion_pytorch_model.safetensors"),
        "diffusion_pytorch_model.safetensors have no readable header",
    ),
    "no controlnet config": (lambda m, c: _drop(c / "config.json"), "ControlNet"),
    "controlnet for another base model": (
        lambda m, c: (c / "config.json").write_text('{"cross_attention_dim": 768}'),
        "768",
    ),
}


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def _garble(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"garbage!")


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_folder_is_a_clear_error(tiny, tmp_path, name):
    model = shutil.copytree(tiny.model, tmp_path / "model")
    controlnet = shutil.copytree(tiny.controlnet, tmp_path / "controlnet")
    check_models(EnhanceModels(model, controlnet))
    breaks, words = BROKEN[name]
    breaks(model, controlnet)
    with pytest.raises(ModelFolderError, match=re.escape(words)):
        diffusion.load(EnhanceModels(model, controlnet))


def test_weights_changed_on_disk_reload_and_never_reach_a_loaded_model(tiny, tmp_path):
    """A weight file copied over a loaded one (a fine-tuned UNet) went unseen by the
    cache, and the loaded model read the new bytes from its mapped file: a shorter file
    killed the service (SIGBUS). The loaded weights are the process's own; a changed file
    loads again."""
    model = shutil.copytree(tiny.model, tmp_path / "model")
    models = EnhanceModels(model, None)
    pipe = diffusion.load(models)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    saved = weights.read_bytes()
    with open(weights, "r+b") as f:  # the same size, other values: in place, as cp writes
        f.seek(len(saved) - 64)
        f.write(bytes(64))
    for k, v in pipe.unet.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert diffusion.load(models) is not pipe  # rewritten: loaded again


def test_folders_must_be_absolute_and_exist(tmp_path):
    with pytest.raises(ModelFolderError, match="absolute"):
        check_models(EnhanceModels(Path("models/sd")))
    with pytest.raises(ModelFolderError, match="not a folder"):
        check_models(EnhanceModels(tmp_path / "nowhere"))
    parsed = EnhanceModels.parse("a, b")
    assert parsed.model.is_absolute() and parsed.controlnet == Path("b").absolute()
    with pytest.raises(ModelFolderError, match="MODEL_DIR"):
        EnhanceModels.parse("a,b,c")


def test_a_folder_path_with_a_comma_is_taken_whole(tiny, tmp_path):
    """``--enhance`` splits at commas: a folder whose path holds one is taken whole where
    it exists, and a piece split out of a path that is no folder says so."""
    model = shutil.copytree(tiny.model, tmp_path / "sd,v1")
    cn = shutil.copytree(tiny.controlnet, tmp_path / "depth,x")
    assert EnhanceModels.parse(str(model)) == EnhanceModels(model)
    both = EnhanceModels.parse(f"{model},{cn}")
    assert both == EnhanceModels(model, cn)
    check_models(both)
    plain = EnhanceModels(tiny.model, tiny.controlnet)
    assert EnhanceModels.parse(f"{tiny.model},{tiny.controlnet}") == plain
    assert diffusion.comma_hint(f"{tiny.model},{tiny.controlnet}") == ""
    gone = f"{tmp_path}/gone,v1"
    assert EnhanceModels.parse(gone) == EnhanceModels(tmp_path / "gone", Path("v1").absolute())
    assert "split at its comma" in diffusion.comma_hint(gone)
    with pytest.raises(ModelFolderError, match="path holds a comma"):
        EnhanceModels.parse("a,b,c")
    r = _splatface("serve", "--store", tmp_path / "s", "--endpoint", "tcp://127.0.0.1:58104",
                   "--enhance", gone)  # fmt: skip
    assert r.returncode == 2 and f"{tmp_path}/gone is not a folder" in r.stderr
    assert f"was split at its comma into {tmp_path}/gone and" in r.stderr
    (tmp_path / "empty,dir").mkdir()
    r = _splatface("serve", "--store", tmp_path / "s", "--endpoint", "tcp://127.0.0.1:58104",
                   "--enhance", tmp_path / "empty,dir")  # fmt: skip
    assert r.returncode == 2 and f"{tmp_path}/empty,dir lacks model_index.json" in r.stderr


# -- the option through the protocol, the CLI and the add-on's client ---------------------


def test_service_refuses_bad_folders_before_building(client, tiny, tmp_path):
    from blender_addon.core.service import run_build

    photo = encode_png(np.zeros((32, 32, 3), np.uint8))

    broken = shutil.copytree(tiny.model, tmp_path / "model")
    _drop(broken / "unet")
    cases = [
        ([str(tmp_path / "nowhere")], errors.BAD_REQUEST, "not a folder"),
        ([str(broken)], errors.BAD_REQUEST, "unet/"),
        (["models/sd"], errors.BAD_REQUEST, "absolute"),
        ([str(tiny.model), str(tiny.controlnet), "x"], errors.TOO_LARGE, "2 items"),
        (["x" * 5000], errors.TOO_LARGE, "4096"),
    ]
    for folders, code, words in cases:
        with pytest.raises(ProtocolError) as e:
            client.build(photo, enhance=folders)
        assert e.value.code == code and words in e.value.message, e.value
    with pytest.raises(ProtocolError) as e:
        run_build(client, photo, enhance=[str(broken)])
    assert e.value.code == errors.BAD_REQUEST and e.value.details == {"field": "enhance"}
    caps = client.hello()["capabilities"]
    assert caps["enhance"] == {"available": True, "default": False}


def _splatface(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "inference_service", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip


def test_cli_checks_enhance_folders(tmp_path):
    r = _splatface("serve", "--store", tmp_path / "s", "--enhance", tmp_path / "nowhere")
    assert r.returncode == 2 and "nowhere is not a folder" in r.stderr
    photo = tmp_path / "p.png"
    photo.write_bytes(encode_png(np.zeros((32, 32, 3), np.uint8)))
    r = _splatface("build", photo, "--store", tmp_path / "s", "--enhance", "a,b,c")
    assert r.returncode != 0 and "MODEL_DIR" in r.stderr


def test_a_build_runs_the_stage_between_the_pseudo_views_and_the_fit(tiny, astronaut, monkeypatch):
    """``BuildOptions.enhance`` puts the stage into a real build (the tiny models paint at
    64 px with 2 steps instead of the preset's 512 px, which would only time them)."""
    from inference_service.build import enhance
    from inference_service.build.builder import BuildOptions, build_avatar
    from inference_service.store import summary

    monkeypatch.setattr(enhance.EnhanceSettings, "for_preset", classmethod(lambda c, p: FAST))
    events: list[tuple[str, float]] = []
    avatar = build_avatar(
        encode_png(astronaut), BuildOptions(preset="fast", enhance=tiny), "0123456789ab",
        lambda stage, fraction, message: events.append((stage, fraction)),
    )  # fmt: skip
    stages = [stage for stage, _ in events]
    order = list(dict.fromkeys(stages))
    assert order.index("views") < order.index("enhance") < order.index("coin"), order
    # the bar moves through the stage (it stood at 0.68 for minutes a view on a CPU)
    fractions = [f for _, f in events]
    assert fractions == sorted(fractions)
    painting = [f for stage, f in events if stage == "enhance"]
    assert painting[0] < 0.70 and painting[-1] > 0.78
    assert avatar.meta["enhance"] == tiny.to_dict()
    assert summary(avatar.meta)["enhanced"] is True  # as ``list`` (and the CLI) show it
    assert len(avatar.gaussians) > 10_000
