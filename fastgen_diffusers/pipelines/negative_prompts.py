"""Negative prompts without classifier-free guidance, the same way in every fastgen pipeline.

At `guidance_scale` <= 1 (where one-step and few-step students run) a negative prompt is not a second UNet
branch: it steers the cross-attention layers through NASA or NAG (`fastgen_diffusers.attention`) for the
duration of the call. At `guidance_scale` > 1 it keeps its classifier-free guidance meaning. These helpers hold
the logic the pipelines share: argument checks, the default strength read from the pipeline's config, whether a
call steers, and the `with` block that installs and restores the processors.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from ..attention.nasa import NEGATIVE_ATTENTION_PROCESSORS, NegativeAttnProcessor, negative_attention


# Defaults of the config values the pipelines register (stored in `model_index.json`).
DEFAULT_NASA_SCALE = 0.1  # SNOOPI's alpha for SD1.5 students
DEFAULT_NAG_SCALE = 4.0  # NAG's phi, the NAG authors' `nag_scale=5`

# `negative_attention_method` -> the config value holding its default strength.
DEFAULT_SCALE_CONFIG_NAMES: dict[str, str] = {"nasa": "default_nasa_scale", "nag": "default_nag_scale"}


def check_negative_attention_inputs(
    guidance_scale: float, nasa_scale: float | None, negative_attention_method: str
) -> None:
    """Raise a `ValueError` naming the argument for a negative `nasa_scale`, a `nasa_scale` passed with
    classifier-free guidance (`guidance_scale` > 1), or an unknown `negative_attention_method`."""
    if nasa_scale is not None and nasa_scale < 0:
        raise ValueError(f"`nasa_scale` has to be >= 0 but is {nasa_scale}.")
    if nasa_scale is not None and guidance_scale > 1:
        raise ValueError(
            f"`nasa_scale` steers attention only when `guidance_scale` <= 1, but `guidance_scale` is"
            f" {guidance_scale}: the negative prompt then acts through classifier-free guidance."
        )
    if negative_attention_method not in NEGATIVE_ATTENTION_PROCESSORS:
        raise ValueError(
            f"`negative_attention_method` has to be one of {sorted(NEGATIVE_ATTENTION_PROCESSORS)} but is"
            f" {negative_attention_method!r}."
        )


def resolve_nasa_scale(config: Any, nasa_scale: float | None, negative_attention_method: str) -> float:
    """`nasa_scale` if given, else the method's default from the pipeline's config (`default_nasa_scale` for
    NASA, `default_nag_scale` for NAG)."""
    if nasa_scale is not None:
        return nasa_scale
    return getattr(config, DEFAULT_SCALE_CONFIG_NAMES[negative_attention_method])


def steers_attention(
    do_classifier_free_guidance: bool,
    nasa_scale: float,
    negative_prompt: str | list[str] | None,
    negative_prompt_embeds: torch.Tensor | None,
) -> bool:
    """Whether a call steers cross-attention: a negative prompt (or its embeddings), no classifier-free guidance,
    and a strength above 0 (0 gives exactly the call without a negative prompt, so nothing is installed)."""
    has_negative = negative_prompt is not None or negative_prompt_embeds is not None
    return not do_classifier_free_guidance and has_negative and nasa_scale > 0


def negative_attention_during_call(
    unet: torch.nn.Module,
    negative_prompt_embeds: torch.Tensor | None,
    nasa_scale: float,
    negative_attention_method: str,
    negative_attention_kwargs: dict[str, Any] | None,
    enabled: bool,
) -> AbstractContextManager[NegativeAttnProcessor | None]:
    """The `with` block of a pipeline call's sampling loop: [`negative_attention`] when `enabled` (it yields the
    shared processor and restores the previous processors on exit, also on an exception), else a block that
    yields `None` and touches nothing."""
    if not enabled:
        return nullcontext()
    return negative_attention(
        unet,
        negative_prompt_embeds,
        nasa_scale,
        method=negative_attention_method,
        **(negative_attention_kwargs or {}),
    )
