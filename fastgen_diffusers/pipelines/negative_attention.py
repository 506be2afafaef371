"""Negative prompts without classifier-free guidance, one mixin for every fastgen pipeline.

At `guidance_scale` <= 1 (where one-step and few-step students run) a negative prompt is not a second UNet branch:
it steers the cross-attention layers through NASA or NAG (`fastgen_diffusers.attention`) for the duration of the
call. At `guidance_scale` > 1 it keeps its classifier-free guidance meaning.

How it steers is a small dict, stored in the pipeline's config (`model_index.json`) by the training script that
tuned it, and overridable per call:

    {"method": "nasa", "scale": 0.5}                            # SNOOPI's NASA: Z+ - scale * Z-
    {"method": "nag", "scale": 4.0, "tau": 2.5, "alpha": 0.5}   # NAG: scale is phi, tau and alpha its bounds
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from ..attention.nasa import NegativeAttnProcessor, negative_attention


# Each method's settings when neither the pipeline's config nor the call names them.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "nasa": {"scale": 0.1},  # SNOOPI's alpha for SD1.5 students
    "nag": {"scale": 4.0, "tau": 2.5, "alpha": 0.5},  # the NAG authors' Diffusers defaults (phi = nag_scale - 1)
}


def resolve_negative_attention(stored: dict[str, Any] | None, override: dict[str, Any] | None) -> dict[str, Any]:
    """The settings one call steers with: the call's `override` over the pipeline's `stored` settings (when they
    are for the same method) over the method's defaults. Raises a `ValueError` naming `negative_attention` for an
    unknown method or key, or a scale that is negative or not finite."""
    stored = dict(stored or {})
    override = dict(override or {})
    method = override.get("method", stored.get("method", "nasa"))
    if method not in METHOD_DEFAULTS:
        raise ValueError(f"`negative_attention['method']` must be one of {sorted(METHOD_DEFAULTS)}, got {method!r}.")
    settings = dict(METHOD_DEFAULTS[method])
    if stored.get("method", "nasa") == method:
        settings.update(stored)
    settings.update(override)
    settings["method"] = method

    unknown = set(settings) - {"method", *METHOD_DEFAULTS[method]}
    if unknown:
        raise ValueError(
            f"`negative_attention` has keys {sorted(unknown)} that method {method!r} does not take; valid keys:"
            f" {sorted({'method', *METHOD_DEFAULTS[method]})}."
        )
    for key, value in settings.items():
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if key != "method" and not (is_number and math.isfinite(value) and value >= 0):
            raise ValueError(f"`negative_attention['{key}']` must be a finite number >= 0, got {value!r}.")
    return settings


class NegativeAttentionMixin:
    """Negative prompts through steered cross-attention for a pipeline with a `unet` and a `negative_attention`
    config entry. Register the entry in `__init__` with `self.register_to_config(negative_attention=...)`."""

    def check_negative_attention_inputs(
        self, guidance_scale: float, negative_attention: dict[str, Any] | None
    ) -> None:
        if negative_attention is not None and not isinstance(negative_attention, dict):
            raise TypeError(f"`negative_attention` must be a dict or None, got {type(negative_attention).__name__}.")
        if negative_attention and guidance_scale > 1:
            raise ValueError(
                f"`negative_attention` steers attention only when `guidance_scale` <= 1, but `guidance_scale` is"
                f" {guidance_scale}: the negative prompt then acts through classifier-free guidance."
            )
        resolve_negative_attention(self.config.negative_attention, negative_attention)

    def steers_attention(
        self,
        settings: dict[str, Any],
        negative_prompt: str | list[str] | None,
        negative_prompt_embeds: torch.Tensor | None,
    ) -> bool:
        """Whether a call steers: a negative prompt (or its embeddings), no classifier-free guidance, and a scale
        above 0 (0 gives exactly the call without a negative prompt, so nothing is installed)."""
        has_negative = negative_prompt is not None or negative_prompt_embeds is not None
        return not self.do_classifier_free_guidance and has_negative and settings["scale"] > 0

    def negative_attention_during_call(
        self, negative_prompt_embeds: torch.Tensor | None, settings: dict[str, Any], enabled: bool
    ) -> AbstractContextManager[NegativeAttnProcessor | None]:
        """The `with` block around the sampling loop: [`negative_attention`] when `enabled` (it yields the shared
        processor and restores the previous processors on exit, also on an exception), else a block that yields
        `None` and touches nothing."""
        if not enabled:
            return nullcontext()
        processor_kwargs = {key: value for key, value in settings.items() if key not in ("method", "scale")}
        return negative_attention(
            self.unet, negative_prompt_embeds, settings["scale"], method=settings["method"], **processor_kwargs
        )
