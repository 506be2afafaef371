"""The ShapesWorld judge: reads the attributes of an image, rejects images that hold no single clean shape, and
embeds images for a Frechet distance.

Background, colour, position and size are read analytically (median background, the largest
blob that differs from it, its colour and bounding box); shape is read by a small CNN trained on
clean images (`training/train_judge.py`). The CNN is trained on all five attributes, so its
penultimate layer is a feature space that sees every attribute: that is where `shapes_fd` lives.

The reject answer (`fidelity.fit_drawing`): an image is rejected when no shape stands out, when more than
`REJECT_FOREIGN_PIXELS` of its pixels have a colour that the nearest clean drawing of the shape the CNN reads
cannot explain (several colours, blends, speckle), or when more than `REJECT_MISPLACED_PIXELS` pixels of the
drawing's colours lie away from its outline (several shapes, stray marks). A rejected image reads as `Attributes()`: every
attribute None, so it is wrong for every attribute a prompt names (`read(images, reject=True)`, `inspect`).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from PIL import Image
from scipy import ndimage
from torch import nn

from .captions import ATTRIBUTE_NAMES, ATTRIBUTE_VALUES, BACKGROUNDS, COLOURS, POSITIONS, Attributes
from .fidelity import DrawingFit, fit_drawing
from .render import GRID_CENTRES, HALF_EXTENTS


# Pixel thresholds between grid cells and between sizes, halfway between the drawn values.
_COLUMN_EDGES = ((GRID_CENTRES[0] + GRID_CENTRES[1]) / 2, (GRID_CENTRES[1] + GRID_CENTRES[2]) / 2)
_SIZE_EDGE = HALF_EXTENTS["small"] + HALF_EXTENTS["large"]  # mean of the two full extents
_CELL_TO_POSITION = {cell: name for name, cell in POSITIONS.items()}
_GREY_NAMES = tuple(BACKGROUNDS)
_GREY_LEVELS = np.array([BACKGROUNDS[n] for n in _GREY_NAMES], dtype=np.float32)
_COLOUR_NAMES = tuple(COLOURS)
_COLOUR_VALUES = np.array([COLOURS[n] for n in _COLOUR_NAMES], dtype=np.float32)
# Above what the teacher VAE's reconstructions of 300 real evaluation images show (foreign: at most 0, misplaced: at
# most 3; `docs/open-prompts.md`), so that a perfect latent generator is accepted (`tests/test_judge.py` checks
# >= 98%), and below what every synthetic defect kind shows in >= 90% of its images (`shapes/defects.py`).
REJECT_FOREIGN_PIXELS = 4
REJECT_MISPLACED_PIXELS = 10


def to_uint8_array(images: list[Image.Image] | np.ndarray | torch.Tensor) -> np.ndarray:
    """(N, 32, 32, 3) uint8 from PIL images, float arrays in [0, 1] (NHWC) or tensors in [0, 1] (NCHW)."""
    if isinstance(images, torch.Tensor):
        images = images.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            images = np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)
        return images
    return np.stack([np.asarray(image.convert("RGB")) for image in images])


def background_colour(image: np.ndarray) -> np.ndarray:
    """Median colour of the image: the shape covers at most ~15% of it."""
    return np.median(image.reshape(-1, 3).astype(np.float32), axis=0)


def foreground_mask(image: np.ndarray, background: np.ndarray) -> np.ndarray:
    """The largest connected blob whose colour differs from the background by at least half the largest difference."""
    distance = np.linalg.norm(image.astype(np.float32) - background, axis=-1)
    peak = distance.max()
    if peak < 30.0:  # nothing stands out: no shape
        return np.zeros(distance.shape, dtype=bool)
    labels, count = ndimage.label(distance >= 0.5 * peak)
    sizes = ndimage.sum(np.ones_like(distance), labels, index=range(1, count + 1))
    return labels == (int(np.argmax(sizes)) + 1)


def read_analytic_attributes(image: np.ndarray) -> dict[str, str | None]:
    """Background, colour, position and size of one uint8 HWC image (None where no shape is found)."""
    background = background_colour(image)
    grey_name = _GREY_NAMES[int(np.argmin(np.abs(_GREY_LEVELS - background.mean())))]
    mask = foreground_mask(image, background)
    if not mask.any():
        return {"background": grey_name, "colour": None, "position": None, "size": None}
    distance = np.linalg.norm(image.astype(np.float32) - background, axis=-1)
    core = mask & (distance >= 0.75 * distance[mask].max())
    colour = np.median(image[core].astype(np.float32), axis=0)
    colour_name = _COLOUR_NAMES[int(np.argmin(np.linalg.norm(_COLOUR_VALUES - colour, axis=1)))]
    rows, columns = np.nonzero(mask)
    cx, cy = (columns.min() + columns.max() + 1) / 2, (rows.min() + rows.max() + 1) / 2
    cell = (int(np.searchsorted(_COLUMN_EDGES, cx)), int(np.searchsorted(_COLUMN_EDGES, cy)))
    extent = max(columns.max() - columns.min() + 1, rows.max() - rows.min() + 1)
    return {
        "background": grey_name,
        "colour": colour_name,
        "position": _CELL_TO_POSITION[cell],
        "size": "small" if extent < _SIZE_EDGE else "large",
    }


def background_brightness(image: np.ndarray) -> float:
    """Mean grey level (0-255) of the background colour."""
    return float(background_colour(image).mean())


class ShapesJudgeNet(ModelMixin, ConfigMixin):
    """A small CNN with one classification head per attribute; `features` is its penultimate layer."""

    @register_to_config
    def __init__(self, feature_dim: int = 128, image_size: int = 32):
        super().__init__()
        self.conv_in = nn.Conv2d(3, 32, 3, padding=1)
        self.conv_1 = nn.Conv2d(32, 32, 3, padding=1)
        self.conv_2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv_3 = nn.Conv2d(64, 64, 3, padding=1)
        self.conv_4 = nn.Conv2d(64, 64, 3, padding=1)
        # Flatten rather than pool: the position head needs to know where things are.
        self.to_features = nn.Linear(64 * (image_size // 8) ** 2, feature_dim)
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, len(ATTRIBUTE_VALUES[name])) for name in ATTRIBUTE_NAMES})

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Penultimate features of images in [-1, 1], (N, 3, 32, 32) -> (N, feature_dim)."""
        h = F.relu(self.conv_in(pixel_values))
        h = F.max_pool2d(F.relu(self.conv_1(h)), 2)
        h = F.max_pool2d(F.relu(self.conv_2(h)), 2)
        h = F.max_pool2d(F.relu(self.conv_3(h)), 2)
        h = F.relu(self.conv_4(h))
        return F.relu(self.to_features(h.flatten(1)))

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.features(pixel_values)
        return {name: head(features) for name, head in self.heads.items()}


class ShapesJudge:
    """Reads ShapesWorld images: analytic attributes plus the CNN's shape, and CNN features for `shapes_fd`."""

    def __init__(self, net: ShapesJudgeNet, batch_size: int = 256):
        self.net = net.eval().requires_grad_(False)
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None) -> "ShapesJudge":
        """Load the judge CNN (safetensors only); by default the one shipped as the `shapes-judge` asset."""
        from ..utils.safe_loading import check_weight_files

        if path is None:
            from .. import assets

            path = assets.path("shapes-judge")
        check_weight_files(path)  # a pickle or a damaged file: a ValueError naming it
        return cls(ShapesJudgeNet.from_pretrained(str(path), use_safetensors=True))

    @torch.no_grad()
    def _batched(self, images: np.ndarray, fn) -> torch.Tensor:
        outputs = []
        for start in range(0, len(images), self.batch_size):
            chunk = torch.from_numpy(images[start : start + self.batch_size]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            outputs.append(fn(chunk))
        return torch.cat(outputs)

    def read_shapes(self, images) -> list[str]:
        """The CNN's shape for each image."""
        shape_logits = self._batched(to_uint8_array(images), lambda x: self.net(x)["shape"])
        return [ATTRIBUTE_VALUES["shape"][i] for i in shape_logits.argmax(dim=1).tolist()]

    def inspect(self, images) -> tuple[list[Attributes], list[DrawingFit], list[bool]]:
        """Per image: the attributes read without rejecting, the nearest clean drawing of its shape, and the reject."""
        array = to_uint8_array(images)
        read = [Attributes(shape=shape, **read_analytic_attributes(image)) for image, shape in zip(array, self.read_shapes(array))]
        fits = [fit_drawing(image, attributes.shape) for image, attributes in zip(array, read)]
        rejected = [
            a.colour is None or f.foreign_pixels > REJECT_FOREIGN_PIXELS or f.misplaced_pixels > REJECT_MISPLACED_PIXELS
            for a, f in zip(read, fits)
        ]
        return read, fits, rejected

    def read(self, images, reject: bool = False) -> list[Attributes]:
        """The attributes of each image: the CNN's shape and the analytic attributes (colour, position and size None
        when no shape stands out).

        With `reject=True`, a rejected image (see the module's docstring) reads as `Attributes()`, as in the
        evaluation (`evaluate.judged`). The default keeps the reading every image gets an answer from, which
        callers that only need one attribute (and the negative-prompt measurement) rely on.
        """
        if not reject:
            array = to_uint8_array(images)
            return [Attributes(shape=s, **read_analytic_attributes(i)) for i, s in zip(array, self.read_shapes(array))]
        read, _, rejected = self.inspect(images)
        return [Attributes() if r else a for a, r in zip(read, rejected)]

    def features(self, images) -> np.ndarray:
        """(N, feature_dim) float64 features for the Frechet distance."""
        return self._batched(to_uint8_array(images), self.net.features).double().numpy()
