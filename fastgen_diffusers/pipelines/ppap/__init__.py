"""`PPAPPipeline`: PPAP guidance in front of any pipeline whose loop takes `guidance_fn`, and one rule for the names
of saved guidances (`shapes-ppap`, `shapes-ppap/regressor`, folders, Hub ids)."""

from .loading import load_ppap_guidance, resolve_ppap_location
from .pipeline_ppap import PPAPPipeline, with_guidance_loop
