"""Networks the methods add to a Stable Diffusion pipeline (ModelMixin + ConfigMixin, safetensors)."""

from .oms import OMSModel
