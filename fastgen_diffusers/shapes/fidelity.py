"""Fidelity with an exact reference: how far an image is from the nearest clean drawing ShapesWorld could make.

ShapesWorld draws one shape of a palette colour (jittered by at most `COLOUR_JITTER` per channel) on a grey
background (jittered by `BACKGROUND_JITTER`), centred within `POSITION_JITTER` of a grid centre, with a half extent
within 5% of its size's. For an image and the shape it shows, `fit_drawing` searches the drawings the world can
make near the image's blob: centre on a quarter-pixel grid around the nearest grid centre, half extent over its
size's range, and, in closed form for each, the background grey and fill colour (least squares, then clamped to
the jitter box of the nearest palette entry and grey level). The fidelity distance is the root-mean-square
difference (0-255 grey levels, over pixels and channels) between the image and that drawing.

Clean images sit near 0 (the search grid and 4x supersampling against the renderer's 8x leave a small
floor); a VAE's reconstructions of them somewhat higher; blends, several shapes, several colours and speckle far
higher.

The pixels the drawing leaves unexplained are of two kinds, and the judge's reject answer (`judge.py`) counts them
apart. A *foreign* pixel has a colour that no mix of the drawing's background and fill can give (its distance
from the segment between the two colours is above `UNEXPLAINED_LEVEL`): a second colour, a blend, speckle. A
*misplaced* pixel has a colour of the drawing but in the wrong place, more than `OUTLINE_TOLERANCE` pixels from the
drawing's outline: a second shape, a stray mark, or an outline far off the shape's. Within that band of the
outline a deviation is a sloppy edge of the one shape, which the CNN's shape reading judges, not a second object.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .captions import BACKGROUNDS, COLOURS, SHAPES
from .render import BACKGROUND_JITTER, COLOUR_JITTER, GRID_CENTRES, HALF_EXTENTS, IMAGE_SIZE, POSITION_JITTER


SUPERSAMPLING = 4
CENTRE_STEP = 0.25  # pixels between candidate centres
RADIUS_FACTORS = (0.95, 0.975, 1.0, 1.025, 1.05)  # the renderer draws r = half extent * U(0.95, 1.05)
# A pixel the drawing does not explain differs from it by more than this in some channel (grey levels): more
# than an anti-aliased edge a quarter pixel off, less than half the contrast of any palette colour on any grey.
UNEXPLAINED_LEVEL = 40.0
OUTLINE_TOLERANCE = 1.0  # pixels from the drawing's outline within which a misplaced pixel is an edge deviation

_GREY_LEVELS = np.array(sorted(BACKGROUNDS.values()), dtype=np.float64)
_PALETTE = np.array(list(COLOURS.values()), dtype=np.float64)
WINDOW = 16  # pixels: every drawing near one grid centre fits in a WINDOW x WINDOW crop around it


@dataclass(frozen=True)
class DrawingFit:
    """The nearest clean drawing found for one image, and its distance from the image."""

    distance: float  # RMS difference, grey levels 0-255
    unexplained_pixels: int  # pixels that differ from the drawing by more than UNEXPLAINED_LEVEL in some channel
    foreign_pixels: int  # pixels whose colour no mix of the fitted background and fill explains
    misplaced_pixels: int  # unexplained pixels of the drawing's colours, beyond OUTLINE_TOLERANCE of its outline
    shape: str
    centre: tuple[float, float]
    half_extent: float
    colour: tuple[float, float, float]
    background: float

    def features(self) -> np.ndarray:
        """The drawing's continuous parameters and its distance: a low-dimensional, exactly defined feature vector."""
        return np.array([*self.centre, self.half_extent, *self.colour, self.background, self.distance])


def _inside(shape: str, x: torch.Tensor, y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Whether subpixel offsets (x, y) from the centre lie inside `shape` of half extent r (the renderer's shapes)."""
    ax, ay = x.abs(), y.abs()
    if shape == "circle":
        return x * x + y * y <= r * r
    if shape == "square":
        return (ax <= r) & (ay <= r)
    if shape == "triangle":  # apex (0, -r), base corners (+-r, r)
        return (y <= r) & (ax <= (y + r) / 2)
    if shape == "cross":
        w = 0.36 * r
        return ((ax <= w) & (ay <= r)) | ((ax <= r) & (ay <= w))
    raise ValueError(f"`shape` must be one of {list(SHAPES)}, got {shape!r}.")


def coverage_masks(
    shape: str,
    centres_x,
    centres_y,
    half_extents,
    origin: tuple[int, int] = (0, 0),
    size: int = IMAGE_SIZE,
    supersampling: int = SUPERSAMPLING,
) -> torch.Tensor:
    """(K, size, size) anti-aliased coverage of K drawings of `shape` over the crop whose top-left pixel is `origin`.

    Supersampled and box-filtered, as the renderer draws.
    """
    subpixels = (torch.arange(size * supersampling, dtype=torch.float32) + 0.5) / supersampling
    cx = torch.as_tensor(centres_x, dtype=torch.float32)[:, None, None] - origin[0]
    cy = torch.as_tensor(centres_y, dtype=torch.float32)[:, None, None] - origin[1]
    r = torch.as_tensor(half_extents, dtype=torch.float32)[:, None, None]
    inside = _inside(shape, subpixels[None, None, :] - cx, subpixels[None, :, None] - cy, r).float()
    return F.avg_pool2d(inside[:, None], supersampling)[:, 0]


def _blob_box(image: np.ndarray) -> tuple[float, float, float]:
    """Centre and half extent of the bounding box of the pixels that stand out most from the median colour."""
    background = np.median(image.reshape(-1, 3), axis=0)
    distance = np.linalg.norm(image - background, axis=-1)
    peak = distance.max()
    if peak <= 0:
        return IMAGE_SIZE / 2, IMAGE_SIZE / 2, HALF_EXTENTS["small"]
    rows, columns = np.nonzero(distance >= 0.5 * peak)
    cx, cy = (columns.min() + columns.max() + 1) / 2, (rows.min() + rows.max() + 1) / 2
    half = max(columns.max() - columns.min() + 1, rows.max() - rows.min() + 1) / 2
    return cx, cy, half


@functools.lru_cache(maxsize=None)
def _candidate_masks(shape: str, gx: float, gy: float, size: str) -> tuple[np.ndarray, ...]:
    """Drawings the world can make of `shape` at grid centre (gx, gy) and `size`: centres, half extents, the crop's
    top-left pixel and the (K, WINDOW * WINDOW) coverage masks over that crop (72 such sets, so cached)."""
    offsets = np.arange(-POSITION_JITTER, POSITION_JITTER + 1e-9, CENTRE_STEP)
    radii = HALF_EXTENTS[size] * np.array(RADIUS_FACTORS)
    X, Y, R = (v.ravel() for v in np.meshgrid(gx + offsets, gy + offsets, radii, indexing="ij"))
    origin = tuple(int(np.clip(int(g) - WINDOW // 2, 0, IMAGE_SIZE - WINDOW)) for g in (gx, gy))
    masks = coverage_masks(shape, X, Y, R, origin, WINDOW).reshape(len(X), -1).double().numpy()
    return X, Y, R, np.array(origin), masks


def _candidates(shape: str, cx: float, cy: float, half: float) -> tuple[np.ndarray, ...]:
    """The candidate drawings around the grid centre and size nearest to a blob's box."""
    grid = np.array(GRID_CENTRES)
    gx, gy = grid[np.argmin(np.abs(grid - cx))], grid[np.argmin(np.abs(grid - cy))]
    size = min(HALF_EXTENTS, key=lambda s: abs(HALF_EXTENTS[s] - half))
    return _candidate_masks(shape, float(gx), float(gy), size)


def _clamp_to_nearest(values: np.ndarray, levels: np.ndarray, jitter: float) -> np.ndarray:
    """Each row of `values` moved into the jitter box of its nearest level (rows of `levels`), and into [0, 255]."""
    nearest = levels[np.argmin(((values[:, None, :] - levels[None, :, :]) ** 2).sum(-1), axis=1)]
    return np.clip(np.clip(values, nearest - jitter, nearest + jitter), 0.0, 255.0)


def _best_fill(pixels: np.ndarray, window_pixels: np.ndarray, masks: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """Index of the best of K coverage masks (K, P'), its squared residuals (K,), and each mask's (grey, fill).

    For each mask m the image ~ b (1 - m) + f m is fitted by least squares per channel, then the grey b and the
    fill f are clamped into the jitter boxes of the nearest grey level and palette colour.
    """
    n = pixels.shape[0]
    s_m, s_mm = masks.sum(1), (masks * masks).sum(1)
    s_mx = masks @ window_pixels  # (K, 3); the masks are zero outside the window
    s_x, s_xx = pixels.sum(0), (pixels * pixels).sum(0)
    a, b_ = n - 2 * s_m + s_mm, s_m - s_mm  # sum (1-m)^2, sum m (1-m)
    det = np.maximum(a * s_mm - b_ * b_, 1e-9)[:, None]
    background_c = ((s_x - s_mx) * s_mm[:, None] - s_mx * b_[:, None]) / det
    grey = _clamp_to_nearest(background_c.mean(1, keepdims=True), _GREY_LEVELS[:, None], BACKGROUND_JITTER)  # (K, 1)
    fill = (s_mx - grey * b_[:, None]) / np.maximum(s_mm, 1e-9)[:, None]
    fill = _clamp_to_nearest(fill, _PALETTE, COLOUR_JITTER)
    residual = (
        s_xx
        - 2 * grey * (s_x - s_mx)
        - 2 * fill * s_mx
        + grey**2 * a[:, None]
        + 2 * grey * fill * b_[:, None]
        + fill**2 * s_mm[:, None]
    ).sum(1)
    return int(np.argmin(residual)), residual, grey, fill


def colour_line_distance(image: np.ndarray, background: float, fill: np.ndarray) -> np.ndarray:
    """Per pixel, the largest channel distance from the colour segment between `background` (grey) and `fill`.

    Every anti-aliased or blurred edge pixel lies on that segment (a mix of the two colours); a pixel off it shows
    a colour the drawing does not have.
    """
    pixels = image.astype(np.float64)
    start = np.full(3, float(background))
    direction = np.asarray(fill, dtype=np.float64) - start
    mix = np.clip(((pixels - start) @ direction) / max(float(direction @ direction), 1e-9), 0.0, 1.0)
    return np.abs(pixels - (start + mix[..., None] * direction)).max(-1)


def distance_from_outline(inside: np.ndarray) -> np.ndarray:
    """Per pixel, the distance in pixels to the nearest pixel on the other side of the boolean mask's outline."""
    return np.where(inside, ndimage.distance_transform_edt(inside), ndimage.distance_transform_edt(~inside))


def fit_drawing(image: np.ndarray, shape: str) -> DrawingFit:
    """The clean ShapesWorld drawing of `shape` nearest to one (32, 32, 3) uint8 image, and its RMS distance.

    A coarse search over cached candidates, then a finer one around the best at the renderer's own supersampling.
    """
    if shape not in SHAPES:
        raise ValueError(f"`shape` must be one of {list(SHAPES)}, got {shape!r}.")
    pixels = image.reshape(-1, 3).astype(np.float64)
    xs, ys, radii, (x0, y0), masks = _candidates(shape, *_blob_box(image.astype(np.float64)))
    window_pixels = image[y0 : y0 + WINDOW, x0 : x0 + WINDOW].reshape(-1, 3).astype(np.float64)
    best, _, _, _ = _best_fill(pixels, window_pixels, masks)
    # Refine: a grid of half the coarse steps around the best, drawn at 8x supersampling like the renderer.
    fine = np.linspace(-0.5, 0.5, 5)
    X, Y, R = (
        v.ravel()
        for v in np.meshgrid(
            xs[best] + fine * CENTRE_STEP, ys[best] + fine * CENTRE_STEP, radii[best] * (1 + fine * 0.025), indexing="ij"
        )
    )
    masks = coverage_masks(shape, X, Y, R, (x0, y0), WINDOW, supersampling=8).reshape(len(X), -1).double().numpy()
    best, residual, grey, fill = _best_fill(pixels, window_pixels, masks)
    coverage = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 1))
    coverage[y0 : y0 + WINDOW, x0 : x0 + WINDOW, 0] = masks[best].reshape(WINDOW, WINDOW)
    drawing = grey[best] * (1 - coverage) + fill[best] * coverage
    unexplained = np.abs(image.astype(np.float64) - drawing).max(-1) > UNEXPLAINED_LEVEL
    foreign = colour_line_distance(image, grey[best, 0], fill[best]) > UNEXPLAINED_LEVEL
    misplaced = unexplained & ~foreign & (distance_from_outline(coverage[..., 0] > 0.5) > OUTLINE_TOLERANCE)
    return DrawingFit(
        distance=float(np.sqrt(max(residual[best], 0.0) / pixels.size)),
        unexplained_pixels=int(unexplained.sum()),
        foreign_pixels=int(foreign.sum()),
        misplaced_pixels=int(misplaced.sum()),
        shape=shape,
        centre=(float(X[best]), float(Y[best])),
        half_extent=float(R[best]),
        colour=tuple(float(c) for c in fill[best]),
        background=float(grey[best, 0]),
    )


def drawing_distances(images: np.ndarray, shapes: list[str]) -> np.ndarray:
    """Fidelity distance of each uint8 (N, 32, 32, 3) image to the nearest clean drawing of its shape."""
    if len(images) != len(shapes):
        raise ValueError(f"`images` has {len(images)} entries but `shapes` has {len(shapes)}.")
    return np.array([fit_drawing(image, shape).distance for image, shape in zip(images, shapes)])
