"""``load_pipeline``: either pipeline kind, picked by the layout of the model folder."""

from __future__ import annotations

from pathlib import Path

from pogdiff.pipelines.base import META_FILE, TextToImagePipeline
from pogdiff.pipelines.pixel import PixelDiffusionPipeline
from pogdiff.pipelines.sd import StableDiffusionPipeline, is_sd_folder


def load_pipeline(ref: str) -> TextToImagePipeline:
    """Load either kind by its layout: ``model_index.json`` naming a ``vae`` -> Stable Diffusion (latent);
    ``builtin:<name>`` or a folder with a pixel ``pogdiff.json`` -> pixel. ``ref`` that is not a local
    path is taken as a hub id (read from the local cache: HF_HUB_OFFLINE)."""
    if ref.startswith("builtin:"):
        return PixelDiffusionPipeline.from_pretrained(ref)
    path = Path(ref)
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"model reference is a file, not a model folder: {path}")
        if is_sd_folder(path):
            return StableDiffusionPipeline.from_pretrained(ref)
        if (path / META_FILE).is_file():
            return PixelDiffusionPipeline.from_pretrained(ref)
        raise FileNotFoundError(f"{path} is neither a Stable Diffusion folder (model_index.json with a vae) nor a pogdiff pixel model ({META_FILE})")
    return StableDiffusionPipeline.from_pretrained(ref)
