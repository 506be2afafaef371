from .auto import FastPipeline
from .core import FastDiffusionPipeline
from .instaflow import InstaFlowPipeline
from .one_step import OneStepPipeline
