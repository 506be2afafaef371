"""InstaFlow: one-step (or few-step) text-to-image with a rectified-flow Stable Diffusion UNet.

The sampling loop is the one of the original `RectifiedFlowPipeline` (gnobitab/InstaFlow `code/pipeline_rf.py`):
standard normal noise at UNet time 1000, a UNet that predicts the velocity v ~ image latent - noise, forward Euler on
t = (1 - i/N) * 1000, classifier-free guidance only when `guidance_scale > 1`, then the VAE decoder. Unlike the
original it forwards `cross_attention_kwargs` to the UNet, lets the scheduler own the Euler step (so SD3- and
PeRFlow-style velocity checkpoints run by changing the scheduler's config), supports `callback_on_step_end`, and
takes a negative prompt at `guidance_scale` <= 1 (where the original ignored it) through NASA or NAG steered
cross-attention, as [`OneStepPipeline`] does: still one UNet evaluation per step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import StableDiffusionLoraLoaderMixin, TextualInversionLoaderMixin
from diffusers.models import AutoencoderKL, UNet2DConditionModel
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, StableDiffusionMixin
from diffusers.pipelines.stable_diffusion import StableDiffusionPipeline, StableDiffusionPipelineOutput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.utils import logging, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer

from ...schedulers import RectifiedFlowEulerScheduler
from ..negative_prompts import (
    DEFAULT_NAG_SCALE,
    DEFAULT_NASA_SCALE,
    check_negative_attention_inputs,
    negative_attention_during_call,
    resolve_nasa_scale,
    steers_attention,
)


logger = logging.get_logger(__name__)  # pylint: disable=invalid-name

OUTPUT_TYPES = ("pil", "np", "pt", "latent")

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from fastgen_diffusers import InstaFlowPipeline

        >>> pipe = InstaFlowPipeline.from_pretrained("XCLIU/instaflow_0_9B_from_sd_1_5", dtype=torch.float16)
        >>> pipe = pipe.to("cuda")

        >>> image = pipe("a photo of an astronaut riding a horse on mars", num_inference_steps=1).images[0]

        >>> # a negative prompt through NASA steered cross-attention: still one UNet evaluation
        >>> image = pipe(
        ...     "a photo of an astronaut riding a horse on mars", negative_prompt="blurry", nasa_scale=0.1
        ... ).images[0]
        ```
"""


class InstaFlowPipeline(
    DiffusionPipeline, StableDiffusionMixin, TextualInversionLoaderMixin, StableDiffusionLoraLoaderMixin
):
    """
    Pipeline for one-step and few-step text-to-image generation with a rectified-flow (InstaFlow) UNet, with negative
    prompts through classifier-free guidance (`guidance_scale` > 1) or, without it, through steered cross-attention
    (SNOOPI's NASA, or NAG).

    This model inherits from [`DiffusionPipeline`]. Check the superclass documentation for the generic methods
    implemented for all pipelines (downloading, saving, running on a particular device, etc.).

    The pipeline also inherits the following loading methods:
        - [`~loaders.TextualInversionLoaderMixin.load_textual_inversion`] for loading textual inversion embeddings
        - [`~loaders.StableDiffusionLoraLoaderMixin.load_lora_weights`] for loading LoRA weights
        - [`~loaders.StableDiffusionLoraLoaderMixin.save_lora_weights`] for saving LoRA weights

    Args:
        vae ([`AutoencoderKL`]):
            Variational Auto-Encoder (VAE) model to decode image latents into images.
        text_encoder ([`~transformers.CLIPTextModel`]):
            Frozen text-encoder.
        tokenizer ([`~transformers.CLIPTokenizer`]):
            A `CLIPTokenizer` to tokenize text.
        unet ([`UNet2DConditionModel`]):
            A `UNet2DConditionModel` that predicts the rectified-flow velocity of the image latents.
        scheduler ([`RectifiedFlowEulerScheduler`]):
            The Euler scheduler stating the checkpoint's velocity convention. The published InstaFlow and
            2-Rectified Flow checkpoints save a `DPMSolverMultistepScheduler` that their own pipeline never steps;
            any scheduler that is not a [`RectifiedFlowEulerScheduler`] is therefore replaced by
            `RectifiedFlowEulerScheduler()` (InstaFlow's conventions), with a warning. Pass `scheduler=` to
            `from_pretrained` to sample a checkpoint with other conventions.
        safety_checker ([`StableDiffusionSafetyChecker`], *optional*):
            Classification module that estimates whether generated images could be considered offensive or harmful.
        feature_extractor ([`~transformers.CLIPImageProcessor`], *optional*):
            A `CLIPImageProcessor` to extract features from generated images; used as inputs to the `safety_checker`.
        default_nasa_scale (`float`, defaults to 0.1):
            NASA's alpha when a call passes a negative prompt at `guidance_scale` <= 1 but no `nasa_scale`. Alpha is
            model-dependent (SNOOPI: 0.1 for SD1.5, 0.2 for SD2.1 students), so training scripts store the one tuned
            for their model here. Stored in `model_index.json`.
        default_nag_scale (`float`, defaults to 4.0):
            NAG's phi for `negative_attention_method="nag"` calls without `nasa_scale` (the NAG authors'
            `nag_scale=5`). Stored in `model_index.json`.
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["safety_checker", "feature_extractor"]
    _exclude_from_cpu_offload = ["safety_checker"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: RectifiedFlowEulerScheduler,
        safety_checker: StableDiffusionSafetyChecker | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        default_nasa_scale: float = DEFAULT_NASA_SCALE,
        default_nag_scale: float = DEFAULT_NAG_SCALE,
    ):
        super().__init__()

        if not isinstance(scheduler, RectifiedFlowEulerScheduler):
            logger.warning(
                f"`scheduler` is a {type(scheduler).__name__}, not a rectified-flow scheduler; using "
                "RectifiedFlowEulerScheduler() (InstaFlow conventions: v = image - noise, t = (1 - i/N) * 1000). "
                "Published InstaFlow checkpoints save a scheduler their sampler never uses. Pass `scheduler=` to "
                "choose other conventions."
            )
            scheduler = RectifiedFlowEulerScheduler()

        if safety_checker is not None and feature_extractor is None:
            raise ValueError(
                "`safety_checker` needs a `feature_extractor` to prepare its inputs; pass both or neither."
            )

        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if getattr(self, "vae", None) else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.register_to_config(default_nasa_scale=default_nasa_scale, default_nag_scale=default_nag_scale)

    # Prompt encoding and the safety checker are Stable Diffusion's, unchanged (textual inversion, LoRA scale on the
    # text encoder, `clip_skip`); sharing the functions keeps them in step with the pinned Diffusers.
    encode_prompt = StableDiffusionPipeline.encode_prompt
    run_safety_checker = StableDiffusionPipeline.run_safety_checker

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
        output_type="pil",
        callback_on_step_end_tensor_inputs=None,
        nasa_scale=None,
        negative_attention_method="nasa",
    ):
        if height % self.vae_scale_factor != 0 or width % self.vae_scale_factor != 0:
            raise ValueError(
                f"`height` and `width` have to be divisible by the VAE scale factor {self.vae_scale_factor} but are "
                f"{height} and {width}."
            )

        if timesteps is not None and sigmas is not None:
            raise ValueError("Pass at most one of `timesteps` and `sigmas`; both describe the sampling grid.")
        if timesteps is None and sigmas is None and num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be at least 1, got {num_inference_steps}.")

        if num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be at least 1, got {num_images_per_prompt}.")

        check_negative_attention_inputs(guidance_scale, nasa_scale, negative_attention_method)

        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")

        if callback_on_step_end_tensor_inputs is not None and not all(
            k in self._callback_tensor_inputs for k in callback_on_step_end_tensor_inputs
        ):
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` has to be in {self._callback_tensor_inputs}, but found "
                f"{[k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]}"
            )

        if prompt is not None and prompt_embeds is not None:
            raise ValueError("Cannot forward both `prompt` and `prompt_embeds`. Please forward only one of the two.")
        elif prompt is None and prompt_embeds is None:
            raise ValueError("Provide either `prompt` or `prompt_embeds`. Cannot leave both undefined.")
        elif prompt is not None and not isinstance(prompt, (str, list)):
            raise ValueError(f"`prompt` has to be of type `str` or `list` but is {type(prompt)}")

        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError(
                "Cannot forward both `negative_prompt` and `negative_prompt_embeds`. Please forward only one of them."
            )

        if (
            prompt_embeds is not None
            and negative_prompt_embeds is not None
            and prompt_embeds.shape != negative_prompt_embeds.shape
        ):
            raise ValueError(
                "`prompt_embeds` and `negative_prompt_embeds` must have the same shape when passed directly, but"
                f" got: `prompt_embeds` {prompt_embeds.shape} != `negative_prompt_embeds`"
                f" {negative_prompt_embeds.shape}."
            )

    def prepare_latents(self, batch_size, num_channels_latents, height, width, dtype, device, generator, latents=None):
        """Standard normal noise, the start of the flow at UNet time 1000.

        Unlike Stable Diffusion's `prepare_latents`, no scheduler `init_noise_sigma` is applied: rectified flow starts
        from N(0, I) whatever scheduler a checkpoint saved (an `EulerDiscreteScheduler` would scale it by ~14.6).
        """
        shape = (batch_size, num_channels_latents, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"You have passed a list of generators of length {len(generator)}, but requested an effective batch"
                f" size of {batch_size}. Make sure the batch size matches the length of the generators."
            )

        if latents is None:
            return randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        if latents.shape != shape:
            raise ValueError(f"`latents` must have shape {shape}, got {tuple(latents.shape)}.")
        return latents.to(device=device, dtype=dtype)

    @property
    def guidance_scale(self):
        return self._guidance_scale

    @property
    def clip_skip(self):
        return self._clip_skip

    @property
    def do_classifier_free_guidance(self):
        # InstaFlow's test: guidance is off at 1 (and below), where the one-step models are meant to run.
        return self._guidance_scale > 1

    @property
    def cross_attention_kwargs(self):
        return self._cross_attention_kwargs

    @property
    def num_timesteps(self):
        return self._num_timesteps

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 1,
        timesteps: list[float] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 1.0,
        negative_prompt: str | list[str] | None = None,
        nasa_scale: float | None = None,
        negative_attention_method: str = "nasa",
        negative_attention_kwargs: dict[str, Any] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[[DiffusionPipeline, int, torch.Tensor, dict], dict]
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
            num_inference_steps (`int`, *optional*, defaults to 1):
                Number of Euler steps on InstaFlow's grid t = (1 - i/N) * 1000. InstaFlow-0.9B is a one-step model;
                2-Rectified Flow is meant for 2 to 25 steps.
            timesteps (`list[float]`, *optional*):
                Custom UNet times, strictly decreasing in (0, 1000]; overrides `num_inference_steps`.
            sigmas (`list[float]`, *optional*):
                Custom noise levels, strictly decreasing in (0, 1]; overrides `num_inference_steps`.
            guidance_scale (`float`, *optional*, defaults to 1.0):
                Classifier-free guidance, v = v_negative + guidance_scale * (v_text - v_negative), enabled when
                `guidance_scale > 1`. InstaFlow-0.9B has guidance distilled in: keep it at 1. 2-Rectified Flow: 1 to 2.
            negative_prompt (`str` or `list[str]`, *optional*):
                The prompt or prompts to guide away from. With `guidance_scale` > 1 it is the negative branch of
                classifier-free guidance; with `guidance_scale` <= 1 (one-step InstaFlow) it steers cross-attention
                instead (see `nasa_scale`), at no extra UNet evaluation.
            nasa_scale (`float`, *optional*):
                Strength of the cross-attention steering away from the negative prompt when `guidance_scale` <= 1:
                NASA's alpha (Z+ - alpha Z-) or NAG's phi. Defaults to `self.config.default_nasa_scale` (NASA) or
                `self.config.default_nag_scale` (NAG). 0 turns steering off. It adds one attention per
                cross-attention layer, not a UNet pass; not allowed with `guidance_scale` > 1.
            negative_attention_method (`str`, *optional*, defaults to `"nasa"`):
                `"nasa"` ([`~fastgen_diffusers.attention.NASAAttnProcessor`]) or `"nag"`
                ([`~fastgen_diffusers.attention.NAGAttnProcessor`]). The processor is set on the UNet's
                cross-attention layers for the call only; the previous processors are restored after it.
            negative_attention_kwargs (`dict`, *optional*):
                Further arguments of the steering processor, e.g. `{"tau": 2.5, "alpha": 0.5}` for NAG.
            num_images_per_prompt (`int`, *optional*, defaults to 1):
                The number of images to generate per prompt.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                A [`torch.Generator`](https://pytorch.org/docs/stable/generated/torch.Generator.html) to make
                generation deterministic.
            latents (`torch.Tensor`, *optional*):
                Pre-generated standard normal noise latents, the start of the flow. If not provided, they are sampled
                with `generator`.
            prompt_embeds (`torch.Tensor`, *optional*):
                Pre-generated text embeddings. If not provided, they are computed from `prompt`.
            negative_prompt_embeds (`torch.Tensor`, *optional*):
                Pre-generated negative text embeddings, used instead of `negative_prompt` (for classifier-free
                guidance or for the steered cross-attention). If not provided, they are computed from
                `negative_prompt`.
            output_type (`str`, *optional*, defaults to `"pil"`):
                One of `"pil"`, `"np"`, `"pt"` or `"latent"` (the image latents, not decoded).
            return_dict (`bool`, *optional*, defaults to `True`):
                Whether or not to return a [`~pipelines.stable_diffusion.StableDiffusionPipelineOutput`] instead of a
                plain tuple.
            cross_attention_kwargs (`dict`, *optional*):
                A kwargs dictionary passed to the UNet's attention processors; `"scale"` scales loaded LoRA layers.
            clip_skip (`int`, *optional*):
                Number of layers to be skipped from CLIP while computing the prompt embeddings.
            callback_on_step_end (`Callable`, `PipelineCallback`, `MultiPipelineCallbacks`, *optional*):
                Called at the end of each step as `callback_on_step_end(self, step, timestep, callback_kwargs)`; it
                may return replacements for the tensors in `callback_kwargs` (a replaced `negative_prompt_embeds`
                also steers the following steps).
            callback_on_step_end_tensor_inputs (`list`, *optional*):
                The tensors passed in `callback_kwargs`, from `self._callback_tensor_inputs`.

        Examples:

        Returns:
            [`~pipelines.stable_diffusion.StableDiffusionPipelineOutput`] or `tuple`:
                If `return_dict` is `True`, a [`~pipelines.stable_diffusion.StableDiffusionPipelineOutput`], otherwise
                a tuple `(images, nsfw_content_detected)`.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor

        # 1. Check inputs
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
            output_type,
            callback_on_step_end_tensor_inputs,
            nasa_scale=nasa_scale,
            negative_attention_method=negative_attention_method,
        )

        self._guidance_scale = guidance_scale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs

        # 2. Define call parameters
        if prompt is not None and isinstance(prompt, str):
            batch_size = 1
        elif prompt is not None and isinstance(prompt, list):
            batch_size = len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]

        device = self._execution_device

        nasa_scale = resolve_nasa_scale(self.config, nasa_scale, negative_attention_method)
        steer_attention = steers_attention(
            self.do_classifier_free_guidance, nasa_scale, negative_prompt, negative_prompt_embeds
        )

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

        # One UNet call per step for classifier-free guidance: [negative, text], the original's order.
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])

        # 4. Prepare timesteps
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, timesteps, sigmas
        )

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

        # 6. Steer cross-attention away from the negative prompt for this call; processors are restored after it
        steering = negative_attention_during_call(
            self.unet,
            negative_prompt_embeds,
            nasa_scale,
            negative_attention_method,
            negative_attention_kwargs,
            enabled=steer_attention,
        )

        # 7. Denoising loop: Euler steps along the velocity, from noise (t = 1000) towards the image
        self._num_timesteps = len(timesteps)
        with steering as negative_processor, self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                latent_model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents

                # InstaFlow feeds the float time to the UNet, one per sample.
                velocity = self.unet(
                    latent_model_input,
                    t.expand(latent_model_input.shape[0]),
                    encoder_hidden_states=prompt_embeds,
                    cross_attention_kwargs=self.cross_attention_kwargs,
                    return_dict=False,
                )[0]

                if self.do_classifier_free_guidance:
                    velocity_negative, velocity_text = velocity.chunk(2)
                    velocity = velocity_negative + self.guidance_scale * (velocity_text - velocity_negative)

                latents = self.scheduler.step(velocity, t, latents, return_dict=False)[0]

                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    for k in callback_on_step_end_tensor_inputs:
                        callback_kwargs[k] = locals()[k]
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)

                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                    if negative_processor is not None:
                        negative_processor.negative_encoder_hidden_states = negative_prompt_embeds

                progress_bar.update()

        # 8. Decode the image latents
        if output_type != "latent":
            image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False, generator=generator)[
                0
            ]
            image, has_nsfw_concept = self.run_safety_checker(image, device, prompt_embeds.dtype)
        else:
            image = latents
            has_nsfw_concept = None

        if has_nsfw_concept is None:
            do_denormalize = [True] * image.shape[0]
        else:
            do_denormalize = [not has_nsfw for has_nsfw in has_nsfw_concept]
        image = self.image_processor.postprocess(image, output_type=output_type, do_denormalize=do_denormalize)

        # Offload all models
        self.maybe_free_model_hooks()

        if not return_dict:
            return (image, has_nsfw_concept)

        return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=has_nsfw_concept)
