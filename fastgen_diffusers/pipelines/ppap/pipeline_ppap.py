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
"""`PPAPPipeline`: a saved `PPAPGuidance` beside an unchanged base pipeline, bound per call.

The guidance is one term of the base's own sampling loop (`guidance_fn`, after CFG and before the scheduler step),
so this wrapper only turns a call's `guide_class` / `guide_target` into that term and hands the rest to the base.
"""

from __future__ import annotations

import inspect
import math
import os
from typing import Any

import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.utils import replace_example_docstring

from ...guidance.ppap import GuidanceFunction, PPAPGuidance, noise_point
from ..core import FastDiffusionPipeline
from .loading import load_ppap_guidance

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> from fastgen_diffusers import FastPipeline

        >>> pipe = FastPipeline.from_pretrained("shapes-2rf", ppap="shapes-ppap")  # its classifier/
        >>> image = pipe("a red on a white background", guide_class="triangle").images[0]
        >>> image = pipe("a red on a white background").images[0]  # the base alone

        >>> pipe = FastPipeline.from_pretrained("shapes-teacher", ppap="shapes-ppap/regressor")
        >>> image = pipe("a red square", guide_target=[-0.56, -0.56], ppap_scale=0.15).images[0]
        ```
"""

# What a pipeline needs to be sampled by `FastDiffusionPipeline` (a Stable Diffusion layout).
SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def takes_guidance_fn(pipe: DiffusionPipeline) -> bool:
    return "guidance_fn" in inspect.signature(pipe.__call__).parameters


def with_guidance_loop(pipe: DiffusionPipeline) -> DiffusionPipeline:
    """`pipe` if its loop takes `guidance_fn`, else its components in `FastDiffusionPipeline` (same scheduler).

    Diffusers' `StableDiffusionPipeline` (the teacher's folder names it) has no place for a guidance term; the
    package's core loop samples the same components with the same scheduler and does. They are shared, not copied,
    and keep their dtype (`from_pipe` would cast them to float32 unless told otherwise).
    """
    if takes_guidance_fn(pipe):
        return pipe
    if all(getattr(pipe, name, None) is not None for name in SD_COMPONENTS):
        guided = FastDiffusionPipeline(
            **{name: getattr(pipe, name) for name in SD_COMPONENTS},
            safety_checker=getattr(pipe, "safety_checker", None),
            feature_extractor=getattr(pipe, "feature_extractor", None),
        )
        guided.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
        return guided
    raise TypeError(
        f"{type(pipe).__name__}'s sampling loop takes no `guidance_fn`, and it lacks the Stable Diffusion components"
        f" {list(SD_COMPONENTS)} that FastDiffusionPipeline would sample it with; PPAP cannot guide it."
    )


def check_number(name: str, value: Any, positive: bool = False) -> None:
    if value is None:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"`{name}` must be a number, got {value!r:.100}.")
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"`{name}` must be a finite number{' > 0' if positive else ''}, or None, got {value}.")


def check_guide_class(guide_class: Any, labels: list[str]) -> None:
    """A class name or index, or a non-empty list of them (one per image); else a `ValueError` listing the classes."""
    wanted = list(guide_class) if isinstance(guide_class, (list, tuple)) else [guide_class]
    if not wanted:
        raise ValueError(f"`guide_class` is an empty list; give one of {labels}, or one per image.")
    for label in wanted:
        is_index = isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(labels)
        if not is_index and not (isinstance(label, str) and label in labels):
            raise ValueError(f"`guide_class` must be one of {labels} (or its index), got {label!r:.100}.")


class PPAPPipeline(DiffusionPipeline):
    r"""
    PPAP guidance (an off-the-shelf classifier or regressor, through its noise-range experts) on any pipeline of
    the package whose loop takes `guidance_fn`: the teacher's DDIM sampler, 2-RF / InstaFlow, one-step students, or
    an `OMSPipeline` in front of one (OMS then makes the first latent and PPAP guides the steps after it).

    The base pipeline is not changed. A call with `guide_class` (a classifier) or `guide_target` (a regressor) binds
    the guidance and calls the base with `guidance_fn=`; a call with neither is the base's plain call.

    The guidance is saved without the base (`save_pretrained` writes a saved `PPAPGuidance`: `ppap_config.json`,
    `guide/`, `experts/`) and loaded with one: `PPAPPipeline.from_pretrained(path, base_pipeline=pipe)`, or
    `FastPipeline.from_pretrained(base, ppap=path)`.

    Args:
        guidance ([`PPAPGuidance`]):
            The guide and its experts. Kept in float32 (the gradient is taken in float32) and on the base's device.
        base_pipeline ([`DiffusionPipeline`], *optional*):
            The pipeline the guidance steers. Not saved with the guidance; required for a call.
    """

    def __init__(self, guidance: PPAPGuidance, base_pipeline: DiffusionPipeline | None = None):
        super().__init__()
        if not isinstance(guidance, PPAPGuidance):
            raise TypeError(f"`guidance` must be a PPAPGuidance, got {type(guidance).__name__}.")
        self.register_to_config()  # no Diffusers components: the guidance saves itself, the base is not saved
        self.guidance = guidance
        self.base_pipeline = None
        if base_pipeline is not None:
            self.set_base_pipeline(base_pipeline)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        base_pipeline: DiffusionPipeline | None = None,
        member: str | None = None,
        allow_pickle: bool = False,
        **hub_kwargs,
    ) -> "PPAPPipeline":
        """A saved `PPAPGuidance` (folder, embedded name such as `shapes-ppap/regressor`, or Hub id; a collection
        means its `member`, by default `classifier`) in front of `base_pipeline`."""
        guidance = load_ppap_guidance(pretrained_model_name_or_path, member, allow_pickle=allow_pickle, **hub_kwargs)
        return cls(guidance, base_pipeline=base_pipeline)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Save the guidance alone (`PPAPGuidance.save_pretrained`: atomic, safetensors, experts as adapters)."""
        if kwargs:
            raise TypeError(f"PPAPPipeline.save_pretrained takes only `save_directory`, got {sorted(kwargs)}.")
        self.guidance.save_pretrained(save_directory)

    def set_base_pipeline(self, base_pipeline: DiffusionPipeline) -> None:
        """Put the guidance in front of `base_pipeline`, after checking that its loop can take it."""
        self.check_base_pipeline(base_pipeline)
        self.base_pipeline = base_pipeline

    @staticmethod
    def sampler_of(base: DiffusionPipeline) -> DiffusionPipeline:
        """The pipeline whose loop runs the guidance: `base`, or the base inside a wrapper (an `OMSPipeline`)."""
        while isinstance(getattr(base, "base_pipeline", None), DiffusionPipeline):
            base = base.base_pipeline
        return base

    @property
    def sampler(self) -> DiffusionPipeline:
        return self.sampler_of(self.base_pipeline)

    def check_base_pipeline(self, base: DiffusionPipeline) -> None:
        """Raise a clear error when the guidance cannot steer `base`: no `guidance_fn`, a scheduler it cannot place
        (VE-form Euler / LMS), or another latent width."""
        if not isinstance(base, DiffusionPipeline):
            raise TypeError(f"`base_pipeline` must be a DiffusionPipeline, got {type(base).__name__}.")
        sampler = self.sampler_of(base)
        name = type(sampler).__name__
        if not takes_guidance_fn(sampler):
            raise TypeError(
                f"`base_pipeline` {name}'s sampling loop takes no `guidance_fn`; give it the package's loop with"
                " `fastgen_diffusers.pipelines.ppap.with_guidance_loop(base)` (FastPipeline.from_pretrained(...,"
                " ppap=...) does this)."
            )
        scheduler = getattr(sampler, "scheduler", None)
        if scheduler is None:
            raise ValueError(f"`base_pipeline` {name} has no `scheduler`; PPAP reads the noise level from it.")
        try:  # the noisiest training timestep: where the guidance reads the parameterisation and the noise level
            noise_point(scheduler, getattr(scheduler.config, "num_train_timesteps", 1000) - 1)
        except TypeError as error:
            raise TypeError(
                f"`base_pipeline` {name} samples with {type(scheduler).__name__}, which PPAP guidance cannot steer:"
                f" {error} Give the base such a scheduler, e.g. `DDIMScheduler.from_config(base.scheduler.config)`."
            ) from None
        guide_channels = self.guidance.experts.get_base_model().config.in_channels
        unet = getattr(sampler, "unet", None)
        if unet is not None and unet.config.in_channels != guide_channels:
            raise ValueError(
                f"The PPAP experts read {guide_channels}-channel latents but `base_pipeline` {name}'s UNet samples"
                f" {unet.config.in_channels}-channel ones; train experts on this base with train_ppap_experts.py."
            )

    @property
    def components(self) -> dict[str, Any]:
        """What `__init__` takes besides the base: the guidance (not a Diffusers component, so not in the config)."""
        return {"guidance": self.guidance}

    @property
    def device(self) -> torch.device:
        return self.base_pipeline.device if self.base_pipeline is not None else self.guidance.guide.device

    @property
    def dtype(self) -> torch.dtype:
        return self.base_pipeline.dtype if self.base_pipeline is not None else torch.float32

    def to(self, *args, **kwargs):
        """Move (or cast) the base pipeline; the guidance follows the device only and stays in float32."""
        device = kwargs.get("device", next((a for a in args if isinstance(a, (str, torch.device))), None))
        if device is not None:
            self.guidance.to(device=device)
        if self.base_pipeline is not None:
            self.base_pipeline.to(*args, **kwargs)
        return self

    def set_progress_bar_config(self, **kwargs):
        super().set_progress_bar_config(**kwargs)
        if self.base_pipeline is not None:
            self.base_pipeline.set_progress_bar_config(**kwargs)

    def guidance_fn_for(
        self,
        guide_class: str | int | list | None = None,
        guide_target: Any = None,
        ppap_scale: float | None = None,
        ppap_grad_rms: float | None = None,
    ) -> GuidanceFunction | None:
        """The `guidance_fn` a call hands its base, or None when it names no class and no target."""
        labels, task = self.guidance.labels, self.guidance.task
        check_number("ppap_scale", ppap_scale)
        check_number("ppap_grad_rms", ppap_grad_rms, positive=True)
        if guide_class is None and guide_target is None:
            given = [name for name, value in (("ppap_scale", ppap_scale), ("ppap_grad_rms", ppap_grad_rms)) if value is not None]
            if given:
                raise ValueError(f"`{given[0]}` is given without `guide_class` or `guide_target`: nothing to guide toward.")
            return None
        if guide_class is not None and guide_target is not None:
            raise ValueError("Pass `guide_class` (a classifier's class) or `guide_target` (a regressor's values), not both.")
        if task == "classification" and guide_target is not None:
            raise ValueError(f"`guide_target`: this PPAP guide is a classifier; pass `guide_class`, one of {labels}.")
        if task == "regression" and guide_class is not None:
            raise ValueError(
                f"`guide_class`: this PPAP guide is a regressor of {labels}; pass `guide_target`, one value for each"
                " (or one row per image)."
            )
        if guide_class is not None:
            check_guide_class(guide_class, labels)
            return self.guidance.bind(class_label=guide_class, scale=ppap_scale, grad_rms=ppap_grad_rms)
        try:
            return self.guidance.bind(target=guide_target, scale=ppap_scale, grad_rms=ppap_grad_rms)
        except (ValueError, TypeError) as error:
            raise type(error)(f"`guide_target`: {error}") from None

    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        guide_class: str | int | list | None = None,
        guide_target: Any = None,
        ppap_scale: float | None = None,
        ppap_grad_rms: float | None = None,
        **base_kwargs: Any,
    ):
        r"""
        Run the base pipeline with PPAP guidance toward `guide_class` or `guide_target`, or plain with neither.

        Args:
            prompt (`str` or `list[str]`, *optional*):
                The base pipeline's prompt.
            guide_class (`str`, `int` or `list`, *optional*):
                A classifier guide's target class (one of `pipe.guidance.labels`, or its index), or one per image.
            guide_target (`list[float]` or `torch.Tensor`, *optional*):
                A regressor guide's target values (one per name in `pipe.guidance.labels`), or one row per image.
            ppap_scale (`float`, *optional*, defaults to the guidance's stored `default_scale`):
                The guidance scale s.
            ppap_grad_rms (`float`, *optional*, defaults to the guidance's stored `default_grad_rms`):
                Each sample's gradient is rescaled to this root-mean-square before the scale.
            **base_kwargs:
                Everything else goes to the base pipeline (`num_inference_steps`, `generator`, `output_type`, ...).

        Examples:

        Returns:
            What the base pipeline returns.
        """
        if self.base_pipeline is None:
            raise ValueError("The PPAP pipeline has no `base_pipeline`; load it with `base_pipeline=` or call `set_base_pipeline`.")
        if "guidance_fn" in base_kwargs:
            raise ValueError(
                "`guidance_fn`: PPAPPipeline makes it from `guide_class` / `guide_target`; call"
                " `pipe.base_pipeline(..., guidance_fn=...)` to run a guidance term of your own."
            )
        guidance_fn = self.guidance_fn_for(guide_class, guide_target, ppap_scale, ppap_grad_rms)
        if guidance_fn is None:
            return self.base_pipeline(prompt=prompt, **base_kwargs)
        self.guidance.to(device=self.sampler._execution_device)
        return self.base_pipeline(prompt=prompt, guidance_fn=guidance_fn, **base_kwargs)
