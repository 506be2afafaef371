"""The PPAP experiment in ShapesWorld: steer an attribute the prompt leaves open, and check the stated ones hold.

Evaluation prompts have one attribute removed from their captions (the shape for the classifier guide, the
position for the centre regressor); the prompts are split into equal blocks, one per target, and each block is
sampled with guidance toward its target. Images use the same per-image seeds as `fastgen eval`
(`image_generator(seed, index)`), so every method sees the same initial noise.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from ..shapes.captions import ATTRIBUTE_NAMES, POSITIONS, SHAPES, make_caption
from ..shapes.dataset import evaluation_prompts
from ..shapes.evaluate import generate_images
from ..shapes.judge import background_colour, foreground_mask, to_uint8_array
from ..shapes.metrics import attribute_adherence
from ..shapes.render import GRID_CENTRES, IMAGE_SIZE


# What each guide steers, and its targets: the four shapes; the four corner cells for the centre regressor.
GUIDED_ATTRIBUTE = {"classification": "shape", "regression": "position"}
CENTRE_TARGETS = ("top left", "top right", "bottom left", "bottom right")


def shape_centre(image: np.ndarray) -> tuple[float, float]:
    """Centre of the shape's bounding box in [-1, 1] image coordinates (the judge's read-out of position)."""
    rows, columns = np.nonzero(foreground_mask(image, background_colour(image)))
    if len(rows) == 0:
        return 0.0, 0.0
    cx, cy = (columns.min() + columns.max() + 1) / 2, (rows.min() + rows.max() + 1) / 2
    return 2 * cx / IMAGE_SIZE - 1, 2 * cy / IMAGE_SIZE - 1


def position_centre(position: str) -> tuple[float, float]:
    """The centre of a grid cell in the [-1, 1] coordinates of `shape_centre`: a regressor target."""
    column, row = POSITIONS[position]
    return 2 * GRID_CENTRES[column] / IMAGE_SIZE - 1, 2 * GRID_CENTRES[row] / IMAGE_SIZE - 1


def targets_for(task: str) -> tuple[str, ...]:
    return SHAPES if task == "classification" else CENTRE_TARGETS


def bind_target(guidance, task: str, target: str, **kwargs):
    """`guidance.bind` toward a ShapesWorld target: a shape name, or a position's cell centre for the regressor."""
    if task == "classification":
        return guidance.bind(class_label=target, **kwargs)
    return guidance.bind(target=list(position_centre(target)), **kwargs)


def evaluate_guided(
    pipe,
    judge,
    task: str,
    guidance_for: Callable[[str], Any] | None,
    num_prompts: int = 1000,
    seed: int = 0,
    batch_size: int = 64,
    **call_kwargs: Any,
) -> dict[str, Any]:
    """Target hit rate and the stated attributes' adherence for one method (`guidance_for(target) -> guidance_fn`,
    or None for no guidance), on `num_prompts` evaluation prompts with the guided attribute left out.

    Returns the metrics and the images (in prompt order) with their targets.
    """
    attribute = GUIDED_ATTRIBUTE[task]
    targets = targets_for(task)
    prompts = evaluation_prompts(num_prompts, seed=seed)
    open_attributes = [replace(p.attributes, **{attribute: None}) for p in prompts]
    captions = [make_caption(a) for a in open_attributes]
    block = -(-num_prompts // len(targets))
    images, wanted, seconds = [], [], 0.0
    for k, target in enumerate(targets):
        start, stop = k * block, min((k + 1) * block, num_prompts)
        guidance_fn = guidance_for(target) if guidance_for is not None else None
        began = time.perf_counter()
        images += generate_images(pipe, captions[start:stop], seed=seed, batch_size=batch_size, first_index=start,
                                  guidance_fn=guidance_fn, **call_kwargs)  # fmt: skip
        seconds += time.perf_counter() - began
        wanted += [target] * (stop - start)
    predicted = judge.read(images)
    stated = [n for n in ATTRIBUTE_NAMES if n != attribute]
    adherence = attribute_adherence(predicted, open_attributes)
    result = {
        "n": num_prompts,
        "target_rate": float(np.mean([getattr(p, attribute) == w for p, w in zip(predicted, wanted)])),
        "stated": {n: adherence[n] for n in stated},
        "images_per_second": num_prompts / seconds,
    }
    if task == "regression":
        centres = np.array([shape_centre(image) for image in to_uint8_array(images)])
        goals = np.array([position_centre(w) for w in wanted])
        result["centre_error_px"] = float(np.linalg.norm(centres - goals, axis=1).mean() * IMAGE_SIZE / 2)
    return {**result, "images": images, "targets": wanted}
