"""One suite for every pipeline of the package, in the spirit of Diffusers' `PipelineTesterMixin`.

Each case builds a pipeline from the same tiny SD components with its own scheduler and runs the same checks:
outputs, batching, saving and loading, prompt embeddings, callbacks, negative prompts through steered attention,
the guidance hook and input validation. Method-specific maths (InstaFlow's Euler loop, a student's x0) is tested
in the pipeline's own test file.
"""

from __future__ import annotations

import re

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler
from torch.testing import assert_close

from fastgen_diffusers.attention import (
    NAGAttnProcessor,
    NASAAttnProcessor,
    NegativeAttnProcessor,
    cross_attention_modules,
)
from fastgen_diffusers.pipelines import FastDiffusionPipeline, FastPipeline, InstaFlowPipeline, OneStepPipeline
from fastgen_diffusers.schedulers import OneStepScheduler, RectifiedFlowEulerScheduler


PROMPT = "a small red circle at the top left on a black background"
OTHER_PROMPT = "a large green square"
NEGATIVE_PROMPT = "a large blue square"
TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}


def teacher_scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False
    )


# name -> (pipeline class, scheduler factory, number of steps the checks sample with)
CASES = {
    "fast-ddim": (FastDiffusionPipeline, teacher_scheduler, 2),
    "instaflow": (InstaFlowPipeline, RectifiedFlowEulerScheduler, 2),
    "one-step": (OneStepPipeline, lambda: OneStepScheduler(prediction_type="v_prediction"), 2),
}


@pytest.fixture(params=sorted(CASES))
def case(request, tiny_sd_components):
    pipeline_class, make_scheduler, steps = CASES[request.param]
    pipe = pipeline_class(**{**tiny_sd_components, "scheduler": make_scheduler()})
    pipe.set_progress_bar_config(disable=True)
    return pipe, steps


def generators(n: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def noise(batch_size: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch_size, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


def cross_attention_processors(pipe) -> list:
    return [layer.processor for layer in cross_attention_modules(pipe.unet)]


@torch.no_grad()
def test_dict_and_tuple_outputs_are_equal(case):
    pipe, steps = case
    as_dict = pipe(PROMPT, num_inference_steps=steps, generator=generators(1), output_type="np")
    images, nsfw = pipe(
        PROMPT, num_inference_steps=steps, generator=generators(1), output_type="np", return_dict=False
    )
    assert nsfw is None and as_dict.nsfw_content_detected is None
    np.testing.assert_allclose(images, as_dict.images, **TOLERANCE)


@torch.no_grad()
def test_output_types_agree(case):
    pipe, steps = case
    outputs = {
        kind: pipe(PROMPT, num_inference_steps=steps, generator=generators(1), output_type=kind).images
        for kind in ("pil", "np", "pt", "latent")
    }
    assert isinstance(outputs["pil"][0], PIL.Image.Image) and outputs["pil"][0].size == (32, 32)
    assert outputs["np"].shape == (1, 32, 32, 3) and outputs["pt"].shape == (1, 3, 32, 32)
    assert outputs["latent"].shape == (1, 4, 16, 16)
    decoded = pipe.vae.decode(outputs["latent"] / pipe.vae.config.scaling_factor).sample
    assert_close(outputs["pt"], (decoded / 2 + 0.5).clamp(0, 1), **TOLERANCE)
    np.testing.assert_allclose(outputs["np"], outputs["pt"].permute(0, 2, 3, 1).numpy(), **TOLERANCE)
    assert np.abs(np.asarray(outputs["pil"][0]) / 255.0 - outputs["np"][0]).max() <= 1 / 255


@torch.no_grad()
def test_a_batch_equals_the_same_prompts_one_by_one(case):
    pipe, steps = case
    prompts = [PROMPT, OTHER_PROMPT, PROMPT]
    batched = pipe(prompts, num_inference_steps=steps, generator=generators(3), output_type="np").images
    for i, prompt in enumerate(prompts):
        single = pipe(prompt, num_inference_steps=steps, generator=generators(1, seed=i), output_type="np").images
        np.testing.assert_allclose(batched[i], single[0], atol=1e-4)
    assert not np.allclose(batched[0], batched[2], atol=1e-3)  # different noise, different image


@torch.no_grad()
def test_num_images_per_prompt_repeats_each_prompt(case):
    pipe, steps = case
    latents = noise().repeat(4, 1, 1, 1)
    images = pipe(
        [PROMPT, OTHER_PROMPT],
        num_images_per_prompt=2,
        num_inference_steps=steps,
        latents=latents,
        output_type="np",
        generator=[torch.Generator().manual_seed(0) for _ in range(4)],  # the same re-noising noise for each
    ).images
    assert images.shape == (4, 32, 32, 3)
    np.testing.assert_allclose(images[0], images[1], atol=1e-5)  # order [p0, p0, p1, p1]
    np.testing.assert_allclose(images[2], images[3], atol=1e-5)
    assert not np.allclose(images[1], images[2], atol=1e-3)


@torch.no_grad()
def test_prompt_embeds_path_equals_prompt_path(case):
    pipe, steps = case
    prompt_embeds, negative_prompt_embeds = pipe.encode_prompt(PROMPT, "cpu", 1, True, NEGATIVE_PROMPT)
    for settings in ({}, {"guidance_scale": 2.0}, {"negative_attention": {"scale": 1.0}}):
        with_negative = bool(settings)
        from_prompt = pipe(
            PROMPT,
            negative_prompt=NEGATIVE_PROMPT if with_negative else None,
            num_inference_steps=steps,
            generator=generators(1),
            output_type="latent",
            **settings,
        ).images
        from_embeds = pipe(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds if with_negative else None,
            num_inference_steps=steps,
            generator=generators(1),
            output_type="latent",
            **settings,
        ).images
        assert_close(from_embeds, from_prompt, **TOLERANCE)


@torch.no_grad()
def test_save_and_load_round_trip(case, tmp_path):
    pipe, steps = case
    pipe.register_to_config(negative_attention={"method": "nasa", "scale": 0.3})
    expected = pipe(
        PROMPT, negative_prompt=NEGATIVE_PROMPT, num_inference_steps=steps, generator=generators(1), output_type="np"
    ).images
    pipe.save_pretrained(tmp_path)

    for loaded in (type(pipe).from_pretrained(tmp_path), FastPipeline.from_pretrained(tmp_path)):
        assert type(loaded) is type(pipe) and type(loaded.scheduler) is type(pipe.scheduler)
        assert loaded.config.negative_attention == {"method": "nasa", "scale": 0.3}
        loaded.set_progress_bar_config(disable=True)
        images = loaded(
            PROMPT,
            negative_prompt=NEGATIVE_PROMPT,
            num_inference_steps=steps,
            generator=generators(1),
            output_type="np",
        ).images
        np.testing.assert_allclose(images, expected, **TOLERANCE)


@torch.no_grad()
def test_callback_on_step_end_sees_every_step_and_can_replace_latents(case):
    pipe, steps = case
    seen = []

    def zero_last_step(pipeline, i, t, callback_kwargs):
        seen.append((i, callback_kwargs["prompt_embeds"].shape[0]))
        return {"latents": torch.zeros_like(callback_kwargs["latents"])} if i == pipeline.num_timesteps - 1 else {}

    latents = pipe(
        PROMPT,
        num_inference_steps=steps,
        guidance_scale=2.0,
        generator=generators(1),
        output_type="latent",
        callback_on_step_end=zero_last_step,
        callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
    ).images
    assert seen == [(i, 2) for i in range(steps)]  # [negative, text] embeddings under CFG
    assert torch.count_nonzero(latents) == 0


@torch.no_grad()
def test_interrupt_skips_the_remaining_steps(case):
    pipe, steps = case
    calls = []
    pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(1))

    def stop(pipeline, i, t, callback_kwargs):
        pipeline._interrupt = True
        return {}

    pipe(PROMPT, num_inference_steps=steps, generator=generators(1), output_type="latent", callback_on_step_end=stop)
    assert len(calls) == 1


@torch.no_grad()
def test_guidance_fn_changes_each_step_and_sees_the_sampler(case):
    pipe, steps = case
    seen = []

    def guidance_fn(model_output, latents, t, scheduler):
        seen.append((model_output.shape, latents.shape, float(t), scheduler is pipe.scheduler))
        return model_output + 0.1

    plain = pipe(PROMPT, num_inference_steps=steps, generator=generators(1), output_type="latent").images
    guided = pipe(
        PROMPT, num_inference_steps=steps, generator=generators(1), output_type="latent", guidance_fn=guidance_fn
    ).images
    assert [s[3] for s in seen] == [True] * steps and all(s[0] == s[1] == (1, 4, 16, 16) for s in seen)
    assert [s[2] for s in seen] == [float(t) for t in pipe.scheduler.timesteps]
    assert not torch.allclose(guided, plain, atol=1e-4)
    identity = pipe(
        PROMPT,
        num_inference_steps=steps,
        generator=generators(1),
        output_type="latent",
        guidance_fn=lambda out, *_: out,
    ).images
    assert_close(identity, plain, **TOLERANCE)


# --- negative prompts at guidance_scale <= 1 ----------------------------------------------------------------


@pytest.mark.parametrize("method, processor_class", [("nasa", NASAAttnProcessor), ("nag", NAGAttnProcessor)])
@torch.no_grad()
def test_negative_attention_steers_during_the_call_and_restores(case, method, processor_class):
    pipe, steps = case
    original = pipe.unet.attn_processors
    during = []
    plain = pipe(PROMPT, num_inference_steps=steps, generator=generators(1), output_type="latent").images
    steered = pipe(
        PROMPT,
        negative_prompt=NEGATIVE_PROMPT,
        negative_attention={"method": method, "scale": 2.0},
        num_inference_steps=steps,
        generator=generators(1),
        output_type="latent",
        callback_on_step_end=lambda p, i, t, kw: during.extend(cross_attention_processors(p)) or {},
    ).images
    assert not torch.allclose(steered, plain, atol=1e-4)
    assert during and all(type(p) is processor_class and p.scale == 2.0 for p in during)
    after = pipe.unet.attn_processors
    assert all(after[name] is original[name] for name in original)


@pytest.mark.parametrize("method", ["nasa", "nag"])
@pytest.mark.parametrize("as_embeds", [False, True])
@torch.no_grad()
def test_negative_attention_scale_zero_equals_no_negative_prompt(case, method, as_embeds):
    pipe, steps = case
    negative = (
        {"negative_prompt_embeds": pipe.encode_prompt(NEGATIVE_PROMPT, "cpu", 1, False)[0]}
        if as_embeds
        else {"negative_prompt": NEGATIVE_PROMPT}
    )
    run = dict(num_inference_steps=steps, output_type="latent")
    plain = pipe(PROMPT, generator=generators(1), **run).images
    off = pipe(PROMPT, negative_attention={"method": method, "scale": 0.0}, generator=generators(1), **negative, **run)
    steered = pipe(PROMPT, negative_attention={"method": method}, generator=generators(1), **negative, **run)
    assert_close(off.images, plain, **TOLERANCE)
    assert not torch.allclose(steered.images, plain, atol=1e-4)  # the default strength does steer


@torch.no_grad()
def test_stored_negative_attention_is_the_default_and_a_call_overrides_it(case):
    pipe, steps = case
    pipe.register_to_config(negative_attention={"method": "nasa", "scale": 0.8})
    run = dict(negative_prompt=NEGATIVE_PROMPT, num_inference_steps=steps, output_type="latent")
    by_default = pipe(PROMPT, generator=generators(1), **run).images
    explicit = pipe(PROMPT, negative_attention={"scale": 0.8}, generator=generators(1), **run).images
    weaker = pipe(PROMPT, negative_attention={"scale": 0.1}, generator=generators(1), **run).images
    assert_close(by_default, explicit, **TOLERANCE)
    assert not torch.allclose(by_default, weaker, atol=1e-4)

    during = []
    pipe(
        PROMPT,
        negative_attention={"method": "nag", "tau": 1.25},
        generator=generators(1),
        callback_on_step_end=lambda p, i, t, kw: during.extend(cross_attention_processors(p)) or {},
        **run,
    )
    # Another method starts from its own defaults, not from the stored NASA scale.
    assert {(type(p), p.scale, p.tau, p.alpha) for p in during} == {(NAGAttnProcessor, 4.0, 1.25, 0.5)}


@torch.no_grad()
def test_processors_restored_when_the_call_raises(case):
    pipe, steps = case
    original = pipe.unet.attn_processors
    seen = []

    def failing_callback(pipeline, i, t, callback_kwargs):
        seen.extend(cross_attention_processors(pipeline))
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        pipe(PROMPT, negative_prompt=NEGATIVE_PROMPT, num_inference_steps=steps, callback_on_step_end=failing_callback)
    assert seen and all(isinstance(p, NASAAttnProcessor) for p in seen)
    after = pipe.unet.attn_processors
    assert all(after[name] is original[name] for name in original)
    assert not any(isinstance(p, NegativeAttnProcessor) for p in cross_attention_processors(pipe))


@torch.no_grad()
def test_each_prompt_is_steered_by_its_own_negative(case):
    pipe, steps = case
    prompts, negatives = [PROMPT, OTHER_PROMPT], [NEGATIVE_PROMPT, "a white background"]
    run = dict(negative_attention={"scale": 1.0}, num_inference_steps=steps, output_type="latent")
    batched = pipe(prompts, negative_prompt=negatives, num_images_per_prompt=2, generator=generators(4), **run).images
    for i in range(4):
        single = pipe(prompts[i // 2], negative_prompt=negatives[i // 2], generator=generators(1, seed=i), **run)
        assert_close(batched[i], single.images[0], atol=1e-4, rtol=1e-4)
    other = pipe(prompts[1], negative_prompt=negatives[0], generator=generators(1, seed=2), **run).images
    assert not torch.allclose(batched[2], other[0], atol=1e-4)
    # One negative prompt for a list of prompts applies to each of them.
    shared = pipe(prompts, negative_prompt=NEGATIVE_PROMPT, generator=generators(2), **run).images
    assert_close(shared[0], batched[0], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_callback_can_replace_the_negative_embeddings(case):
    pipe, steps = case
    replacement = pipe.encode_prompt("a green cross", "cpu", 1, False)[0]
    seen = []

    def callback(pipeline, i, t, callback_kwargs):
        seen.append(cross_attention_processors(pipeline)[0].negative_encoder_hidden_states)
        return {"negative_prompt_embeds": replacement}

    pipe(
        PROMPT,
        negative_prompt=NEGATIVE_PROMPT,
        num_inference_steps=2,
        output_type="latent",
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["negative_prompt_embeds"],
    )
    assert not torch.equal(seen[0], replacement) and seen[1] is replacement


@torch.no_grad()
def test_load_lora_weights_changes_output_and_its_scale_reaches_the_unet(save_random_lora, case, tmp_path):
    pipe, steps = case
    run = dict(num_inference_steps=steps, output_type="latent")
    base = pipe(PROMPT, generator=generators(1), **run).images
    save_random_lora(pipe, tmp_path)
    pipe.load_lora_weights(tmp_path)
    with_lora = pipe(PROMPT, generator=generators(1), **run).images
    lora_off = pipe(PROMPT, generator=generators(1), cross_attention_kwargs={"scale": 0.0}, **run).images
    assert not torch.allclose(with_lora, base, atol=1e-3)
    assert_close(lora_off, base, **TOLERANCE)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_inference_steps": -2}, "num_inference_steps"),
        ({"num_inference_steps": 1.5}, "num_inference_steps"),
        ({"height": 31}, "height"),
        ({"width": "32"}, "width"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"prompt": None}, "prompt"),
        ({"prompt": ""}, None),  # an empty prompt is a valid prompt
        ({"prompt": ["a", 3]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt_embeds": torch.zeros(1, 77, 8)}, "prompt_embeds"),
        ({"prompt": None, "prompt_embeds": torch.zeros(77, 8)}, "prompt_embeds"),
        ({"prompt": None, "prompt_embeds": torch.full((1, 77, 8), float("nan"))}, "prompt_embeds"),
        ({"negative_prompt": NEGATIVE_PROMPT, "negative_prompt_embeds": torch.zeros(1, 77, 8)}, "negative_prompt"),
        ({"negative_prompt": [NEGATIVE_PROMPT] * 2}, "negative_prompt"),
        ({"negative_prompt": 5}, "negative_prompt"),
        ({"negative_prompt": NEGATIVE_PROMPT, "negative_attention": {"scale": -0.1}}, "negative_attention"),
        ({"negative_prompt": NEGATIVE_PROMPT, "negative_attention": {"method": "pag"}}, "negative_attention"),
        ({"negative_prompt": NEGATIVE_PROMPT, "negative_attention": {"tau": 2.0}}, "negative_attention"),
        ({"negative_attention": {"scale": 0.1}, "guidance_scale": 2.0}, "negative_attention"),
        ({"latents": torch.zeros(1, 4, 8, 8)}, "latents"),
        ({"latents": torch.full((1, 4, 16, 16), float("nan"))}, "latents"),
        ({"num_images_per_prompt": 0}, "num_images_per_prompt"),
        ({"output_type": "jpeg"}, "output_type"),
        ({"guidance_fn": "ppap"}, "guidance_fn"),
        ({"callback_on_step_end_tensor_inputs": ["noise_pred"]}, "callback_on_step_end_tensor_inputs"),
        ({"generator": generators(2)}, "generators"),
    ],
)
def test_bad_input_raises_an_error_naming_the_argument(case, kwargs, argument):
    pipe, steps = case
    call = {"prompt": PROMPT, "num_inference_steps": steps, "output_type": "latent", **kwargs}
    if argument is None:
        assert pipe(**call).images.shape == (1, 4, 16, 16)
        return
    with pytest.raises((ValueError, TypeError), match=re.escape(argument)):
        pipe(**call)
