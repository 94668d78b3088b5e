"""The sample grid: real | generated pairs, scaled without blending, titled, labelled and captioned."""

import numpy as np
import pytest

from pogdiff.grids import MAX_WIDTH, comparison_grid

SIZE = 16


def _solid(rgb, size: int = SIZE) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, np.uint8), (size, size, 3)).copy()


def _box(grid: np.ndarray, rgb) -> tuple[int, int, int, int, int]:
    """(top, left, bottom, right, pixel count) of the pixels of one colour."""
    ys, xs = np.nonzero((grid == np.array(rgb, np.uint8)).all(-1))
    return ys.min(), xs.min(), ys.max(), xs.max(), len(ys)


def _ink(region: np.ndarray) -> bool:
    """Whether text was drawn there: dark anti-aliased shades, which no test image uses."""
    return bool((region < 100).all(-1).any())


def test_comparison_grid_pairs_real_and_generated_images_scaled_up():
    real_rgb = [[(200, 20 + 10 * j, 40 * r + 10) for j in range(8)] for r in range(2)]
    gen_rgb = [[(20 + 10 * j, 200, 40 * r + 10) for j in range(8)] for r in range(2)]
    counts = (8, 2)  # the first row has more pairs than are shown
    real = [np.stack([_solid(real_rgb[r][j]) for j in range(n)]) for r, n in enumerate(counts)]
    gen = [np.stack([_solid(gen_rgb[r][j]) for j in range(n)]) for r, n in enumerate(counts)]
    gen[1][1, :, SIZE // 2:] = (250, 120, 0)  # half one colour, half another
    captions = [[f"caption {r}.{j}" for j in range(n)] for r, n in enumerate(counts)]
    grid = comparison_grid(["Vexo\n40 training images", "Talbrin\n2 training images"], real, gen, captions,
                           "few bucket: 2 individuals", pairs=6, min_cell=48)
    assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[2] == 3
    cell = 48  # 16-pixel images, scaled up 3x by nearest neighbour
    for r, n in enumerate(counts):
        for j in range(8):
            present = (grid == np.array(real_rgb[r][j], np.uint8)).all(-1).any()
            assert present == (j < min(n, 6))  # at most 6 pairs per row
        for j in range(min(n, 6)):
            top, left, bottom, right, count = _box(grid, real_rgb[r][j])
            assert (bottom - top + 1, right - left + 1, count) == (cell, cell, cell * cell)
            g_top, g_left, *_ = _box(grid, gen_rgb[r][j])
            assert g_top == top and g_left == right + 3  # generated right of its real image, 2 pixels apart
            assert _ink(grid[bottom + 1 : bottom + 14, left : right + cell])  # its caption under the pair
    # nearest neighbour: the half-and-half image is two clean 24 x 48 blocks, no blended pixels
    *_, left_count = _box(grid, gen_rgb[1][1])
    top, left, bottom, right, right_count = _box(grid, (250, 120, 0))
    assert left_count == right_count == cell * cell // 2
    cell_pixels = grid[top : bottom + 1, left - cell // 2 : right + 1].reshape(-1, 3)
    assert {tuple(p) for p in cell_pixels} == {tuple(gen_rgb[1][1]), (250, 120, 0)}
    # the rows are stacked, the second below the first, with the first row's captions between them
    assert _box(grid, real_rgb[1][0])[0] > _box(grid, real_rgb[0][0])[2] + 12
    top, left, *_ = _box(grid, real_rgb[0][0])
    assert _ink(grid[: top - 20]) and _ink(grid[top - 16 : top, left : left + 2 * cell])  # title, then the header row
    assert _ink(grid[:, :left])  # the labels left of the images
    assert grid.shape[1] <= MAX_WIDTH
    with pytest.raises(ValueError, match=r"row 1 \('b'\): real \(1, 16, 16, 3\) and generated \(2, 16, 16, 3\)"):
        comparison_grid(["a", "b"], [real[1], real[1][:1]], [gen[1], gen[1]], [["x", "y"]] * 2, "t")
    with pytest.raises(ValueError, match=r"row 0 \('a'\): 1 captions for 2 pairs"):
        comparison_grid(["a"], [real[1]], [gen[1]], [["x"]], "t")


def test_wide_grids_show_fewer_pairs_and_large_images_shrink():
    # 512-pixel images (Stable Diffusion) become 128-pixel cells, and a row of 6 pairs would be
    # over 1500 pixels wide: the grid shows the pairs that fit in MAX_WIDTH
    real = np.stack([_solid((200, 10 * j, 0), 512) for j in range(6)])
    gen = np.stack([_solid((10 * j, 200, 0), 512) for j in range(6)])
    grid = comparison_grid(["x\n6 training images"], [real], [gen], [["a long caption " * 5] * 6], "many bucket")
    assert grid.shape[1] <= MAX_WIDTH
    shown = [j for j in range(6) if (grid == np.array((200, 10 * j, 0), np.uint8)).all(-1).any()]
    assert shown == [0, 1, 2]  # label + 3 x (2 x 128 + 2) + 2 gaps fits, a fourth pair does not
    top, left, bottom, right, count = _box(grid, (200, 0, 0))
    assert (bottom - top + 1, right - left + 1) == (128, 128)
