"""Euler sampling for rectified-flow (straight-path) models, with the velocity convention stated in the config.

Rectified-flow checkpoints share one path, x_sigma = (1 - sigma) * x_data + sigma * noise, and one UNet time,
sigma * num_train_timesteps (so 1000 is pure noise, as in Stable Diffusion). They differ in the sign of the velocity
their network predicts, which is the one thing this scheduler needs to be told:

| checkpoints                                             | network output   | `velocity_direction`        |
|---------------------------------------------------------|------------------|-----------------------------|
| InstaFlow, 2-Rectified Flow                             | x_data - noise   | `"noise_to_data"` (default) |
| SD3 / `FlowMatchEulerDiscreteScheduler`, PeRFlow with   | noise - x_data   | `"data_to_noise"`           |
| `prediction_type="velocity"`                            |                  |                             |

Diffusers' `FlowMatchEulerDiscreteScheduler` samples the second kind only (InstaFlow would need its output negated by
the caller), and its default grid ends at t=1 instead of InstaFlow's t = (1 - i/N) * 1000; hence this scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from .step_index import StepIndexMixin

VELOCITY_DIRECTIONS = ("noise_to_data", "data_to_noise")


@dataclass
class RectifiedFlowEulerSchedulerOutput(BaseOutput):
    """
    Output of [`RectifiedFlowEulerScheduler.step`].

    Args:
        prev_sample (`torch.Tensor`):
            The sample at the next (less noisy) point of the grid; the input of the next model call.
        pred_original_sample (`torch.Tensor`):
            The current velocity followed straight to sigma = 0: the image latent a one-step sampler would return.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class RectifiedFlowEulerScheduler(SchedulerMixin, ConfigMixin, StepIndexMixin):
    """
    Forward Euler on the straight path from noise (sigma = 1) to data (sigma = 0).

    The initial noise is standard normal (there is no `init_noise_sigma` to apply), the model input needs no scaling,
    and the UNet receives `timesteps = sigmas * num_train_timesteps`.

    Args:
        num_train_timesteps (`int`, defaults to 1000):
            The UNet time of pure noise. Flow time sigma in [0, 1] is fed to the UNet as sigma * num_train_timesteps.
        velocity_direction (`str`, defaults to `"noise_to_data"`):
            What the network's velocity points to. `"noise_to_data"`: v = x_data - noise (InstaFlow, 2-Rectified
            Flow). `"data_to_noise"`: v = noise - x_data (SD3 flow matching, PeRFlow velocity checkpoints).
        shift (`float`, defaults to 1.0):
            Moves the uniform grid of `num_inference_steps` toward high noise, sigma -> shift * sigma / (1 + (shift
            - 1) * sigma), the formula of Diffusers' `FlowMatchEulerDiscreteScheduler` (SD3 samples at shift 3).
            A few-step student decides the layout and the attributes a prompt leaves open at high noise, where its
            path bends most; 4 steps at shift 3 are sigma = 1, 0.9, 0.75, 0.5. 1 keeps InstaFlow's grid; one step
            (sigma = 1) is the same at any shift. Grids given as `sigmas` or `timesteps` are used as given.
    """

    order = 1
    init_noise_sigma = 1.0

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, velocity_direction: str = "noise_to_data", shift: float = 1.0):
        if velocity_direction not in VELOCITY_DIRECTIONS:
            raise ValueError(f"`velocity_direction` must be one of {VELOCITY_DIRECTIONS}, got {velocity_direction!r}.")
        if not shift > 0:
            raise ValueError(f"`shift` must be positive (1 keeps the uniform grid), got {shift}.")
        # Until `set_timesteps` is called, the grid is InstaFlow's single step.
        self.set_timesteps(1)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: list[float] | None = None,
        timesteps: list[float] | None = None,
    ):
        """
        Sets the sampling grid. Pass exactly one of its three descriptions.

        Args:
            num_inference_steps (`int`, *optional*):
                N uniform steps, sigma_i = 1 - i/N: InstaFlow's UNet times (1 - i/N) * 1000, e.g. [1000, 750, 500,
                250] for N = 4; moved toward high noise by the config's `shift`.
            device (`str` or `torch.device`, *optional*):
                The device of `timesteps` and `sigmas`.
            sigmas (`list[float]`, *optional*):
                Noise levels in (0, 1], strictly decreasing.
            timesteps (`list[float]`, *optional*):
                UNet times in (0, num_train_timesteps], strictly decreasing (e.g. PeRFlow's piecewise grid).

        A final sigma = 0 is appended to `self.sigmas`: the last step lands on data.
        """
        given = {"num_inference_steps": num_inference_steps, "sigmas": sigmas, "timesteps": timesteps}
        if sum(value is not None for value in given.values()) != 1:
            raise ValueError(f"Pass exactly one of `num_inference_steps`, `sigmas` or `timesteps`, got {given}.")

        if num_inference_steps is not None:
            if num_inference_steps < 1:
                raise ValueError(f"`num_inference_steps` must be at least 1, got {num_inference_steps}.")
            grid = np.array([1.0 - i / num_inference_steps for i in range(num_inference_steps)])
            shift = self.config.shift
            grid = shift * grid / (1.0 + (shift - 1.0) * grid)
        elif sigmas is not None:
            grid = np.asarray(sigmas, dtype=np.float64)
        else:
            grid = np.asarray(timesteps, dtype=np.float64) / self.config.num_train_timesteps

        if grid.ndim != 1 or len(grid) == 0 or grid[0] > 1 or grid[-1] <= 0 or np.any(np.diff(grid) >= 0):
            name = "sigmas" if sigmas is not None else "timesteps"
            raise ValueError(
                f"`{name}` must be strictly decreasing noise levels in (0, 1] (timesteps in (0, "
                f"{self.config.num_train_timesteps}]), got {sigmas if sigmas is not None else timesteps}."
            )

        self.num_inference_steps = len(grid)
        self.timesteps = torch.from_numpy(grid * self.config.num_train_timesteps).to(device, dtype=torch.float32)
        self.sigmas = torch.from_numpy(np.append(grid, 0.0)).to(device, dtype=torch.float32)
        self._reset_step_index()

    def index_for_timestep(self, timestep: float | torch.Tensor) -> int:
        """Position of `timestep` on the grid."""
        matches = (self.timesteps == torch.as_tensor(timestep, device=self.timesteps.device)).nonzero()
        if len(matches) == 0:
            raise ValueError(
                f"`timestep` {timestep} is not on the grid {self.timesteps.tolist()} from `set_timesteps`."
            )
        return matches[0].item()

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor | None = None) -> torch.Tensor:
        """The UNet reads x_sigma as it is (no sigma-dependent input scaling on the straight path)."""
        return sample

    def sigma_for(self, timestep: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """sigma = timestep / num_train_timesteps, one value or one per sample, broadcast over `like`, in float32."""
        sigma = torch.as_tensor(timestep, device=like.device, dtype=torch.float32) / self.config.num_train_timesteps
        return sigma.reshape(-1, *([1] * (like.ndim - 1))) if sigma.ndim else sigma

    def scale_noise(self, sample: torch.Tensor, timestep: float | torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The point of the straight path at `timestep`: x_sigma = (1 - sigma) sample + sigma noise, in float32.

        `timestep` is in UNet time (sigma * num_train_timesteps), one value or one per sample, as in training.
        """
        sigma = self.sigma_for(timestep, sample)
        return (1 - sigma) * sample.float() + sigma * noise.float()

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The velocity a network of this config is trained to predict on the path from `noise` to `sample`."""
        velocity = sample.float() - noise.float()
        return velocity if self.config.velocity_direction == "noise_to_data" else -velocity

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> RectifiedFlowEulerSchedulerOutput | tuple:
        """
        One Euler step from `timestep`'s sigma to the next sigma on the grid.

        Args:
            model_output (`torch.Tensor`):
                The network's velocity, in the convention of `config.velocity_direction`.
            timestep (`float` or `torch.Tensor`):
                The current UNet time, one of `self.timesteps`.
            sample (`torch.Tensor`):
                The current latents x_sigma.
            return_dict (`bool`, defaults to `True`):
                Whether to return a [`RectifiedFlowEulerSchedulerOutput`] rather than a tuple.

        Returns:
            [`RectifiedFlowEulerSchedulerOutput`] or `tuple`: `(prev_sample, pred_original_sample)` as a tuple.
        """
        index = self._current_step_index(timestep)
        sigma, sigma_next = self.sigmas[index], self.sigmas[index + 1]
        self._step_index += 1

        # Work with dx/dsigma ("data_to_noise"); sigma decreases, so the step (sigma_next - sigma) is negative. Upcast
        # as FlowMatchEulerDiscreteScheduler does, so half-precision latents do not lose the small updates.
        velocity = model_output.to(torch.float32)
        if self.config.velocity_direction == "noise_to_data":
            velocity = -velocity
        sample_fp32 = sample.to(torch.float32)
        prev_sample = (sample_fp32 + (sigma_next - sigma) * velocity).to(sample.dtype)
        pred_original_sample = (sample_fp32 - sigma * velocity).to(sample.dtype)

        if not return_dict:
            return (prev_sample, pred_original_sample)
        return RectifiedFlowEulerSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)
