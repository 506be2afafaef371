"""PPAP: the guidance conversions, the experts (routing, save/load, adapters only), and guidance in real samplers."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import DDIMScheduler
from safetensors.torch import load_file

from fastgen_diffusers import assets
from fastgen_diffusers.guidance import PPAPGuidance
from fastgen_diffusers.guidance.conversions import (
    expert_index,
    guide_epsilon,
    guide_rectified_flow_velocity,
    guide_sample_prediction,
    guide_v_prediction,
    log_snr_edges,
    rectified_flow_log_snr,
    rectified_flow_to_vp_scale,
    rescale_gradient,
    vp_coefficients,
    vp_log_snr,
)
from fastgen_diffusers.guidance.ppap import SD_LOG_SNR_RANGE, noise_point
from fastgen_diffusers.models.ppap import EXPERT_FULLY_TRAINED, PPAPGuideNet
from fastgen_diffusers.pipelines.core import FastDiffusionPipeline
from fastgen_diffusers.schedulers import RectifiedFlowEulerScheduler


SHAPE_LABELS = ["circle", "square", "triangle", "cross"]


def tiny_guide(num_outputs: int = 4) -> PPAPGuideNet:
    torch.manual_seed(0)
    return PPAPGuideNet(num_outputs=num_outputs, block_out_channels=(8, 16), norm_num_groups=4, head_dim=16)


def sd_scheduler(prediction_type: str) -> DDIMScheduler:
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)  # fmt: skip


# ---- conversions: every parameterisation moves the clean-latent guess by the same s sigma^2 / alpha g ----


@pytest.mark.parametrize("log_snr", [-4.0, 0.0, 3.0])
def test_every_parameterisation_moves_x0_by_the_same_amount(log_snr):
    torch.manual_seed(0)
    x0, eps, grad = torch.randn(3, 2, 4, 4, 4).unbind(0)
    scale = 0.7
    alpha, sigma = vp_coefficients(torch.tensor(log_snr))
    x = alpha * x0 + sigma * eps
    expected = x0 + scale * sigma**2 / alpha * grad

    from_eps = (x - sigma * guide_epsilon(eps, grad, sigma, scale)) / alpha
    v = alpha * eps - sigma * x0
    v_guided = guide_v_prediction(v, grad, alpha, sigma, scale)
    from_v = alpha * x - sigma * v_guided
    from_x0 = guide_sample_prediction(x0, grad, alpha, sigma, scale)
    for got in (from_eps, from_v, from_x0):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    # The straight path at the same log-SNR: x_r = c x, gradients scale as g_r = g / c.
    r = torch.sigmoid(torch.tensor(-log_snr / 2))
    c = rectified_flow_to_vp_scale(r)
    x_r = (1 - r) * x0 + r * eps
    torch.testing.assert_close(x_r / c, x, atol=1e-5, rtol=1e-5)
    for direction, sign in (("noise_to_data", 1), ("data_to_noise", -1)):
        u = sign * (x0 - eps)
        u_guided = guide_rectified_flow_velocity(u, grad / c, r, scale, direction)
        torch.testing.assert_close(x_r + r * sign * u_guided, expected, atol=1e-5, rtol=1e-5)


def test_log_snr_axes_agree():
    alpha_bar = torch.tensor([0.9, 0.5, 0.01], dtype=torch.float64)
    alpha, sigma = vp_coefficients(vp_log_snr(alpha_bar))
    torch.testing.assert_close(alpha**2, alpha_bar)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(3, dtype=torch.float64))
    r = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
    torch.testing.assert_close(rectified_flow_log_snr(r), 2 * torch.log((1 - r) / r))
    # SD's scaled-linear schedule spans the default expert range.
    bar = sd_scheduler("epsilon").alphas_cumprod.double()
    assert vp_log_snr(bar[999]).item() == pytest.approx(SD_LOG_SNR_RANGE[0], abs=1e-2)
    assert vp_log_snr(bar[0]).item() == pytest.approx(SD_LOG_SNR_RANGE[1], abs=1e-2)


def test_rescale_gradient_sets_each_samples_rms():
    grad = torch.randn(3, 4, 8, 8) * torch.tensor([0.01, 1.0, 100.0]).reshape(3, 1, 1, 1)
    rms = rescale_gradient(grad, 2.0).flatten(1).pow(2).mean(1).sqrt()
    torch.testing.assert_close(rms, torch.full((3,), 2.0))
    assert torch.equal(rescale_gradient(torch.zeros(1, 4), 1.0), torch.zeros(1, 4))


def test_log_snr_ranges_partition_the_axis():
    edges = log_snr_edges(-5.0, 5.0, 5)
    assert edges == pytest.approx([5.0, 3.0, 1.0, -1.0, -3.0, -5.0])
    assert [expert_index(v, edges) for v in (9.0, 4.0, 0.5, -2.0, -4.9, -math.inf)] == [0, 0, 2, 3, 4, 4]
    with pytest.raises(ValueError, match="num_experts"):
        log_snr_edges(-5.0, 5.0, 0)


def test_noise_point_reads_the_scheduler():
    ddim = sd_scheduler("v_prediction")
    point = noise_point(ddim, torch.tensor(500))
    assert point.kind == "v_prediction" and point.vp_scale == 1.0
    assert point.log_snr == pytest.approx(vp_log_snr(ddim.alphas_cumprod[500].double()).item())
    flow = noise_point(RectifiedFlowEulerScheduler(), torch.tensor(750.0))
    assert flow.kind == "flow" and flow.log_snr == pytest.approx(2 * math.log(0.25 / 0.75))
    assert flow.vp_scale == pytest.approx(math.sqrt(0.25**2 + 0.75**2))
    with pytest.raises(TypeError, match="scheduler"):
        noise_point(object(), 10)


# ---- experts ----


def test_experts_save_load_round_trip_stores_adapters_only(tmp_path):
    guidance = PPAPGuidance.from_guide(tiny_guide(), "classification", SHAPE_LABELS, num_experts=3)
    for name, parameter in guidance.experts.named_parameters():  # make the experts differ from one another
        if parameter.requires_grad or "expert_" in name:
            torch.manual_seed(len(name))
            parameter.data += 0.05 * torch.randn_like(parameter)
    latents = torch.randn(2, 4, 16, 16)
    before = [guidance.predict(latents, log_snr) for log_snr in (6.0, 0.0, -5.0)]
    assert not torch.allclose(before[0], before[2])
    guidance.save_pretrained(tmp_path / "ppap")
    loaded = PPAPGuidance.from_pretrained(tmp_path / "ppap")
    assert loaded.edges == guidance.edges and loaded.labels == SHAPE_LABELS
    for log_snr, expected in zip((6.0, 0.0, -5.0), before):
        torch.testing.assert_close(loaded.predict(latents, log_snr), expected, atol=1e-5, rtol=1e-5)
    # Each expert on disk is its adapter (LoRA, its stem and norms), never the frozen backbone.
    stored = load_file(tmp_path / "ppap" / "experts" / "expert_1" / "adapter_model.safetensors")
    assert sum(t.numel() for t in stored.values()) == guidance.parameter_counts()["per_expert"]
    fully_trained = tuple(f".{name}.{kind}" for name in EXPERT_FULLY_TRAINED for kind in ("weight", "bias"))
    assert all(".lora_" in key or key.endswith(fully_trained) for key in stored)


def test_each_expert_adds_a_small_share_of_the_guide():
    counts = PPAPGuidance.from_guide(PPAPGuideNet(), "classification", SHAPE_LABELS).parameter_counts()
    assert counts["per_expert"] < 0.2 * counts["guide"]  # rank 16 (the original's) on this small guide: 17%


def test_bind_rejects_bad_targets():
    classifier = PPAPGuidance.from_guide(tiny_guide(), "classification", SHAPE_LABELS, num_experts=2)
    with pytest.raises(ValueError, match="class_label"):
        classifier.bind(class_label="hexagon")
    with pytest.raises(ValueError, match="class_label"):
        classifier.bind(target=[0.0, 0.0])
    regressor = PPAPGuidance.from_guide(tiny_guide(2), "regression", ["x", "y"], num_experts=2)
    with pytest.raises(ValueError, match="target"):
        regressor.bind(target=[0.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="grad_rms"):
        regressor.bind(target=[0.0, 0.0], grad_rms=0.0)


# ---- guidance inside the pipeline core, for a DDPM-family scheduler and for rectified flow ----


def guided_pipeline(tiny_sd_components, scheduler) -> FastDiffusionPipeline:
    components = {**tiny_sd_components, "scheduler": scheduler}
    pipe = FastDiffusionPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("scheduler", [sd_scheduler("v_prediction"), sd_scheduler("epsilon"), RectifiedFlowEulerScheduler()],
                         ids=["ddim-v", "ddim-eps", "rectified-flow"])  # fmt: skip
def test_guidance_raises_the_targets_probability(tiny_sd_components, scheduler):
    guidance = PPAPGuidance.from_guide(tiny_guide(), "classification", SHAPE_LABELS, num_experts=3)
    pipe = guided_pipeline(tiny_sd_components, scheduler)
    kwargs = dict(prompt=["a red circle"] * 4, num_inference_steps=6, guidance_scale=1.0, output_type="latent")

    def final_log_probability(guidance_fn):
        latents = pipe(**kwargs, generator=torch.Generator().manual_seed(0), guidance_fn=guidance_fn).images
        with torch.no_grad():
            return torch.log_softmax(guidance.predict(latents, 7.0), dim=1)[:, 2]

    plain = final_log_probability(None)
    torch.testing.assert_close(final_log_probability(guidance.bind(class_label="triangle", scale=0.0)), plain)
    guided = final_log_probability(guidance.bind(class_label="triangle", scale=2.0, grad_rms=0.1))
    assert (guided > plain).all(), (guided, plain)


def test_regression_guidance_moves_the_output_toward_the_target(tiny_sd_components):
    guidance = PPAPGuidance.from_guide(tiny_guide(2), "regression", ["x", "y"], num_experts=2)
    pipe = guided_pipeline(tiny_sd_components, sd_scheduler("v_prediction"))
    target = torch.tensor([3.0, -3.0])
    kwargs = dict(prompt=["a circle"] * 3, num_inference_steps=6, guidance_scale=1.0, output_type="latent")

    def distance(guidance_fn):
        latents = pipe(**kwargs, generator=torch.Generator().manual_seed(0), guidance_fn=guidance_fn).images
        with torch.no_grad():
            return (guidance.predict(latents, 7.0) - target).norm(dim=1)

    assert (distance(guidance.bind(target=target, scale=2.0, grad_rms=0.1)) < distance(None)).all()


# ---- training scripts, end to end on micro settings ----


@pytest.mark.slow
def test_guide_and_expert_training_run_and_resume(tmp_path, tiny_sd_path):
    from test_training_scripts import accelerate_launch

    guide_dir = tmp_path / "guide"
    accelerate_launch("train_ppap_guides.py", "--task", "classification", "--output_dir", str(guide_dir),
                      "--max_train_steps", "2", "--train_batch_size", "4", "--num_train_samples", "16",
                      "--num_eval_samples", "8")  # fmt: skip
    assert json.loads((guide_dir / "guide.json").read_text())["labels"] == SHAPE_LABELS

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red\na small at the top\n")
    out = tmp_path / "experts"
    common = ["--guide_path", str(guide_dir), "--pretrained_model_name_or_path", str(tiny_sd_path),
              "--num_inference_steps", "2", "--prompts_file", str(prompts), "--output_dir", str(out),
              "--num_experts", "2", "--num_generated", "12", "--num_validation_generated", "4", "--shard_size", "6",
              "--generation_batch_size", "6", "--train_batch_size", "4", "--checkpointing_steps", "2"]  # fmt: skip
    accelerate_launch("train_ppap_experts.py", *common, "--max_train_steps", "4")
    first = PPAPGuidance.from_pretrained(out)
    record = json.loads((out / "experts.json").read_text())
    assert [row["expert"] for row in record["experts"]] == [0, 1]
    assert "train_ppap_experts.py" in (out / "README.md").read_text()
    latents = torch.randn(2, 4, 16, 16)
    assert not torch.allclose(first.predict(latents, 6.0), first.predict(latents, -5.0))  # trained apart

    # Resuming from the last checkpoint into a longer run keeps the finished experts and trains on.
    accelerate_launch("train_ppap_experts.py", *common, "--max_train_steps", "6", "--resume_from_checkpoint", "latest")
    assert (out / "checkpoint-6").is_dir()
    PPAPGuidance.from_pretrained(out)


def test_warm_start_copies_the_previous_expert():
    script = __import__("importlib").import_module("test_training_scripts").script_module("train_ppap_experts")
    guidance = PPAPGuidance.from_guide(tiny_guide(), "classification", SHAPE_LABELS, num_experts=2)
    for name, parameter in guidance.experts.named_parameters():
        if "expert_0" in name:
            parameter.data += 0.1
    latents = torch.randn(2, 4, 16, 16)
    assert not torch.allclose(guidance.predict(latents, 6.0), guidance.predict(latents, -5.0))
    script.carry_over(guidance, 0, 1)
    torch.testing.assert_close(guidance.predict(latents, 6.0), guidance.predict(latents, -5.0))


# ---- the shipped asset and the command line ----


def test_shipped_asset_loads_with_adapters_only():
    for name, task in (("classifier", "classification"), ("classifier-single-expert", "classification"),
                       ("regressor", "regression")):  # fmt: skip
        guidance = PPAPGuidance.from_pretrained("shapes-ppap", subfolder=name)
        stored = json.loads((assets.path("shapes-ppap") / name / "ppap_config.json").read_text())
        assert guidance.task == task and stored["default_scale"] > 0
        assert (guidance.default_scale, guidance.default_grad_rms) == (stored["default_scale"], stored["default_grad_rms"])
        counts = guidance.parameter_counts()
        assert counts["per_expert"] < 0.2 * counts["guide"]  # adapters, stem and norms only, not a copy of the guide
        with torch.no_grad():
            assert guidance.predict(torch.randn(2, 4, 16, 16), 0.0).shape == (2, len(guidance.labels))


def test_cli_generates_with_ppap_and_rejects_a_bad_class(tmp_path):
    from fastgen_diffusers.cli import main

    out = tmp_path / "out"
    main(["generate", "--model", "shapes-2rf", "--ppap", "shapes-ppap", "--guide-class", "triangle", "--steps", "2",
          "--prompt", "a red on a white background", "--out", str(out)])  # fmt: skip
    record = json.loads((out / "index.jsonl").read_text().splitlines()[0])
    assert record["guide_class"] == "triangle" and (out / "00000.png").is_file()
    with pytest.raises(SystemExit):
        main(["generate", "--model", "shapes-2rf", "--ppap", "shapes-ppap", "--guide-class", "hexagon",
              "--prompt", "a red", "--out", str(out)])  # fmt: skip
    with pytest.raises(SystemExit):
        main(["generate", "--model", "shapes-2rf", "--guide-class", "triangle", "--prompt", "a red", "--out", str(out)])


def test_cli_eval_ppap_prints_the_guided_table(capsys):
    from fastgen_diffusers.cli import main

    main(["eval", "--model", "shapes-2rf", "--ppap", "shapes-ppap/regressor", "--n", "4", "--steps", "1"])
    printed = capsys.readouterr().out
    assert "| no guidance |" in printed and "| PPAP |" in printed and "centre error (px)" in printed
