"""The embedded ShapesWorld teacher is a plain Diffusers checkpoint."""

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from fastgen_diffusers import FastPipeline, assets
from fastgen_diffusers.shapes import ATTRIBUTE_NAMES, build_dataset
from fastgen_diffusers.shapes.judge import ShapesJudge
from fastgen_diffusers.training.data import images_to_tensor


def test_teacher_loads_with_diffusers_and_fastgen():
    path = assets.path("shapes-teacher")
    pipe = StableDiffusionPipeline.from_pretrained(path)
    assert pipe.unet.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.scheduler.config.prediction_type == "v_prediction"  # SD 2.x-v style, on SD's schedule
    assert isinstance(FastPipeline.from_pretrained("shapes-teacher"), StableDiffusionPipeline)
    images = pipe(
        ["a large red circle", "a large blue square", "a large yellow cross", "a large green triangle"],
        num_inference_steps=10,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert images.shape == (4, 32, 32, 3)
    read = ShapesJudge.from_pretrained().read(images)
    assert [r.colour for r in read] == ["red", "blue", "yellow", "green"]  # the prompt, not chance (1/8 each)


def test_teacher_follows_position_and_background_words():
    """Layout and brightness come from the prompt, not from the initial noise (one seed for all)."""
    pipe = StableDiffusionPipeline.from_pretrained(assets.path("shapes-teacher"))
    positions = ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"]
    backgrounds = ["black", "dark gray", "gray", "light gray", "white"] * 2
    prompts = [f"a large red circle at the {p} on a {b} background" for p, b in zip(positions, backgrounds)]
    images = pipe(
        prompts,
        num_inference_steps=25,
        guidance_scale=4.0,
        generator=[torch.Generator().manual_seed(0) for _ in prompts],
        output_type="np",
    ).images
    read = ShapesJudge.from_pretrained().read(images)
    assert sum(r.position == p for r, p in zip(read, positions)) >= 8  # chance: 1 of 9
    assert sum(r.background == b for r, b in zip(read, backgrounds)) >= 8  # chance: 1.8 of 9


def test_teacher_vae_keeps_every_attribute_at_unit_latent_scale():
    pipe = StableDiffusionPipeline.from_pretrained(assets.path("shapes-teacher"))
    rows = build_dataset(200, seed=3, split="eval")[:]
    pixels = images_to_tensor(rows["image"])
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.sample() * pipe.vae.config.scaling_factor
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    assert 0.8 < latents.std().item() < 1.25
    images = pipe.image_processor.postprocess(decoded, output_type="pil")
    predicted = ShapesJudge.from_pretrained().read(images)
    for name in ATTRIBUTE_NAMES:
        accuracy = np.mean([getattr(p, name) == rows[name][i] for i, p in enumerate(predicted)])
        assert accuracy >= 0.97, (name, accuracy)
