"""`OneStepPipeline`: students that map noise to an image in one UNet evaluation (SwiftBrush, SNOOPI, DMD2)."""

from .pipeline_one_step import OneStepPipeline
