"""Sampling for students that predict the image in one UNet call (SwiftBrush, SNOOPI, DMD2-style generators).

Such a student reads pure noise at one fixed timestep (`student_timestep`, 999 for SD1.5 students) and its output,
read with the teacher's `prediction_type` (epsilon, v or sample), is x0. Several steps are "predict x0, re-noise it
to the next timestep with fresh noise, predict again" (DMD2's and LCM's multistep sampling, e.g. timesteps
[999, 749, 499, 249]). The schedule is the teacher's DDPM schedule; the x0 and re-noising maths run in float32,
since 1 - alpha_bar and the division by sqrt(alpha_bar) (0.07 at SD's t = 999) lose digits in half precision.

Training uses the same two functions (`add_noise`, `predict_original_sample`) with one timestep per sample, so a
student is trained and sampled with one piece of maths.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers import DDPMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .step_index import StepIndexMixin

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass
class OneStepSchedulerOutput(BaseOutput):
    """
    Output of [`OneStepScheduler.step`].

    Args:
        prev_sample (`torch.Tensor`):
            The prediction re-noised to the next timestep, or the prediction itself after the last one.
        pred_original_sample (`torch.Tensor`):
            The student's x0 at this step.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast one value per sample (or one value) over the trailing dimensions of `like`, in float32."""
    values = values.to(device=like.device, dtype=torch.float32)
    return values.reshape(-1, *([1] * (like.ndim - 1))) if values.ndim else values


class OneStepScheduler(SchedulerMixin, ConfigMixin, StepIndexMixin):
    """
    Predict-x0-then-re-noise sampling on a DDPM schedule, for students that map noise to x0 in one UNet call.

    The initial noise is standard normal (`init_noise_sigma` = 1) and the model input needs no scaling. A published
    student saved with a DDPM-family scheduler (`DDPMScheduler`, `DDIMScheduler`, `LCMScheduler`) becomes this
    scheduler with `OneStepScheduler.from_config(scheduler.config)`: the beta schedule and `prediction_type` carry over.

    Args:
        num_train_timesteps (`int`, defaults to 1000): Length of the teacher's schedule.
        beta_start (`float`, defaults to 0.00085): The teacher's first beta (Stable Diffusion's).
        beta_end (`float`, defaults to 0.012): The teacher's last beta.
        beta_schedule (`str`, defaults to `"scaled_linear"`): As in [`DDPMScheduler`].
        prediction_type (`str`, defaults to `"epsilon"`): What the student's UNet outputs: `"epsilon"`,
            `"v_prediction"` or `"sample"`.
        student_timestep (`int`, defaults to 999): The timestep at which the student reads pure noise (999 for
            SwiftBrush / SNOOPI / DMD2 SD1.5 students; 399 for one-step DMD2 SDXL).
        trained_betas (`list[float]`, *optional*): Explicit betas, as in [`DDPMScheduler`].
        rescale_betas_zero_snr (`bool`, defaults to `False`): Rescale the betas to zero terminal SNR, as in
            [`DDPMScheduler`] (a teacher trained that way has alpha_bar = 0 at its last timestep).
    """

    order = 1
    init_noise_sigma = 1.0

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        prediction_type: str = "epsilon",
        student_timestep: int = 999,
        trained_betas: list[float] | None = None,
        rescale_betas_zero_snr: bool = False,
    ):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"`prediction_type` must be one of {PREDICTION_TYPES}, got {prediction_type!r}.")
        if not 0 <= student_timestep < num_train_timesteps:
            raise ValueError(f"`student_timestep` must be in [0, {num_train_timesteps}), got {student_timestep}.")
        # Diffusers' own beta schedules, so that every DDPM-family config gives the teacher's alphas.
        schedule = DDPMScheduler(
            num_train_timesteps,
            beta_start,
            beta_end,
            beta_schedule,
            trained_betas=trained_betas,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
        )
        betas = schedule.betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.set_timesteps(1)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | None = None,
    ) -> None:
        """
        Sets the timesteps. Pass exactly one of `num_inference_steps` and `timesteps`.

        Args:
            num_inference_steps (`int`, *optional*):
                N timesteps evenly spaced down from `student_timestep`: [999] for N = 1, [999, 749, 499, 249] for 4.
            device (`str` or `torch.device`, *optional*):
                The device of `self.timesteps`.
            timesteps (`list[int]`, *optional*):
                Strictly decreasing integer timesteps in [0, num_train_timesteps); the first reads pure noise.
        """
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError(
                f"Pass exactly one of `num_inference_steps` and `timesteps`, got {num_inference_steps} and {timesteps}."
            )
        if num_inference_steps is not None:
            if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
                raise ValueError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps!r}.")
            start = self.config.student_timestep
            timesteps = [start - round(i * (start + 1) / num_inference_steps) for i in range(num_inference_steps)]
        timesteps = [int(t) if isinstance(t, torch.Tensor) else t for t in timesteps]
        num_train_timesteps = self.config.num_train_timesteps
        if len(timesteps) == 0 or not all(isinstance(t, int) and 0 <= t < num_train_timesteps for t in timesteps):
            raise ValueError(
                f"`timesteps` must be a non-empty list of integers in [0, {num_train_timesteps}), got {timesteps}."
            )
        if any(later >= earlier for earlier, later in pairwise(timesteps)):
            raise ValueError(f"`timesteps` must be strictly decreasing, got {timesteps}.")
        self.num_inference_steps = len(timesteps)
        self.timesteps = torch.tensor(timesteps, dtype=torch.long, device=device)
        self._reset_step_index()

    def scale_model_input(self, sample: torch.Tensor, timestep: int | torch.Tensor | None = None) -> torch.Tensor:
        """The student reads the variance-preserving sample as it is."""
        return sample

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: int | torch.Tensor
    ) -> torch.Tensor:
        """x_t = sqrt(a) x0 + sqrt(1 - a) noise with a = alphas_cumprod[t], in float32; one timestep or one per sample."""
        alpha_prod = _per_sample(self.alphas_cumprod[torch.as_tensor(timesteps).cpu()], original_samples)
        return alpha_prod.sqrt() * original_samples.float() + (1 - alpha_prod).sqrt() * noise.float()

    def predict_original_sample(
        self, model_output: torch.Tensor, timesteps: int | torch.Tensor, sample: torch.Tensor
    ) -> torch.Tensor:
        """x0 from the UNet's output on x_t, read with `config.prediction_type`, in float32."""
        alpha_prod = _per_sample(self.alphas_cumprod[torch.as_tensor(timesteps).cpu()], sample)
        alpha, sigma = alpha_prod.sqrt(), (1 - alpha_prod).sqrt()
        model_output, sample = model_output.float(), sample.float()
        if self.config.prediction_type == "epsilon":
            return (sample - sigma * model_output) / alpha
        if self.config.prediction_type == "v_prediction":
            return alpha * sample - sigma * model_output
        return model_output

    def index_for_timestep(self, timestep: int | torch.Tensor) -> int:
        """Position of `timestep` among `self.timesteps`."""
        matches = (self.timesteps == int(timestep)).nonzero()
        if len(matches) == 0:
            raise ValueError(f"`timestep` {timestep} is not among the timesteps {self.timesteps.tolist()}.")
        return matches[0].item()

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> OneStepSchedulerOutput | tuple:
        """
        Predict x0 at `timestep`; re-noise it to the next timestep with noise from `generator`, unless it is the last.

        Returns:
            [`OneStepSchedulerOutput`] or `tuple`: `(prev_sample, pred_original_sample)` as a tuple.
        """
        index = self._current_step_index(timestep)
        pred_original_sample = self.predict_original_sample(model_output, timestep, sample)
        prev_sample = pred_original_sample
        if index + 1 < len(self.timesteps):
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            prev_sample = self.add_noise(pred_original_sample, noise, self.timesteps[index + 1])
        self._step_index += 1

        prev_sample, pred_original_sample = prev_sample.to(sample.dtype), pred_original_sample.to(sample.dtype)
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return OneStepSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
