"""Generate ShapesWorld evaluation images with any pipeline and score them with the judge."""

from __future__ import annotations

import time
from typing import Any

from PIL import Image

from ..utils.seeding import image_generator
from .dataset import evaluation_prompts
from .judge import ShapesJudge
from .metrics import attribute_adherence, brightness_error, shapes_fd
from .render import render_attributes


def generate_images(
    pipe,
    prompts: list[str],
    seed: int,
    batch_size: int = 64,
    first_index: int = 0,
    **call_kwargs: Any,
) -> list[Image.Image]:
    """Images for `prompts` in order; image i uses `image_generator(seed, first_index + i)`.

    `call_kwargs` go to the pipeline call (e.g. `num_inference_steps`, `guidance_scale`,
    `negative_prompt`); None values are left to the pipeline's defaults. A string `negative_prompt`
    applies to every prompt, a list holds one per prompt (Diffusers pipelines want a list of the
    batch's length beside a list of prompts).
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be at least 1, got {batch_size}.")
    call_kwargs = {k: v for k, v in call_kwargs.items() if v is not None}
    negative_prompt = call_kwargs.pop("negative_prompt", None)
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        generators = [image_generator(seed, first_index + start + i) for i in range(len(batch))]
        if isinstance(negative_prompt, str):
            call_kwargs["negative_prompt"] = [negative_prompt] * len(batch)
        elif negative_prompt is not None:
            call_kwargs["negative_prompt"] = negative_prompt[start : start + batch_size]
        images.extend(pipe(prompt=batch, generator=generators, output_type="pil", **call_kwargs).images)
    return images


def evaluate_pipeline(
    pipe,
    judge: ShapesJudge,
    num_prompts: int = 1000,
    seed: int = 0,
    batch_size: int = 64,
    **call_kwargs: Any,
) -> dict[str, Any]:
    """Every ShapesWorld metric for `pipe` on the first `num_prompts` evaluation prompts.

    Real images for `shapes_fd` are drawn for the same prompts, so the two sets share their
    attribute distribution. Images per second counts generation only (no judging).
    """
    prompts = evaluation_prompts(num_prompts, seed=seed)
    start = time.perf_counter()
    images = generate_images(pipe, [p.caption for p in prompts], seed=seed, batch_size=batch_size, **call_kwargs)
    seconds = time.perf_counter() - start
    prompted = [p.attributes for p in prompts]
    predicted = judge.read(images)
    held_out = [i for i, p in enumerate(prompted) if p.is_held_out()]
    real = [render_attributes(p.attributes, p.seed) for p in prompts]
    return {
        "n": num_prompts,
        "adherence": attribute_adherence(predicted, prompted),
        "held_out_adherence": (
            attribute_adherence([predicted[i] for i in held_out], [prompted[i] for i in held_out]) if held_out else {}
        ),
        "shapes_fd": shapes_fd(judge, images, real),
        "brightness_error": brightness_error(images, prompted),
        "images_per_second": num_prompts / seconds,
    }
