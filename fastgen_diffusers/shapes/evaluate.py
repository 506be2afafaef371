"""Generate ShapesWorld evaluation images with any pipeline and score them with the judge."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..utils.seeding import image_generator
from .captions import Attributes
from .dataset import evaluation_prompts
from .judge import ShapesJudge, to_uint8_array
from .metrics import attribute_adherence, brightness_error, drawing_fd, shapes_fd
from .open_prompts import open_prompts, score_open_prompts
from .render import render, render_attributes


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
    predicted, fits = judged(judge, images)
    held_out = [i for i, p in enumerate(prompted) if p.is_held_out()]
    real = [render_attributes(p.attributes, p.seed) for p in prompts]
    _, real_fits = judged(judge, real)
    return {
        "n": num_prompts,
        "adherence": attribute_adherence(predicted, prompted),
        "held_out_adherence": (
            attribute_adherence([predicted[i] for i in held_out], [prompted[i] for i in held_out]) if held_out else {}
        ),
        **reject_and_fidelity(predicted, fits),
        "drawing_fd": drawing_fd(fits, real_fits),
        "shapes_fd": shapes_fd(judge, images, real),
        "brightness_error": brightness_error(images, prompted),
        "images_per_second": num_prompts / seconds,
    }


def judged(judge: ShapesJudge, images) -> tuple[list[Attributes], list]:
    """The judge's reading of each image (a rejected one reads as `Attributes()`) and its nearest clean drawing."""
    read, fits, rejected = judge.inspect(images)
    return [Attributes() if r else a for a, r in zip(read, rejected)], fits


def reject_and_fidelity(predicted: list[Attributes], fits) -> dict[str, float]:
    """The share of rejected images and the mean distance to the nearest clean drawing."""
    return {
        "rejected": sum(p == Attributes() for p in predicted) / len(predicted),
        "fidelity": float(np.mean([f.distance for f in fits])),
    }


def open_prompt_scores(judge: ShapesJudge, images, prompts) -> dict[str, Any]:
    """Adherence per kind, open-attribute TV distances, reject rate and mean fidelity distance of images for `prompts`."""
    predicted, fits = judged(judge, images)
    return {
        **score_open_prompts(predicted, prompts),
        **reject_and_fidelity(predicted, fits),
    }


def evaluate_open_prompts(
    pipe,
    judge: ShapesJudge,
    num_prompts: int = 1000,
    seed: int = 0,
    batch_size: int = 64,
    **call_kwargs: Any,
) -> dict[str, Any]:
    """Open-prompt metrics of `pipe` (see `open_prompts`) on `num_prompts` partial prompts, one image each."""
    prompts = open_prompts(num_prompts, seed=seed)
    images = generate_images(pipe, [p.caption for p in prompts], seed=seed, batch_size=batch_size, **call_kwargs)
    return {"n": num_prompts, **open_prompt_scores(judge, images, prompts)}


@torch.no_grad()
def vae_reconstructions(vae, images, batch_size: int = 256) -> np.ndarray:
    """What a perfect latent generator would produce: `vae` decoding its own encoding (mode) of each image."""
    array = to_uint8_array(images)
    outputs = []
    for start in range(0, len(array), batch_size):
        x = torch.from_numpy(array[start : start + batch_size]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        decoded = vae.decode(vae.encode(x.to(vae.dtype)).latent_dist.mode()).sample.float()
        outputs.append(to_uint8_array((decoded.clamp(-1, 1) + 1) / 2))
    return np.concatenate(outputs)


def evaluation_floors(
    judge: ShapesJudge, vae, num_prompts: int = 1000, num_open_prompts: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """The same metrics on real images and on `vae`'s reconstructions of them: what no generator can beat.

    Full prompts: reject rate, adherence and fidelity distance. Open prompts: the real images drawn for the
    same prompts and seeds give the open-attribute TV that sampling noise alone leaves at this number of prompts.
    """
    floors: dict[str, Any] = {}
    full = evaluation_prompts(num_prompts, seed=seed)
    partial = open_prompts(num_open_prompts, seed=seed)
    real_full = to_uint8_array([render_attributes(p.attributes, p.seed) for p in full])
    real_open = to_uint8_array([render(p.caption, p.seed) for p in partial])
    for name, full_images, open_images in (
        ("real", real_full, real_open),
        ("vae", vae_reconstructions(vae, real_full), vae_reconstructions(vae, real_open)),
    ):
        predicted, fits = judged(judge, full_images)
        floors[name] = {
            "full": {
                "adherence": attribute_adherence(predicted, [p.attributes for p in full])["all"],
                "rejected": sum(p == Attributes() for p in predicted) / len(predicted),
                "fidelity": float(np.mean([f.distance for f in fits])),
            },
            "open": open_prompt_scores(judge, open_images, partial),
        }
    return floors
