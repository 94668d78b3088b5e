"""Sample grids a reviewer reads without the code: real | generated pairs, labelled.

Pure: numpy arrays in, a uint8 picture out (Pillow draws it, in the font matplotlib ships, so the
picture is the same on every machine).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MAX_WIDTH = 1000  # the MLflow artifact viewer shows about this much without shrinking the picture
_INK = (0, 0, 0)
_MUTED = (90, 90, 90)
_PAD = 2  # between the two images of a pair
_PAIR_GAP = 14  # between pairs, wider than inside a pair, so pairs read as pairs
_ROW_GAP = 10
_MARGIN = 8
_CAPTION_LINES = 3
_SUBTITLE = "each pair: a real training image and the image generated from its caption (printed below the pair)"


@functools.cache
def _font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont:
    # DejaVu Sans as matplotlib ships it (a dependency already): the same letters on every machine,
    # with word spacing Pillow's embedded Aileron lacks at small sizes
    from matplotlib import get_data_path

    return ImageFont.truetype(str(Path(get_data_path()) / "fonts" / "ttf" / f"DejaVuSans{'-Bold' if bold else ''}.ttf"), size)


def _wrap(text: str, font, width: float, lines: int) -> list[str]:
    """``text`` broken at spaces into at most ``lines`` lines of at most ``width`` pixels, the last
    one cut with "..." when the text does not fit."""
    out: list[str] = []
    words = text.split()
    while words and len(out) < lines:
        line = words.pop(0)
        while words and font.getlength(f"{line} {words[0]}") <= width:
            line = f"{line} {words.pop(0)}"
        out.append(line)
    if words or (out and font.getlength(out[-1]) > width):
        last = out[-1]
        while last and font.getlength(last + "...") > width:
            last = last[:-1]
        out[-1] = last.rstrip() + "..."
    return out


def _cell_size(s: int, min_cell: int, max_cell: int) -> int:
    # small images are scaled up by a whole factor (nearest neighbour keeps 16-pixel images crisp),
    # large ones (Stable Diffusion's 512) down to max_cell
    return s * math.ceil(min_cell / s) if s < min_cell else min(s, max_cell)


def _scaled(img: np.ndarray, cell: int) -> Image.Image:
    s = img.shape[0]
    if cell % s == 0:
        return Image.fromarray(img.repeat(cell // s, 0).repeat(cell // s, 1))
    return Image.fromarray(img).resize((cell, cell), Image.Resampling.LANCZOS)


def comparison_grid(labels: list[str], real: list[np.ndarray], generated: list[np.ndarray],
                    captions: list[list[str]], title: str, pairs: int = 6, min_cell: int = 64,
                    max_cell: int = 128, max_width: int = MAX_WIDTH) -> np.ndarray:
    """A titled grid, one row per individual: its label, then up to ``pairs`` pairs real | generated.

    labels: one (multi-line) text per row, e.g. ``"Vexo\\n12 training images"``; real[i],
    generated[i]: uint8 ``[k_i, s, s, 3]``, generated[i][j] prompted by captions[i][j], the caption
    of real[i][j] (printed under the pair, wrapped to its width, at most 3 lines). ``title`` heads
    the picture (e.g. the bucket); under it a line says what a pair is and a header row names the
    columns "real" and "generated". Images become cells of ``cell`` pixels: an s < min_cell image
    scaled up by the whole factor ceil(min_cell / s) (nearest neighbour), a larger one shown at
    min(s, max_cell). Fewer pairs are shown where ``pairs`` would make the picture wider than
    ``max_width`` (at least one). Pair j of row r starts at x = label_width + j (2 cell + 2 + 14),
    its generated image 2 + cell further right. Returns uint8 ``[H, W, 3]`` on white.
    """
    if not generated:
        raise ValueError("comparison_grid needs at least one row")
    if not len(labels) == len(real) == len(generated) == len(captions):
        raise ValueError(f"{len(labels)} labels, {len(real)} real rows, {len(generated)} generated rows and "
                         f"{len(captions)} caption rows: one of each per row")
    if pairs < 1:
        raise ValueError(f"pairs must be >= 1, got {pairs}")
    s = generated[0].shape[1]
    for r, (re, ge, ca) in enumerate(zip(real, generated, captions)):
        if len(re) != len(ge) or re.shape[1:] != (s, s, 3) or ge.shape[1:] != (s, s, 3):
            raise ValueError(f"row {r} ({labels[r]!r}): real {re.shape} and generated {ge.shape} must be "
                             f"equally many [{s}, {s}, 3] images")
        if len(ca) != len(ge):
            raise ValueError(f"row {r} ({labels[r]!r}): {len(ca)} captions for {len(ge)} pairs")
    cell = _cell_size(s, min_cell, max_cell)
    title_font, text_font, bold_font, small_font = _font(16), _font(12), _font(12, bold=True), _font(10)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(measure.textbbox((0, 0), t, font=bold_font)[2] for label in labels for t in label.split("\n")) + 2 * _MARGIN
    pair_w = 2 * cell + _PAD
    fit = max(1, (max_width - label_w - _MARGIN + _PAIR_GAP) // (pair_w + _PAIR_GAP))
    shown = min(pairs, fit, max(len(g) for g in generated))
    line_h = measure.textbbox((0, 0), "Ag", font=text_font)[3] + 3
    small_h = measure.textbbox((0, 0), "Ag", font=small_font)[3] + 2
    wrapped = [[_wrap(c, small_font, pair_w, _CAPTION_LINES) for c in row[:shown]] for row in captions]
    caption_h = max((len(lines) for row in wrapped for lines in row), default=0) * small_h
    row_h = cell + caption_h + _ROW_GAP
    title_h = measure.textbbox((0, 0), title, font=title_font)[3] + 4
    top = _MARGIN + title_h + 2 * line_h + 2
    width = max(label_w + shown * (pair_w + _PAIR_GAP) - _PAIR_GAP,
                measure.textbbox((0, 0), title, font=title_font)[2], measure.textbbox((0, 0), _SUBTITLE, font=small_font)[2]) + _MARGIN
    height = top + len(generated) * row_h
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((_MARGIN, _MARGIN), title, fill=_INK, font=title_font)
    draw.text((_MARGIN, _MARGIN + title_h), _SUBTITLE, fill=_MUTED, font=small_font)
    for j in range(shown):
        x = label_w + j * (pair_w + _PAIR_GAP)
        draw.text((x, top - line_h), "real", fill=_INK, font=text_font)
        draw.text((x + cell + _PAD, top - line_h), "generated", fill=_INK, font=text_font)
    for r, (label, re, ge) in enumerate(zip(labels, real, generated)):
        y = top + r * row_h
        lines = label.split("\n")
        y_text = y + max(0, (cell - len(lines) * line_h) // 2)
        for k, text in enumerate(lines):  # the first line (the name) in bold
            draw.text((_MARGIN, y_text + k * line_h), text, fill=_INK, font=bold_font if k == 0 else text_font)
        for j in range(min(shown, len(ge))):
            x = label_w + j * (pair_w + _PAIR_GAP)
            canvas.paste(_scaled(re[j], cell), (x, y))
            canvas.paste(_scaled(ge[j], cell), (x + cell + _PAD, y))
            draw.multiline_text((x, y + cell + 1), "\n".join(wrapped[r][j]), fill=_MUTED, font=small_font, spacing=2)
    return np.asarray(canvas, np.uint8).copy()
