from .auto import FastPipeline
from .instaflow import InstaFlowPipeline
from .one_step import OneStepPipeline
