"""One-step (and few-step) text-to-image for students that map noise to an image in one UNet evaluation.

SwiftBrush, SNOOPI and DMD2-style students read pure noise at one timestep and output x0 (in the teacher's
parameterisation). Saved as a `StableDiffusionPipeline`, such a student would be sampled for many steps by that
pipeline's loop; here the loop is [`FastDiffusionPipeline`]'s and the step is [`OneStepScheduler`]'s: one UNet call
at the scheduler's `student_timestep`, or predict-x0-then-re-noise over several timesteps.
"""

from __future__ import annotations

from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ...schedulers import OneStepScheduler
from ..core import FastDiffusionPipeline


class OneStepPipeline(FastDiffusionPipeline):
    r"""
    Text-to-image for students that map noise to an image in one UNet evaluation (SwiftBrush, SNOOPI, DMD2), with
    negative prompts through steered cross-attention (SNOOPI's NASA, or NAG).

    ```py
    >>> import torch
    >>> from fastgen_diffusers import OneStepPipeline

    >>> pipe = OneStepPipeline.from_pretrained("path/to/one-step-student", dtype=torch.float16).to("cuda")
    >>> image = pipe("a photo of a dog in a park").images[0]  # one UNet call at the student timestep
    >>> image = pipe("a photo of a dog in a park", negative_prompt="blurry").images[0]  # NASA, still one call
    >>> image = pipe("a photo of a dog in a park", num_inference_steps=4).images[0]  # [999, 749, 499, 249]
    ```

    Args:
        vae, text_encoder, tokenizer, unet, safety_checker, feature_extractor, negative_attention:
            As in [`FastDiffusionPipeline`]; the UNet is the one-step student.
        scheduler ([`OneStepScheduler`]):
            The student's schedule, parameterisation and `student_timestep`. A DDPM-family scheduler (`DDPMScheduler`,
            `DDIMScheduler`, `LCMScheduler`, as published students save) becomes
            `OneStepScheduler.from_config(scheduler.config)`: its betas and `prediction_type` carry over.
    """

    default_num_inference_steps = 1

    @classmethod
    def scheduler_for_sampling(cls, scheduler: SchedulerMixin) -> OneStepScheduler:
        if isinstance(scheduler, OneStepScheduler):
            return scheduler
        if not hasattr(scheduler, "alphas_cumprod"):
            raise ValueError(
                "`scheduler` must be a OneStepScheduler or a DDPM-family scheduler with `alphas_cumprod` to take"
                f" the schedule from, got {scheduler.__class__.__name__}."
            )
        return OneStepScheduler.from_config(scheduler.config)
