"""LoRA adapters on a UNet: the peft config the scripts train, and its export in Diffusers' LoRA format."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from diffusers import UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

# Every attention projection, self- and cross-attention: the target of Diffusers' text-to-image LoRA script.
LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]


def unet_lora_config(rank: int, alpha: float, target_modules: list[str] = LORA_TARGET_MODULES) -> LoraConfig:
    """A LoRA of rank `rank` scaled by `alpha / rank`, Gaussian-initialised as in Diffusers' LoRA scripts."""
    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=target_modules)


def save_unet_lora(
    pipeline_class: type[StableDiffusionLoraLoaderMixin], unet: UNet2DConditionModel, output_dir: str | Path
) -> None:
    """Write the UNet's LoRA as `pytorch_lora_weights.safetensors` for `pipeline_class.load_lora_weights`, with the
    adapter's config, so that rank and alpha survive the reload."""
    pipeline_class.save_lora_weights(
        str(output_dir),
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        safe_serialization=True,
    )


@contextlib.contextmanager
def adapters_disabled(unet: UNet2DConditionModel) -> Iterator[UNet2DConditionModel]:
    """The UNet without its LoRA for the `with` block (e.g. the frozen teacher under the fake score's LoRA), with
    the LoRA back on afterwards, also on an error."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()
