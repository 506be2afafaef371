"""Guidance terms a sampling loop applies to the model output between CFG and the scheduler step (PPAP)."""

from .ppap import DecodedGuide, GuidanceFunction, PPAPGuidance


__all__ = ["DecodedGuide", "GuidanceFunction", "PPAPGuidance"]
