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
"""One-step (and few-step) text-to-image for students that map noise to an image in one UNet evaluation."""

from collections.abc import Callable
from itertools import pairwise
from typing import Any

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import StableDiffusionLoraLoaderMixin, TextualInversionLoaderMixin
from diffusers.models import AutoencoderKL, UNet2DConditionModel
from diffusers.models.lora import adjust_lora_scale_text_encoder
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, StableDiffusionMixin
from diffusers.pipelines.stable_diffusion.pipeline_output import StableDiffusionPipelineOutput
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import (
    USE_PEFT_BACKEND,
    is_torch_xla_available,
    logging,
    replace_example_docstring,
    scale_lora_layers,
    unscale_lora_layers,
)
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer

from ..negative_prompts import (
    DEFAULT_NAG_SCALE,
    DEFAULT_NASA_SCALE,
    check_negative_attention_inputs,
    negative_attention_during_call,
    resolve_nasa_scale,
    steers_attention,
)


if is_torch_xla_available():
    import torch_xla.core.xla_model as xm

    XLA_AVAILABLE = True
else:
    XLA_AVAILABLE = False

logger = logging.get_logger(__name__)  # pylint: disable=invalid-name

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from fastgen_diffusers.pipelines.one_step import OneStepPipeline

        >>> pipe = OneStepPipeline.from_pretrained("path/to/one-step-student", dtype=torch.float16).to("cuda")
        >>> prompt = "a photo of a dog in a park"

        >>> # one UNet evaluation at t = pipe.config.student_timestep
        >>> image = pipe(prompt).images[0]

        >>> # a negative prompt through NASA: steered cross-attention, still one UNet evaluation
        >>> image = pipe(prompt, negative_prompt="blurry, low quality", nasa_scale=0.1).images[0]

        >>> # DMD2-style 4-step sampling: predict x0, re-noise it to the next timestep, repeat
        >>> image = pipe(prompt, timesteps=[999, 749, 499, 249]).images[0]
        ```
"""


def predict_original_sample(
    model_output: torch.Tensor, sample: torch.Tensor, alpha_prod_t: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """x0 from one model evaluation on x_t = sqrt(a) x0 + sqrt(1 - a) eps, with a = `alpha_prod_t`, in float32.

    In float32 because 1 - a and the division by sqrt(a) (0.07 at SD's t = 999) lose digits in half precision.
    """
    model_output = model_output.float()
    sample = sample.float()
    alpha = alpha_prod_t.float() ** 0.5
    sigma = (1 - alpha_prod_t.float()) ** 0.5
    if prediction_type == "epsilon":
        return (sample - sigma * model_output) / alpha
    if prediction_type == "v_prediction":
        return alpha * sample - sigma * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(
        f"`prediction_type` {prediction_type!r} is not supported; use 'epsilon', 'v_prediction' or 'sample'."
    )


def diffuse(original_sample: torch.Tensor, noise: torch.Tensor, alpha_prod_t: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(a) x0 + sqrt(1 - a) noise in float32, the forward process the students were trained on."""
    alpha_prod_t = alpha_prod_t.float()
    return alpha_prod_t**0.5 * original_sample.float() + (1 - alpha_prod_t) ** 0.5 * noise.float()


class OneStepPipeline(
    DiffusionPipeline,
    StableDiffusionMixin,
    TextualInversionLoaderMixin,
    StableDiffusionLoraLoaderMixin,
):
    r"""
    Pipeline for students that map noise to an image in one UNet evaluation at a fixed timestep (SwiftBrush,
    SNOOPI, DMD2-style generators), with negative prompts through steered cross-attention (SNOOPI's NASA, or NAG).

    Such a student saved as a `StableDiffusionPipeline` would be sampled for many steps by that pipeline's
    `__call__`; this one evaluates the UNet on pure noise at `student_timestep` and turns the output into x0
    with the scheduler's `alphas_cumprod` and `prediction_type`. The scheduler is only that schedule: any
    DDPM-family scheduler works (`DDPMScheduler`, `DDIMScheduler`, `LCMScheduler`, ...).

    This model inherits from [`DiffusionPipeline`]. Check the superclass documentation for the generic methods
    implemented for all pipelines (downloading, saving, running on a particular device, etc.).

    The pipeline also inherits the following loading methods:
        - [`~loaders.TextualInversionLoaderMixin.load_textual_inversion`] for loading textual inversion embeddings
        - [`~loaders.StableDiffusionLoraLoaderMixin.load_lora_weights`] for loading LoRA weights
        - [`~loaders.StableDiffusionLoraLoaderMixin.save_lora_weights`] for saving LoRA weights

    Args:
        vae ([`AutoencoderKL`]):
            Variational Auto-Encoder (VAE) model to decode the predicted latents into images.
        text_encoder ([`~transformers.CLIPTextModel`]):
            Frozen text-encoder.
        tokenizer ([`~transformers.CLIPTokenizer`]):
            A `CLIPTokenizer` to tokenize text.
        unet ([`UNet2DConditionModel`]):
            The one-step student.
        scheduler ([`SchedulerMixin`]):
            A DDPM-family scheduler; only its `alphas_cumprod` and `config.prediction_type` are used.
        safety_checker ([`StableDiffusionSafetyChecker`], *optional*):
            Classification module that estimates whether generated images could be considered offensive or harmful.
        feature_extractor ([`~transformers.CLIPImageProcessor`], *optional*):
            A `CLIPImageProcessor` to extract features from generated images; used as inputs to the `safety_checker`.
        student_timestep (`int`, defaults to 999):
            The timestep at which the student reads pure noise (999 for SwiftBrush/SNOOPI/DMD2 SD1.5; 399 for
            one-step DMD2 SDXL). Stored in `model_index.json`.
        default_nasa_scale (`float`, defaults to 0.1):
            NASA's alpha when a call passes a negative prompt but no `nasa_scale`. Alpha is model-dependent
            (SNOOPI: 0.1 for SD1.5, 0.2 for SD2.1 students), so training scripts store the one tuned for their
            student here. Stored in `model_index.json`.
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
        scheduler: SchedulerMixin,
        safety_checker: StableDiffusionSafetyChecker | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        student_timestep: int = 999,
        default_nasa_scale: float = DEFAULT_NASA_SCALE,
        default_nag_scale: float = DEFAULT_NAG_SCALE,
    ):
        super().__init__()

        if not hasattr(scheduler, "alphas_cumprod"):
            raise ValueError(
                f"`scheduler` must be a DDPM-family scheduler with `alphas_cumprod`, got {scheduler.__class__.__name__}."
            )
        if safety_checker is not None and feature_extractor is None:
            raise ValueError(
                f"Make sure to define a feature extractor when loading {self.__class__} if you want to use the safety"
                " checker. If you do not want to use the safety checker, you can pass `'safety_checker=None'` instead."
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
        self.register_to_config(
            student_timestep=student_timestep,
            default_nasa_scale=default_nasa_scale,
            default_nag_scale=default_nag_scale,
        )

    # Copied from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion.StableDiffusionPipeline.encode_prompt
    def encode_prompt(
        self,
        prompt,
        device,
        num_images_per_prompt,
        do_classifier_free_guidance,
        negative_prompt=None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        lora_scale: float | None = None,
        clip_skip: int | None = None,
    ):
        r"""
        Encodes the prompt into text encoder hidden states.

        Args:
            prompt (`str` or `list[str]`, *optional*):
                prompt to be encoded
            device: (`torch.device`):
                torch device
            num_images_per_prompt (`int`):
                number of images that should be generated per prompt
            do_classifier_free_guidance (`bool`):
                whether to use classifier free guidance or not
            negative_prompt (`str` or `list[str]`, *optional*):
                The prompt or prompts not to guide the image generation. If not defined, one has to pass
                `negative_prompt_embeds` instead. Ignored when not using guidance (i.e., ignored if `guidance_scale` is
                less than `1`).
            prompt_embeds (`torch.Tensor`, *optional*):
                Pre-generated text embeddings. Can be used to easily tweak text inputs, *e.g.* prompt weighting. If not
                provided, text embeddings will be generated from `prompt` input argument.
            negative_prompt_embeds (`torch.Tensor`, *optional*):
                Pre-generated negative text embeddings. Can be used to easily tweak text inputs, *e.g.* prompt
                weighting. If not provided, negative_prompt_embeds will be generated from `negative_prompt` input
                argument.
            lora_scale (`float`, *optional*):
                A LoRA scale that will be applied to all LoRA layers of the text encoder if LoRA layers are loaded.
            clip_skip (`int`, *optional*):
                Number of layers to be skipped from CLIP while computing the prompt embeddings. A value of 1 means that
                the output of the pre-final layer will be used for computing the prompt embeddings.
        """
        # set lora scale so that monkey patched LoRA
        # function of text encoder can correctly access it
        if lora_scale is not None and isinstance(self, StableDiffusionLoraLoaderMixin):
            self._lora_scale = lora_scale

            # dynamically adjust the LoRA scale
            if not USE_PEFT_BACKEND:
                adjust_lora_scale_text_encoder(self.text_encoder, lora_scale)
            else:
                scale_lora_layers(self.text_encoder, lora_scale)

        if prompt is not None and isinstance(prompt, str):
            batch_size = 1
        elif prompt is not None and isinstance(prompt, list):
            batch_size = len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]

        if prompt_embeds is None:
            # textual inversion: process multi-vector tokens if necessary
            if isinstance(self, TextualInversionLoaderMixin):
                prompt = self.maybe_convert_prompt(prompt, self.tokenizer)

            text_inputs = self.tokenizer(
                prompt,
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            )
            text_input_ids = text_inputs.input_ids
            untruncated_ids = self.tokenizer(prompt, padding="longest", return_tensors="pt").input_ids

            if untruncated_ids.shape[-1] >= text_input_ids.shape[-1] and not torch.equal(
                text_input_ids, untruncated_ids
            ):
                removed_text = self.tokenizer.batch_decode(
                    untruncated_ids[:, self.tokenizer.model_max_length - 1 : -1]
                )
                logger.warning(
                    "The following part of your input was truncated because CLIP can only handle sequences up to"
                    f" {self.tokenizer.model_max_length} tokens: {removed_text}"
                )

            if hasattr(self.text_encoder.config, "use_attention_mask") and self.text_encoder.config.use_attention_mask:
                attention_mask = text_inputs.attention_mask.to(device)
            else:
                attention_mask = None

            if clip_skip is None:
                prompt_embeds = self.text_encoder(text_input_ids.to(device), attention_mask=attention_mask)
                prompt_embeds = prompt_embeds[0]
            else:
                prompt_embeds = self.text_encoder(
                    text_input_ids.to(device), attention_mask=attention_mask, output_hidden_states=True
                )
                # Access the `hidden_states` first, that contains a tuple of
                # all the hidden states from the encoder layers. Then index into
                # the tuple to access the hidden states from the desired layer.
                prompt_embeds = prompt_embeds[-1][-(clip_skip + 1)]
                # We also need to apply the final LayerNorm here to not mess with the
                # representations. The `last_hidden_states` that we typically use for
                # obtaining the final prompt representations passes through the LayerNorm
                # layer.
                prompt_embeds = self.text_encoder.text_model.final_layer_norm(prompt_embeds)

        if self.text_encoder is not None:
            prompt_embeds_dtype = self.text_encoder.dtype
        elif self.unet is not None:
            prompt_embeds_dtype = self.unet.dtype
        else:
            prompt_embeds_dtype = prompt_embeds.dtype

        prompt_embeds = prompt_embeds.to(dtype=prompt_embeds_dtype, device=device)

        bs_embed, seq_len, _ = prompt_embeds.shape
        # duplicate text embeddings for each generation per prompt, using mps friendly method
        prompt_embeds = prompt_embeds.repeat(1, num_images_per_prompt, 1)
        prompt_embeds = prompt_embeds.view(bs_embed * num_images_per_prompt, seq_len, -1)

        # get unconditional embeddings for classifier free guidance
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            uncond_tokens: list[str]
            if negative_prompt is None:
                uncond_tokens = [""] * batch_size
            elif prompt is not None and type(prompt) is not type(negative_prompt):
                raise TypeError(
                    f"`negative_prompt` should be the same type to `prompt`, but got {type(negative_prompt)} !="
                    f" {type(prompt)}."
                )
            elif isinstance(negative_prompt, str):
                uncond_tokens = [negative_prompt]
            elif batch_size != len(negative_prompt):
                raise ValueError(
                    f"`negative_prompt`: {negative_prompt} has batch size {len(negative_prompt)}, but `prompt`:"
                    f" {prompt} has batch size {batch_size}. Please make sure that passed `negative_prompt` matches"
                    " the batch size of `prompt`."
                )
            else:
                uncond_tokens = negative_prompt

            # textual inversion: process multi-vector tokens if necessary
            if isinstance(self, TextualInversionLoaderMixin):
                uncond_tokens = self.maybe_convert_prompt(uncond_tokens, self.tokenizer)

            max_length = prompt_embeds.shape[1]
            uncond_input = self.tokenizer(
                uncond_tokens,
                padding="max_length",
                max_length=max_length,
                truncation=True,
                return_tensors="pt",
            )

            if hasattr(self.text_encoder.config, "use_attention_mask") and self.text_encoder.config.use_attention_mask:
                attention_mask = uncond_input.attention_mask.to(device)
            else:
                attention_mask = None

            negative_prompt_embeds = self.text_encoder(
                uncond_input.input_ids.to(device),
                attention_mask=attention_mask,
            )
            negative_prompt_embeds = negative_prompt_embeds[0]

        if do_classifier_free_guidance:
            # duplicate unconditional embeddings for each generation per prompt, using mps friendly method
            seq_len = negative_prompt_embeds.shape[1]

            negative_prompt_embeds = negative_prompt_embeds.to(dtype=prompt_embeds_dtype, device=device)

            negative_prompt_embeds = negative_prompt_embeds.repeat(1, num_images_per_prompt, 1)
            negative_prompt_embeds = negative_prompt_embeds.view(batch_size * num_images_per_prompt, seq_len, -1)

        if self.text_encoder is not None:
            if isinstance(self, StableDiffusionLoraLoaderMixin) and USE_PEFT_BACKEND:
                # Retrieve the original scale by scaling back the LoRA layers
                unscale_lora_layers(self.text_encoder, lora_scale)

        return prompt_embeds, negative_prompt_embeds

    # Copied from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion.StableDiffusionPipeline.run_safety_checker
    def run_safety_checker(self, image, device, dtype):
        if self.safety_checker is None:
            has_nsfw_concept = None
        else:
            if torch.is_tensor(image):
                feature_extractor_input = self.image_processor.postprocess(image, output_type="pil")
            else:
                feature_extractor_input = self.image_processor.numpy_to_pil(image)
            safety_checker_input = self.feature_extractor(feature_extractor_input, return_tensors="pt").to(device)
            image, has_nsfw_concept = self.safety_checker(
                images=image, clip_input=safety_checker_input.pixel_values.to(dtype)
            )
        return image, has_nsfw_concept

    def check_inputs(
        self,
        prompt,
        height,
        width,
        timesteps,
        guidance_scale,
        nasa_scale,
        negative_attention_method,
        output_type,
        negative_prompt=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        callback_on_step_end_tensor_inputs=None,
    ):
        if height % self.vae_scale_factor != 0 or width % self.vae_scale_factor != 0:
            raise ValueError(
                f"`height` and `width` have to be divisible by {self.vae_scale_factor} but are {height} and {width}."
            )

        num_train_timesteps = self.scheduler.config.num_train_timesteps
        if len(timesteps) == 0 or not all(isinstance(t, int) and 0 <= t < num_train_timesteps for t in timesteps):
            raise ValueError(
                f"`timesteps` has to be a non-empty list of integers in [0, {num_train_timesteps}) but is {timesteps}."
            )
        if any(later >= earlier for earlier, later in pairwise(timesteps)):
            raise ValueError(f"`timesteps` has to be strictly decreasing but is {timesteps}.")

        check_negative_attention_inputs(guidance_scale, nasa_scale, negative_attention_method)
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"`output_type` has to be 'pil', 'np', 'pt' or 'latent' but is {output_type!r}.")

        if callback_on_step_end_tensor_inputs is not None and not all(
            k in self._callback_tensor_inputs for k in callback_on_step_end_tensor_inputs
        ):
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` has to be in {self._callback_tensor_inputs}, but found"
                f" {[k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]}"
            )

        if prompt is not None and prompt_embeds is not None:
            raise ValueError(
                f"Cannot forward both `prompt`: {prompt} and `prompt_embeds`: {prompt_embeds}. Please make sure to"
                " only forward one of the two."
            )
        elif prompt is None and prompt_embeds is None:
            raise ValueError(
                "Provide either `prompt` or `prompt_embeds`. Cannot leave both `prompt` and `prompt_embeds` undefined."
            )
        elif prompt is not None and (not isinstance(prompt, str) and not isinstance(prompt, list)):
            raise ValueError(f"`prompt` has to be of type `str` or `list` but is {type(prompt)}")

        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError(
                f"Cannot forward both `negative_prompt`: {negative_prompt} and `negative_prompt_embeds`:"
                f" {negative_prompt_embeds}. Please make sure to only forward one of the two."
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
        """Pure Gaussian noise at the first timestep.

        Not scaled by `scheduler.init_noise_sigma`, unlike Stable Diffusion's: the students are variance-preserving
        (x_T ~ N(0, I)) whichever scheduler holds their schedule, and Euler-type schedulers' sigma is not 1.
        """
        shape = (
            batch_size,
            num_channels_latents,
            int(height) // self.vae_scale_factor,
            int(width) // self.vae_scale_factor,
        )
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"You have passed a list of generators of length {len(generator)}, but requested an effective batch"
                f" size of {batch_size}. Make sure the batch size matches the length of the generators."
            )
        if latents is None:
            return randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        if tuple(latents.shape) != shape:
            raise ValueError(f"`latents` has to have shape {shape} but has shape {tuple(latents.shape)}.")
        return latents.to(device=device, dtype=dtype)

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
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        timesteps: list[int] | None = None,
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
        callback_on_step_end: Callable[[int, int, dict], None]
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
            timesteps (`list[int]`, *optional*, defaults to `[self.config.student_timestep]`):
                Strictly decreasing timesteps. The first one reads pure noise; at each, the UNet predicts x0, which
                is re-noised with fresh noise to the next timestep (multistep sampling as in DMD2 and LCM, e.g.
                `[999, 749, 499, 249]`); the last prediction is the output. One entry is one UNet evaluation.
            guidance_scale (`float`, *optional*, defaults to 1.0):
                Classifier-free guidance on the model output when > 1, at the cost of a doubled UNet batch; the
                negative prompt (or the empty prompt) is then the unconditional branch. Distilled students are
                usually run without it (`<= 1`), and take negative prompts through `nasa_scale` instead.
            negative_prompt (`str` or `list[str]`, *optional*):
                What the image should not show. With `guidance_scale` <= 1 it steers cross-attention (see
                `nasa_scale`); with `guidance_scale` > 1 it is the CFG unconditional prompt.
            nasa_scale (`float`, *optional*):
                Strength of the cross-attention steering away from the negative prompt when `guidance_scale` <= 1:
                NASA's alpha (Z+ - alpha Z-) or NAG's phi. Defaults to `self.config.default_nasa_scale` (NASA) or
                `self.config.default_nag_scale` (NAG). 0 turns steering off. It adds one attention per
                cross-attention layer, not a UNet pass.
            negative_attention_method (`str`, *optional*, defaults to `"nasa"`):
                `"nasa"` ([`~fastgen_diffusers.attention.NASAAttnProcessor`]) or `"nag"`
                ([`~fastgen_diffusers.attention.NAGAttnProcessor`]).
            negative_attention_kwargs (`dict`, *optional*):
                Further arguments of the steering processor, e.g. `{"tau": 2.5, "alpha": 0.5}` for NAG.
            num_images_per_prompt (`int`, *optional*, defaults to 1):
                The number of images to generate per prompt.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                A [`torch.Generator`](https://pytorch.org/docs/stable/generated/torch.Generator.html) to make
                generation deterministic; it also draws the re-noising noise of multistep sampling.
            latents (`torch.Tensor`, *optional*):
                Pre-generated Gaussian noise at the first timestep, of shape `(batch_size * num_images_per_prompt,
                unet.config.in_channels, height // vae_scale_factor, width // vae_scale_factor)`.
            prompt_embeds (`torch.Tensor`, *optional*):
                Pre-generated text embeddings, used instead of `prompt`.
            negative_prompt_embeds (`torch.Tensor`, *optional*):
                Pre-generated negative text embeddings, used instead of `negative_prompt`.
            output_type (`str`, *optional*, defaults to `"pil"`):
                `"pil"`, `"np"`, `"pt"`, or `"latent"` for the predicted latents without decoding.
            return_dict (`bool`, *optional*, defaults to `True`):
                Whether or not to return a [`~pipelines.stable_diffusion.StableDiffusionPipelineOutput`] instead of a
                plain tuple.
            cross_attention_kwargs (`dict`, *optional*):
                A kwargs dictionary passed along to the UNet's attention processors (e.g. `{"scale": 0.5}` for LoRA).
            clip_skip (`int`, *optional*):
                Number of layers to be skipped from CLIP while computing the prompt embeddings.
            callback_on_step_end (`Callable`, `PipelineCallback`, `MultiPipelineCallbacks`, *optional*):
                A function or a subclass of `PipelineCallback` or `MultiPipelineCallbacks` called at the end of each
                step with `callback_on_step_end(self, step, timestep, callback_kwargs)`. `callback_kwargs` holds the
                tensors named in `callback_on_step_end_tensor_inputs`; `latents` is then the re-noised sample for
                the next timestep, or the prediction after the last one.
            callback_on_step_end_tensor_inputs (`list`, *optional*):
                The list of tensor inputs for the `callback_on_step_end` function, from `._callback_tensor_inputs`.

        Examples:

        Returns:
            [`~pipelines.stable_diffusion.StableDiffusionPipelineOutput`] or `tuple`:
                If `return_dict` is `True`, [`~pipelines.stable_diffusion.StableDiffusionPipelineOutput`] is returned,
                otherwise a `tuple` whose first element is the generated images and whose second element says which
                images the safety checker flagged (`None` without a safety checker).
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 0. Default height, width and timesteps to the student's
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        timesteps = [self.config.student_timestep] if timesteps is None else list(timesteps)

        # 1. Check inputs. Raise error if not correct
        self.check_inputs(
            prompt,
            height,
            width,
            timesteps,
            guidance_scale,
            nasa_scale,
            negative_attention_method,
            output_type,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            callback_on_step_end_tensor_inputs,
        )

        self._guidance_scale = guidance_scale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False

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

        # For classifier free guidance, we need to do two forward passes.
        # Here we concatenate the unconditional and text embeddings into a single batch
        # to avoid doing two forward passes
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])

        # 4. Prepare the schedule: x0 and re-noising use the scheduler's alphas_cumprod, in float32
        alphas_cumprod = self.scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
        prediction_type = self.scheduler.config.prediction_type
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

        # 6. Steer cross-attention away from the negative prompt for this call; processors are restored after it
        steering = negative_attention_during_call(
            self.unet,
            negative_prompt_embeds,
            nasa_scale,
            negative_attention_method,
            negative_attention_kwargs,
            enabled=steer_attention,
        )

        # 7. Sampling loop: x0 at each timestep, re-noised to the next one
        with steering as negative_processor, self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue

                # expand the latents if we are doing classifier free guidance
                latent_model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents

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

                denoised = predict_original_sample(model_output, latents, alphas_cumprod[t], prediction_type)
                if i < len(timesteps) - 1:
                    noise = randn_tensor(latents.shape, generator=generator, device=device, dtype=latents.dtype)
                    denoised = diffuse(denoised, noise, alphas_cumprod[timesteps[i + 1]])
                latents = denoised.to(latents.dtype)

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

                if XLA_AVAILABLE:
                    xm.mark_step()

        if output_type != "latent":
            image = self.vae.decode(
                latents.to(self.vae.dtype) / self.vae.config.scaling_factor, return_dict=False, generator=generator
            )[0]
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
