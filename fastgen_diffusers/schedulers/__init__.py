"""Schedulers for the package's students: they own the sampling step and state their conventions in their config."""

from .scheduling_one_step import OneStepScheduler, OneStepSchedulerOutput
from .scheduling_rectified_flow_euler import RectifiedFlowEulerScheduler, RectifiedFlowEulerSchedulerOutput
