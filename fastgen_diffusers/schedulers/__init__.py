"""Schedulers for rectified-flow models: they own the sampling step and state their conventions in their config."""

from .scheduling_rectified_flow_euler import RectifiedFlowEulerScheduler, RectifiedFlowEulerSchedulerOutput
