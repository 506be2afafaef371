"""fastgen-diffusers: one-step and few-step text-to-image for Hugging Face Diffusers."""

from .attention import NAGAttnProcessor, NASAAttnProcessor, negative_attention
from .pipelines import FastPipeline, InstaFlowPipeline, OneStepPipeline
from .pipelines.oms import OMSPipeline
from .models import OMSModel
from .schedulers import RectifiedFlowEulerScheduler


__version__ = "0.1.0"
