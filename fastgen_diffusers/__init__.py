"""fastgen-diffusers: one-step and few-step text-to-image for Hugging Face Diffusers."""

from transformers.utils import logging as _transformers_logging


# Importing the pipelines names `CLIPImageProcessor` (the optional safety checker's feature extractor), and without
# torchvision transformers then warns that it falls back to its PIL backend. Nothing here uses that processor, so
# the warning is silenced for these imports only; the user's verbosity is restored after them.
_verbosity = _transformers_logging.get_verbosity()
_transformers_logging.set_verbosity_error()
try:
    from .attention import NAGAttnProcessor, NASAAttnProcessor, negative_attention
    from .models import OMSModel
    from .pipelines import FastDiffusionPipeline, FastPipeline, InstaFlowPipeline, OneStepPipeline
    from .pipelines.oms import OMSPipeline
    from .pipelines.ppap import PPAPPipeline
    from .schedulers import OneStepScheduler, RectifiedFlowEulerScheduler
finally:
    _transformers_logging.set_verbosity(_verbosity)


__version__ = "0.1.0"
