"""Shared fixtures: tiny Stable Diffusion components built offline, for every pipeline test."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
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
    pipe = StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    path = root / "pipeline"
    pipe.save_pretrained(path)
    return path


def _save_random_lora(pipe, path):
    """Save a LoRA with non-zero weights on the UNet's attention projections; return a UNet carrying it."""
    lora_unet = copy.deepcopy(pipe.unet)
    lora_unet.add_adapter(
        LoraConfig(
            r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]
        )
    )
    torch.manual_seed(0)
    for name, parameter in lora_unet.named_parameters():
        if "lora_B" in name:  # "gaussian" initialises B to zero, which would be a no-op adapter
            parameter.normal_(std=0.5)
    type(pipe).save_lora_weights(
        path,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(lora_unet)),
        unet_lora_adapter_metadata=lora_unet.peft_config["default"].to_dict(),
    )
    return lora_unet


@pytest.fixture
def save_random_lora():
    """`save_random_lora(pipe, path)`: a LoRA with non-zero weights saved for `pipe`; returns the UNet carrying it."""
    return _save_random_lora
