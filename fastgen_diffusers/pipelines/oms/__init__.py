"""`OMSPipeline`: One More Step in front of any Stable-Diffusion-schedule pipeline."""

from .pipeline_oms import OMSPipeline, first_latent, oms_generator, remove_spatial_mean
