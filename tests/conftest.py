"""Shared fixtures: tiny Stable Diffusion components built offline, for every pipeline test."""

from __future__ import annotations

import os

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from fastgen_diffusers.shapes.tokenizer import build_tokenizer


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def make_tiny_sd_components(tokenizer_dir) -> dict:
    """SD components at toy width (sizes from Diffusers' own SD tests), 32x32 images, 16x16 latents."""
    tokenizer = build_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8,
        norm_num_groups=2,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(4, 8),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=2,
        sample_size=32,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=8,
            intermediate_size=16,
            num_attention_heads=2,
            num_hidden_layers=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


@pytest.fixture
def tiny_sd_components(tmp_path) -> dict:
    return make_tiny_sd_components(tmp_path / "tokenizer-files")


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory):
    """A tiny StableDiffusionPipeline saved in Diffusers layout, as a Hub checkpoint would be."""
    root = tmp_path_factory.mktemp("tiny-sd")
    components = make_tiny_sd_components(root / "tokenizer-files")
    pipe = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    path = root / "pipeline"
    pipe.save_pretrained(path)
    return path
