"""train_tiny_decoder's options for the judge-facing loss terms and the models' own generated latents."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL
from test_training_scripts import script_module

BASE = ["--pretrained_model_name_or_path", "x", "--output_dir", "o", "--max_train_steps", "1"]


train_tiny_decoder = script_module("train_tiny_decoder")


def test_level_term_is_the_mean_offset_and_edge_term_ignores_it():
    target = torch.zeros(2, 3, 8, 8)
    target[:, :, 2:5, 2:5] = 1.0  # a square: edges
    offset = target + 0.1  # same edges, brighter everywhere
    loss = train_tiny_decoder.reconstruction_loss
    assert loss(offset, target, "l1", level_weight=1.0) == pytest.approx(0.2, abs=1e-6)  # pixel 0.1 + level 0.1
    assert loss(offset, target, "l1", edge_weight=1.0) == pytest.approx(0.1, abs=1e-6)  # edges unchanged
    assert loss(target, target, "l1", edge_weight=1.0, level_weight=1.0) == 0


def test_edge_term_sees_a_blurred_edge_the_level_term_does_not():
    target = torch.zeros(1, 1, 2, 8)  # two identical rows: a vertical edge only
    target[..., 4:] = 1.0
    blurred = target.clone()
    blurred[..., 3], blurred[..., 4] = 0.5, 0.5  # same mean, softer step
    loss = train_tiny_decoder.reconstruction_loss
    assert loss(blurred, target, "l1", level_weight=1.0) == pytest.approx(1 / 8, abs=1e-6)
    assert loss(blurred, target, "l1", edge_weight=1.0) > loss(blurred, target, "l1") + 0.1


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--edge_loss_weight", "-1"], "edge_loss_weight"),
        (["--level_loss_weight", "-0.5"], "level_loss_weight"),
        (["--generated_latents_from", "m", "--generated_fraction", "1"], "generated_fraction"),
        (["--generated_latents_from", "m", "--generated_fraction", "0"], "generated_fraction"),
    ],
)
def test_bad_flags_are_rejected(flags, message):
    with pytest.raises(ValueError, match=message):
        train_tiny_decoder.parse_args(BASE + ["--dataset_name", "shapesworld"] + flags)


def test_card_states_the_loss_terms_and_the_generated_share():
    args = train_tiny_decoder.parse_args(
        BASE
        + ["--dataset_name", "shapesworld", "--edge_loss_weight", "0.5", "--generated_latents_from", "a", "b"]
        + ["--generated_fraction", "0.25"]
    )
    text = train_tiny_decoder.describe_loss(args)
    assert text.startswith("l1 + 0.5 x edge") and "level" not in text and "25%" in text and "`a`, `b`" in text


def test_generated_latents_are_the_pipelines_own_scaled_latents(tiny_sd_path):
    """The latents a pipeline hands its decoder: sampling them again with the same seed gives the same latents,
    and decoding them with the pipeline's VAE gives the pipeline's own image."""
    source = train_tiny_decoder.GeneratedLatents([str(tiny_sd_path)], torch.device("cpu"), seed=0, num_captions=16)
    latents = source.sample(3, torch.Generator().manual_seed(1), batch_index=0)
    again = source.sample(3, torch.Generator().manual_seed(1), batch_index=0)
    pipe, settings = source.pipes[0]
    assert latents.shape == (3, pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    torch.testing.assert_close(latents, again, atol=1e-5, rtol=0)
    vae = AutoencoderKL.from_pretrained(tiny_sd_path, subfolder="vae")
    image = pipe(
        prompt=[source.captions[0]], generator=torch.Generator().manual_seed(2), output_type="pt", **settings
    ).images
    own = pipe(prompt=[source.captions[0]], generator=torch.Generator().manual_seed(2), output_type="latent", **settings)
    decoded = vae.decode(own.images / vae.config.scaling_factor).sample
    torch.testing.assert_close((decoded / 2 + 0.5).clamp(0, 1), image, atol=1e-4, rtol=0)
