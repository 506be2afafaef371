"""The One More Step (OMS) network: text in, the clean latent out, from pure noise at zero SNR.

OMS (Hu et al., 2023, arXiv 2311.15744) adds one step in front of a diffusion model whose schedule never reaches
zero SNR (Stable Diffusion's scaled-linear betas leave sqrt(alpha_bar) = 0.068 of the image in x_999). Its network
reads unit-variance noise x_S and a prompt and predicts v at alpha_bar_S = 0, where
v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 = -x0: the clean latent, negated. That x0 is then diffused to the
base model's first timestep (see `fastgen_diffusers.pipelines.oms`).
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput


# The timestep the network is always called at. Any constant would do: the time embedding of a constant is a
# constant, which the network learns as one more bias per block.
OMS_TIMESTEP = 999


# ModelMixin and ConfigMixin are named again (UNet2DConditionModel already is both) because a pipeline's loader
# looks them up in this module to learn how to load `OMSModel`.
class OMSModel(UNet2DConditionModel, ModelMixin, ConfigMixin):
    r"""
    The OMS network: a [`UNet2DConditionModel`] called at one fixed timestep (`OMS_TIMESTEP`), predicting v at zero
    SNR (so x0 = -v) from unit-variance noise and text embeddings.

    The original's `UNet2DConditionWoCTModel` is a copy of Diffusers' UNet with the time embedding cut out. Here the
    UNet is reused as it is and always called at the same timestep: its time embedding is then a constant vector,
    that is, a learned bias per ResNet block (about 5k parameters in the ShapesWorld module), and everything else
    is Diffusers' own class, so attention processors, gradient checkpointing, LoRA adapters and
    `save_pretrained` / `from_pretrained` (safetensors) work unchanged, and no copy of Diffusers' UNet code has to
    follow its releases (the original breaks on diffusers >= 0.25 for that reason). The cost is that `forward`
    takes no timestep.

    The configuration is `UNet2DConditionModel`'s; `in_channels` = `out_channels` = the latent channels of the VAE
    whose latent space the module was trained in, and `cross_attention_dim` = the hidden size of the text encoder
    it reads.
    """

    def forward(
        self,
        sample: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
        **kwargs,
    ) -> UNet2DConditionOutput | tuple:
        """
        Args:
            sample (`torch.Tensor`): Unit-variance noise x_S of shape `(batch, in_channels, height, width)`.
            encoder_hidden_states (`torch.Tensor`): Text embeddings `(batch, tokens, cross_attention_dim)`.
            attention_mask, cross_attention_kwargs, encoder_attention_mask: As in [`UNet2DConditionModel`].
            return_dict (`bool`, defaults to `True`): Return a [`UNet2DConditionOutput`] rather than a tuple.

        Returns:
            v at zero SNR, i.e. minus the predicted clean latent, shaped like `sample`.
        """
        if "timestep" in kwargs:
            raise TypeError("`OMSModel.forward` takes no `timestep`: the network is always called at `OMS_TIMESTEP`.")
        return super().forward(
            sample,
            OMS_TIMESTEP,
            encoder_hidden_states,
            attention_mask=attention_mask,
            cross_attention_kwargs=cross_attention_kwargs,
            encoder_attention_mask=encoder_attention_mask,
            return_dict=return_dict,
            **kwargs,
        )


def predicted_original_sample(v: torch.Tensor) -> torch.Tensor:
    """x0 from the OMS network's v at alpha_bar = 0: x0 = sqrt(alpha_bar) x_S - sqrt(1 - alpha_bar) v = -v."""
    return -v
