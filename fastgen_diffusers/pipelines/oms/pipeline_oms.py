# Copyright 2026 The fastgen-diffusers authors and The HuggingFace Team. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""One More Step: a step in front of any SD-schedule pipeline that hands it a first latent holding the prompt's
low frequencies, as its training schedule (non-zero terminal SNR) always did, instead of pure noise.

The base pipeline is not changed: it gets `latents`. Its scheduler decides where OMS must land (alpha_bar at its
first timestep after `set_timesteps`, taken on a copy) and how its sample is scaled (`init_noise_sigma`,
`scale_model_input`).
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import math
from typing import Any

import torch
from diffusers import AutoencoderTiny
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.utils import logging, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer

from ...models.oms import OMSModel, predicted_original_sample
from ..core import (
    check_generator,
    check_image_size,
    check_latents,
    check_positive_int,
    check_text_embeds,
    prompt_batch_size,
)

logger = logging.get_logger(__name__)  # pylint: disable=invalid-name

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> from diffusers import StableDiffusionPipeline
        >>> from fastgen_diffusers import FastPipeline
        >>> from fastgen_diffusers.pipelines.oms import OMSPipeline

        >>> base = StableDiffusionPipeline.from_pretrained("path/to/sd")
        >>> pipe = OMSPipeline.from_pretrained("path/to/oms-module", base_pipeline=base)
        >>> # or: pipe = FastPipeline.from_pretrained("path/to/sd", oms="path/to/oms-module")

        >>> image = pipe("a cat against a black background", num_inference_steps=25).images[0]
        >>> # low-frequency control: the base reads `prompt`, the OMS module reads `oms_prompt`
        >>> image = pipe("a car", oms_prompt="a red car", oms_guidance_scale=1.5).images[0]
        >>> # the base pipeline alone, same noise
        >>> image = pipe("a car", oms=False).images[0]
        ```
"""

# Schedulers whose first latent is pure noise by construction: their schedule reaches zero SNR, so OMS has
# nothing to fix.
ZERO_TERMINAL_SNR_SCHEDULERS = ("RectifiedFlowEulerScheduler", "FlowMatchEulerDiscreteScheduler")


def first_latent(
    original_sample: torch.Tensor,
    noise: torch.Tensor,
    alpha_prod_t: float | torch.Tensor,
    model_input_scale: float | torch.Tensor,
    init_noise_sigma: float | torch.Tensor,
) -> torch.Tensor:
    """The `latents` that make the base pipeline start from x_T = sqrt(a) x0 + sqrt(1 - a) z, a = `alpha_prod_t`.

    x_T is the variance-preserving sample the base UNet was trained to read at its first timestep. The base
    scheduler's own sample is x_T / `model_input_scale` (its `scale_model_input` factor at that timestep: 1 for
    DDIM / DDPM / one-step schedulers, 1 / sqrt(sigma^2 + 1) for Euler-type ones), and the base pipeline multiplies
    `latents` by `init_noise_sigma`, so both are divided out here. Uses the standard deviation sqrt(1 - a) where the
    original OMS code uses the variance.
    """
    alpha_prod_t = torch.as_tensor(alpha_prod_t, dtype=torch.float32)
    x_t = alpha_prod_t.sqrt() * original_sample.float() + (1 - alpha_prod_t).sqrt() * noise.float()
    return x_t / (torch.as_tensor(model_input_scale, dtype=torch.float32) * float(init_noise_sigma))


def remove_spatial_mean(noise: torch.Tensor) -> torch.Tensor:
    """`noise` without each channel's spatial mean, rescaled so that every entry keeps unit variance.

    The mean over the image is a latent's lowest frequency: its overall brightness and colour. In x_T the base's
    noise carries a random mean of its own (standard deviation 1 / sqrt(height x width)) beside the OMS prediction's
    sqrt(alpha_bar) x0, and on SD's schedule the two are of the same size, so the noise overrules what OMS sets
    about as often as not. Without it, the first latent's mean is the OMS prediction's alone.
    """
    count = noise.shape[-2] * noise.shape[-1]
    if count < 2:
        raise ValueError(f"Removing the spatial mean needs at least 2 latent positions, got shape {tuple(noise.shape)}.")
    centred = noise - noise.mean(dim=(-2, -1), keepdim=True)
    return centred * (count / (count - 1)) ** 0.5


def oms_generator(generator: torch.Generator | None) -> torch.Generator:
    """A generator for OMS's own noise, derived from `generator`'s current state without drawing from it.

    The base pipeline's stream is then the same with and without OMS; without a generator OMS's noise is random.
    """
    if generator is None:
        derived = torch.Generator()
        derived.seed()
        return derived
    digest = hashlib.sha256(b"one-more-step" + generator.get_state().numpy().tobytes()).digest()
    return torch.Generator(generator.device).manual_seed(int.from_bytes(digest[:8], "little") % 2**63)


class OMSPipeline(DiffusionPipeline):
    r"""
    One More Step (Hu et al., 2023) in front of a Stable-Diffusion-schedule text-to-image pipeline.

    The OMS module reads unit-variance noise and its prompt (`oms_prompt`, by default the base's prompt), predicts
    the clean latent x0, and diffuses it to the base scheduler's first timestep with the noise the base pipeline
    would have drawn itself: x_T = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) z. The base pipeline (any
    `DiffusionPipeline` taking `latents`, `num_inference_steps` and `generator`, whose scheduler has `alphas_cumprod`)
    then runs unchanged from x_T. A base with a schedule that reaches zero SNR (rectified flow) is refused: its first
    latent is pure noise by construction.

    Randomness: z is drawn from `generator` exactly as the base pipeline's `prepare_latents` would draw its noise,
    and OMS's own input noise comes from a generator derived from `generator`'s state without drawing from it. So
    with and without OMS the base sees the same noise and the same random stream afterwards; the images differ by
    what OMS adds.

    The module is saved without the base (`save_pretrained` writes `oms_model`, and the text encoder only if the
    module has its own), and loaded with one: `OMSPipeline.from_pretrained(path, base_pipeline=pipe)`.

    Args:
        oms_model ([`OMSModel`]):
            The OMS network (v at zero SNR).
        oms_text_encoder ([`~transformers.CLIPTextModel`], *optional*):
            The text encoder the module reads. If absent, the base pipeline's `text_encoder` is used (the module was
            then trained on it).
        oms_tokenizer ([`~transformers.CLIPTokenizer`], *optional*):
            The tokenizer of `oms_text_encoder`; the base pipeline's if absent.
        base_pipeline ([`DiffusionPipeline`], *optional*):
            The pipeline to run after the OMS step. Not saved with the module; required for a call.
        latent_channels (`int`, *optional*):
            Channels of the latent space the module was trained in. Stored in `model_index.json`.
        vae_scaling_factor (`float`, *optional*):
            `vae.config.scaling_factor` of the VAE the module was trained with; a base whose VAE scales its latents
            otherwise lives in another latent space. Stored in `model_index.json`.
    """

    model_cpu_offload_seq = "oms_text_encoder->oms_model"
    _optional_components = ["oms_text_encoder", "oms_tokenizer"]

    def __init__(
        self,
        oms_model: OMSModel,
        oms_text_encoder: CLIPTextModel | None = None,
        oms_tokenizer: CLIPTokenizer | None = None,
        base_pipeline: DiffusionPipeline | None = None,
        latent_channels: int | None = None,
        vae_scaling_factor: float | None = None,
        default_oms_guidance_scale: float = 1.0,
        default_remove_noise_mean: bool = False,
    ):
        super().__init__()
        if (oms_text_encoder is None) != (oms_tokenizer is None):
            raise ValueError("Pass both `oms_text_encoder` and `oms_tokenizer`, or neither (to use the base's).")
        self.register_modules(oms_model=oms_model, oms_text_encoder=oms_text_encoder, oms_tokenizer=oms_tokenizer)
        self.register_to_config(
            latent_channels=latent_channels if latent_channels is not None else oms_model.config.in_channels,
            vae_scaling_factor=vae_scaling_factor,
            default_oms_guidance_scale=default_oms_guidance_scale,
            default_remove_noise_mean=default_remove_noise_mean,
        )
        self.base_pipeline = None
        if base_pipeline is not None:
            self.set_base_pipeline(base_pipeline)

    def set_base_pipeline(self, base_pipeline: DiffusionPipeline) -> None:
        """Put the module in front of `base_pipeline`, after checking they share the latent space and text encoder."""
        self.check_base_pipeline(base_pipeline)
        self.base_pipeline = base_pipeline

    def check_base_pipeline(self, base: DiffusionPipeline) -> None:
        """Raise a clear error when OMS cannot serve `base`: no SD-type schedule, or another latent space."""
        if not isinstance(base, DiffusionPipeline):
            raise TypeError(f"`base_pipeline` must be a DiffusionPipeline, got {type(base).__name__}.")
        for name in ("scheduler", "unet", "vae"):
            if getattr(base, name, None) is None:
                raise ValueError(f"`base_pipeline` ({type(base).__name__}) has no `{name}`; OMS needs a UNet pipeline.")
        scheduler_name = type(base.scheduler).__name__
        if scheduler_name in ZERO_TERMINAL_SNR_SCHEDULERS or getattr(base.scheduler.config, "rescale_betas_zero_snr", False):
            raise ValueError(
                f"`base_pipeline` {type(base).__name__} samples with {scheduler_name}, whose first latent is pure noise"
                " by construction (its schedule reaches zero SNR at the first step): there is no schedule flaw for"
                " One More Step to fix. OMS serves pipelines on a schedule with non-zero terminal SNR (Stable"
                " Diffusion's)."
            )
        if not hasattr(base.scheduler, "alphas_cumprod"):
            raise ValueError(
                f"`base_pipeline`'s scheduler {scheduler_name} has no `alphas_cumprod`; OMS needs a DDPM-type schedule."
            )
        if "latents" not in inspect.signature(base.__call__).parameters:
            raise ValueError(f"`base_pipeline` {type(base).__name__} takes no `latents`, which is how OMS hands over.")
        unet_channels, vae_channels = base.unet.config.in_channels, base.vae.config.latent_channels
        base_scale = base.vae.config.scaling_factor
        module_channels, module_scale = self.config.latent_channels, self.config.vae_scaling_factor
        # A tiny decoder (TAESD's AutoencoderTiny) reads the already scaled latents and says scaling_factor 1.0 by
        # convention: it decodes the base's latent space without naming it, so only the channels can be compared.
        compare_scale = module_scale is not None and not isinstance(base.vae, AutoencoderTiny)
        if (
            module_channels != vae_channels
            or module_channels != unet_channels
            or (compare_scale and abs(module_scale - base_scale) > 1e-4 * abs(module_scale))
        ):
            raise ValueError(
                "The OMS module and `base_pipeline` live in different latent spaces: the module was trained on"
                f" {module_channels}-channel latents scaled by {module_scale}, the base ({type(base).__name__}) has a"
                f" {unet_channels}-channel UNet and a {vae_channels}-channel VAE with scaling_factor {base_scale}."
                " One module serves one VAE latent space; train one for this base with training/train_oms.py."
            )
        if self.oms_text_encoder is None:
            text_encoder = getattr(base, "text_encoder", None)
            if text_encoder is None or getattr(base, "tokenizer", None) is None:
                raise ValueError(
                    f"The OMS module has no text encoder of its own and `base_pipeline` {type(base).__name__} has none"
                    " to lend it; load the module with `oms_text_encoder` and `oms_tokenizer`."
                )
            if text_encoder.config.hidden_size != self.oms_model.config.cross_attention_dim:
                raise ValueError(
                    f"The OMS module reads {self.oms_model.config.cross_attention_dim}-wide text embeddings but the"
                    f" base's text encoder gives {text_encoder.config.hidden_size}; pass the module's own"
                    " `oms_text_encoder`."
                )

    def to(self, *args, **kwargs):
        """Move (or cast) the module and its base pipeline together."""
        if self.base_pipeline is not None:
            self.base_pipeline.to(*args, **kwargs)
        return super().to(*args, **kwargs)

    def set_progress_bar_config(self, **kwargs):
        super().set_progress_bar_config(**kwargs)
        if self.base_pipeline is not None:
            self.base_pipeline.set_progress_bar_config(**kwargs)

    @property
    def text_encoder(self) -> CLIPTextModel:
        return self.oms_text_encoder if self.oms_text_encoder is not None else self.base_pipeline.text_encoder

    @property
    def tokenizer(self) -> CLIPTokenizer:
        return self.oms_tokenizer if self.oms_tokenizer is not None else self.base_pipeline.tokenizer

    def encode_oms_prompt(self, prompt: str | list[str], device: torch.device, num_images_per_prompt: int) -> torch.Tensor:
        """The module's text embeddings, repeated for `num_images_per_prompt`."""
        tokens = self.tokenizer(
            prompt, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        embeds = self.text_encoder(tokens.to(device), return_dict=False)[0]
        return embeds.to(self.oms_model.dtype).repeat_interleave(num_images_per_prompt, dim=0)

    def base_first_step(
        self, num_inference_steps: int | None, timesteps: list | None, sigmas: list | None, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """alpha_bar, `scale_model_input`'s factor and `init_noise_sigma` at the base's first timestep.

        Taken from a copy of the base's scheduler after `set_timesteps`, as the base pipeline will set it (Euler's
        `init_noise_sigma` depends on the grid), so the base's own scheduler is not disturbed.
        """
        scheduler = copy.deepcopy(self.base_pipeline.scheduler)
        schedule, _ = retrieve_timesteps(scheduler, num_inference_steps, device, timesteps, sigmas)
        first = schedule[0]
        alpha_prod = scheduler.alphas_cumprod[int(round(float(first)))].float()
        model_input_scale = scheduler.scale_model_input(torch.ones(1, device=device), first).float().cpu()
        return alpha_prod, model_input_scale, float(scheduler.init_noise_sigma)

    def check_inputs(
        self,
        prompt,
        oms_prompt,
        oms_negative_prompt,
        oms_guidance_scale,
        prompt_embeds,
        oms_prompt_embeds,
        oms_negative_prompt_embeds=None,
        num_inference_steps=None,
        num_images_per_prompt=1,
        height=None,
        width=None,
        generator=None,
        latents=None,
    ):
        """Raise a `ValueError` or `TypeError` naming the argument, before the module runs: what the OMS step reads
        itself is checked here (the base pipeline checks the rest when it is called)."""
        if self.base_pipeline is None:
            raise ValueError("The OMS pipeline has no `base_pipeline`; load it with `base_pipeline=` or call `set_base_pipeline`.")
        if not isinstance(oms_guidance_scale, (int, float)) or isinstance(oms_guidance_scale, bool):
            raise TypeError(f"`oms_guidance_scale` must be a number, got {oms_guidance_scale!r:.100}.")
        if not oms_guidance_scale >= 0 or not math.isfinite(oms_guidance_scale):
            raise ValueError(
                f"`oms_guidance_scale` must be a finite number >= 0 (1 turns OMS's guidance off), got {oms_guidance_scale}."
            )
        if prompt is None and prompt_embeds is None:
            raise ValueError("Provide either `prompt` or `prompt_embeds`. Cannot leave both undefined.")
        if prompt is not None and not (
            isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt))
        ):
            raise TypeError(f"`prompt` must be a string or a non-empty list of strings, got {prompt!r:.200}.")
        if prompt_embeds is not None:
            check_text_embeds("prompt_embeds", prompt_embeds, None)
        if oms_prompt is not None and oms_prompt_embeds is not None:
            raise ValueError("Pass at most one of `oms_prompt` and `oms_prompt_embeds`.")
        if oms_negative_prompt is not None and oms_negative_prompt_embeds is not None:
            raise ValueError("Pass at most one of `oms_negative_prompt` and `oms_negative_prompt_embeds`.")
        batch_size = prompt_batch_size(prompt, prompt_embeds)
        for name, value in (("oms_prompt", oms_prompt), ("oms_negative_prompt", oms_negative_prompt)):
            if value is None:
                continue
            if not (isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))):
                raise TypeError(f"`{name}` must be a string or a list of strings, got {value!r:.200}.")
            if isinstance(value, list) and len(value) != batch_size:
                raise ValueError(f"`{name}` has {len(value)} entries but there are {batch_size} prompts.")
        width_of_text = self.oms_model.config.cross_attention_dim
        for name, embeds in (("oms_prompt_embeds", oms_prompt_embeds), ("oms_negative_prompt_embeds", oms_negative_prompt_embeds)):
            if embeds is None:
                continue
            check_text_embeds(name, embeds, width_of_text)
            if embeds.shape[0] != batch_size:
                raise ValueError(f"`{name}` has batch {embeds.shape[0]} but there are {batch_size} prompts.")
        if oms_prompt is None and oms_prompt_embeds is None and prompt is None:
            if self.oms_text_encoder is not None:
                raise ValueError(
                    "With `prompt_embeds` and a module that has its own text encoder, pass `oms_prompt` or"
                    " `oms_prompt_embeds`: the base's embeddings are not the module's."
                )
            check_text_embeds("prompt_embeds", prompt_embeds, width_of_text)
        if num_inference_steps is not None:
            check_positive_int("num_inference_steps", num_inference_steps)
        check_positive_int("num_images_per_prompt", num_images_per_prompt)
        check_image_size(height, width, self.base_vae_scale_factor)
        check_latents(latents)
        check_generator(generator, batch_size * num_images_per_prompt)

    @property
    def base_vae_scale_factor(self) -> int:
        base = self.base_pipeline
        return getattr(base, "vae_scale_factor", 2 ** (len(base.vae.config.block_out_channels) - 1))

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        oms_prompt: str | list[str] | None = None,
        oms_negative_prompt: str | list[str] | None = None,
        oms_guidance_scale: float | None = None,
        remove_noise_mean: bool | None = None,
        oms: bool = True,
        num_inference_steps: int | None = None,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        oms_prompt_embeds: torch.Tensor | None = None,
        oms_negative_prompt_embeds: torch.Tensor | None = None,
        **base_kwargs: Any,
    ):
        r"""
        Run the OMS step, then the base pipeline from its result.

        Args:
            prompt (`str` or `list[str]`, *optional*):
                The base pipeline's prompt, and the module's unless `oms_prompt` is given.
            oms_prompt (`str` or `list[str]`, *optional*):
                What the module reads instead of `prompt`: low-frequency control (brightness, colour, layout), e.g.
                prompt "a car" with `oms_prompt` "a red car".
            oms_negative_prompt (`str` or `list[str]`, *optional*):
                The unconditional branch of the module's guidance (default ""); used when `oms_guidance_scale` != 1.
            oms_guidance_scale (`float`, *optional*, defaults to `self.config.default_oms_guidance_scale`):
                Classifier-free guidance on the module's output; at 1 the unconditional pass is skipped.
            remove_noise_mean (`bool`, *optional*, defaults to `self.config.default_remove_noise_mean`):
                Take each channel's spatial mean out of the base's noise z before forming x_T (see
                `remove_spatial_mean`), so that the overall brightness and colour are the module's alone: the
                background follows `oms_prompt` far more often. False is the original OMS (z as drawn).
            oms (`bool`, *optional*, defaults to `True`):
                False runs the base pipeline alone (exactly as calling it).
            num_inference_steps (`int`, *optional*):
                The base pipeline's steps (its default if not given); the OMS step lands on its first timestep.
            num_images_per_prompt (`int`, *optional*, defaults to 1):
                Images per prompt.
            height (`int`, *optional*), width (`int`, *optional*):
                Image size in pixels (the base's default if not given).
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                The base pipeline's generator(s); OMS draws its own noise from generators derived from them.
            latents (`torch.Tensor`, *optional*):
                The base's unit-variance initial noise z. With OMS, the first latent is formed from it.
            prompt_embeds (`torch.Tensor`, *optional*):
                The base's text embeddings; the module reuses them when it reads the base's text encoder and no
                `oms_prompt` is given.
            oms_prompt_embeds, oms_negative_prompt_embeds (`torch.Tensor`, *optional*):
                The module's text embeddings, instead of `oms_prompt` / `oms_negative_prompt`.
            **base_kwargs:
                Everything else goes to the base pipeline (`guidance_scale`, `negative_prompt`, `output_type`, ...).

        Examples:

        Returns:
            What the base pipeline returns.
        """
        if not isinstance(oms, bool):
            raise TypeError(f"`oms` must be True or False, got {oms!r:.100}.")
        if not oms:
            return self._call_base(prompt, num_inference_steps, num_images_per_prompt, height, width, generator,
                                   latents, prompt_embeds, base_kwargs)
        if oms_guidance_scale is None:
            oms_guidance_scale = self.config.default_oms_guidance_scale
        if remove_noise_mean is None:
            remove_noise_mean = self.config.default_remove_noise_mean
        if not isinstance(remove_noise_mean, bool):
            raise TypeError(f"`remove_noise_mean` must be True or False, got {remove_noise_mean!r:.100}.")
        if self.base_pipeline is None:
            raise ValueError("The OMS pipeline has no `base_pipeline`; load it with `base_pipeline=` or call `set_base_pipeline`.")
        base = self.base_pipeline
        device = base._execution_device
        vae_scale_factor = self.base_vae_scale_factor
        if height is None:
            height = base.unet.config.sample_size * vae_scale_factor
        if width is None:
            width = base.unet.config.sample_size * vae_scale_factor
        self.check_inputs(prompt, oms_prompt, oms_negative_prompt, oms_guidance_scale, prompt_embeds, oms_prompt_embeds,
                          oms_negative_prompt_embeds, num_inference_steps, num_images_per_prompt, height, width,
                          generator, latents)  # fmt: skip

        # 1. The base's sampling grid and image size, with its own defaults
        if num_inference_steps is None and base_kwargs.get("timesteps") is None and base_kwargs.get("sigmas") is None:
            num_inference_steps = getattr(base, "default_num_inference_steps", None)
            if num_inference_steps is None:
                num_inference_steps = inspect.signature(base.__call__).parameters["num_inference_steps"].default
        alpha_prod, model_input_scale, init_noise_sigma = self.base_first_step(
            num_inference_steps, base_kwargs.get("timesteps"), base_kwargs.get("sigmas"), device
        )

        # 2. The module's text embeddings (the base's own when it reads the base's encoder and has no prompt of its own)
        num_prompts = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else None
        if num_prompts is None and prompt_embeds is not None:
            num_prompts = prompt_embeds.shape[0]
        if isinstance(oms_prompt, str) and num_prompts is not None:
            oms_prompt = [oms_prompt] * num_prompts  # one OMS prompt for every prompt
        if oms_prompt_embeds is None:
            if oms_prompt is None and prompt is None:
                oms_prompt_embeds = prompt_embeds.to(self.oms_model.dtype).repeat_interleave(num_images_per_prompt, 0)
            else:
                oms_prompt_embeds = self.encode_oms_prompt(oms_prompt if oms_prompt is not None else prompt, device,
                                                           num_images_per_prompt)
        else:
            oms_prompt_embeds = oms_prompt_embeds.to(device, self.oms_model.dtype).repeat_interleave(num_images_per_prompt, 0)
        batch = oms_prompt_embeds.shape[0]
        do_guidance = oms_guidance_scale != 1
        if do_guidance:
            if oms_negative_prompt_embeds is None:
                negative = oms_negative_prompt if oms_negative_prompt is not None else ""
                negative = [negative] * (batch // num_images_per_prompt) if isinstance(negative, str) else negative
                oms_negative_prompt_embeds = self.encode_oms_prompt(negative, device, num_images_per_prompt)
            else:
                oms_negative_prompt_embeds = oms_negative_prompt_embeds.to(device, self.oms_model.dtype)
                oms_negative_prompt_embeds = oms_negative_prompt_embeds.repeat_interleave(num_images_per_prompt, 0)

        # 3. The module's input: unit-variance noise from its own stream, whatever the base's init_noise_sigma
        channels = self.oms_model.config.in_channels
        shape = (batch, channels, height // vae_scale_factor, width // vae_scale_factor)
        generators = generator if isinstance(generator, list) else [generator]
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"`generator` is a list of {len(generator)} generators for {batch} images; pass one per image.")
        own = [oms_generator(g) for g in generators]
        oms_noise = randn_tensor(shape, generator=own if isinstance(generator, list) else own[0], device=device,
                                 dtype=self.oms_model.dtype)

        # 4. x0 = -v at zero SNR, with the module's guidance when its scale is not 1
        if do_guidance:
            v_uncond, v_text = self.oms_model(
                torch.cat([oms_noise] * 2), torch.cat([oms_negative_prompt_embeds, oms_prompt_embeds]), return_dict=False
            )[0].chunk(2)
            v = v_uncond + oms_guidance_scale * (v_text - v_uncond)
        else:
            v = self.oms_model(oms_noise, oms_prompt_embeds, return_dict=False)[0]
        original_sample = predicted_original_sample(v)

        # 5. The base's noise z, drawn as its prepare_latents would, then x_T at its first timestep
        base_dtype = base.unet.dtype
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=base_dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"`latents` must have shape {shape}, got {tuple(latents.shape)}.")
        if remove_noise_mean:
            latents = remove_spatial_mean(latents)
        x_t = first_latent(original_sample, latents.to(device), alpha_prod.to(device), model_input_scale.to(device),
                           init_noise_sigma)

        # 6. The base pipeline, unchanged, from there
        return self._call_base(prompt, num_inference_steps, num_images_per_prompt, height, width, generator,
                               x_t.to(base_dtype), prompt_embeds, base_kwargs)

    def _call_base(self, prompt, num_inference_steps, num_images_per_prompt, height, width, generator, latents,
                   prompt_embeds, base_kwargs):
        if self.base_pipeline is None:
            raise ValueError("The OMS pipeline has no `base_pipeline`; load it with `base_pipeline=` or call `set_base_pipeline`.")
        kwargs = {
            "prompt": prompt,
            "num_inference_steps": num_inference_steps,
            "num_images_per_prompt": num_images_per_prompt,
            "height": height,
            "width": width,
            "generator": generator,
            "latents": latents,
            "prompt_embeds": prompt_embeds,
        }
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        return self.base_pipeline(**kwargs, **base_kwargs)
