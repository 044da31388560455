"""Local diffusion weights for the optional ``enhance`` stage: check, load, cache.

Weights come only from folders on disk (``local_files_only``), never from a hub, and
only as safetensors: folder paths can arrive in build requests, and a pickled ``.bin``
would run code on load. :func:`check_models` reads nothing but file names and small JSON
configs, so the service can refuse a bad folder before it queues a build; :func:`load`
imports ``diffusers`` (slow, optional) on first use only.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: What a Stable Diffusion (inpainting) folder must hold, as diffusers' ``save_pretrained``
#: writes it (and as the folders of the public weights on the Hugging Face hub are laid out).
_MODEL_PARTS = {
    "unet": ("config.json", "diffusion_pytorch_model"),
    "vae": ("config.json", "diffusion_pytorch_model"),
    "text_encoder": ("config.json", "model"),
}
_CONTROLNET_WEIGHTS = "diffusion_pytorch_model"
#: Weight file variants ``from_pretrained`` can be told to load, in order of preference.
_VARIANTS = (None, "fp16")
_INSTALL = "pip install 'splatface[enhance]'"


class ModelFolderError(ValueError):
    """A model folder is missing, incomplete or unusable; the message names the part."""


@dataclass(frozen=True)
class EnhanceModels:
    """Where the diffusion weights are. ``model``: a Stable Diffusion inpainting folder
    (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
    ``scheduler/``); ``controlnet``: a depth ControlNet folder (``config.json`` and
    weights) trained for the same base model, or ``None`` for inpainting without depth
    conditioning."""

    model: Path
    controlnet: Path | None = None

    @classmethod
    def parse(cls, text: str) -> EnhanceModels:
        """``MODEL_DIR[,CONTROLNET_DIR]`` as the CLI takes it; paths made absolute. A
        folder's path may hold a comma: where splitting at every comma leaves a piece
        that is no folder here, the value whole, else split at one of its commas, is
        taken where that names existing folders (``~/models/sd,v1`` whole)."""
        parts = [p.strip() for p in text.split(",")]
        if not all(_is_dir(p) for p in parts):
            commas = [i for i, c in enumerate(text) if c == ","]
            ways = [[text.strip()]] + [[text[:i].strip(), text[i + 1 :].strip()] for i in commas]
            parts = next((w for w in ways if all(_is_dir(p) for p in w)), parts)
        if not 1 <= len(parts) <= 2 or not all(parts):
            raise ModelFolderError(
                f"--enhance takes MODEL_DIR or MODEL_DIR,CONTROLNET_DIR, got {text!r}; a "
                "folder whose path holds a comma is taken whole where it exists"
            )
        model = Path(parts[0]).expanduser().absolute()
        controlnet = Path(parts[1]).expanduser().absolute() if len(parts) == 2 else None
        return cls(model, controlnet)

    def to_dict(self) -> dict[str, str]:
        """JSON-able, for the avatar's build facts."""
        out = {"model": str(self.model)}
        if self.controlnet is not None:
            out["controlnet"] = str(self.controlnet)
        return out


def _is_dir(text: str) -> bool:
    return bool(text) and Path(text).expanduser().is_dir()


def comma_hint(text: str) -> str:
    """What to add to an error about the folders of ``--enhance`` ``text``, where
    :meth:`EnhanceModels.parse` split it at a comma into a piece that is no folder here:
    the user may have meant one folder whose path holds the comma."""
    try:
        models = EnhanceModels.parse(text)
    except ModelFolderError:
        return ""
    if models.controlnet is None or (models.model.is_dir() and models.controlnet.is_dir()):
        return ""
    return (
        f" (--enhance {text!r} was split at its comma into {models.model} and "
        f"{models.controlnet}; a folder whose path holds a comma is taken whole where it "
        "exists on this machine)"
    )


def has_diffusers() -> bool:
    """Whether the ``enhance`` extra is installed (without importing it)."""
    from importlib.util import find_spec

    return all(find_spec(m) is not None for m in ("diffusers", "transformers", "safetensors"))


def _read_config(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ModelFolderError(f"{what} lacks {path.name} ({path})")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFolderError(
            f"{what}'s {path.name} is not readable JSON ({path}): {exc}"
        ) from None
    if not isinstance(config, dict):
        raise ModelFolderError(f"{what}'s {path.name} is not a JSON object ({path})")
    return config


def _check_weights(path: Path) -> None:
    """A ``.safetensors`` file whose header reads and whose tensors all lie within it:
    a truncated download or copy passed the folder check and failed the build at its
    enhance stage, after its first stages ran (the header is read, not the weights)."""
    try:
        have = path.stat().st_size
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            text = f.read(min(size, 100 << 20))
    except OSError as exc:
        raise ModelFolderError(f"cannot read the weights {path}: {exc.strerror or exc}") from None
    need = 8 + size
    if have >= need:
        try:
            header = json.loads(text)
            ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
            need += max(ends, default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise ModelFolderError(
                f"the weights {path} have no readable header: fetch them again"
            ) from None
    if have < need:
        raise ModelFolderError(
            f"the weights {path} are truncated ({have} bytes of {need}): fetch or copy them again"
        )


def _variants(folder: Path, stem: str, what: str) -> set[str | None]:
    """The weight variants present for ``stem`` (single file, checked, or sharded
    index)."""
    found: set[str | None] = set()
    for variant in _VARIANTS:
        name = stem + (f".{variant}" if variant else "") + ".safetensors"
        if (folder / name).is_file():
            _check_weights(folder / name)
            found.add(variant)
        elif (folder / f"{name}.index.json").is_file():
            found.add(variant)
    if not found:
        pickled = sorted(p.name for p in folder.glob("*.bin"))
        hint = (
            f"; it has only pickled weights ({', '.join(pickled)}), which splatface does "
            "not load: convert them to safetensors or fetch the .safetensors files"
            if pickled
            else ""
        )
        raise ModelFolderError(f"{what} lacks its weights {stem}.safetensors ({folder}){hint}")
    return found


def _folder(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.is_absolute():
        raise ModelFolderError(f"{what} must be an absolute path, got {str(path)!r}")
    if not path.is_dir():
        raise ModelFolderError(f"{what} {path} is not a folder")
    return path


@dataclass(frozen=True)
class _Checked:
    """What :func:`check_models` learnt, for :func:`load`."""

    variant: str | None
    controlnet_variant: str | None


def check_models(models: EnhanceModels) -> _Checked:
    """Check both folders hold every part the pipeline needs, without importing anything
    heavy; raise :class:`ModelFolderError` naming the first missing or mismatched part."""
    root = _folder(models.model, "the enhance model folder")
    index = _read_config(root / "model_index.json", f"the enhance model folder {root}")
    common: set[str | None] = set(_VARIANTS)
    configs: dict[str, dict[str, Any]] = {}
    for part, (config, stem) in _MODEL_PARTS.items():
        what = f"the enhance model folder's {part}/"
        sub = root / part
        if not sub.is_dir():
            raise ModelFolderError(f"the enhance model folder {root} lacks {part}/")
        configs[part] = _read_config(sub / config, what)
        common &= _variants(sub, stem, what)
    tok = root / "tokenizer"
    if not tok.is_dir():
        raise ModelFolderError(f"the enhance model folder {root} lacks tokenizer/")
    if not (tok / "tokenizer.json").is_file() and not (
        (tok / "vocab.json").is_file() and (tok / "merges.txt").is_file()
    ):
        raise ModelFolderError(
            f"the enhance model folder's tokenizer/ lacks vocab.json and merges.txt "
            f"(or tokenizer.json) ({tok})"
        )
    if not (root / "scheduler").is_dir():
        raise ModelFolderError(f"the enhance model folder {root} lacks scheduler/")
    _read_config(root / "scheduler" / "scheduler_config.json", "the enhance model's scheduler/")
    if not common:
        raise ModelFolderError(
            f"the enhance model folder {root}: unet/, vae/ and text_encoder/ have no weight "
            "variant in common (all full precision, or all .fp16)"
        )
    if index.get("_class_name", "").startswith("StableDiffusionXL"):
        raise ModelFolderError(
            f"the enhance model folder {root} holds SDXL ({index['_class_name']}); "
            "use a Stable Diffusion 1.x or 2.x inpainting model"
        )
    variant = None if None in common else "fp16"
    cn_variant = None
    if models.controlnet is not None:
        cn = _folder(models.controlnet, "the enhance ControlNet folder")
        cn_config = _read_config(cn / "config.json", f"the enhance ControlNet folder {cn}")
        found = _variants(cn, _CONTROLNET_WEIGHTS, f"the enhance ControlNet folder {cn}")
        cn_variant = None if None in found else "fp16"
        want = configs["unet"].get("cross_attention_dim")
        got = cn_config.get("cross_attention_dim")
        if want != got:
            raise ModelFolderError(
                f"the ControlNet {cn} was trained for a base model with text width {got}, "
                f"the inpainting model {root} has {want} (Stable Diffusion 1.x is 768, 2.x "
                "is 1024): use a ControlNet made for the same base model"
            )
    return _Checked(variant, cn_variant)


def check_ready(models: EnhanceModels) -> _Checked:
    """What a service checks before accepting ``models``: the ``enhance`` extra is
    installed and both folders are complete (:func:`check_models`, whose findings it
    returns)."""
    if not has_diffusers():
        raise ModelFolderError(f"this service cannot run the enhance stage: {_INSTALL}")
    return check_models(models)


def device_and_dtype(device: str | None = None) -> tuple[str, Any]:
    """CUDA in half precision when present (or asked for), else CPU in float32 (half
    precision on CPU is slow and, in the VAE, inaccurate)."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return device, torch.float16 if device == "cuda" else torch.float32


_cache: dict[tuple, Any] = {}
_cache_lock = threading.Lock()


def _stamp(models: EnhanceModels) -> tuple:
    """The folders' configs and weight files, with each one's modification time, size
    and inode: replacing or rewriting any of them reloads the models (a weight file
    copied over a loaded one went unseen, and the pipeline read the new bytes)."""
    paths = [models.model / "model_index.json", models.model / "unet" / "config.json"]
    for part in _MODEL_PARTS:
        paths += sorted((models.model / part).glob("*.safetensors*"))
    if models.controlnet is not None:
        paths.append(models.controlnet / "config.json")
        paths += sorted(models.controlnet.glob("*.safetensors*"))
    stats = [(str(p), p.stat()) for p in paths]
    return tuple((name, st.st_mtime_ns, st.st_size, st.st_ino) for name, st in stats)


def load(models: EnhanceModels, device: str | None = None) -> Any:
    """The inpainting pipeline for ``models`` on ``device`` (None: see
    :func:`device_and_dtype`): ``StableDiffusionControlNetInpaintPipeline`` with a
    ControlNet, ``StableDiffusionInpaintPipeline`` without. The last one loaded is kept,
    so builds after the first skip the load (seconds to a minute for real weights)."""
    checked = check_ready(models)
    device, dtype = device_and_dtype(device)
    key = (_stamp(models), device, str(dtype))
    with _cache_lock:
        if key in _cache:
            return _cache[key]
        _cache.clear()  # one pipeline at a time: a real one is gigabytes
        pipe = _load(models, checked, device, dtype)
        _cache[key] = pipe
        return pipe


def _load(models: EnhanceModels, checked: _Checked, device: str, dtype: Any) -> Any:
    from diffusers import (
        ControlNetModel,
        StableDiffusionControlNetInpaintPipeline,
        StableDiffusionInpaintPipeline,
    )
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # their loading bars would land in the service's log, one line per refresh
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()

    common = {"local_files_only": True, "use_safetensors": True, "dtype": dtype}
    # The safety checker is left out: it blacks out whole images it dislikes, which here
    # would paint the back of a head black; the pictures are textures of the user's own
    # head, not images shown or served as such. The weights' licence still applies.
    extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    try:
        if models.controlnet is None:
            pipe = StableDiffusionInpaintPipeline.from_pretrained(
                str(models.model), variant=checked.variant, **common, **extra
            )
        else:
            controlnet = ControlNetModel.from_pretrained(
                str(models.controlnet), variant=checked.controlnet_variant, **common
            )
            pipe = StableDiffusionControlNetInpaintPipeline.from_pretrained(
                str(models.model), controlnet=controlnet, variant=checked.variant,
                **common, **extra,
            )  # fmt: skip
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelFolderError(f"cannot load the enhance models {models.to_dict()}: {exc}") from exc
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    _own_memory(pipe)
    return pipe


def _own_memory(pipe: Any) -> None:
    """Copy every weight the pipeline holds in host memory out of its mapped file into
    memory of its own: a weight file changed on disk while loaded (a ``cp`` of a
    fine-tuned UNet) killed the service with SIGBUS, or fed the model the new file's
    bytes. Weights moved to a GPU are copies already."""
    import torch

    for part in pipe.components.values():
        if isinstance(part, torch.nn.Module):
            with torch.no_grad():
                for t in (*part.parameters(), *part.buffers()):
                    if t.device.type == "cpu":
                        t.data = t.data.clone()
