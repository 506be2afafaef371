from .auto import FastPipeline
from .instaflow import InstaFlowPipeline
