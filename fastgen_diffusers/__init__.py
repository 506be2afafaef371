"""fastgen-diffusers: one-step and few-step text-to-image for Hugging Face Diffusers."""

from .pipelines import FastPipeline, InstaFlowPipeline
from .schedulers import RectifiedFlowEulerScheduler


__version__ = "0.1.0"
