"""OneStepPipeline: x0 at the student timestep, few-step re-noising, NASA/NAG negative prompts, CFG, I/O."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from fastgen_diffusers.attention import NAGAttnProcessor, NASAAttnProcessor, cross_attention_modules
from fastgen_diffusers.pipelines import FastPipeline
from fastgen_diffusers.pipelines.one_step import OneStepPipeline


PROMPT = "a small red triangle at the top left on a black background"
NEGATIVE = "a blue square"
LATENT_SHAPE = (1, 4, 16, 16)


def make_pipe(components: dict, **config) -> OneStepPipeline:
    pipe = OneStepPipeline(**components, **config)
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
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type)
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
    x0 = pipe(PROMPT, timesteps=[999, 499], generator=generator(7), output_type="latent").images

    gen = generator(7)
    latents = randn_tensor(LATENT_SHAPE, generator=gen, dtype=torch.float32)
    embeds = embed(pipe, PROMPT)
    a999, a499 = (float(pipe.scheduler.alphas_cumprod[t]) for t in (999, 499))
    first = (latents.double() - (1 - a999) ** 0.5 * unet_output(pipe, latents, 999, embeds)) / a999**0.5
    fresh = randn_tensor(LATENT_SHAPE, generator=gen, dtype=torch.float32).double()
    renoised = (a499**0.5 * first + (1 - a499) ** 0.5 * fresh).float()
    expected = (renoised.double() - (1 - a499) ** 0.5 * unet_output(pipe, renoised, 499, embeds)) / a499**0.5
    torch.testing.assert_close(x0.double(), expected, rtol=1e-4, atol=1e-4)


def test_callback_sees_every_step_and_can_edit_latents(pipe):
    seen = []

    def callback(pipeline, step, timestep, callback_kwargs):
        seen.append((step, timestep, callback_kwargs["latents"].shape))
        return {"latents": torch.zeros_like(callback_kwargs["latents"])}

    x0 = pipe(
        PROMPT, timesteps=[999, 749, 499], generator=generator(), output_type="latent", callback_on_step_end=callback
    ).images
    assert seen == [(0, 999, LATENT_SHAPE), (1, 749, LATENT_SHAPE), (2, 499, LATENT_SHAPE)]
    assert torch.equal(x0, torch.zeros(LATENT_SHAPE))
    assert pipe.num_timesteps == 3


# --- determinism, outputs, batching -------------------------------------------------------------------


def test_determinism(pipe):
    first = pipe(PROMPT, generator=generator(0), output_type="np").images
    again = pipe(PROMPT, generator=generator(0), output_type="np").images
    other = pipe(PROMPT, generator=generator(1), output_type="np").images
    assert np.array_equal(first, again)
    assert not np.allclose(first, other)


def test_output_types(pipe):
    images = {kind: pipe(PROMPT, generator=generator(), output_type=kind).images for kind in ("pil", "np", "pt")}
    latent = pipe(PROMPT, generator=generator(), output_type="latent").images
    assert isinstance(images["pil"][0], PIL.Image.Image) and images["pil"][0].size == (32, 32)
    assert images["np"].shape == (1, 32, 32, 3) and 0 <= images["np"].min() and images["np"].max() <= 1
    assert images["pt"].shape == (1, 3, 32, 32)
    assert latent.shape == LATENT_SHAPE
    np.testing.assert_allclose(images["pt"].permute(0, 2, 3, 1).numpy(), images["np"], atol=1e-6)
    np.testing.assert_array_equal(np.asarray(images["pil"][0]), (images["np"][0] * 255).round().astype(np.uint8))

    as_tuple = pipe(PROMPT, generator=generator(), output_type="np", return_dict=False)
    assert isinstance(as_tuple, tuple) and as_tuple[1] is None
    assert np.array_equal(as_tuple[0], images["np"])


def test_num_images_per_prompt(pipe):
    images = pipe([PROMPT, NEGATIVE], num_images_per_prompt=3, generator=generator(), output_type="np").images
    assert images.shape == (6, 32, 32, 3)
    assert not np.allclose(images[0], images[1])  # each image gets its own noise

    generators = [generator(seed) for seed in range(6)]
    images = pipe([PROMPT, NEGATIVE], num_images_per_prompt=3, generator=generators, output_type="np").images
    alone = pipe(NEGATIVE, generator=generator(4), output_type="np").images
    np.testing.assert_allclose(images[4], alone[0], atol=1e-5)


# --- saving, loading, dispatch ------------------------------------------------------------------------


def test_save_load_round_trip(tiny_sd_components, tmp_path):
    pipe = make_pipe(tiny_sd_components, student_timestep=749, default_nasa_scale=0.3)
    before = pipe(PROMPT, negative_prompt=NEGATIVE, generator=generator(), output_type="np").images
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "OneStepPipeline"
    assert index["student_timestep"] == 749 and index["default_nasa_scale"] == 0.3

    loaded = OneStepPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.student_timestep == 749 and loaded.config.default_nasa_scale == 0.3
    after = loaded(PROMPT, negative_prompt=NEGATIVE, generator=generator(), output_type="np").images
    np.testing.assert_allclose(after, before, atol=1e-6)

    dispatched = FastPipeline.from_pretrained(tmp_path)
    assert type(dispatched) is OneStepPipeline and dispatched.config.student_timestep == 749


def test_loads_a_stable_diffusion_layout(tiny_sd_path):
    """One-step students are often published as StableDiffusionPipeline folders (SwiftBrush)."""
    pipe = OneStepPipeline.from_pretrained(tiny_sd_path, student_timestep=999)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.safety_checker is None
    assert pipe(PROMPT, generator=generator(), output_type="np").images.shape == (1, 32, 32, 3)


# --- negative prompts: NASA / NAG and CFG -------------------------------------------------------------


@pytest.mark.parametrize("method", ["nasa", "nag"])
def test_nasa_scale_zero_equals_no_negative_prompt(pipe, method):
    plain = pipe(PROMPT, generator=generator(), output_type="np").images
    off = pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        nasa_scale=0.0,
        negative_attention_method=method,
        generator=generator(),
        output_type="np",
    ).images
    assert np.array_equal(off, plain)


@pytest.mark.parametrize("method, processor_class", [("nasa", NASAAttnProcessor), ("nag", NAGAttnProcessor)])
def test_negative_attention_steers_during_the_call_and_restores(pipe, method, processor_class):
    original = pipe.unet.attn_processors
    during = []

    def callback(pipeline, step, timestep, callback_kwargs):
        during.extend(cross_attention_processors(pipeline))
        return {}

    plain = pipe(PROMPT, generator=generator(), output_type="np").images
    steered = pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        nasa_scale=2.0,
        negative_attention_method=method,
        generator=generator(),
        output_type="np",
        callback_on_step_end=callback,
    ).images
    assert not np.allclose(steered, plain)
    assert during and all(type(processor) is processor_class for processor in during)
    assert all(processor.scale == 2.0 for processor in during)
    after = pipe.unet.attn_processors
    assert all(after[name] is original[name] for name in original)


def test_negative_attention_kwargs_reach_the_processor(pipe):
    during = []
    pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        negative_attention_method="nag",
        negative_attention_kwargs={"tau": 1.25, "alpha": 0.75},
        generator=generator(),
        callback_on_step_end=lambda p, i, t, kw: during.extend(cross_attention_processors(p)) or {},
    )
    assert {(p.scale, p.tau, p.alpha) for p in during} == {(pipe.config.default_nag_scale, 1.25, 0.75)}


def test_default_nasa_scale_comes_from_the_config(tiny_sd_components):
    pipe = make_pipe(tiny_sd_components, default_nasa_scale=0.8)
    by_default = pipe(PROMPT, negative_prompt=NEGATIVE, generator=generator(), output_type="np").images
    explicit = pipe(PROMPT, negative_prompt=NEGATIVE, nasa_scale=0.8, generator=generator(), output_type="np").images
    weaker = pipe(PROMPT, negative_prompt=NEGATIVE, nasa_scale=0.1, generator=generator(), output_type="np").images
    assert np.array_equal(by_default, explicit)
    assert not np.allclose(by_default, weaker)


def test_processors_restored_when_the_call_raises(pipe):
    original = pipe.unet.attn_processors

    def failing_callback(pipeline, step, timestep, callback_kwargs):
        assert all(isinstance(p, NASAAttnProcessor) for p in cross_attention_processors(pipeline))
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        pipe(PROMPT, negative_prompt=NEGATIVE, nasa_scale=1.0, callback_on_step_end=failing_callback)
    after = pipe.unet.attn_processors
    assert all(after[name] is original[name] for name in original)


def test_callback_can_replace_the_negative_embeddings(pipe):
    replacement = embed(pipe, "a green cross")
    seen = []

    def callback(pipeline, step, timestep, callback_kwargs):
        seen.append(cross_attention_processors(pipeline)[0].negative_encoder_hidden_states)
        return {"negative_prompt_embeds": replacement}

    pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        timesteps=[999, 499],
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["negative_prompt_embeds"],
    )
    assert not torch.equal(seen[0], replacement)
    assert seen[1] is replacement


def test_nasa_pairs_each_prompt_with_its_negative(pipe):
    prompts, negatives = [PROMPT, "a large green circle"], [NEGATIVE, "a white background"]
    latents = noise((4, 4, 16, 16))
    batched = pipe(
        prompts, negative_prompt=negatives, nasa_scale=1.0, num_images_per_prompt=2, latents=latents, output_type="np"
    ).images
    for i in range(4):
        single = pipe(
            prompts[i // 2],
            negative_prompt=negatives[i // 2],
            nasa_scale=1.0,
            latents=latents[i : i + 1],
            output_type="np",
        ).images
        np.testing.assert_allclose(batched[i], single[0], atol=1e-4)


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


# --- input validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"height": 31}, "height"),
        ({"timesteps": [499, 999]}, "timesteps"),
        ({"timesteps": [1000]}, "timesteps"),
        ({"timesteps": []}, "timesteps"),
        ({"nasa_scale": -0.1}, "nasa_scale"),
        ({"nasa_scale": 0.1, "guidance_scale": 2.0}, "nasa_scale"),
        ({"negative_attention_method": "pag"}, "negative_attention_method"),
        ({"output_type": "jpeg"}, "output_type"),
        ({"prompt_embeds": torch.zeros(1, 24, 8)}, "prompt_embeds"),
        ({"prompt": None}, "prompt"),
        ({"negative_prompt_embeds": torch.zeros(1, 24, 8)}, "negative_prompt_embeds"),
        ({"latents": torch.zeros(1, 4, 8, 8)}, "latents"),
        ({"callback_on_step_end_tensor_inputs": ["noise"]}, "callback_on_step_end_tensor_inputs"),
        ({"generator": [generator(0), generator(1)]}, "generators"),
    ],
)
def test_bad_inputs_raise_value_errors_naming_the_argument(pipe, kwargs, argument):
    call = {"prompt": PROMPT, "negative_prompt": NEGATIVE, **kwargs}
    with pytest.raises(ValueError, match=argument):
        pipe(**call)


def test_scheduler_without_alphas_cumprod_is_rejected(tiny_sd_components):
    tiny_sd_components["scheduler"] = FlowMatchEulerDiscreteScheduler()
    with pytest.raises(ValueError, match="scheduler"):
        OneStepPipeline(**tiny_sd_components)
