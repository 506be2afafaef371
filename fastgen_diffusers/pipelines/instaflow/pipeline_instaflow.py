"""InstaFlow: one-step (or few-step) text-to-image with a rectified-flow Stable Diffusion UNet.

The sampling loop is the one of the original `RectifiedFlowPipeline` (gnobitab/InstaFlow `code/pipeline_rf.py`):
standard normal noise at UNet time 1000, a UNet that predicts the velocity v ~ image latent - noise, forward Euler on
t = (1 - i/N) * 1000, classifier-free guidance only when `guidance_scale > 1`, then the VAE decoder. Here the loop
is [`FastDiffusionPipeline`]'s and the Euler step is [`RectifiedFlowEulerScheduler`]'s (so SD3- and PeRFlow-style
velocity checkpoints run by changing the scheduler's config); a negative prompt at `guidance_scale` <= 1 (which the
original ignored) steers cross-attention through NASA or NAG: still one UNet evaluation per step.
"""

from __future__ import annotations

from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import logging

from ...schedulers import RectifiedFlowEulerScheduler
from ..core import FastDiffusionPipeline

logger = logging.get_logger(__name__)  # pylint: disable=invalid-name


class InstaFlowPipeline(FastDiffusionPipeline):
    r"""
    One-step and few-step text-to-image with a rectified-flow (InstaFlow, 2-Rectified Flow) UNet.

    ```py
    >>> import torch
    >>> from fastgen_diffusers import InstaFlowPipeline

    >>> pipe = InstaFlowPipeline.from_pretrained("XCLIU/instaflow_0_9B_from_sd_1_5", dtype=torch.float16).to("cuda")
    >>> image = pipe("a photo of an astronaut riding a horse on mars").images[0]  # one step
    >>> image = pipe("a photo of an astronaut riding a horse on mars", negative_prompt="blurry").images[0]  # NASA
    ```

    Args:
        vae, text_encoder, tokenizer, unet, safety_checker, feature_extractor, negative_attention:
            As in [`FastDiffusionPipeline`]; the UNet predicts the rectified-flow velocity of the image latents.
        scheduler ([`RectifiedFlowEulerScheduler`]):
            The Euler scheduler stating the checkpoint's velocity convention. The published InstaFlow and
            2-Rectified Flow checkpoints save a `DPMSolverMultistepScheduler` that their own pipeline never steps;
            any scheduler that is not a [`RectifiedFlowEulerScheduler`] is therefore replaced by
            `RectifiedFlowEulerScheduler()` (InstaFlow's conventions), with a warning. Pass `scheduler=` to
            `from_pretrained` to sample a checkpoint with other conventions.
    """

    default_num_inference_steps = 1

    @classmethod
    def scheduler_for_sampling(cls, scheduler: SchedulerMixin) -> RectifiedFlowEulerScheduler:
        if isinstance(scheduler, RectifiedFlowEulerScheduler):
            return scheduler
        logger.warning(
            f"`scheduler` is a {type(scheduler).__name__}, not a rectified-flow scheduler; using "
            "RectifiedFlowEulerScheduler() (InstaFlow conventions: v = image - noise, t = (1 - i/N) * 1000). "
            "Published InstaFlow checkpoints save a scheduler their sampler never uses. Pass `scheduler=` to "
            "choose other conventions."
        )
        return RectifiedFlowEulerScheduler()
