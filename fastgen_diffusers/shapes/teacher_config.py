"""Architecture of the ShapesWorld teacher: Stable Diffusion's three components, made tiny.

Latents are 16x16x4 (one VAE downsampling). An 8x8x4 latent (SD's factor 4 at this
resolution) leaves a small shape about 2x2 latent pixels, and a trial decoder blurred small
triangles, squares and crosses into blobs (shape read right 57% of the time); at 16x16 the
decoder keeps them apart.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .render import IMAGE_SIZE
from .tokenizer import MODEL_MAX_LENGTH


TEXT_HIDDEN_SIZE = 128
# "micro" is the same architecture at toy width, for tests of the training scripts.
SCALES = ("full", "micro")

# Stable Diffusion's own noise schedule, flaw included (terminal SNR is not zero).
SD_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
)
# SD 1.x predicts epsilon, SD 2.x-v the velocity, on that same schedule. The shipped teacher is
# v (SD 2.1 style): an epsilon UNet this small never learned position or background, because
# at t ~ 1000 it must copy its noisy input to within 0.5% before its x0 guess beats zero.
PREDICTION_TYPES = ("epsilon", "v_prediction")


def _check_scale(scale: str) -> None:
    if scale not in SCALES:
        raise ValueError(f"`scale` must be one of {list(SCALES)}, got {scale!r}.")


def make_vae(scale: str = "full") -> AutoencoderKL:
    _check_scale(scale)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64) if scale == "full" else (8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16 if scale == "full" else 4,
        sample_size=IMAGE_SIZE,
    )


def _text_hidden_size(scale: str) -> int:
    return TEXT_HIDDEN_SIZE if scale == "full" else 16


def make_text_encoder(tokenizer: CLIPTokenizer, scale: str = "full") -> CLIPTextModel:
    _check_scale(scale)
    hidden_size = _text_hidden_size(scale)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=3 if scale == "full" else 1,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_encoder = CLIPTextModel(config)
    # CLIP's init (std 0.02) starts every word near the same point; words the UNet has not yet
    # learned to read then get no gradient and stay there. Unit-norm embeddings keep them apart.
    torch.nn.init.normal_(text_encoder.get_input_embeddings().weight, std=hidden_size**-0.5)
    return text_encoder


def make_unet(scale: str = "full") -> UNet2DConditionModel:
    # Cross-attention at every resolution: position words must reach the 16x16 map directly.
    _check_scale(scale)
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 128) if scale == "full" else (8, 16, 16),
        layers_per_block=1,
        cross_attention_dim=_text_hidden_size(scale),
        attention_head_dim=8,
        norm_num_groups=32 if scale == "full" else 4,
    )


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"`prediction_type` must be one of {list(PREDICTION_TYPES)}, got {prediction_type!r}.")


def make_noise_scheduler(prediction_type: str = "v_prediction") -> DDPMScheduler:
    _check_prediction_type(prediction_type)
    return DDPMScheduler(**SD_SCHEDULE, prediction_type=prediction_type)


def make_sampling_scheduler(prediction_type: str = "v_prediction") -> DDIMScheduler:
    """The teacher's default sampler (25 DDIM steps, CFG 4 by default in `fastgen eval`)."""
    _check_prediction_type(prediction_type)
    return DDIMScheduler(
        **SD_SCHEDULE,
        prediction_type=prediction_type,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )
