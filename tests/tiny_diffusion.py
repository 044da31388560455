"""Tiny randomly initialised diffusion models, written to folders the way real weights are.

The ``enhance`` stage loads Stable Diffusion inpainting folders (and a ControlNet) from
disk only. Tests and ``benchmarks/enhance.py`` cannot download real weights, so they
build models with the same classes and layout but a few thousand parameters, save them
with ``save_pretrained`` and load them back through the project's own loader. The
pictures they paint are noise; what they check is the plumbing.
"""

from __future__ import annotations

import json
from pathlib import Path

#: Characters the tiny tokenizer knows (anything else becomes ``<|endoftext|>``).
_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789,.'-"
_CROSS = 32  # text embedding width shared by the text encoder, UNet and ControlNet


def _tokenizer(folder: Path):
    """A CLIP tokenizer over single characters, written from scratch (no hub)."""
    from transformers import CLIPTokenizer

    tokens = ["<|startoftext|>", "<|endoftext|>"]
    tokens += list(_ALPHABET) + [c + "</w>" for c in _ALPHABET]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(
        vocab_file=str(folder / "vocab.json"),
        merges_file=str(folder / "merges.txt"),
        model_max_length=128,
        pad_token="<|endoftext|>",
    )
    return tok


def _components(seed: int, in_channels: int) -> dict:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=_CROSS,
        attention_head_dim=4,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        sample_size=64,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=_CROSS,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=2 + 2 * len(_ALPHABET),
            max_position_embeddings=128,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return {"unet": unet, "vae": vae, "text_encoder": text, "scheduler": scheduler}


def make_tiny_inpainting(folder: Path, seed: int = 0, in_channels: int = 9) -> Path:
    """Write a tiny Stable Diffusion inpainting pipeline folder (9-channel UNet like
    ``stable-diffusion-inpainting``; 4 for a plain text-to-image UNet). Returns ``folder``."""
    from diffusers import StableDiffusionInpaintPipeline

    folder = Path(folder)
    parts = _components(seed, in_channels)
    pipe = StableDiffusionInpaintPipeline(
        **parts,
        tokenizer=_tokenizer(folder / "_tok"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    for f in (folder / "_tok").iterdir():
        f.unlink()
    (folder / "_tok").rmdir()
    return folder


def make_tiny_controlnet(folder: Path, seed: int = 1) -> Path:
    """Write a tiny ControlNet folder that fits :func:`make_tiny_inpainting`'s UNet (its
    conditioning embedding halves the image once, as the tiny VAE does). Returns ``folder``."""
    import torch
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    net = ControlNetModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        in_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        cross_attention_dim=_CROSS,
        conditioning_embedding_out_channels=(16, 32),
        attention_head_dim=4,
    )
    # A fresh ControlNet's output convolutions are zero, so it would change nothing; give
    # them small weights so tests can see the depth condition reach the picture.
    with torch.no_grad():
        for block in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
            block.weight.normal_(0.0, 0.05)
    net.save_pretrained(folder)
    return Path(folder)


def make_tiny_models(root: Path, controlnet: bool = True) -> tuple[Path, Path | None]:
    """Both folders under ``root``: (``root/inpaint``, ``root/controlnet`` or None)."""
    model = make_tiny_inpainting(Path(root) / "inpaint")
    return model, make_tiny_controlnet(Path(root) / "controlnet") if controlnet else None


def sphere_views(
    size: int = 64,
    yaws: tuple[float, ...] = (0.0, 60.0, -60.0, 120.0, -120.0, 180.0),
    radius: float = 0.1,
    seed: int = 0,
):
    """Views of a sphere "head" (centre at the origin) from cameras orbiting it at the
    given yaws; ``views[0]`` (yaw ``yaws[0]``) plays the photo. Depth is exact (ray-sphere
    intersection); colour is a smooth pattern of the surface point, so a pixel warped
    between views keeps its colour. Pseudo-views are trusted (0.9) where the photo's camera
    sees the point head-on, and barely (0.1) elsewhere, with a flat grey there."""
    import math

    import numpy as np

    from inference_service.build.views import (
        SOURCE_INPAINT,
        SOURCE_NONE,
        SOURCE_PHOTO,
        View,
        unproject,
    )
    from kernels import Camera
    from protocol.camera import framing_distance, intrinsics_from_fov, orbit

    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 2 * math.pi, 3)
    intrinsics = intrinsics_from_fov(size, size, 30.0)
    distance = framing_distance(radius, 30.0, fill=0.8)
    photo_dir = None
    views = []
    for k, yaw in enumerate(yaws):
        camera = Camera.from_arrays(intrinsics, orbit(np.zeros(3), distance, yaw, 0.0))
        # ray-sphere intersection in camera space: the sphere's centre is at c
        c = camera.world_to_camera[:3, 3]
        j, i = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5)
        d = np.stack([(j - camera.cx) / camera.fx, (i - camera.cy) / camera.fy,
                      np.ones_like(j)], -1)  # fmt: skip
        a = (d * d).sum(-1)
        b = (d * c).sum(-1)
        disc = b * b - a * (c @ c - radius**2)
        hit = disc > 0
        depth = np.full((size, size), np.inf)
        depth[hit] = (b[hit] - np.sqrt(disc[hit])) / a[hit]
        points = unproject(depth, camera)
        colour = np.zeros((size, size, 3), np.float32)
        normal = points[hit] / radius
        colour[hit] = 0.5 + 0.4 * np.sin(8 * normal @ np.eye(3) + phase)
        if k == 0:
            photo_dir = camera.position / np.linalg.norm(camera.position)
            confidence = hit.astype(np.float32)
            source = np.where(hit, SOURCE_PHOTO, SOURCE_NONE).astype(np.uint8)
        else:
            seen = hit.copy()
            seen[hit] = normal @ photo_dir > 0.3
            confidence = np.where(seen, 0.9, np.where(hit, 0.1, 0.0)).astype(np.float32)
            colour[hit & ~seen] = 0.5
            source = np.where(seen, SOURCE_PHOTO, np.where(hit, SOURCE_INPAINT, SOURCE_NONE))
            source = source.astype(np.uint8)
        views.append(
            View(
                camera=camera,
                image=colour,
                confidence=confidence,
                depth=depth.astype(np.float32),
                alpha=hit.astype(np.float32),
                source=source,
                yaw=None if k == 0 else yaw,
                pitch=None if k == 0 else 0.0,
            )
        )
    return views
