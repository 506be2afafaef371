"""`OneStepPipeline`: students that map noise to an image in one UNet evaluation (SwiftBrush, SNOOPI, DMD2)."""

from .pipeline_one_step import OneStepPipeline, diffuse, predict_original_sample


__all__ = ["OneStepPipeline", "diffuse", "predict_original_sample"]
