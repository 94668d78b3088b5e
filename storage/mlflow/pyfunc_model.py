"""MLflow "models from code" definition of a logged PoGDiff text-to-image model.

``storage.mlflow.packaging.log_model`` passes this file's path as ``python_model``: MLflow copies the file
into the logged model and executes it at load time, so no live object is ever cloudpickled. The
artifact ``"model"`` is, by the model config's ``weights``:

- ``full``: the saved model folder (pixel or Stable Diffusion, loaded by its layout with
  ``pogdiff.pipelines.loader.load_pipeline``);
- ``lora``: ``pogdiff.json`` + ``scheduler/`` of the fine-tuned model and the LoRA adapter in
  ``lora/`` (peft format, as the trainer saves it). Everything else comes from the model config's
  ``base_model``: the artifact ``"base"`` for a builtin base (``builtin:<name>``, part of the
  package code), else the folder or hub id it names. A folder base's UNet must still have the
  recorded ``base_model_digest``; the adapter is fused into the UNet on load.

Input: a DataFrame, one row per prompt::

    prompt               str    required
    seed                 int    default 0
    num_images           int    default 1      images generated for this row
    guidance_scale       float  default 1.0    classifier-free guidance weight (1 = none)
    num_inference_steps  int    default 25     DDIM steps

Output: uint8 ``[sum(num_images), H, W, 3]``, the images of row 0 first, then row 1, ...
Each row is generated on its own, so a row's images depend only on that row (and the model), never
on the other rows of the request.

Importing this module has one side effect, ``mlflow.models.set_model``; the pipeline itself is
loaded only in ``load_context``.
"""

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from diffusers import DDPMScheduler
from mlflow.pyfunc import PythonModel, PythonModelContext

from pogdiff.pipelines.base import ADAPTER_DIR, META_FILE, TextToImagePipeline
from pogdiff.pipelines.loader import load_pipeline
from pogdiff.pipelines.pixel import BUILTIN_MODELS

PROMPT = "prompt"
# Column -> (type, default). ``storage.mlflow.packaging.model_signature`` declares the same columns (a test
# checks that they agree).
OPTIONAL_COLUMNS: dict[str, tuple[type, int | float]] = {
    "seed": (int, 0),
    "num_images": (int, 1),
    "guidance_scale": (float, 1.0),
    "num_inference_steps": (int, 25),
}
DEVICE_ENV = "POGDIFF_DEVICE"  # e.g. "cpu" to keep a GPU free; default: cuda when available
BASE_ARTIFACT = "base"  # a builtin base model travels with the LoRA model under this artifact name
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' save_lora_adapter file name


def unet_digest(model_folder: str | Path) -> str:
    """sha256 over the UNet config and weight files of a model folder (sorted by name), hex."""
    unet = Path(model_folder) / "unet"
    files = sorted(p for p in unet.iterdir() if p.name == "config.json" or p.suffix in (".safetensors", ".bin"))
    if not files:
        raise FileNotFoundError(f"no UNet config or weights in {unet}")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def load_adapter_model(
    folder: str | Path, base_model: str, base_digest: str | None, base_folder: str | None = None
) -> TextToImagePipeline:
    """Base pipeline + the fine-tuned scheduler + the LoRA adapter of ``folder``, fused.

    The base is ``base_folder`` when given (the shipped copy of a builtin base), else
    ``base_model`` (a folder, or a hub id read from the local cache). Fusing (W + B A once) makes
    sampling cost what the base costs; the result equals the trainer's fused model folder.
    """
    folder = Path(folder)
    ref = base_folder or str(BUILTIN_MODELS.get(base_model, base_model))
    if base_digest is not None and (found := unet_digest(ref)) != base_digest:
        raise ValueError(
            f"base model {base_model!r} has changed since the adapter was trained on it "
            f"(UNet digest {found[:12]}..., recorded {base_digest[:12]}...)"
        )
    pipe = load_pipeline(ref)
    meta = json.loads((folder / META_FILE).read_text())
    for key, found in (("space", pipe.space), ("image_size", pipe.image_size)):
        if meta.get(key) != found:
            raise ValueError(f"adapter and base model {base_model!r} disagree on {key}: {meta.get(key)!r} != {found!r}")
    # the training scheduler, as the trainer saw it (e.g. a prediction_type override)
    pipe.scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(str(folder / "scheduler")))
    pipe.unet.load_lora_adapter(
        str(folder / ADAPTER_DIR), prefix=None, weight_name=LORA_WEIGHTS, use_safetensors=True, local_files_only=True
    )
    pipe.unet.fuse_lora()
    pipe.unet.unload_lora()
    return pipe


def _cell(row: pd.Series, column: str) -> int | float:
    """The value of an optional column in one row; missing column or missing value -> default."""
    kind, default = OPTIONAL_COLUMNS[column]
    value = row.get(column, None)
    if value is None or pd.isna(value):
        return default
    if kind is int:
        as_float = float(value)
        if not as_float.is_integer():
            raise ValueError(f"column {column!r} must hold integers, got {value!r}")
        return int(as_float)
    return float(value)


class TextToImageModel(PythonModel):
    """pyfunc wrapper around a pogdiff text-to-image pipeline (pixel or Stable Diffusion)."""

    def __init__(self) -> None:
        self.pipeline: TextToImagePipeline | None = None

    def load_context(self, context: PythonModelContext) -> None:
        """Load the pipeline from the ``"model"`` artifact (and the base model for a LoRA model);
        move the UNet to the GPU when there is one."""
        config = context.model_config or {}
        if config.get("weights") == "lora":
            self.pipeline = load_adapter_model(
                context.artifacts["model"],
                config["base_model"],
                config.get("base_model_digest"),
                context.artifacts.get(BASE_ARTIFACT),
            )
        else:
            self.pipeline = load_pipeline(context.artifacts["model"])
        device = os.environ.get(DEVICE_ENV) or ("cuda" if torch.cuda.is_available() else "cpu")
        self.pipeline.to(device)

    def predict(
        self,
        context: PythonModelContext | None,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> np.ndarray:
        """Generate images for each row; returns uint8 ``[sum(num_images), H, W, 3]`` in row order."""
        if self.pipeline is None:
            raise RuntimeError("model not loaded: load it with mlflow.pyfunc.load_model")
        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if PROMPT not in df.columns:
            raise ValueError(f"model input needs a {PROMPT!r} column; got columns {list(df.columns)}")
        out = []
        for i, (_, row) in enumerate(df.iterrows()):
            prompt = row[PROMPT]
            if not isinstance(prompt, str):
                raise ValueError(f"row {i}: {PROMPT!r} must be a string, got {prompt!r}")
            cells = {c: _cell(row, c) for c in OPTIONAL_COLUMNS}
            if cells["num_images"] < 1 or cells["num_inference_steps"] < 1:
                raise ValueError(f"row {i}: num_images and num_inference_steps must be >= 1, got {cells}")
            out.append(
                self.pipeline.generate(
                    [prompt],
                    num_images_per_prompt=cells["num_images"],
                    seed=cells["seed"],
                    guidance_scale=cells["guidance_scale"],
                    num_inference_steps=cells["num_inference_steps"],
                )
            )
        if not out:
            s = self.pipeline.image_size
            return np.zeros((0, s, s, 3), np.uint8)
        return np.concatenate(out)


mlflow.models.set_model(TextToImageModel())
