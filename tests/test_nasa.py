"""NASA and NAG attention processors and the `negative_attention` context manager."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from peft import LoraConfig

from fastgen_diffusers.attention import (
    NAGAttnProcessor,
    NASAAttnProcessor,
    cross_attention_modules,
    negative_attention,
)


def make_cross_attention() -> Attention:
    torch.manual_seed(0)
    return Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8).eval()


def attention_by_hand(attn: Attention, hidden_states: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V per head, heads merged, before `to_out`."""
    batch, tokens, _ = hidden_states.shape
    query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
    head_dim = query.shape[-1] // attn.heads

    def split(x):
        return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

    weights = torch.softmax(split(query) @ split(key).transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
    return (weights @ split(value)).transpose(1, 2).reshape(batch, tokens, -1)


def random_inputs(batch: int = 2, generator_seed: int = 1):
    generator = torch.Generator().manual_seed(generator_seed)
    hidden_states = torch.randn(batch, 10, 16, generator=generator)
    context = torch.randn(batch, 5, 8, generator=generator)
    negative = torch.randn(batch, 7, 8, generator=generator)
    return hidden_states, context, negative


def unet_inputs(unet, batch: int = 2, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, 16, 16, generator=generator)
    prompt_embeds = torch.randn(batch, 6, unet.config.cross_attention_dim, generator=generator)
    negative_embeds = torch.randn(batch, 6, unet.config.cross_attention_dim, generator=generator)
    return sample, prompt_embeds, negative_embeds


def run_unet(unet, sample, prompt_embeds) -> torch.Tensor:
    with torch.no_grad():
        return unet(sample, 999, encoder_hidden_states=prompt_embeds).sample


@pytest.fixture
def unet(tiny_sd_components):
    return tiny_sd_components["unet"].eval()


# --- the processors against the formulas --------------------------------------------------------------


def test_nasa_processor_matches_formula_by_hand():
    attn = make_cross_attention()
    hidden_states, context, negative = random_inputs()
    with torch.no_grad():
        out = NASAAttnProcessor(negative, scale=0.7)(attn, hidden_states, encoder_hidden_states=context)
        positive_z = attention_by_hand(attn, hidden_states, context)
        negative_z = attention_by_hand(attn, hidden_states, negative)
        # subtracted before to_out: W(Z+ - a Z-) + b, so the output bias is not subtracted
        expected = attn.to_out[0](positive_z - 0.7 * negative_z)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_nag_processor_matches_formula_by_hand():
    attn = make_cross_attention()
    hidden_states, context, negative = random_inputs()
    phi, alpha = 2.0, 0.4
    with torch.no_grad():
        positive_z = attention_by_hand(attn, hidden_states, context)
        negative_z = attention_by_hand(attn, hidden_states, negative)
        extrapolated = positive_z + phi * (positive_z - negative_z)
        ratio = extrapolated.abs().sum(-1, keepdim=True) / positive_z.abs().sum(-1, keepdim=True)
        tau = ratio.median().item()  # so that some tokens are clamped and some are not
        assert (ratio > tau).any() and (ratio < tau).any()
        clamped = torch.where(ratio > tau, extrapolated * tau / ratio, extrapolated)
        expected = attn.to_out[0](alpha * clamped + (1 - alpha) * positive_z)

        out = NAGAttnProcessor(negative, scale=phi, tau=tau, alpha=alpha)(
            attn, hidden_states, encoder_hidden_states=context
        )
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("processor_class", [NASAAttnProcessor, NAGAttnProcessor])
def test_scale_zero_is_exactly_the_default_processor(processor_class):
    attn = make_cross_attention()
    hidden_states, context, negative = random_inputs()
    with torch.no_grad():
        expected = AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states=context)
        out = processor_class(negative, scale=0.0)(attn, hidden_states, encoder_hidden_states=context)
        steered = processor_class(negative, scale=1.0)(attn, hidden_states, encoder_hidden_states=context)
    assert torch.equal(out, expected)
    assert not torch.allclose(steered, expected)


@pytest.mark.parametrize("processor_class", [NASAAttnProcessor, NAGAttnProcessor])
def test_self_attention_is_never_steered(processor_class):
    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    hidden_states, _, negative = random_inputs()
    with torch.no_grad():
        expected = AttnProcessor2_0()(attn, hidden_states)
        out = processor_class(negative, scale=3.0)(attn, hidden_states)
    assert torch.equal(out, expected)


def test_processor_pairs_each_sample_with_its_own_negative():
    attn = make_cross_attention()
    hidden_states, context, negative = random_inputs(batch=3)
    with torch.no_grad():
        batched = NASAAttnProcessor(negative, scale=0.5)(attn, hidden_states, encoder_hidden_states=context)
        one_by_one = torch.cat(
            [
                NASAAttnProcessor(negative[i : i + 1], scale=0.5)(
                    attn, hidden_states[i : i + 1], encoder_hidden_states=context[i : i + 1]
                )
                for i in range(3)
            ]
        )
        shared = NASAAttnProcessor(negative[:1], scale=0.5)(attn, hidden_states, encoder_hidden_states=context)
        repeated = NASAAttnProcessor(negative[:1].repeat(3, 1, 1), scale=0.5)(
            attn, hidden_states, encoder_hidden_states=context
        )
    torch.testing.assert_close(batched, one_by_one, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shared, repeated, rtol=1e-5, atol=1e-6)


def test_processor_rejects_mismatched_batch_and_masks():
    attn = make_cross_attention()
    hidden_states, context, negative = random_inputs(batch=2)
    with pytest.raises(ValueError, match="negative_encoder_hidden_states"):
        NASAAttnProcessor(torch.cat([negative, negative[:1]]), scale=0.5)(
            attn, hidden_states, encoder_hidden_states=context
        )
    with pytest.raises(ValueError, match="attention mask"):
        NASAAttnProcessor(negative, scale=0.5)(
            attn, hidden_states, encoder_hidden_states=context, attention_mask=torch.ones(2, 5)
        )


# --- the context manager on a UNet --------------------------------------------------------------------


def test_context_installs_on_cross_attention_only_and_restores(unet):
    sample, prompt_embeds, negative_embeds = unet_inputs(unet)
    original = unet.attn_processors
    cross = {
        f"{name}.processor"
        for name, module in unet.named_modules()
        if isinstance(module, Attention) and module.is_cross_attention
    }
    assert len(cross) == len(cross_attention_modules(unet)) > 0
    assert all(".attn2." in name for name in cross)
    assert cross != set(original)  # there are self-attention layers too
    plain = run_unet(unet, sample, prompt_embeds)

    with negative_attention(unet, negative_embeds, scale=0.5) as processor:
        inside = unet.attn_processors
        steered = run_unet(unet, sample, prompt_embeds)
    assert isinstance(processor, NASAAttnProcessor)
    assert all(inside[name] is processor for name in cross)
    assert all(inside[name] is original[name] for name in set(original) - cross)
    assert not torch.allclose(steered, plain)

    after = unet.attn_processors
    assert all(after[name] is original[name] for name in original)
    assert torch.equal(run_unet(unet, sample, prompt_embeds), plain)


def test_context_restores_processors_when_the_body_raises(unet):
    _, _, negative_embeds = unet_inputs(unet)
    original = unet.attn_processors
    with pytest.raises(RuntimeError, match="boom"), negative_attention(unet, negative_embeds, 0.5, method="nag"):
        raise RuntimeError("boom")
    after = unet.attn_processors
    assert all(after[name] is original[name] for name in original)


@pytest.mark.parametrize("method", ["nasa", "nag"])
def test_unet_scale_zero_equals_plain_and_scale_changes_output(unet, method):
    sample, prompt_embeds, negative_embeds = unet_inputs(unet)
    plain = run_unet(unet, sample, prompt_embeds)
    with negative_attention(unet, negative_embeds, scale=0.0, method=method):
        off = run_unet(unet, sample, prompt_embeds)
    with negative_attention(unet, negative_embeds, scale=2.0, method=method):
        on = run_unet(unet, sample, prompt_embeds)
    assert torch.equal(off, plain)
    assert not torch.allclose(on, plain)


def test_yielded_processor_state_can_change_inside_the_block(unet):
    sample, prompt_embeds, negative_embeds = unet_inputs(unet)
    plain = run_unet(unet, sample, prompt_embeds)
    with negative_attention(unet, negative_embeds, scale=1.0) as processor:
        processor.scale = 0.0
        assert torch.equal(run_unet(unet, sample, prompt_embeds), plain)


def test_unet_batch_pairs_samples_with_their_negatives(unet):
    sample, prompt_embeds, negative_embeds = unet_inputs(unet, batch=2)
    with negative_attention(unet, negative_embeds, scale=1.0):
        batched = run_unet(unet, sample, prompt_embeds)
    for i in range(2):
        with negative_attention(unet, negative_embeds[i : i + 1], scale=1.0):
            single = run_unet(unet, sample[i : i + 1], prompt_embeds[i : i + 1])
        torch.testing.assert_close(batched[i : i + 1], single, rtol=1e-4, atol=1e-5)


def test_no_unexpected_kwargs_warnings(unet):
    sample, prompt_embeds, negative_embeds = unet_inputs(unet)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    diffusers_logger = logging.getLogger("diffusers")
    diffusers_logger.addHandler(handler)
    try:
        with negative_attention(unet, negative_embeds, scale=0.5):
            run_unet(unet, sample, prompt_embeds)
        assert records == []
        # control: passing negatives as cross_attention_kwargs is what warns on every layer
        with torch.no_grad():
            unet(
                sample, 999, prompt_embeds, cross_attention_kwargs={"negative_encoder_hidden_states": negative_embeds}
            )
        assert any("not expected" in record.getMessage() for record in records)
    finally:
        diffusers_logger.removeHandler(handler)


def test_works_with_a_lora_adapter(unet):
    sample, prompt_embeds, negative_embeds = unet_inputs(unet)
    base = run_unet(unet, sample, prompt_embeds)
    unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    with_lora = run_unet(unet, sample, prompt_embeds)
    assert not torch.allclose(with_lora, base)
    original = unet.attn_processors

    with negative_attention(unet, negative_embeds, scale=0.0):
        assert torch.equal(run_unet(unet, sample, prompt_embeds), with_lora)
    with negative_attention(unet, negative_embeds, scale=1.0):
        steered = run_unet(unet, sample, prompt_embeds)
        unet.disable_adapters()
        steered_without_lora = run_unet(unet, sample, prompt_embeds)
        unet.enable_adapters()
    assert not torch.allclose(steered, with_lora)
    assert not torch.allclose(steered, steered_without_lora)  # the negative branch goes through the LoRA layers

    # one LoRA-wrapped layer against the formula, with its LoRA-wrapped projections
    attn = cross_attention_modules(unet)[0]
    assert type(attn.to_k).__module__.startswith("peft")
    generator = torch.Generator().manual_seed(3)
    hidden_states = torch.randn(2, 10, attn.to_q.in_features, generator=generator)
    with torch.no_grad():
        out = NASAAttnProcessor(negative_embeds, scale=0.3)(attn, hidden_states, encoder_hidden_states=prompt_embeds)
        expected = attn.to_out[0](
            attention_by_hand(attn, hidden_states, prompt_embeds)
            - 0.3 * attention_by_hand(attn, hidden_states, negative_embeds)
        )
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)

    after = unet.attn_processors
    assert all(after[key] is original[key] for key in original)
    assert torch.equal(run_unet(unet, sample, prompt_embeds), with_lora)


def test_bad_method_and_model_without_cross_attention(unet):
    _, _, negative_embeds = unet_inputs(unet)
    with pytest.raises(ValueError, match="method"), negative_attention(unet, negative_embeds, 0.5, method="cfg"):
        pass
    with (
        pytest.raises(ValueError, match="no cross-attention"),
        negative_attention(torch.nn.Linear(2, 2), negative_embeds, 0.5),
    ):
        pass
