"""OneStepPipeline: x0 at the student timestep, few-step re-noising, NASA/NAG negative prompts, CFG, I/O."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from fastgen_diffusers.attention import NASAAttnProcessor, cross_attention_modules
from fastgen_diffusers.pipelines import FastPipeline
from fastgen_diffusers.pipelines.one_step import OneStepPipeline
from fastgen_diffusers.schedulers import OneStepScheduler


PROMPT = "a small red triangle at the top left on a black background"
NEGATIVE = "a blue square"
LATENT_SHAPE = (1, 4, 16, 16)


def make_pipe(components: dict, **scheduler_config) -> OneStepPipeline:
    scheduler = OneStepScheduler.from_config(components["scheduler"].config, **scheduler_config)
    pipe = OneStepPipeline(**{**components, "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def pipe(tiny_sd_components) -> OneStepPipeline:
    return make_pipe(tiny_sd_components)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def noise(shape=LATENT_SHAPE, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=generator(seed))


def embed(pipe: OneStepPipeline, prompt: str | list[str]) -> torch.Tensor:
    with torch.no_grad():
        return pipe.encode_prompt(prompt, "cpu", 1, False)[0]


def unet_output(pipe: OneStepPipeline, latents: torch.Tensor, t: int, embeds: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return pipe.unet(latents, t, encoder_hidden_states=embeds).sample.double()


def cross_attention_processors(pipe: OneStepPipeline) -> list:
    return [layer.processor for layer in cross_attention_modules(pipe.unet)]


# --- the student's x0 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_x0_formula_by_hand(pipe, prediction_type):
    pipe.scheduler = OneStepScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type)
    latents = noise()
    x0 = pipe(PROMPT, latents=latents, output_type="latent").images

    alpha_prod = float(pipe.scheduler.alphas_cumprod[999])
    assert abs(alpha_prod - 0.0047) < 1e-4  # SD's scaled-linear schedule at t = 999
    out = unet_output(pipe, latents, 999, embed(pipe, PROMPT))
    z = latents.double()
    expected = {
        "epsilon": (z - (1 - alpha_prod) ** 0.5 * out) / alpha_prod**0.5,
        "v_prediction": alpha_prod**0.5 * z - (1 - alpha_prod) ** 0.5 * out,
        "sample": out,
    }[prediction_type]
    torch.testing.assert_close(x0.double(), expected, rtol=1e-4, atol=1e-4)


def test_student_timestep_from_config_is_the_unet_timestep(tiny_sd_components):
    pipe = make_pipe(tiny_sd_components, student_timestep=399)
    latents = noise()
    x0 = pipe(PROMPT, latents=latents, output_type="latent").images
    alpha_prod = float(pipe.scheduler.alphas_cumprod[399])
    out = unet_output(pipe, latents, 399, embed(pipe, PROMPT))
    expected = (latents.double() - (1 - alpha_prod) ** 0.5 * out) / alpha_prod**0.5
    torch.testing.assert_close(x0.double(), expected, rtol=1e-4, atol=1e-4)


def test_few_step_sampling_renoises_with_fresh_noise(pipe):
    x0 = pipe(PROMPT, num_inference_steps=2, generator=generator(7), output_type="latent").images

    gen = generator(7)
    latents = randn_tensor(LATENT_SHAPE, generator=gen, dtype=torch.float32)
    embeds = embed(pipe, PROMPT)
    a999, a499 = (float(pipe.scheduler.alphas_cumprod[t]) for t in (999, 499))
    first = (latents.double() - (1 - a999) ** 0.5 * unet_output(pipe, latents, 999, embeds)) / a999**0.5
    fresh = randn_tensor(LATENT_SHAPE, generator=gen, dtype=torch.float32).double()
    renoised = (a499**0.5 * first + (1 - a499) ** 0.5 * fresh).float()
    expected = (renoised.double() - (1 - a499) ** 0.5 * unet_output(pipe, renoised, 499, embeds)) / a499**0.5
    torch.testing.assert_close(x0.double(), expected, rtol=1e-4, atol=1e-4)


# --- determinism, outputs, batching -------------------------------------------------------------------


# --- saving, loading, dispatch ------------------------------------------------------------------------


def test_save_load_round_trip(tiny_sd_components, tmp_path):
    pipe = make_pipe(tiny_sd_components, student_timestep=749)
    pipe.register_to_config(negative_attention={"method": "nasa", "scale": 0.3})
    before = pipe(PROMPT, negative_prompt=NEGATIVE, generator=generator(), output_type="np").images
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "OneStepPipeline"
    assert index["scheduler"] == ["fastgen_diffusers.schedulers.scheduling_one_step", "OneStepScheduler"]
    assert index["negative_attention"] == {"method": "nasa", "scale": 0.3}

    loaded = OneStepPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.scheduler.config.student_timestep == 749 and loaded.config.negative_attention["scale"] == 0.3
    after = loaded(PROMPT, negative_prompt=NEGATIVE, generator=generator(), output_type="np").images
    np.testing.assert_allclose(after, before, atol=1e-6)

    dispatched = FastPipeline.from_pretrained(tmp_path)
    assert type(dispatched) is OneStepPipeline and dispatched.scheduler.config.student_timestep == 749


def test_loads_a_stable_diffusion_layout(tiny_sd_path):
    """One-step students are often published as StableDiffusionPipeline folders (SwiftBrush)."""
    pipe = OneStepPipeline.from_pretrained(tiny_sd_path)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.safety_checker is None
    # The saved DDIMScheduler becomes the student's scheduler, with the same schedule and parameterisation.
    assert type(pipe.scheduler) is OneStepScheduler and pipe.scheduler.config.student_timestep == 999
    assert pipe.scheduler.timesteps.tolist() == [999]
    assert pipe(PROMPT, generator=generator(), output_type="np").images.shape == (1, 32, 32, 3)


# --- negative prompts: NASA / NAG and CFG -------------------------------------------------------------


def test_cfg_path_by_hand(pipe):
    latents = noise()
    during = []
    x0 = pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        guidance_scale=3.0,
        latents=latents,
        output_type="latent",
        callback_on_step_end=lambda p, i, t, kw: during.extend(cross_attention_processors(p)) or {},
    ).images
    assert not any(isinstance(p, NASAAttnProcessor) for p in during)  # CFG, not steering

    uncond = unet_output(pipe, latents, 999, embed(pipe, NEGATIVE))
    cond = unet_output(pipe, latents, 999, embed(pipe, PROMPT))
    eps = uncond + 3.0 * (cond - uncond)
    alpha_prod = float(pipe.scheduler.alphas_cumprod[999])
    expected = (latents.double() - (1 - alpha_prod) ** 0.5 * eps) / alpha_prod**0.5
    torch.testing.assert_close(x0.double(), expected, rtol=1e-4, atol=1e-4)


# --- input validation and the scheduler ----------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [{"timesteps": [499, 999]}, {"timesteps": [1000]}, {"timesteps": []}, {"timesteps": [999.5]}],
)
def test_bad_timesteps_raise_a_value_error_naming_them(pipe, kwargs):
    with pytest.raises(ValueError, match="`timesteps`"):
        pipe(PROMPT, **kwargs)


def test_scheduler_without_alphas_cumprod_is_rejected(tiny_sd_components):
    tiny_sd_components["scheduler"] = FlowMatchEulerDiscreteScheduler()
    with pytest.raises(ValueError, match="scheduler"):
        OneStepPipeline(**tiny_sd_components)


def test_scheduler_spacing_config_round_trip_and_errors(tmp_path):
    scheduler = OneStepScheduler(prediction_type="v_prediction", student_timestep=999)
    assert [scheduler.set_timesteps(n) or scheduler.timesteps.tolist() for n in (1, 2, 4)] == [
        [999],
        [999, 499],
        [999, 749, 499, 249],
    ]
    scheduler.save_pretrained(tmp_path)
    reloaded = OneStepScheduler.from_pretrained(tmp_path)
    assert reloaded.config.prediction_type == "v_prediction" and reloaded.init_noise_sigma == 1.0
    ddim = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    torch.testing.assert_close(OneStepScheduler.from_config(ddim.config).alphas_cumprod, ddim.alphas_cumprod)
    zero_snr = DDIMScheduler.from_config(ddim.config, rescale_betas_zero_snr=True)
    converted = OneStepScheduler.from_config(zero_snr.config)
    torch.testing.assert_close(converted.alphas_cumprod, zero_snr.alphas_cumprod)
    assert converted.alphas_cumprod[-1] < 1e-6
    for bad in ({"prediction_type": "flow"}, {"student_timestep": 1000}):
        with pytest.raises(ValueError, match=f"`{next(iter(bad))}`"):
            OneStepScheduler(**bad)
    with pytest.raises(ValueError, match="`num_inference_steps`"):
        scheduler.set_timesteps(0)


def test_scheduler_noising_and_x0_take_one_timestep_per_sample():
    """The training maths: x0 read back from an exact v on a noised sample, each sample at its own timestep."""
    scheduler = OneStepScheduler(prediction_type="v_prediction")
    x0, eps = noise((3, 4, 16, 16)), noise((3, 4, 16, 16), seed=1)
    t = torch.tensor([999, 500, 10])
    x_t = scheduler.add_noise(x0, eps, t)
    a = scheduler.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    torch.testing.assert_close(x_t, a.sqrt() * x0 + (1 - a).sqrt() * eps)
    torch.testing.assert_close(scheduler.predict_original_sample(v, t, x_t), x0, atol=1e-5, rtol=1e-5)
