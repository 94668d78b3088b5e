"""Decoding stored image bytes into arrays for training and evaluation."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def decode_images(blobs: list[bytes], size: int) -> np.ndarray:
    """Encoded images -> uint8 ``[N, size, size, 3]`` (RGB; resized with a box filter when needed)."""
    out = np.empty((len(blobs), size, size, 3), np.uint8)
    for i, blob in enumerate(blobs):
        with Image.open(io.BytesIO(blob)) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BOX)
            out[i] = np.asarray(im)
    return out
