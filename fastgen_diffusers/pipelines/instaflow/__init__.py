"""InstaFlow: rectified-flow Stable Diffusion, one step or a few."""

from .pipeline_instaflow import InstaFlowPipeline
