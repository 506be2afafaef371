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
"""The one pipeline body every fastgen sampler runs in.

The methods differ in their step, not in their pipeline: the scheduler owns the step (rectified-flow Euler for
InstaFlow, predict-x0-then-re-noise for one-step students, any Diffusers scheduler for a Stable Diffusion teacher),
and this class owns what they share: prompt encoding, input checks, the initial latents, the loop with its
callbacks, interrupt and progress bar, negative prompts through steered cross-attention (NASA, NAG), a guidance
term inside the loop (`guidance_fn`, which PPAP uses), and the decode. `InstaFlowPipeline` and `OneStepPipeline` are
this class with their scheduler and defaults.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import StableDiffusionLoraLoaderMixin, TextualInversionLoaderMixin
from diffusers.models import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, StableDiffusionMixin
from diffusers.pipelines.stable_diffusion import StableDiffusionPipeline, StableDiffusionPipelineOutput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import (
    USE_PEFT_BACKEND,
    is_torch_xla_available,
    logging,
    scale_lora_layers,
    unscale_lora_layers,
)
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer

from .negative_attention import NegativeAttentionMixin, resolve_negative_attention

if is_torch_xla_available():
    import torch_xla.core.xla_model as xm

    XLA_AVAILABLE = True
else:
    XLA_AVAILABLE = False

logger = logging.get_logger(__name__)  # pylint: disable=invalid-name

OUTPUT_TYPES = ("pil", "np", "pt", "latent")

# A term added inside the sampling loop: `guidance_fn(model_output, latents, timestep, scheduler)` returns the model
# output (in its own parameterisation) to step with. Called after classifier-free guidance, with gradients off.
GuidanceFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, SchedulerMixin], torch.Tensor]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_positive_int(name: str, value: Any) -> None:
    """Raise a `ValueError` naming `name` unless `value` is an int >= 1 (a bool is not a count)."""
    if not _is_int(value) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r:.100}.")


def check_image_size(height: Any, width: Any, vae_scale_factor: int) -> None:
    """Raise a `ValueError` naming `height` or `width` unless each is a positive multiple of the VAE's factor."""
    for name, value in (("height", height), ("width", width)):
        if not _is_int(value) or value <= 0:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r:.100}.")
        if value % vae_scale_factor != 0:
            raise ValueError(
                f"`{name}` must be divisible by the VAE scale factor {vae_scale_factor}, got {value}; e.g."
                f" {max(vae_scale_factor, value - value % vae_scale_factor)}."
            )


def check_text_embeds(name: str, embeds: Any, width: int | None) -> None:
    """Raise an error naming `name` unless `embeds` is a finite (batch >= 1, tokens, `width`) tensor."""
    if not isinstance(embeds, torch.Tensor):
        raise TypeError(f"`{name}` must be a tensor (batch, tokens, features), got {type(embeds).__name__}.")
    if embeds.ndim != 3 or embeds.shape[0] < 1 or embeds.shape[1] < 1:
        raise ValueError(
            f"`{name}` must be a 3-D tensor (batch >= 1, tokens >= 1, features), got shape {tuple(embeds.shape)}."
        )
    if width is not None and embeds.shape[-1] != width:
        raise ValueError(
            f"`{name}` must have {width} features (the UNet's cross-attention width), got shape {tuple(embeds.shape)}."
        )
    if embeds.is_floating_point() and not torch.isfinite(embeds).all():
        raise ValueError(f"`{name}` contains NaN or infinite values.")


def check_latents(latents: Any) -> None:
    """Raise an error naming `latents` unless it is a finite 4-D tensor (its shape is checked where it is known)."""
    if latents is None:
        return
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"`latents` must be a tensor, got {type(latents).__name__}.")
    if latents.ndim != 4:
        raise ValueError(
            f"`latents` must be a 4-D tensor (batch, channels, height, width), got shape {tuple(latents.shape)}."
        )
    if latents.is_floating_point() and not torch.isfinite(latents).all():
        raise ValueError("`latents` contains NaN or infinite values; the image would be garbage.")


def check_generator(generator: Any, num_images: int) -> None:
    """Raise an error naming `generator` unless it is None, a `torch.Generator`, or one per image."""
    if generator is None or isinstance(generator, torch.Generator):
        return
    if not isinstance(generator, list) or not all(isinstance(g, torch.Generator) for g in generator):
        raise TypeError(
            f"`generator` must be a torch.Generator or a list of them (one per image), got {generator!r:.100}."
        )
    if len(generator) != num_images:
        raise ValueError(
            f"`generator` is a list of {len(generator)} generators for {num_images} images (prompts x"
            " num_images_per_prompt); pass one generator, or one per image."
        )


def prompt_batch_size(prompt: Any, prompt_embeds: torch.Tensor | None) -> int:
    return 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]


def check_finite(tensor: torch.Tensor, what: str) -> None:
    """The guard around the decode: NaN or infinite values would come out as black or garbage images, silently."""
    if not torch.isfinite(tensor).all():
        raise FloatingPointError(
            f"The {what} contain NaN or infinite values; the images would be black or garbage. In float16 (an"
            " overflow), try float32 or bfloat16."
        )


class FastDiffusionPipeline(
    DiffusionPipeline,
    StableDiffusionMixin,
    TextualInversionLoaderMixin,
    StableDiffusionLoraLoaderMixin,
    NegativeAttentionMixin,
):
    r"""
    Text-to-image with a Stable-Diffusion-family UNet and whatever scheduler owns its step, with negative prompts
    through classifier-free guidance (`guidance_scale` > 1) or, without it, through steered cross-attention
    (SNOOPI's NASA, or NAG), and an optional guidance term inside the loop (`guidance_fn`).

    It loads any Stable Diffusion folder (`FastDiffusionPipeline.from_pretrained(sd_folder)` or
    `FastDiffusionPipeline.from_pipe(sd_pipe)`) and samples it with its own scheduler, as `StableDiffusionPipeline`
    would; [`InstaFlowPipeline`] and [`OneStepPipeline`] are this pipeline with their scheduler and defaults.

    This model inherits from [`DiffusionPipeline`]. Check the superclass documentation for the generic methods
    implemented for all pipelines (downloading, saving, running on a particular device, etc.).

    The pipeline also inherits the following loading methods:
        - [`~loaders.TextualInversionLoaderMixin.load_textual_inversion`] for loading textual inversion embeddings
        - [`~loaders.StableDiffusionLoraLoaderMixin.load_lora_weights`] for loading LoRA weights
        - [`~loaders.StableDiffusionLoraLoaderMixin.save_lora_weights`] for saving LoRA weights

    Args:
        vae ([`AutoencoderKL`] or [`AutoencoderTiny`]):
            The autoencoder whose decoder turns image latents into images.
        text_encoder ([`~transformers.CLIPTextModel`]):
            Frozen text-encoder.
        tokenizer ([`~transformers.CLIPTokenizer`]):
            A `CLIPTokenizer` to tokenize text.
        unet ([`UNet2DConditionModel`]):
            The denoiser, in the parameterisation its scheduler expects.
        scheduler ([`SchedulerMixin`]):
            The scheduler that owns the sampling step.
        safety_checker ([`StableDiffusionSafetyChecker`], *optional*):
            Classification module that estimates whether generated images could be considered offensive or harmful.
        feature_extractor ([`~transformers.CLIPImageProcessor`], *optional*):
            A `CLIPImageProcessor` to extract features from generated images; used as inputs to the `safety_checker`.
        negative_attention (`dict`, *optional*):
            How a negative prompt steers cross-attention at `guidance_scale` <= 1 when a call does not say:
            `{"method": "nasa", "scale": alpha}` or `{"method": "nag", "scale": phi, "tau": ..., "alpha": ...}`.
            Training scripts store the setting tuned for their model; stored in `model_index.json`. Defaults to
            NASA with SNOOPI's SD1.5 alpha, 0.1.
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["safety_checker", "feature_extractor"]
    _exclude_from_cpu_offload = ["safety_checker"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    # `num_inference_steps` when a call does not give it.
    default_num_inference_steps = 50

    def __init__(
        self,
        vae: AutoencoderKL | AutoencoderTiny,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: SchedulerMixin,
        safety_checker: StableDiffusionSafetyChecker | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        negative_attention: dict[str, Any] | None = None,
    ):
        super().__init__()
        if safety_checker is not None and feature_extractor is None:
            raise ValueError(
                "`safety_checker` needs a `feature_extractor` to prepare its inputs; pass both or neither."
            )

        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=self.scheduler_for_sampling(scheduler),
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if getattr(self, "vae", None) else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        negative_attention = resolve_negative_attention(negative_attention, None)
        self.register_to_config(negative_attention=negative_attention)

    @classmethod
    def scheduler_for_sampling(cls, scheduler: SchedulerMixin) -> SchedulerMixin:
        """The scheduler this pipeline samples with, given the one it is built or loaded with: that one here;
        subclasses whose checkpoints save a scheduler their sampler cannot step replace or convert it."""
        return scheduler

    def encode_prompt(
        self,
        prompt,
        device,
        num_images_per_prompt,
        do_classifier_free_guidance,
        negative_prompt=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        lora_scale=None,
        clip_skip=None,
    ):
        """Stable Diffusion's `encode_prompt`, with `clip_skip` also for a `CLIPTextModel` without the `.text_model`
        wrapper (transformers 5 dropped it; Diffusers' own `clip_skip` path still reads it)."""
        if clip_skip is not None and prompt_embeds is None and not hasattr(self.text_encoder, "text_model"):
            prompt_embeds = self.clip_skipped_prompt_embeds(prompt, device, clip_skip, lora_scale)
            clip_skip = None
        return StableDiffusionPipeline.encode_prompt(
            self,
            prompt,
            device,
            num_images_per_prompt,
            do_classifier_free_guidance,
            negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            lora_scale=lora_scale,
            clip_skip=clip_skip,
        )

    def clip_skipped_prompt_embeds(self, prompt, device, clip_skip: int, lora_scale: float | None) -> torch.Tensor:
        """The text encoder's hidden state `clip_skip` layers before the last, through its final layer norm."""
        prompt = self.maybe_convert_prompt(prompt, self.tokenizer)
        text_inputs = self.tokenizer(
            prompt, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        )  # fmt: skip
        use_mask = getattr(self.text_encoder.config, "use_attention_mask", False)
        attention_mask = text_inputs.attention_mask.to(device) if use_mask else None
        scale_lora = lora_scale is not None and USE_PEFT_BACKEND
        if scale_lora:
            scale_lora_layers(self.text_encoder, lora_scale)
        input_ids = text_inputs.input_ids.to(device)
        hidden_states = self.text_encoder(input_ids, attention_mask=attention_mask, output_hidden_states=True)[-1]
        embeds = self.text_encoder.final_layer_norm(hidden_states[-(clip_skip + 1)])
        if scale_lora:
            unscale_lora_layers(self.text_encoder, lora_scale)
        return embeds.to(dtype=self.text_encoder.dtype, device=device)

    run_safety_checker = StableDiffusionPipeline.run_safety_checker
    prepare_extra_step_kwargs = StableDiffusionPipeline.prepare_extra_step_kwargs

    def check_inputs(
        self,
        prompt,
        height,
        width,
        num_inference_steps,
        timesteps,
        sigmas,
        guidance_scale,
        num_images_per_prompt,
        negative_prompt=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        latents=None,
        output_type="pil",
        negative_attention=None,
        guidance_fn=None,
        callback_on_step_end_tensor_inputs=None,
        eta=0.0,
        generator=None,
        clip_skip=None,
        callback_on_step_end=None,
    ):
        """Raise a `ValueError` or `TypeError` that names the argument, before any model runs."""
        check_image_size(height, width, self.vae_scale_factor)

        if timesteps is not None and sigmas is not None:
            raise ValueError("Pass at most one of `timesteps` and `sigmas`; both describe the sampling grid.")
        if timesteps is None and sigmas is None:
            check_positive_int("num_inference_steps", num_inference_steps)
        for name, grid in (("timesteps", timesteps), ("sigmas", sigmas)):
            if grid is not None and name not in inspect.signature(self.scheduler.set_timesteps).parameters:
                raise ValueError(
                    f"`{name}`: {type(self.scheduler).__name__}.set_timesteps takes no custom `{name}`; pass"
                    " `num_inference_steps`."
                )
        if not _is_number(guidance_scale) or not math.isfinite(guidance_scale):
            raise ValueError(f"`guidance_scale` must be a finite number, got {guidance_scale!r:.100}.")
        check_positive_int("num_images_per_prompt", num_images_per_prompt)
        if not _is_number(eta) or not math.isfinite(eta):
            raise ValueError(f"`eta` must be a finite number, got {eta!r:.100}.")
        num_layers = self.text_encoder.config.num_hidden_layers if clip_skip is not None else None
        if clip_skip is not None and (not _is_int(clip_skip) or not 0 <= clip_skip <= num_layers):
            raise ValueError(
                f"`clip_skip` must be an integer in [0, {num_layers}] (the text encoder has {num_layers} layers),"
                f" got {clip_skip!r:.100}."
            )

        if prompt is not None and prompt_embeds is not None:
            raise ValueError("Cannot forward both `prompt` and `prompt_embeds`. Please forward only one of the two.")
        if prompt is None and prompt_embeds is None:
            raise ValueError("Provide either `prompt` or `prompt_embeds`. Cannot leave both undefined.")
        if prompt is not None and not (
            isinstance(prompt, str)
            or (isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt))
        ):
            raise TypeError(f"`prompt` must be a string or a non-empty list of strings, got {prompt!r:.200}.")
        text_width = self.unet.config.cross_attention_dim
        text_width = text_width if isinstance(text_width, int) and self.unet.config.encoder_hid_dim is None else None
        for name, embeds in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if embeds is not None:
                check_text_embeds(name, embeds, text_width)
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Cannot forward both `negative_prompt` and `negative_prompt_embeds`; pass one of them.")
        if negative_prompt is not None:
            if not (
                isinstance(negative_prompt, str)
                or (isinstance(negative_prompt, list) and all(isinstance(p, str) for p in negative_prompt))
            ):
                raise TypeError(
                    f"`negative_prompt` must be a string or a list of strings, got {negative_prompt!r:.200}."
                )
            batch_size = prompt_batch_size(prompt, prompt_embeds)
            if isinstance(negative_prompt, list) and len(negative_prompt) != batch_size:
                raise ValueError(
                    f"`negative_prompt` has {len(negative_prompt)} entries but there are {batch_size} prompts; pass one"
                    " negative prompt, or one per prompt."
                )
        if negative_prompt_embeds is not None:
            batch_size = prompt_batch_size(prompt, prompt_embeds)
            if negative_prompt_embeds.shape[0] != batch_size:
                raise ValueError(
                    f"`negative_prompt_embeds` has batch {negative_prompt_embeds.shape[0]} but there are {batch_size}"
                    " prompts; pass one negative embedding per prompt."
                )
            tokens = prompt_embeds.shape[1] if prompt_embeds is not None else self.tokenizer.model_max_length
            if guidance_scale > 1 and negative_prompt_embeds.shape[1] != tokens:
                raise ValueError(
                    f"`negative_prompt_embeds` has {negative_prompt_embeds.shape[1]} tokens but the prompt's"
                    f" embeddings have {tokens}; classifier-free guidance batches them together, so they must match."
                )
        check_latents(latents)
        check_generator(generator, prompt_batch_size(prompt, prompt_embeds) * num_images_per_prompt)

        if not isinstance(output_type, str) or output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r:.100}.")
        self.check_negative_attention_inputs(guidance_scale, negative_attention)
        if guidance_fn is not None and not callable(guidance_fn):
            raise TypeError(f"`guidance_fn` must be callable, got {type(guidance_fn).__name__}.")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise TypeError(f"`callback_on_step_end` must be callable, got {type(callback_on_step_end).__name__}.")
        if callback_on_step_end_tensor_inputs is not None and (
            not isinstance(callback_on_step_end_tensor_inputs, (list, tuple))
            or not all(k in self._callback_tensor_inputs for k in callback_on_step_end_tensor_inputs)
        ):
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` must be a list of names from {self._callback_tensor_inputs},"
                f" got {callback_on_step_end_tensor_inputs!r:.100}."
            )

    def prepare_latents(self, batch_size, num_channels_latents, height, width, dtype, device, generator, latents=None):
        """Standard normal noise scaled by the scheduler's `init_noise_sigma`, as Stable Diffusion's; given `latents`
        are scaled too, so a caller hands over unit-variance noise (or OMS's first latent) whatever the scheduler."""
        shape = (batch_size, num_channels_latents, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"You have passed a list of generators of length {len(generator)}, but requested an effective batch"
                f" size of {batch_size}. Make sure the batch size matches the length of the generators."
            )
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"`latents` must have shape {shape}, got {tuple(latents.shape)}.")
        else:
            latents = latents.to(device=device, dtype=dtype)
        return latents * self.scheduler.init_noise_sigma

    def checked_guidance(self, guidance_fn: GuidanceFn, model_output, latents, timestep) -> torch.Tensor:
        """`guidance_fn`'s model output, refused (naming it) when it changes the shape or is not finite."""
        guided = guidance_fn(model_output, latents, timestep, self.scheduler)
        if not isinstance(guided, torch.Tensor) or guided.shape != model_output.shape:
            raise ValueError(
                f"`guidance_fn` must return a tensor of the model output's shape {tuple(model_output.shape)}, got"
                f" {_describe(guided)}."
            )
        if not torch.isfinite(guided).all():
            raise ValueError(f"`guidance_fn` returned NaN or infinite values at timestep {float(timestep):g}.")
        return guided

    def decode_latents_to_images(self, latents, output_type, device, dtype, generator):
        """The decode and the optional safety check; `output_type="latent"` returns the latents as they are."""
        if output_type == "latent":
            return latents, None
        image = self.vae.decode(
            latents.to(self.vae.dtype) / self.vae.config.scaling_factor, return_dict=False, generator=generator
        )[0]
        check_finite(image, "decoded images")
        image, has_nsfw_concept = self.run_safety_checker(image, device, dtype)
        do_denormalize = (
            [True] * image.shape[0] if has_nsfw_concept is None else [not nsfw for nsfw in has_nsfw_concept]
        )
        return self.image_processor.postprocess(
            image, output_type=output_type, do_denormalize=do_denormalize
        ), has_nsfw_concept

    @property
    def guidance_scale(self):
        return self._guidance_scale

    @property
    def clip_skip(self):
        return self._clip_skip

    @property
    def do_classifier_free_guidance(self):
        return self._guidance_scale > 1

    @property
    def cross_attention_kwargs(self):
        return self._cross_attention_kwargs

    @property
    def num_timesteps(self):
        return self._num_timesteps

    @property
    def interrupt(self):
        return self._interrupt

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        timesteps: list[float] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 1.0,
        negative_prompt: str | list[str] | None = None,
        negative_attention: dict[str, Any] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        guidance_fn: GuidanceFn | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[[DiffusionPipeline, int, int, dict], dict]
        | PipelineCallback
        | MultiPipelineCallbacks
        | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
    ):
        r"""
        The call function to the pipeline for generation.

        Args:
            prompt (`str` or `list[str]`, *optional*):
                The prompt or prompts to guide image generation. If not defined, you need to pass `prompt_embeds`.
            height (`int`, *optional*, defaults to `self.unet.config.sample_size * self.vae_scale_factor`):
                The height in pixels of the generated image.
            width (`int`, *optional*, defaults to `self.unet.config.sample_size * self.vae_scale_factor`):
                The width in pixels of the generated image.
            num_inference_steps (`int`, *optional*, defaults to `self.default_num_inference_steps`):
                The number of UNet evaluations per image (doubled in batch by classifier-free guidance).
            timesteps (`list[float]`, *optional*):
                A custom grid for schedulers whose `set_timesteps` takes one (e.g. `[999, 749, 499, 249]` for a
                one-step student's multistep sampling); overrides `num_inference_steps`.
            sigmas (`list[float]`, *optional*):
                A custom grid of noise levels for schedulers whose `set_timesteps` takes one; overrides
                `num_inference_steps`.
            guidance_scale (`float`, *optional*, defaults to 1.0):
                Classifier-free guidance when > 1, at the cost of a doubled UNet batch; the negative prompt (or the
                empty prompt) is then the unconditional branch. Distilled students usually run without it.
            negative_prompt (`str` or `list[str]`, *optional*):
                What the image should not show. With `guidance_scale` <= 1 it steers cross-attention (see
                `negative_attention`); with `guidance_scale` > 1 it is the CFG unconditional prompt.
            negative_attention (`dict`, *optional*):
                This call's steering settings over the pipeline's `config.negative_attention`, e.g. `{"scale": 0.2}`
                or `{"method": "nag", "scale": 4.0}`. A scale of 0 turns steering off. Steering adds one attention
                per cross-attention layer, not a UNet pass.
            num_images_per_prompt (`int`, *optional*, defaults to 1):
                The number of images to generate per prompt.
            eta (`float`, *optional*, defaults to 0.0):
                DDIM's eta, for schedulers that take it; ignored by the others.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                A [`torch.Generator`](https://pytorch.org/docs/stable/generated/torch.Generator.html) to make
                generation deterministic; it also draws any noise the scheduler's step adds.
            latents (`torch.Tensor`, *optional*):
                Unit-variance noise to start from (multiplied by the scheduler's `init_noise_sigma`), of shape
                `(batch_size * num_images_per_prompt, unet.config.in_channels, height // vae_scale_factor,
                width // vae_scale_factor)`.
            prompt_embeds (`torch.Tensor`, *optional*):
                Pre-generated text embeddings, used instead of `prompt`.
            negative_prompt_embeds (`torch.Tensor`, *optional*):
                Pre-generated negative text embeddings, used instead of `negative_prompt`.
            guidance_fn (`Callable`, *optional*):
                `guidance_fn(model_output, latents, timestep, scheduler)` returns the model output to step with,
                in the same parameterisation; called at each step after classifier-free guidance, with gradients
                off (enable them inside). PPAP's guidance is such a function.
            output_type (`str`, *optional*, defaults to `"pil"`):
                One of `"pil"`, `"np"`, `"pt"` or `"latent"` (the image latents, not decoded).
            return_dict (`bool`, *optional*, defaults to `True`):
                Whether to return a [`~pipelines.stable_diffusion.StableDiffusionPipelineOutput`] or a plain tuple.
            cross_attention_kwargs (`dict`, *optional*):
                Passed to the UNet's attention processors (e.g. `{"scale": 0.5}` for LoRA).
            clip_skip (`int`, *optional*):
                Number of layers to be skipped from CLIP while computing the prompt embeddings.
            callback_on_step_end (`Callable`, `PipelineCallback`, `MultiPipelineCallbacks`, *optional*):
                Called at the end of each step as `callback_on_step_end(self, step, timestep, callback_kwargs)` with
                the tensors named in `callback_on_step_end_tensor_inputs`; it may return replacements for them.
            callback_on_step_end_tensor_inputs (`list`, *optional*):
                The tensor inputs for `callback_on_step_end`, from `._callback_tensor_inputs`.

        Returns:
            [`~pipelines.stable_diffusion.StableDiffusionPipelineOutput`] or `tuple`: the images, and which of them
            the safety checker flagged (`None` without a safety checker).
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 0. Default height, width and steps
        if height is None:
            height = self.unet.config.sample_size * self.vae_scale_factor
        if width is None:
            width = self.unet.config.sample_size * self.vae_scale_factor
        if num_inference_steps is None:
            num_inference_steps = self.default_num_inference_steps

        # 1. Check inputs. Raise error if not correct
        self.check_inputs(
            prompt,
            height,
            width,
            num_inference_steps,
            timesteps,
            sigmas,
            guidance_scale,
            num_images_per_prompt,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            latents,
            output_type,
            negative_attention,
            guidance_fn,
            callback_on_step_end_tensor_inputs,
            eta,
            generator,
            clip_skip,
            callback_on_step_end,
        )
        self._guidance_scale = guidance_scale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False

        # 2. Define call parameters
        if isinstance(prompt, str):
            batch_size = 1
        elif isinstance(prompt, list):
            batch_size = len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        if isinstance(prompt, list) and isinstance(negative_prompt, str):
            negative_prompt = [negative_prompt] * batch_size  # one negative prompt for every prompt
        device = self._execution_device
        steering = resolve_negative_attention(self.config.negative_attention, negative_attention)
        steer_attention = self.steers_attention(steering, negative_prompt, negative_prompt_embeds)

        # 3. Encode input prompt (the negative one once, for CFG or for the steered cross-attention)
        lora_scale = (
            self.cross_attention_kwargs.get("scale", None) if self.cross_attention_kwargs is not None else None
        )
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            self.do_classifier_free_guidance or steer_attention,
            negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            lora_scale=lora_scale,
            clip_skip=self.clip_skip,
        )
        # For classifier free guidance, we need to do two forward passes.
        # Here we concatenate the unconditional and text embeddings into a single batch
        # to avoid doing two forward passes
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])

        # 4. Prepare timesteps
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, timesteps, sigmas
        )
        self._num_timesteps = len(timesteps)

        # 5. Prepare latent variables
        latents = self.prepare_latents(
            batch_size * num_images_per_prompt,
            self.unet.config.in_channels,
            height,
            width,
            prompt_embeds.dtype,
            device,
            generator,
            latents,
        )
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 6. Steer cross-attention away from the negative prompt for this call; processors are restored after it
        steering_block = self.negative_attention_during_call(negative_prompt_embeds, steering, steer_attention)

        # 7. Denoising loop
        with steering_block as negative_processor, self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue

                # expand the latents if we are doing classifier free guidance
                latent_model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
                latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)

                model_output = self.unet(
                    latent_model_input,
                    t,
                    encoder_hidden_states=prompt_embeds,
                    cross_attention_kwargs=self.cross_attention_kwargs,
                    return_dict=False,
                )[0]

                # perform guidance
                if self.do_classifier_free_guidance:
                    model_output_uncond, model_output_text = model_output.chunk(2)
                    model_output = model_output_uncond + self.guidance_scale * (
                        model_output_text - model_output_uncond
                    )
                if guidance_fn is not None:
                    model_output = self.checked_guidance(guidance_fn, model_output, latents, t)

                # compute the previous noisy sample x_t -> x_t-1
                latents = self.scheduler.step(model_output, t, latents, **extra_step_kwargs, return_dict=False)[0]

                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    for k in callback_on_step_end_tensor_inputs:
                        callback_kwargs[k] = locals()[k]
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)

                    if "latents" in callback_outputs:
                        check_callback_latents(callback_outputs["latents"], latents.shape)
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                    if negative_processor is not None:
                        negative_processor.negative_encoder_hidden_states = negative_prompt_embeds

                progress_bar.update()

                if XLA_AVAILABLE:
                    xm.mark_step()

        # 8. Decode
        check_finite(latents, "sampled latents")
        image, has_nsfw_concept = self.decode_latents_to_images(
            latents, output_type, device, prompt_embeds.dtype, generator
        )

        # Offload all models
        self.maybe_free_model_hooks()

        if not return_dict:
            return (image, has_nsfw_concept)

        return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=has_nsfw_concept)


def check_callback_latents(latents: Any, shape: torch.Size) -> None:
    """The latents a step-end callback hands back: a finite tensor of the loop's shape, or an error naming it."""
    if not isinstance(latents, torch.Tensor) or latents.shape != shape:
        raise ValueError(
            f"`callback_on_step_end` must return `latents` of shape {tuple(shape)}, got {_describe(latents)}."
        )
    if not torch.isfinite(latents).all():
        raise ValueError("`callback_on_step_end` returned `latents` with NaN or infinite values.")


def _describe(value: Any) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
