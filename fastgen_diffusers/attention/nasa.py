"""Negative prompts inside cross-attention, for students that have no second UNet pass to spend on CFG.

With one UNet evaluation, classifier-free guidance blends two different images (the positive and the
negative prediction), so one-step students ignore or break on negative prompts. SNOOPI's Negative-Away
Steer Attention (NASA) steers inside every image-text cross-attention layer instead, with one shared query:

    Z = softmax(Q K+^T / sqrt(d)) V+  -  alpha * softmax(Q K-^T / sqrt(d)) V-

where K-, V- are the negative prompt embeddings through the layer's own `to_k`/`to_v`, and the difference
is taken before `to_out` (so the output bias is not subtracted). NAG (Normalized Attention Guidance,
arXiv 2505.21179) extrapolates instead and bounds how far the features may move, which is steadier at large
strengths. Either costs one extra key/value projection and one attention per cross-attention layer.

The negative embeddings travel as processor state, not as `cross_attention_kwargs`: `negative_attention`
installs one processor on the cross-attention layers for the duration of a `with` block and restores the
previous processors on exit. The UNet call is unchanged, self-attention layers keep their processors, and
Diffusers logs no "cross_attention_kwargs ... are not expected" warning on them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0


def nasa_attention_output(positive: torch.Tensor, negative: torch.Tensor, scale: float) -> torch.Tensor:
    """SNOOPI's NASA: Z+ - scale * Z-, a plain subtraction (no extrapolation, no normalisation)."""
    return positive - scale * negative


def nag_attention_output(
    positive: torch.Tensor, negative: torch.Tensor, scale: float, tau: float, alpha: float
) -> torch.Tensor:
    """NAG on attention outputs of shape `(batch, tokens, channels)`.

    Z_ext = Z+ + scale * (Z+ - Z-); where a token's L1 norm ratio ||Z_ext||_1 / ||Z+||_1 exceeds `tau`,
    Z_ext is rescaled to ratio `tau`; the result is alpha * Z_ext + (1 - alpha) * Z+. `scale` is NAG's
    phi, which is `nag_scale - 1` in the NAG authors' code (their default `nag_scale=5` is `scale=4`).
    """
    extrapolated = positive + scale * (positive - negative)
    norm_positive = positive.norm(p=1, dim=-1, keepdim=True)
    norm_extrapolated = extrapolated.norm(p=1, dim=-1, keepdim=True)
    too_far = norm_extrapolated > tau * norm_positive
    extrapolated = torch.where(too_far, extrapolated * (tau * norm_positive / norm_extrapolated), extrapolated)
    return alpha * extrapolated + (1 - alpha) * positive


def _attend(attn: Attention, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V for one text context, as `AttnProcessor2_0` computes it; heads merged."""
    batch_size = query.shape[0]
    if attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    key = attn.to_k(context)
    value = attn.to_v(context)
    head_dim = key.shape[-1] // attn.heads
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
    return hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)


class NegativeAttnProcessor:
    r"""
    Cross-attention that also attends, with the same query, to negative prompt embeddings held as state, and
    combines the two outputs with `steer` before `to_out`. Subclasses define `steer`.

    Self-attention calls (no `encoder_hidden_states`) are handed to [`AttnProcessor2_0`] unchanged, so the
    processor may be set on every layer, though [`negative_attention`] sets it on cross-attention layers only.

    Args:
        negative_encoder_hidden_states (`torch.Tensor`):
            Negative prompt embeddings `(batch, tokens, dim)`, one per sample of the UNet batch, or a batch of one
            shared by all samples. Cast to the positive embeddings' device and dtype on use.
        scale (`float`):
            Steering strength; 0 gives exactly the output of [`AttnProcessor2_0`].
    """

    def __init__(self, negative_encoder_hidden_states: torch.Tensor, scale: float):
        self.negative_encoder_hidden_states = negative_encoder_hidden_states
        self.scale = scale
        self._unsteered = AttnProcessor2_0()

    def steer(self, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _negative_context(self, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """The negative embeddings on the positive ones' device and dtype, one per sample."""
        negative = self.negative_encoder_hidden_states.to(
            device=encoder_hidden_states.device, dtype=encoder_hidden_states.dtype
        )
        batch_size = encoder_hidden_states.shape[0]
        if negative.shape[0] == 1:
            return negative.expand(batch_size, -1, -1)
        if negative.shape[0] != batch_size:
            raise ValueError(
                f"`negative_encoder_hidden_states` has batch size {negative.shape[0]} but the cross-attention input"
                f" has {batch_size}; pass one negative per sample (repeated like the prompt embeddings) or a single one."
            )
        return negative

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is None:
            return self._unsteered(attn, hidden_states, attention_mask=attention_mask, temb=temb)
        if attention_mask is not None:
            raise ValueError(
                f"{self.__class__.__name__} steers unmasked text contexts (SD-family UNets); it got an encoder"
                " attention mask, which has no counterpart for the negative prompt."
            )
        negative_encoder_hidden_states = self._negative_context(encoder_hidden_states)

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size = hidden_states.shape[0]

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        query = query.view(batch_size, -1, attn.heads, query.shape[-1] // attn.heads).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)

        # One shared query against the positive and the negative text context.
        positive = _attend(attn, query, encoder_hidden_states)
        negative = _attend(attn, query, negative_encoder_hidden_states)
        hidden_states = self.steer(positive, negative).to(query.dtype)

        # linear proj
        hidden_states = attn.to_out[0](hidden_states)
        # dropout
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)

        if attn.residual_connection:
            hidden_states = hidden_states + residual

        return hidden_states / attn.rescale_output_factor


class NASAAttnProcessor(NegativeAttnProcessor):
    r"""
    SNOOPI's Negative-Away Steer Attention: Z+ - scale * Z- before `to_out`.

    `scale` is the paper's alpha. It is strongly model-dependent: SNOOPI uses 0.1 for SD1.5 and 0.2 for SD2.1
    students (training-free), and finds quality drops once the negative term dominates.
    """

    def steer(self, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        return nasa_attention_output(positive, negative, self.scale)


class NAGAttnProcessor(NegativeAttnProcessor):
    r"""
    Normalized Attention Guidance: extrapolate away from Z-, bound the per-token L1 norm ratio by `tau`, blend
    back with Z+ by `alpha` (see [`nag_attention_output`]). `scale` is NAG's phi (its `nag_scale - 1`); the
    `tau` and `alpha` defaults are those of the NAG authors' Diffusers pipelines.
    """

    def __init__(
        self, negative_encoder_hidden_states: torch.Tensor, scale: float, tau: float = 2.5, alpha: float = 0.5
    ):
        super().__init__(negative_encoder_hidden_states, scale)
        self.tau = tau
        self.alpha = alpha

    def steer(self, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        return nag_attention_output(positive, negative, self.scale, self.tau, self.alpha)


NEGATIVE_ATTENTION_PROCESSORS: dict[str, type[NegativeAttnProcessor]] = {
    "nasa": NASAAttnProcessor,
    "nag": NAGAttnProcessor,
}


def cross_attention_modules(model: torch.nn.Module) -> list[Attention]:
    """The image-text cross-attention layers of `model`: in an SD UNet, the `attn2` of every transformer block."""
    return [module for module in model.modules() if isinstance(module, Attention) and module.is_cross_attention]


@contextmanager
def negative_attention(
    unet: torch.nn.Module,
    negative_encoder_hidden_states: torch.Tensor,
    scale: float,
    method: str = "nasa",
    **processor_kwargs,
) -> Iterator[NegativeAttnProcessor]:
    r"""
    Steer every cross-attention layer of `unet` away from a negative prompt for the duration of the block.

    ```py
    with negative_attention(pipe.unet, negative_prompt_embeds, scale=0.1) as processor:
        noise_pred = pipe.unet(latents, t, encoder_hidden_states=prompt_embeds).sample
    ```

    As the PAG pipelines do for self-attention, the processors are swapped for the block and restored on exit,
    also when the block raises; only the cross-attention layers are touched. One processor is shared by all of
    them and yielded, so its `negative_encoder_hidden_states` and `scale` may be changed inside the block (per
    step, or per training iteration for NASA-T). Processors that other features set on cross-attention layers
    (IP-Adapter) are replaced for the duration of the block.

    Args:
        unet: A model with Diffusers `Attention` layers (`UNet2DConditionModel`, with or without LoRA adapters).
        negative_encoder_hidden_states (`torch.Tensor`):
            Negative prompt embeddings, one per sample of the UNet batch or a batch of one.
        scale (`float`): Steering strength: NASA's alpha or NAG's phi.
        method (`str`, defaults to `"nasa"`): `"nasa"` ([`NASAAttnProcessor`]) or `"nag"` ([`NAGAttnProcessor`]).
        processor_kwargs: Further arguments of the method's processor, e.g. `tau` and `alpha` for NAG.
    """
    if method not in NEGATIVE_ATTENTION_PROCESSORS:
        raise ValueError(f"`method` must be one of {sorted(NEGATIVE_ATTENTION_PROCESSORS)}, got {method!r}.")
    processor = NEGATIVE_ATTENTION_PROCESSORS[method](negative_encoder_hidden_states, scale, **processor_kwargs)
    layers = cross_attention_modules(unet)
    if not layers:
        raise ValueError(f"`unet` ({unet.__class__.__name__}) has no cross-attention layers to steer.")

    original_processors = [layer.processor for layer in layers]
    for layer in layers:
        layer.set_processor(processor)
    try:
        yield processor
    finally:
        for layer, original in zip(layers, original_processors):
            layer.set_processor(original)
