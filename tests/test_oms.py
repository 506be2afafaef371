"""One More Step: the OMS network, OMSPipeline in front of Stable Diffusion and one-step pipelines, and its errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    StableDiffusionPipeline,
)
from diffusers.utils.torch_utils import randn_tensor

from fastgen_diffusers import FastPipeline
from fastgen_diffusers.models.oms import OMS_TIMESTEP, OMSModel
from fastgen_diffusers.pipelines.instaflow import InstaFlowPipeline
from fastgen_diffusers.pipelines.oms import OMSPipeline, first_latent, oms_generator, remove_spatial_mean
from fastgen_diffusers.pipelines.one_step import OneStepPipeline
from fastgen_diffusers.schedulers import OneStepScheduler, RectifiedFlowEulerScheduler


PROMPT = "a small red triangle at the top left on a black background"
SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SHAPE = (1, 4, 16, 16)


def make_oms_model(in_channels: int = 4, cross_attention_dim: int = 8) -> OMSModel:
    torch.manual_seed(1)
    return OMSModel(
        sample_size=16,
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(4, 8),
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=2,
        norm_num_groups=2,
    )


def sd_pipe(components: dict, scheduler=None) -> StableDiffusionPipeline:
    components = {**components, "scheduler": scheduler or components["scheduler"]}
    pipe = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def one_step_pipe(components: dict) -> OneStepPipeline:
    pipe = OneStepPipeline(**{**components, "scheduler": OneStepScheduler(**SD_SCHEDULE, prediction_type="v_prediction")})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def oms_pipe(base, **kwargs) -> OMSPipeline:
    pipe = OMSPipeline(oms_model=make_oms_model(), base_pipeline=base, vae_scaling_factor=base.vae.config.scaling_factor, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sd_alphas_cumprod() -> torch.Tensor:
    """Stable Diffusion's alpha_bar by hand: betas linear in sqrt from 0.00085 to 0.012 over 1000 steps."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


class Recorder:
    """Forward hooks that keep every input sample and output of a module."""

    def __init__(self, module: torch.nn.Module):
        self.inputs, self.outputs, self.batch_sizes = [], [], []
        module.register_forward_hook(self.hook)

    def hook(self, module, args, output):
        self.inputs.append(args[0].detach().clone())
        self.batch_sizes.append(args[0].shape[0])
        self.outputs.append((output[0] if isinstance(output, tuple) else output.sample).detach().clone())


# --- the network ----------------------------------------------------------------------------------------


def test_oms_model_round_trips_and_takes_no_timestep(tmp_path):
    model = make_oms_model().eval()
    noise, embeds = torch.randn(SHAPE, generator=generator()), torch.randn(1, 5, 8, generator=generator(1))
    with torch.no_grad():
        before = model(noise, embeds).sample
        # it is the UNet at the fixed timestep
        assert torch.allclose(before, super(OMSModel, model).forward(noise, OMS_TIMESTEP, embeds).sample, atol=1e-6)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = OMSModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(noise, embeds).sample, before, atol=1e-5)
    with pytest.raises(TypeError, match="timestep"):
        model(noise, embeds, timestep=10)


# --- the first latent -----------------------------------------------------------------------------------


def test_first_latent_formula():
    x0, z = torch.full(SHAPE, 2.0), torch.full(SHAPE, -1.0)
    latent = first_latent(x0, z, alpha_prod_t=0.04, model_input_scale=0.5, init_noise_sigma=4.0)
    expected = (0.2 * 2.0 + 0.96**0.5 * -1.0) / (0.5 * 4.0)  # std sqrt(1 - a), not the variance
    assert torch.allclose(latent, torch.full(SHAPE, expected), atol=1e-6)


@pytest.mark.parametrize(
    "scheduler, first_timestep",
    [
        (DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1), 801),
        (EulerDiscreteScheduler(**SD_SCHEDULE, steps_offset=1, timestep_spacing="leading"), 801),
        (EulerDiscreteScheduler(**SD_SCHEDULE, timestep_spacing="trailing"), 999),
    ],
    ids=["ddim", "euler-leading", "euler-trailing"],
)
@torch.no_grad()
def test_base_unet_first_reads_x_t_from_the_oms_prediction(tiny_sd_components, scheduler, first_timestep):
    """The base UNet's first input (after init_noise_sigma and scale_model_input) is sqrt(a) x0 + sqrt(1 - a) z."""
    base = sd_pipe(tiny_sd_components, scheduler)
    pipe = oms_pipe(base)
    oms_calls, unet_calls = Recorder(pipe.oms_model), Recorder(base.unet)
    pipe(PROMPT, num_inference_steps=5, guidance_scale=1.0, generator=generator(3), output_type="latent")

    alpha_bar = sd_alphas_cumprod()[first_timestep].item()
    x0 = -oms_calls.outputs[0].double()
    z = torch.randn(SHAPE, generator=generator(3)).double()  # the noise the base would have drawn itself
    expected = alpha_bar**0.5 * x0 + (1 - alpha_bar) ** 0.5 * z
    assert torch.allclose(unet_calls.inputs[0].double(), expected, atol=1e-4)
    # the module read unit-variance noise, whatever the base's init_noise_sigma
    assert 0.7 < oms_calls.inputs[0].std().item() < 1.3


def test_remove_spatial_mean_centres_each_channel_and_keeps_unit_variance():
    noise = torch.randn(4000, 2, 4, 4, generator=generator(1))
    centred = remove_spatial_mean(noise)
    assert centred.shape == noise.shape
    assert centred.mean(dim=(-2, -1)).abs().max().item() < 1e-5
    assert abs(centred.var().item() - 1.0) < 0.02  # the rescaling restores the variance the mean took away
    with pytest.raises(ValueError, match="at least 2 latent positions"):
        remove_spatial_mean(torch.randn(1, 4, 1, 1))


@torch.no_grad()
def test_noise_mean_removed_leaves_the_first_latent_mean_to_oms(tiny_sd_components):
    """With `remove_noise_mean`, x_T = sqrt(a) x0 + sqrt(1 - a) z' where z' is z without its per-channel mean."""
    scheduler = DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    base = sd_pipe(tiny_sd_components, scheduler)
    pipe = oms_pipe(base)
    oms_calls, unet_calls = Recorder(pipe.oms_model), Recorder(base.unet)
    pipe(PROMPT, num_inference_steps=5, guidance_scale=1.0, remove_noise_mean=True, generator=generator(3),
         output_type="latent")  # fmt: skip
    alpha_bar = sd_alphas_cumprod()[801].item()
    x0 = -oms_calls.outputs[0].double()
    z = remove_spatial_mean(torch.randn(SHAPE, generator=generator(3)).double())
    expected = alpha_bar**0.5 * x0 + (1 - alpha_bar) ** 0.5 * z
    assert torch.allclose(unet_calls.inputs[0].double(), expected, atol=1e-4)
    noise_part = unet_calls.inputs[0].double() - alpha_bar**0.5 * x0
    assert noise_part.mean(dim=(-2, -1)).abs().max().item() < 1e-4
    with pytest.raises(TypeError, match="remove_noise_mean"):
        pipe(PROMPT, num_inference_steps=2, remove_noise_mean="yes")


@torch.no_grad()
def test_oms_off_equals_the_base_pipeline(tiny_sd_components):
    base = sd_pipe(tiny_sd_components)
    pipe = oms_pipe(base)
    without = pipe(PROMPT, oms=False, num_inference_steps=3, generator=generator(), output_type="np").images
    alone = base(PROMPT, num_inference_steps=3, generator=generator(), output_type="np").images
    np.testing.assert_allclose(without, alone, atol=1e-6)
    with_oms = pipe(PROMPT, num_inference_steps=3, generator=generator(), output_type="np").images
    assert np.abs(with_oms - alone).max() > 1e-4


@torch.no_grad()
def test_base_random_stream_is_the_same_with_and_without_oms(tiny_sd_components):
    """OMS's own noise comes from a generator derived from the base's without drawing from it."""
    ddpm_like = DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    base = sd_pipe(tiny_sd_components, ddpm_like)
    pipe = oms_pipe(base)
    with_oms, without = generator(5), generator(5)
    pipe(PROMPT, num_inference_steps=3, eta=1.0, generator=with_oms, output_type="latent")  # eta draws noise per step
    base(PROMPT, num_inference_steps=3, eta=1.0, generator=without, output_type="latent")
    assert torch.equal(with_oms.get_state(), without.get_state())

    g = generator(7)
    state = g.get_state()
    first, second = oms_generator(g), oms_generator(g)
    assert torch.equal(g.get_state(), state)
    assert torch.equal(torch.randn(4, generator=first), torch.randn(4, generator=second))
    assert not torch.equal(torch.randn(4, generator=oms_generator(g)), torch.randn(4, generator=generator(7)))


# --- in front of two pipeline classes ---------------------------------------------------------------------


@pytest.mark.parametrize("base_kind", ["stable-diffusion", "one-step"])
@torch.no_grad()
def test_works_in_front_of_two_pipeline_classes(tiny_sd_components, base_kind):
    base = sd_pipe(tiny_sd_components) if base_kind == "stable-diffusion" else one_step_pipe(tiny_sd_components)
    pipe = oms_pipe(base)
    oms_calls, unet_calls = Recorder(pipe.oms_model), Recorder(base.unet)
    images = pipe([PROMPT, "a blue circle"], num_images_per_prompt=2, guidance_scale=1.0, output_type="np",
                  generator=[generator(i) for i in range(4)]).images
    assert images.shape == (4, 32, 32, 3) and np.isfinite(images).all()
    if base_kind == "one-step":  # one UNet call at the student timestep 999, from the OMS latent
        alpha_bar = sd_alphas_cumprod()[999].item()
        z = torch.stack([torch.randn(SHAPE[1:], generator=generator(i)) for i in range(4)]).double()
        expected = alpha_bar**0.5 * -oms_calls.outputs[0].double() + (1 - alpha_bar) ** 0.5 * z
        assert len(unet_calls.inputs) == 1
        assert torch.allclose(unet_calls.inputs[0].double(), expected, atol=1e-4)


@torch.no_grad()
def test_guidance_is_skipped_at_scale_one_and_negative_prompt_and_embeds_work(tiny_sd_components):
    base = sd_pipe(tiny_sd_components)
    pipe = oms_pipe(base)
    calls = Recorder(pipe.oms_model)
    kwargs = dict(num_inference_steps=2, guidance_scale=1.0, output_type="latent")
    pipe(PROMPT, num_images_per_prompt=3, generator=generator(), **kwargs)
    pipe(PROMPT, num_images_per_prompt=3, oms_guidance_scale=2.0, generator=generator(), **kwargs)
    assert calls.batch_sizes == [3, 6]

    plain = pipe(PROMPT, oms_guidance_scale=3.0, generator=generator(), **kwargs).images
    negative = pipe(PROMPT, oms_guidance_scale=3.0, oms_negative_prompt="a blue square", generator=generator(), **kwargs).images
    assert (plain - negative).abs().max() > 1e-4

    # prompt_embeds: the module reuses the base's embeddings (it reads the base's text encoder)
    embeds = base.encode_prompt(PROMPT, "cpu", 1, False)[0]
    from_embeds = pipe(prompt_embeds=embeds, num_images_per_prompt=2, generator=[generator(), generator(1)], **kwargs).images
    from_text = pipe(PROMPT, num_images_per_prompt=2, generator=[generator(), generator(1)], **kwargs).images
    assert torch.allclose(from_embeds, from_text, atol=1e-5)

    # an OMS prompt changes only what the module reads
    controlled = pipe(PROMPT, oms_prompt="a white background", generator=generator(), **kwargs).images
    assert (controlled - plain).abs().max() > 1e-4


# --- saving, loading, FastPipeline ---------------------------------------------------------------------------


@torch.no_grad()
def test_stored_default_guidance_is_used_and_saved(tiny_sd_components, tmp_path):
    base = sd_pipe(tiny_sd_components)
    pipe = oms_pipe(base, default_oms_guidance_scale=3.0)
    kwargs = dict(num_inference_steps=2, output_type="latent")
    by_default = pipe(PROMPT, generator=generator(), **kwargs).images
    np.testing.assert_allclose(by_default, pipe(PROMPT, oms_guidance_scale=3.0, generator=generator(), **kwargs).images)
    assert not np.allclose(by_default, pipe(PROMPT, oms_guidance_scale=1.0, generator=generator(), **kwargs).images)
    pipe.save_pretrained(tmp_path)
    loaded = OMSPipeline.from_pretrained(tmp_path, base_pipeline=base)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.default_oms_guidance_scale == 3.0
    np.testing.assert_allclose(loaded(PROMPT, generator=generator(), **kwargs).images, by_default, atol=1e-5)


@torch.no_grad()
def test_stored_noise_mean_choice_is_used_and_saved(tiny_sd_components, tmp_path):
    base = sd_pipe(tiny_sd_components)
    pipe = oms_pipe(base, default_remove_noise_mean=True)
    kwargs = dict(num_inference_steps=2, output_type="latent")
    by_default = pipe(PROMPT, generator=generator(), **kwargs).images
    np.testing.assert_allclose(by_default, pipe(PROMPT, remove_noise_mean=True, generator=generator(), **kwargs).images)
    assert not np.allclose(by_default, pipe(PROMPT, remove_noise_mean=False, generator=generator(), **kwargs).images)
    pipe.save_pretrained(tmp_path)
    loaded = OMSPipeline.from_pretrained(tmp_path, base_pipeline=base)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.default_remove_noise_mean is True
    np.testing.assert_allclose(loaded(PROMPT, generator=generator(), **kwargs).images, by_default, atol=1e-5)


@pytest.mark.parametrize("own_text_encoder", [False, True])
@torch.no_grad()
def test_save_and_load_round_trip(tiny_sd_components, tmp_path, own_text_encoder):
    base = sd_pipe(tiny_sd_components)
    extra = {"oms_text_encoder": base.text_encoder, "oms_tokenizer": base.tokenizer} if own_text_encoder else {}
    pipe = oms_pipe(base, **extra)
    kwargs = dict(num_inference_steps=2, oms_guidance_scale=1.5, output_type="latent")
    before = pipe(PROMPT, generator=generator(), **kwargs).images
    pipe.save_pretrained(tmp_path)

    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "OMSPipeline"
    assert index["oms_model"] == ["fastgen_diffusers.models.oms", "OMSModel"]
    assert (tmp_path / "oms_text_encoder").is_dir() == own_text_encoder
    assert not (tmp_path / "unet").exists()  # the base is not part of the module

    loaded = OMSPipeline.from_pretrained(tmp_path, base_pipeline=base)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.vae_scaling_factor == pytest.approx(base.vae.config.scaling_factor)
    assert torch.allclose(loaded(PROMPT, generator=generator(), **kwargs).images, before, atol=1e-5)


@torch.no_grad()
def test_fast_pipeline_builds_it(tiny_sd_path, tmp_path):
    base = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    oms_pipe(base).save_pretrained(tmp_path / "oms")
    pipe = FastPipeline.from_pretrained(tiny_sd_path, oms=tmp_path / "oms")
    assert isinstance(pipe, OMSPipeline) and isinstance(pipe.base_pipeline, StableDiffusionPipeline)
    pipe.set_progress_bar_config(disable=True)
    assert pipe(PROMPT, num_inference_steps=2, output_type="np").images.shape == (1, 32, 32, 3)


# --- errors ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", [RectifiedFlowEulerScheduler(), FlowMatchEulerDiscreteScheduler()])
def test_rectified_flow_base_is_refused(tiny_sd_components, scheduler):
    if isinstance(scheduler, RectifiedFlowEulerScheduler):
        base = InstaFlowPipeline(**{**tiny_sd_components, "scheduler": scheduler})
    else:
        base = sd_pipe(tiny_sd_components, scheduler)
    with pytest.raises(ValueError, match="pure noise by construction"):
        oms_pipe(base)


def test_latent_space_mismatch_names_both(tiny_sd_components):
    base = sd_pipe(tiny_sd_components)
    with pytest.raises(ValueError, match=r"8-channel latents .* 4-channel UNet"):
        OMSPipeline(oms_model=make_oms_model(in_channels=8), base_pipeline=base)
    with pytest.raises(ValueError, match=r"scaled by 0\.5.*scaling_factor 0\.18215"):
        OMSPipeline(oms_model=make_oms_model(), base_pipeline=base, vae_scaling_factor=0.5)
    with pytest.raises(ValueError, match="16-wide text embeddings but the base's text encoder gives 8"):
        OMSPipeline(oms_model=make_oms_model(cross_attention_dim=16), base_pipeline=base)


def test_bad_call_arguments(tiny_sd_components):
    pipe = oms_pipe(sd_pipe(tiny_sd_components))
    with pytest.raises(ValueError, match="oms_guidance_scale"):
        pipe(PROMPT, oms_guidance_scale=-1.0)
    with pytest.raises(ValueError, match="`oms_prompt` has 2 entries but there are 1 prompts"):
        pipe(PROMPT, oms_prompt=["a", "b"])
    with pytest.raises(ValueError, match="no `base_pipeline`"):
        OMSPipeline(oms_model=make_oms_model())(PROMPT)


# --- the shipped module -----------------------------------------------------------------------------------------


@torch.no_grad()
def test_shipped_module_serves_the_shapesworld_bases_and_reads_the_background():
    teacher = FastPipeline.from_pretrained("shapes-teacher", oms="shapes-oms")
    assert isinstance(teacher, OMSPipeline)
    assert sum(p.numel() for p in teacher.oms_model.parameters()) < sum(p.numel() for p in teacher.base_pipeline.unet.parameters())
    snoopi = FastPipeline.from_pretrained("shapes-snoopi", oms="shapes-oms")
    assert isinstance(snoopi.base_pipeline, OneStepPipeline)
    with pytest.raises(ValueError, match="pure noise by construction"):
        FastPipeline.from_pretrained("shapes-instaflow", oms="shapes-oms")

    # its x0 for a black and a white background, decoded: dark and bright
    prompts = ["a large red circle at the center on a black background", "a large red circle at the center on a white background"]
    embeds = snoopi.encode_oms_prompt(prompts, "cpu", 1)
    x0 = -snoopi.oms_model(torch.randn(2, 4, 16, 16, generator=generator()), embeds).sample
    base = snoopi.base_pipeline
    images = base.vae.decode(x0 / base.vae.config.scaling_factor).sample
    black, white = ((images.clamp(-1, 1) + 1) * 127.5)[:, :, 0, 0].mean(dim=1).tolist()  # corner pixel: background
    assert black < 40 and white > 215

    # its stored defaults, and the OMS prompt steering a background the base prompt leaves open, one grey level apart
    assert snoopi.config.default_remove_noise_mean is True and snoopi.config.default_oms_guidance_scale == 2.0
    corners = {}
    for level in ("dark gray", "light gray"):
        images = snoopi(["a small red circle at the center"] * 8, oms_prompt=f"a small red circle at the center on a {level} background",
                        generator=[generator(seed) for seed in range(8)], output_type="np").images  # fmt: skip
        corners[level] = images[:, :3, :3].mean(axis=(1, 2, 3))
    assert (corners["dark gray"] < corners["light gray"]).all()


# --- the command line ----------------------------------------------------------------------------------------------


def test_cli_generate_with_oms_and_oms_prompt(tiny_sd_path, tmp_path, capsys):
    from fastgen_diffusers.cli import main

    base = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    oms_pipe(base).save_pretrained(tmp_path / "oms")
    out = tmp_path / "out"
    main(["generate", "--model", str(tiny_sd_path), "--oms", str(tmp_path / "oms"), "--oms-prompt", "a white background",
          "--oms-guidance-scale", "2", "--prompt", "a red circle", "--steps", "2", "--num-images", "2", "--out", str(out)])  # fmt: skip
    records = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["oms_prompt"] == "a white background" for r in records)
    main(["generate", "--model", str(tiny_sd_path), "--oms", str(tmp_path / "oms"), "--oms-noise-mean", "remove",
          "--prompt", "a red circle", "--steps", "2", "--out", str(tmp_path / "out-centred")])  # fmt: skip
    records = [json.loads(line) for line in (tmp_path / "out-centred" / "index.jsonl").read_text().splitlines()]
    assert records[0]["remove_noise_mean"] is True

    with pytest.raises(SystemExit):
        main(["generate", "--model", str(tiny_sd_path), "--oms-prompt", "x", "--prompt", "x", "--out", str(out)])
    assert "need --oms" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(tiny_sd_path), "--oms-noise-mean", "keep", "--prompt", "x", "--out", str(out)])
    assert "need --oms" in capsys.readouterr().err
