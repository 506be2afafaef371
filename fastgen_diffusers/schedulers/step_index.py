"""The step counter Diffusers schedulers keep, shared by the package's schedulers."""

from __future__ import annotations

import torch


class StepIndexMixin:
    """`step_index` / `begin_index` as in Diffusers' schedulers: the index of the step being taken, found from the
    first timestep a loop passes (or from `set_begin_index`) and advanced by each `step`. A scheduler using it
    defines `index_for_timestep` and `num_inference_steps`, and calls `_reset_step_index` in `set_timesteps`."""

    def _reset_step_index(self) -> None:
        self._step_index = None
        self._begin_index = None

    @property
    def step_index(self) -> int | None:
        """The index of the current timestep; `None` before the first `step` after `set_timesteps`."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """The first step's index, when a pipeline set it with `set_begin_index` (e.g. to start mid-grid)."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def _current_step_index(self, timestep: float | torch.Tensor) -> int:
        """The index `step` works at: looked up on the first step, then counted; an error past the grid's end."""
        if self._step_index is None:
            self._step_index = (
                self._begin_index if self._begin_index is not None else self.index_for_timestep(timestep)
            )
        if self._step_index >= self.num_inference_steps:
            raise ValueError(
                f"`step` was called past the end of the {self.num_inference_steps}-step grid; call `set_timesteps` first."
            )
        return self._step_index
