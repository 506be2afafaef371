"""InstaFlowPipeline and RectifiedFlowEulerScheduler on tiny SD components: InstaFlow's sampler, computed by hand.

Negative prompts at guidance_scale <= 1 go through NASA / NAG steered cross-attention; the expected outputs are the
hand-written Euler steps with the UNet evaluated inside `negative_attention(...)`.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, StableDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor2_0
from torch.testing import assert_close

from fastgen_diffusers.attention import (
    NAGAttnProcessor,
    NASAAttnProcessor,
    NegativeAttnProcessor,
    cross_attention_modules,
    negative_attention,
)
from fastgen_diffusers.pipelines import FastPipeline
from fastgen_diffusers.pipelines.instaflow import InstaFlowPipeline
from fastgen_diffusers.schedulers import RectifiedFlowEulerScheduler


PROMPT = "a small red circle at the top left on a black background"
NEGATIVE_PROMPT = "a large blue square"


@pytest.fixture
def pipe(tiny_sd_components) -> InstaFlowPipeline:
    pipe = InstaFlowPipeline(**{**tiny_sd_components, "scheduler": RectifiedFlowEulerScheduler()})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def noise(batch_size: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch_size, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


def embed(pipe, prompt: str) -> torch.Tensor:
    ids = pipe.tokenizer(
        prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return pipe.text_encoder(ids)[0]


def velocity(unet, latents: torch.Tensor, t: float, embeds: torch.Tensor) -> torch.Tensor:
    """InstaFlow's UNet call: float time t, one per sample (`torch.ones((B,)) * t` in the original)."""
    return unet(latents, torch.ones(latents.shape[0]) * t, encoder_hidden_states=embeds).sample


def steered_velocity(unet, latents, t, embeds, negative_embeds, scale, method="nasa", **processor_kwargs):
    """The UNet's velocity with its cross-attention steered away from `negative_embeds` (NASA or NAG)."""
    with negative_attention(unet, negative_embeds, scale, method=method, **processor_kwargs):
        return velocity(unet, latents, t, embeds)


def cross_attention_processors(pipe) -> list:
    return [layer.processor for layer in cross_attention_modules(pipe.unet)]


def assert_same_processor_objects(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    assert all(after[name] is before[name] for name in before)


def record_unet_calls(unet) -> list[tuple[int, torch.Tensor]]:
    """(batch size, timestep) of every UNet call."""
    calls = []
    unet.register_forward_pre_hook(
        lambda module, args: calls.append((args[0].shape[0], float(torch.as_tensor(args[1]).reshape(-1)[0])))
    )
    return calls


@torch.no_grad()
def test_one_step_is_noise_plus_velocity_at_t1000(pipe):
    z = noise()
    calls = record_unet_calls(pipe.unet)

    latents = pipe(PROMPT, latents=z, output_type="latent").images

    assert [t for _, t in calls] == [1000.0]
    calls.clear()
    assert_close(latents, z + velocity(pipe.unet, z, 1000.0, embed(pipe, PROMPT)))


@torch.no_grad()
def test_four_steps_follow_instaflow_grid_and_euler_loop(pipe):
    z = noise()
    calls = record_unet_calls(pipe.unet)
    seen = []

    def callback(pipeline, i, t, callback_kwargs):
        seen.append((i, t.item()))
        return {}

    latents = pipe(
        PROMPT, num_inference_steps=4, latents=z, output_type="latent", callback_on_step_end=callback
    ).images

    assert [t for _, t in calls] == [1000.0, 750.0, 500.0, 250.0]
    assert seen == [(0, 1000.0), (1, 750.0), (2, 500.0), (3, 250.0)]
    calls.clear()
    embeds, expected = embed(pipe, PROMPT), z
    for i in range(4):
        expected = expected + 0.25 * velocity(pipe.unet, expected, (1 - i / 4) * 1000, embeds)
    assert_close(latents, expected)


@torch.no_grad()
def test_timesteps_and_sigmas_override_the_grid(pipe):
    z = noise()
    by_sigmas = pipe(PROMPT, sigmas=[1.0, 0.6], latents=z, output_type="latent").images
    by_timesteps = pipe(PROMPT, timesteps=[1000, 600], latents=z, output_type="latent").images

    embeds = embed(pipe, PROMPT)
    expected = z + 0.4 * velocity(pipe.unet, z, 1000.0, embeds)
    expected = expected + 0.6 * velocity(pipe.unet, expected, 600.0, embeds)
    assert_close(by_sigmas, expected)
    assert_close(by_timesteps, expected)


@torch.no_grad()
def test_classifier_free_guidance_combines_negative_and_text_velocities(pipe):
    z = noise()
    calls = record_unet_calls(pipe.unet)

    during = []
    guided = pipe(
        PROMPT,
        negative_prompt=NEGATIVE_PROMPT,
        guidance_scale=3.0,
        latents=z,
        output_type="latent",
        callback_on_step_end=lambda p, i, t, kw: during.extend(cross_attention_processors(p)) or {},
    ).images
    pipe(PROMPT, guidance_scale=1.0, latents=z, output_type="latent")

    # Above 1 the negative prompt is the CFG branch: no steered cross-attention.
    assert during and not any(isinstance(p, NegativeAttnProcessor) for p in during)

    # CFG doubles the UNet batch at guidance_scale > 1 only.
    assert [batch for batch, _ in calls] == [2, 1]
    calls.clear()
    v_negative = velocity(pipe.unet, z, 1000.0, embed(pipe, NEGATIVE_PROMPT))
    v_text = velocity(pipe.unet, z, 1000.0, embed(pipe, PROMPT))
    assert_close(guided, z + v_negative + 3.0 * (v_text - v_negative))


@torch.no_grad()
def test_save_pretrained_round_trip_gives_identical_images(pipe, tmp_path):
    pipe.scheduler = RectifiedFlowEulerScheduler(velocity_direction="data_to_noise")
    pipe.save_pretrained(tmp_path)

    loaded = InstaFlowPipeline.from_pretrained(tmp_path)
    through_front_door = FastPipeline.from_pretrained(tmp_path)

    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == "InstaFlowPipeline"
    assert type(through_front_door) is InstaFlowPipeline
    assert loaded.scheduler.config.velocity_direction == "data_to_noise"
    z = noise()
    expected = pipe(PROMPT, num_inference_steps=2, latents=z, output_type="np").images
    for reloaded in (loaded, through_front_door):
        reloaded.set_progress_bar_config(disable=True)
        images = reloaded(PROMPT, num_inference_steps=2, latents=z, output_type="np").images
        np.testing.assert_allclose(images, expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_published_checkpoint_layout_loads_through_fast_pipeline(tiny_sd_components, tmp_path):
    # The XCLIU/* checkpoints: an SD folder whose model_index.json says RectifiedFlowPipeline, with a
    # DPMSolverMultistepScheduler in scheduler/ that the original sampler never steps.
    components = {**tiny_sd_components, "scheduler": DPMSolverMultistepScheduler()}
    sd = StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    sd.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    index["_class_name"] = "RectifiedFlowPipeline"
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    assert index["scheduler"] == ["diffusers", "DPMSolverMultistepScheduler"]
    assert index["safety_checker"] == [None, None]

    pipe = FastPipeline.from_pretrained(tmp_path)
    pipe.set_progress_bar_config(disable=True)

    assert type(pipe) is InstaFlowPipeline
    assert type(pipe.scheduler) is RectifiedFlowEulerScheduler
    assert pipe.scheduler.config.velocity_direction == "noise_to_data"
    # A folder without a stored negative-attention setting gets NASA at SNOOPI's SD1.5 alpha.
    assert pipe.config.negative_attention == {"method": "nasa", "scale": 0.1}
    z = noise()
    v = velocity(components["unet"], z, 1000.0, embed(pipe, PROMPT))
    assert_close(pipe(PROMPT, latents=z, output_type="latent").images, z + v)
    assert pipe(PROMPT, output_type="np").images.shape == (1, 32, 32, 3)
    # `scheduler=` chooses other conventions for such a folder.
    sd3_style = FastPipeline.from_pretrained(
        tmp_path, scheduler=RectifiedFlowEulerScheduler(velocity_direction="data_to_noise")
    )
    sd3_style.set_progress_bar_config(disable=True)
    assert_close(sd3_style(PROMPT, latents=z, output_type="latent").images, z - v)


@torch.no_grad()
def test_from_pipe_shares_components_and_swaps_in_rectified_flow_scheduler(tiny_sd_components):
    sd = StableDiffusionPipeline(
        **tiny_sd_components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe = InstaFlowPipeline.from_pipe(sd)

    assert pipe.unet is sd.unet and pipe.vae is sd.vae and pipe.text_encoder is sd.text_encoder
    assert type(pipe.scheduler) is RectifiedFlowEulerScheduler
    assert type(sd.scheduler).__name__ == "DDIMScheduler"


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"height": 31}, "height"),
        ({"prompt_embeds": torch.zeros(1, 24, 8)}, "prompt_embeds"),
        ({"prompt": None}, "prompt"),
        ({"callback_on_step_end_tensor_inputs": ["noise_pred"]}, "callback_on_step_end_tensor_inputs"),
        ({"output_type": "jpeg"}, "output_type"),
        ({"negative_prompt": NEGATIVE_PROMPT, "negative_prompt_embeds": torch.zeros(1, 77, 8)}, "negative_prompt"),
        ({"timesteps": [1000], "sigmas": [1.0]}, "sigmas"),
        ({"sigmas": [0.5, 1.0]}, "sigmas"),
        ({"timesteps": [1000, 0]}, "timesteps"),
        ({"latents": torch.zeros(1, 4, 8, 8)}, "latents"),
        ({"num_images_per_prompt": 0}, "num_images_per_prompt"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(pipe, kwargs, argument):
    with pytest.raises(ValueError, match=re.escape(f"`{argument}`")):
        pipe(**{"prompt": PROMPT, **kwargs})


# --- negative prompts at guidance_scale <= 1: NASA / NAG steered cross-attention ------------------------------------


@torch.no_grad()
def test_negative_prompt_without_guidance_steers_cross_attention_with_nasa(pipe):
    z = noise()
    plain = pipe(PROMPT, latents=z, output_type="latent").images
    original = pipe.unet.attn_processors
    calls = record_unet_calls(pipe.unet)
    during = []

    steered = pipe(
        PROMPT,
        negative_prompt=NEGATIVE_PROMPT,
        negative_attention={"scale": 2.0},
        latents=z,
        output_type="latent",
        callback_on_step_end=lambda p, i, t, kw: during.append(p.unet.attn_processors) or {},
    ).images

    # One UNet evaluation of batch 1, as without a negative prompt; the output is the NASA-steered velocity.
    assert [batch for batch, _ in calls] == [1]
    calls.clear()
    assert not torch.allclose(steered, plain, atol=1e-4)
    expected = z + steered_velocity(pipe.unet, z, 1000.0, embed(pipe, PROMPT), embed(pipe, NEGATIVE_PROMPT), 2.0)
    assert_close(steered, expected)
    # During the call: one NASA processor on every cross-attention layer, self-attention untouched.
    (installed,) = during
    cross = {name for name in installed if "attn2" in name}
    assert cross and all(type(installed[name]) is NASAAttnProcessor for name in cross)
    assert len({id(installed[name]) for name in cross}) == 1 and installed[next(iter(cross))].scale == 2.0
    assert all(installed[name] is original[name] for name in original if name not in cross)
    # After the call: the very same processor objects as before.
    assert_same_processor_objects(original, pipe.unet.attn_processors)
    assert_close(pipe(PROMPT, latents=z, output_type="latent").images, plain)


@torch.no_grad()
def test_nag_method_uses_its_default_scale_and_the_given_tau_and_alpha(pipe):
    z = noise()
    original = pipe.unet.attn_processors
    during = []

    steered = pipe(
        PROMPT,
        negative_prompt=NEGATIVE_PROMPT,
        negative_attention={"method": "nag", "tau": 1.25, "alpha": 0.75},
        latents=z,
        output_type="latent",
        callback_on_step_end=lambda p, i, t, kw: during.extend(cross_attention_processors(p)) or {},
    ).images

    assert during and all(type(p) is NAGAttnProcessor for p in during)
    assert {(p.scale, p.tau, p.alpha) for p in during} == {(4.0, 1.25, 0.75)}
    embeds, negative_embeds = embed(pipe, PROMPT), embed(pipe, NEGATIVE_PROMPT)
    nag = steered_velocity(pipe.unet, z, 1000.0, embeds, negative_embeds, 4.0, method="nag", tau=1.25, alpha=0.75)
    assert_close(steered, z + nag)
    nasa = steered_velocity(pipe.unet, z, 1000.0, embeds, negative_embeds, 4.0)
    assert not torch.allclose(steered, z + nasa, atol=1e-4)
    assert_same_processor_objects(original, pipe.unet.attn_processors)


@torch.no_grad()
def test_nasa_keeps_custom_processors_of_other_layers_and_restores_its_own(pipe):
    class CountingProcessor(AttnProcessor2_0):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def __call__(self, *args, **kwargs):
            self.calls += 1
            return super().__call__(*args, **kwargs)

    self_attention, cross_attention = CountingProcessor(), CountingProcessor()
    pipe.unet.set_attn_processor(
        {name: cross_attention if "attn2" in name else self_attention for name in pipe.unet.attn_processors}
    )
    original = pipe.unet.attn_processors
    z = noise()

    steered = pipe(
        PROMPT, negative_prompt=NEGATIVE_PROMPT, negative_attention={"scale": 1.0}, latents=z, output_type="latent"
    ).images

    # Self-attention ran through its custom processor; cross-attention through NASA, not the custom one.
    assert self_attention.calls > 0 and cross_attention.calls == 0
    assert_same_processor_objects(original, pipe.unet.attn_processors)
    pipe(PROMPT, latents=z, output_type="latent")
    assert cross_attention.calls > 0  # back in place for the next call
    expected = z + steered_velocity(pipe.unet, z, 1000.0, embed(pipe, PROMPT), embed(pipe, NEGATIVE_PROMPT), 1.0)
    assert_close(steered, expected)


@torch.no_grad()
def test_nasa_with_lora_weights(save_random_lora, pipe, tmp_path):
    z = noise()
    base_steered = pipe(
        PROMPT, negative_prompt=NEGATIVE_PROMPT, negative_attention={"scale": 1.0}, latents=z, output_type="latent"
    ).images
    lora_unet = save_random_lora(pipe, tmp_path)
    pipe.load_lora_weights(tmp_path)
    with_lora = pipe(PROMPT, latents=z, output_type="latent").images
    original = pipe.unet.attn_processors

    steered = pipe(
        PROMPT, negative_prompt=NEGATIVE_PROMPT, negative_attention={"scale": 1.0}, latents=z, output_type="latent"
    ).images
    lora_off = pipe(
        PROMPT,
        negative_prompt=NEGATIVE_PROMPT,
        negative_attention={"scale": 1.0},
        latents=z,
        output_type="latent",
        cross_attention_kwargs={"scale": 0.0},
    ).images

    # NASA runs through the LoRA-adapted projections (its negative keys/values included) ...
    embeds, negative_embeds = embed(pipe, PROMPT), embed(pipe, NEGATIVE_PROMPT)
    assert_close(steered, z + steered_velocity(lora_unet, z, 1000.0, embeds, negative_embeds, 1.0))
    assert not torch.allclose(steered, base_steered, atol=1e-3)
    assert not torch.allclose(steered, with_lora, atol=1e-4)
    # ... the LoRA scale still reaches the UNet under NASA ...
    assert_close(lora_off, base_steered)
    # ... and the LoRA pipeline is unchanged after the steered calls.
    assert_same_processor_objects(original, pipe.unet.attn_processors)
    assert_close(pipe(PROMPT, latents=z, output_type="latent").images, with_lora)


def test_scheduler_grid_and_config_round_trip(tmp_path):
    scheduler = RectifiedFlowEulerScheduler(velocity_direction="data_to_noise")
    scheduler.save_pretrained(tmp_path)
    reloaded = RectifiedFlowEulerScheduler.from_pretrained(tmp_path)

    assert reloaded.config.velocity_direction == "data_to_noise" and reloaded.config.num_train_timesteps == 1000
    assert RectifiedFlowEulerScheduler.from_config(scheduler.config).config.velocity_direction == "data_to_noise"
    assert reloaded.timesteps.tolist() == [1000.0]
    reloaded.set_timesteps(4)
    assert reloaded.timesteps.tolist() == [1000.0, 750.0, 500.0, 250.0]
    assert reloaded.sigmas.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    with pytest.raises(ValueError, match="`velocity_direction`"):
        RectifiedFlowEulerScheduler(velocity_direction="forward")


def test_shift_front_loads_the_uniform_grid_and_only_it(tmp_path):
    RectifiedFlowEulerScheduler(shift=3.0).save_pretrained(tmp_path)
    shifted = RectifiedFlowEulerScheduler.from_pretrained(tmp_path)
    assert shifted.config.shift == 3.0 and shifted.timesteps.tolist() == [1000.0]  # one step: pure noise at any shift
    shifted.set_timesteps(4)
    torch.testing.assert_close(shifted.sigmas, torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]))  # 3s / (1 + 2s)
    reference = FlowMatchEulerDiscreteScheduler(shift=3.0)  # Diffusers' shift of the same uniform sigmas
    reference.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25])
    torch.testing.assert_close(shifted.sigmas, reference.sigmas)
    shifted.set_timesteps(sigmas=[1.0, 0.6])  # an explicit grid is used as given
    assert shifted.sigmas.tolist() == pytest.approx([1.0, 0.6, 0.0])
    with pytest.raises(ValueError, match="`shift`"):
        RectifiedFlowEulerScheduler(shift=0.0)


def test_velocity_conventions_give_the_same_trajectory():
    """InstaFlow (v = data - noise), SD3 and PeRFlow (v = noise - data) sample one flow when the sign is configured."""

    def instaflow_velocity(x, t):  # any smooth field of (x, t) will do
        return torch.sin(3 * x) * t / 1000 - 0.5 * x

    def sample(scheduler, model_sign, **grid):
        scheduler.set_timesteps(**grid)
        x, seen = noise(2), []
        for t in scheduler.timesteps:
            seen.append(float(t))
            x = scheduler.step(model_sign * instaflow_velocity(x, t), t, x).prev_sample
        return x, seen

    expected, grid = noise(2), [1000.0, 750.0, 500.0, 250.0]
    for t in grid:
        expected = expected + 0.25 * instaflow_velocity(expected, torch.tensor(t))

    trajectories = {
        "instaflow": sample(RectifiedFlowEulerScheduler(), +1, num_inference_steps=4),
        "sd3": sample(RectifiedFlowEulerScheduler(velocity_direction="data_to_noise"), -1, num_inference_steps=4),
        # PeRFlow's own scheduler gives integer UNet times, int64 [1000, 750, 500, 250] for 4 steps.
        "perflow": sample(
            RectifiedFlowEulerScheduler(velocity_direction="data_to_noise"),
            -1,
            timesteps=torch.tensor([1000, 750, 500, 250]),
        ),
        "flow_match": sample(FlowMatchEulerDiscreteScheduler(shift=1.0), -1, sigmas=[1 - i / 4 for i in range(4)]),
    }
    for name, (x, seen) in trajectories.items():
        assert seen == grid, name
        assert_close(x, expected, msg=name)


def test_one_step_prediction_of_the_data_is_the_step_itself():
    scheduler = RectifiedFlowEulerScheduler()
    x, v = noise(), noise(seed=1)
    output = scheduler.step(v, 1000.0, x)

    assert_close(output.prev_sample, x + v)
    assert_close(output.pred_original_sample, x + v)
    scheduler.set_timesteps(2)
    assert_close(scheduler.step(v, 500.0, x).pred_original_sample, x + 0.5 * v)
    with pytest.raises(ValueError, match="`step` was called past the end"):
        scheduler.step(v, 500.0, x)
    scheduler.set_timesteps(2)
    with pytest.raises(ValueError, match="`timestep`"):
        scheduler.step(v, 999.0, x)
