"""MLflow "models from code" definition of a logged PoGDiff text-to-image model.

``storage.tracking.log_model`` passes this file's path as ``python_model``: MLflow copies the file
into the logged model and executes it at load time, so no live object is ever cloudpickled. The
saved model folder (``PixelDiffusionPipeline.save_pretrained``) travels as the artifact ``"model"``.

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

import os
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel, PythonModelContext

from pogdiff.model import PixelDiffusionPipeline

PROMPT = "prompt"
# Column -> (type, default). ``storage.tracking.model_signature`` declares the same columns (a test
# checks that they agree).
OPTIONAL_COLUMNS: dict[str, tuple[type, int | float]] = {
    "seed": (int, 0),
    "num_images": (int, 1),
    "guidance_scale": (float, 1.0),
    "num_inference_steps": (int, 25),
}
DEVICE_ENV = "POGDIFF_DEVICE"  # e.g. "cpu" to keep a GPU free; default: cuda when available


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


class PixelDiffusionModel(PythonModel):
    """pyfunc wrapper around ``pogdiff.model.PixelDiffusionPipeline``."""

    def __init__(self) -> None:
        self.pipeline: PixelDiffusionPipeline | None = None

    def load_context(self, context: PythonModelContext) -> None:
        """Load the pipeline from the ``"model"`` artifact; move the UNet to the GPU when there is one."""
        self.pipeline = PixelDiffusionPipeline.from_pretrained(context.artifacts["model"])
        device = os.environ.get(DEVICE_ENV) or ("cuda" if torch.cuda.is_available() else "cpu")
        self.pipeline.unet.to(device)

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


mlflow.models.set_model(PixelDiffusionModel())
