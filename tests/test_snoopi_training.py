"""SNOOPI / PG-SB training: the score-distillation maths by hand, and train_snoopi.py end to end on a micro teacher."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler
from safetensors.torch import load_file
from test_training_scripts import accelerate_launch, script_module

from fastgen_diffusers import FastPipeline, OneStepPipeline
from fastgen_diffusers.schedulers import OneStepScheduler
from fastgen_diffusers.shapes.captions import COLOURS
from fastgen_diffusers.training.checkpointing import list_checkpoints
from fastgen_diffusers.training.prompts import draw_negative_prompts, load_prompts
from fastgen_diffusers.training.score_distillation import (
    classifier_free_guidance,
    dmd_gradient,
    fake_score_loss,
    predicted_noise,
    sample_guidance_scales,
    sample_timesteps,
    vsd_gradient,
    vsd_loss,
)
from fastgen_diffusers.training.students import load_student_checkpoint, student_scheduler

SCHEDULER = OneStepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)  # SD's schedule
ALPHAS_CUMPROD = SCHEDULER.alphas_cumprod


def noisy_sample(x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """x_t as training makes it: the student's scheduler, one timestep per sample."""
    return SCHEDULER.add_noise(x0, noise, timesteps)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- guidance ---------------------------------------------------------------------------------------------


def test_guidance_scales_are_uniform_per_sample_in_range():
    kappa = sample_guidance_scales(20_000, 0.5, 4.0, generator=torch.Generator().manual_seed(0))
    assert kappa.shape == (20_000,) and kappa.dtype == torch.float32
    assert 0.5 <= kappa.min() and kappa.max() <= 4.0
    assert kappa.mean().item() == pytest.approx(2.25, abs=0.03)  # (0.5 + 4) / 2
    assert kappa.std().item() == pytest.approx(3.5 / 12**0.5, abs=0.03)  # uniform on a width-3.5 interval
    assert len(kappa.unique()) > 19_000  # one scale per sample, not per batch


def test_equal_bounds_give_fixed_scale_vsd():
    assert torch.equal(sample_guidance_scales(5, 4.5, 4.5), torch.full((5,), 4.5))


@pytest.mark.parametrize("minimum, maximum", [(4.0, 0.5), (-1.0, 2.0)])
def test_bad_guidance_range_is_rejected(minimum, maximum):
    with pytest.raises(ValueError, match="minimum"):
        sample_guidance_scales(2, minimum, maximum)


def test_per_sample_classifier_free_guidance_by_hand():
    unconditional = torch.tensor([1.0, 2.0]).reshape(2, 1, 1, 1).expand(2, 4, 2, 2).to(torch.bfloat16)
    conditional = torch.tensor([3.0, -2.0]).reshape(2, 1, 1, 1).expand(2, 4, 2, 2)
    guided = classifier_free_guidance(unconditional, conditional, torch.tensor([0.5, 4.0]))
    assert guided.dtype == torch.float32
    assert torch.equal(guided[0], torch.full((4, 2, 2), 1 + 0.5 * (3 - 1)))  # 2.0
    assert torch.equal(guided[1], torch.full((4, 2, 2), 2 + 4.0 * (-2 - 2)))  # -14.0


# --- schedule: noise, x0 and epsilon in float32 --------------------------------------------------------------


def test_student_x0_at_the_last_timestep_by_hand():
    noise, model_output = randn(2, 4, 8, 8), randn(2, 4, 8, 8, seed=1)
    a = ALPHAS_CUMPROD[999].double()
    assert a.item() == pytest.approx(0.0047, abs=1e-4)  # SwiftBrush's hard-coded value, read from the schedule
    x0 = SCHEDULER.predict_original_sample(model_output.half(), 999, noise.half())
    assert x0.dtype == torch.float32
    expected = (noise.half().double() - (1 - a).sqrt() * model_output.half().double()) / a.sqrt()
    torch.testing.assert_close(x0.double(), expected, rtol=1e-5, atol=1e-5)


def test_student_scheduler_keeps_the_teachers_schedule_but_not_its_sampler_options():
    teacher = DDIMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction", clip_sample=False)
    student = student_scheduler(teacher.config, None)
    assert student.config.student_timestep == 999
    assert student.config.prediction_type == "v_prediction"
    torch.testing.assert_close(student.alphas_cumprod, teacher.alphas_cumprod)
    assert "clip_sample" not in student.config and "steps_offset" not in student.config


def test_noisy_sample_uses_one_timestep_per_sample_in_float32():
    x0, noise = randn(2, 4, 8, 8).bfloat16(), randn(2, 4, 8, 8, seed=1)
    timesteps = torch.tensor([3, 900])
    noisy = noisy_sample(x0, noise, timesteps)
    assert noisy.dtype == torch.float32
    for i, t in enumerate(timesteps):
        a = ALPHAS_CUMPROD[t]
        torch.testing.assert_close(noisy[i], a.sqrt() * x0[i].float() + (1 - a).sqrt() * noise[i])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_predicted_noise_recovers_the_noise(prediction_type):
    x0, noise = randn(3, 4, 8, 8), randn(3, 4, 8, 8, seed=1)
    timesteps = torch.tensor([10, 500, 990])
    a = ALPHAS_CUMPROD[timesteps].reshape(-1, 1, 1, 1)
    sample = noisy_sample(x0, noise, timesteps)
    model_output = {"epsilon": noise, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * x0, "sample": x0}
    recovered = predicted_noise(model_output[prediction_type], sample, a, prediction_type)
    torch.testing.assert_close(recovered, noise, rtol=1e-3, atol=1e-3)


def test_unknown_prediction_type_is_rejected():
    with pytest.raises(ValueError, match="prediction_type"):
        predicted_noise(randn(1, 4, 2, 2), randn(1, 4, 2, 2), torch.tensor(0.5), "flow")


def test_timesteps_stay_in_swiftbrush_range():
    timesteps = sample_timesteps(50_000, 1000, 0.02, 0.981, generator=torch.Generator().manual_seed(0))
    assert timesteps.min().item() == 20 and timesteps.max().item() == 980  # [20, 981)
    full = sample_timesteps(50_000, 1000, generator=torch.Generator().manual_seed(0))
    assert full.min().item() == 0 and full.max().item() == 999
    with pytest.raises(ValueError, match="min_ratio"):
        sample_timesteps(2, 1000, 0.5, 0.5)


# --- the losses -------------------------------------------------------------------------------------------------


def test_vsd_gradient_is_the_sigma_squared_weighted_noise_difference():
    teacher, fake = randn(2, 4, 8, 8), randn(2, 4, 8, 8, seed=1)
    timesteps = torch.tensor([20, 700])
    gradient = vsd_gradient(teacher.bfloat16(), fake, ALPHAS_CUMPROD, timesteps)
    for i, t in enumerate(timesteps):
        torch.testing.assert_close(gradient[i], (1 - ALPHAS_CUMPROD[t]) * (teacher.bfloat16()[i].float() - fake[i]))
    teacher[0, 0, 0, 0] = float("nan")
    assert torch.isfinite(vsd_gradient(teacher, fake, ALPHAS_CUMPROD, timesteps)).all()


def test_dmd2_gradient_is_the_normalised_x0_difference_in_the_same_direction():
    teacher, fake, student_x0 = randn(2, 4, 8, 8), randn(2, 4, 8, 8, seed=1), randn(2, 4, 8, 8, seed=2)
    timesteps = torch.tensor([50, 950])
    sample = noisy_sample(student_x0, randn(2, 4, 8, 8, seed=3), timesteps)
    gradient = dmd_gradient(teacher, fake, student_x0.requires_grad_(True), sample, ALPHAS_CUMPROD, timesteps)
    assert not gradient.requires_grad
    swiftbrush = vsd_gradient(teacher, fake, ALPHAS_CUMPROD, timesteps)
    for i, t in enumerate(timesteps):
        a = ALPHAS_CUMPROD[t]
        teacher_x0 = (sample[i] - (1 - a).sqrt() * teacher[i]) / a.sqrt()
        fake_x0 = (sample[i] - (1 - a).sqrt() * fake[i]) / a.sqrt()
        normaliser = (student_x0[i] - teacher_x0).abs().mean()
        torch.testing.assert_close(gradient[i], ((fake_x0 - teacher_x0) / normaliser).detach(), rtol=1e-4, atol=1e-4)
        # sigma / alpha in x0 space against SwiftBrush's sigma^2 in epsilon space: same direction.
        scale = ((1 - a).sqrt() / a.sqrt()) / normaliser / (1 - a)
        torch.testing.assert_close(gradient[i], (scale * swiftbrush[i]).detach(), rtol=1e-3, atol=1e-3)


def test_vsd_surrogate_loss_backpropagates_the_weighted_score_difference():
    # A linear "student" x0 = W z: dL/dx0 must be the VSD gradient (over numel), so dL/dW = grad z^T / numel.
    z = randn(6, 3)
    weight = randn(5, 6, seed=1).requires_grad_(True)
    x0 = (weight @ z).reshape(1, 5, 3, 1)
    timesteps = torch.tensor([400])
    gradient = vsd_gradient(randn(1, 5, 3, 1, seed=2), randn(1, 5, 3, 1, seed=3), ALPHAS_CUMPROD, timesteps)
    loss = vsd_loss(x0, gradient)
    loss.backward()
    assert loss.item() == pytest.approx(0.5 * gradient.pow(2).mean().item())
    expected = gradient.reshape(5, 3) @ z.T / gradient.numel()
    torch.testing.assert_close(weight.grad, expected)


def test_fake_score_loss_by_hand():
    noise, model_output = randn(2, 4, 8, 8), randn(2, 4, 8, 8, seed=1)
    sample = randn(2, 4, 8, 8, seed=2)
    timesteps = torch.tensor([100, 900])
    loss = fake_score_loss(model_output, noise, sample, ALPHAS_CUMPROD, timesteps, "epsilon")
    expected = torch.stack([ALPHAS_CUMPROD[t] * (model_output[i] - noise[i]).pow(2) for i, t in enumerate(timesteps)])
    assert loss.item() == pytest.approx(expected.mean().item(), rel=1e-5)
    # A perfect v-prediction denoiser has zero loss: the target is epsilon read back from v.
    x0 = randn(2, 4, 8, 8, seed=3)
    x_t = noisy_sample(x0, noise, timesteps)
    a = ALPHAS_CUMPROD[timesteps].reshape(-1, 1, 1, 1)
    v = a.sqrt() * noise - (1 - a).sqrt() * x0
    assert fake_score_loss(v, noise, x_t, ALPHAS_CUMPROD, timesteps, "v_prediction").item() < 1e-10


# --- train_snoopi.py --------------------------------------------------------------------------------------------


def import_train_snoopi():
    return script_module("train_snoopi")


SHAPESWORLD_PROMPTS = ["--shapesworld_prompts", "32", "--shapesworld_partial_caption_prob", "0.3"]
MICRO_ARGS = ["--train_batch_size", "2", "--fake_lora_rank", "4", "--fake_lora_alpha", "4",
              "--learning_rate", "1e-3", "--ema_decay", "0.9", "--checkpointing_steps", "2", "--validation_steps", "2",
              "--num_validation_images", "2"]  # fmt: skip


def train(teacher: Path, out: Path, steps: int, *args: str, num_processes: int = 1):
    return accelerate_launch(
        "train_snoopi.py", "--pretrained_model_name_or_path", str(teacher), "--output_dir", str(out),
        "--max_train_steps", str(steps), *MICRO_ARGS, *args, num_processes=num_processes,
    )  # fmt: skip


def unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def test_two_processes_resume_exactly_and_export_a_one_step_pipeline(tiny_sd_path, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(tiny_sd_path, straight, 3, *SHAPESWORLD_PROMPTS, num_processes=2)
    assert [p.name for p in list_checkpoints(straight)] == ["checkpoint-2", "checkpoint-3"]
    # A run killed after step 2 left its first command and checkpoint-2; resuming it must give the same run.
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    shutil.copy(straight / "training_commands.txt", resumed)
    result = train(
        tiny_sd_path, resumed, 3, *SHAPESWORLD_PROMPTS, "--resume_from_checkpoint", "latest", num_processes=2
    )
    assert "Resuming from" in result.stderr and "checkpoint-2" in result.stderr
    assert [p.name for p in list_checkpoints(resumed)] == ["checkpoint-2", "checkpoint-3"]
    assert not list(resumed.glob("*.partial"))

    # Bit for bit: student EMA, fake-score LoRA and checkpoints, whether interrupted or not.
    for name in ("student", "fake_score"):
        a, b = (load_file(run / "checkpoint-3" / f"{name}.safetensors") for run in (straight, resumed))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = unet_weights(straight), unet_weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    teacher = unet_weights(tiny_sd_path)
    assert any(not torch.equal(a[k], teacher[k]) for k in a)  # the student moved
    # Checkpoints hold trainable weights only: the fake score is the LoRA, not the frozen teacher.
    assert all("lora" in k for k in load_file(resumed / "checkpoint-3" / "fake_score.safetensors"))
    assert (resumed / "checkpoint-3" / "random_states_1.pkl").is_file()
    assert (straight / "validation" / "step-2.png").is_file()
    # A full-weight checkpoint's raw student rebuilds as a pipeline, every weight from the checkpoint.
    raw_student = load_file(resumed / "checkpoint-3" / "student.safetensors")
    rebuilt = load_student_checkpoint(resumed, "checkpoint-3").unet.state_dict()
    assert raw_student.keys() == rebuilt.keys()
    for key in raw_student:
        torch.testing.assert_close(rebuilt[key], raw_student[key], rtol=1e-6, atol=1e-6)

    pipe = FastPipeline.from_pretrained(resumed)
    assert isinstance(pipe, OneStepPipeline)
    assert pipe.scheduler.config.student_timestep == 999
    assert pipe.config.negative_attention == {"method": "nasa", "scale": pytest.approx(0.1)}
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", negative_prompt="a blue square", generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
    metadata = json.loads((resumed / "fastgen.json").read_text())
    assert metadata == {"method": "snoopi", "default_inference": {"num_inference_steps": 1, "guidance_scale": 1.0}}
    card = (resumed / "README.md").read_text()
    assert card.count("train_snoopi.py") == 2 and "--resume_from_checkpoint latest" in card  # both commands
    assert "U(0.5, 4)" in card


def test_lora_student_loads_as_lora_weights_on_the_teacher(tiny_sd_path, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\na green cross on a white background\n")
    out = tmp_path / "lora"
    negatives = tmp_path / "negatives.txt"
    negatives.write_text("blurry\nlow quality\n")
    # Also the other options: prompts from a file, fixed-scale VSD, two fake updates per step, DMD2's weighting,
    # NASA-T on every step.
    train(tiny_sd_path, out, 2, "--use_lora", "--lora_rank", "4", "--lora_alpha", "8", "--prompts_file", str(prompts),
          "--guidance_scale_min", "3", "--guidance_scale_max", "3", "--fake_updates_per_step", "2",
          "--vsd_weighting", "dmd2", "--nasa_training_prob", "1", "--negative_prompts_file", str(negatives),
          "--ema_decay", "0")  # fmt: skip
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    assert lora and all("lora" in k and k.startswith("unet.") for k in lora)
    card = (out / "README.md").read_text()
    assert "fixed kappa = 3" in card and "DMD2's" in card and "NASA-T on 100% of steps" in card

    latents = randn(1, 4, 16, 16)
    merged = FastPipeline.from_pretrained(out)
    base = OneStepPipeline.from_pretrained(tiny_sd_path)
    before = base("a red circle", latents=latents, output_type="latent").images
    base.load_lora_weights(out)
    with_lora = base("a red circle", latents=latents, output_type="latent").images
    torch.testing.assert_close(with_lora, merged("a red circle", latents=latents, output_type="latent").images)
    assert not torch.allclose(with_lora, before)

    # With EMA decay 0 the export is the last step's raw student, which its checkpoint rebuilds.
    from_checkpoint = load_student_checkpoint(out, "checkpoint-2")
    assert from_checkpoint.scheduler.config.student_timestep == 999
    torch.testing.assert_close(
        from_checkpoint("a red circle", latents=latents, output_type="latent").images, with_lora, atol=1e-4, rtol=1e-4
    )


def test_load_student_checkpoint_names_what_is_missing(tmp_path):
    (tmp_path / "checkpoint-1").mkdir()
    with pytest.raises(ValueError, match="training_args.json"):
        load_student_checkpoint(tmp_path, "checkpoint-1")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--guidance_scale_min", "4", "--guidance_scale_max", "1"], "--guidance_scale_min"),
        (["--min_timestep_ratio", "0.9", "--max_timestep_ratio", "0.1"], "--min_timestep_ratio"),
        (["--fake_learning_rate", "0"], "--fake_learning_rate"),
        (["--fake_prompt_dropout", "1.5"], "--fake_prompt_dropout"),
        (["--nasa_training_prob", "2"], "--nasa_training_prob"),
        (["--nasa_training_max_scale", "-1"], "--nasa_training_max_scale"),
        (["--negative_prompts_file", "missing.txt"], "--negative_prompts_file"),
        (["--nasa_training_prob", "0.5"], "--negative_prompts_file"),  # no default negatives
        (["--negative_prompts_file", "p.txt", "--shapesworld_negative_colours"], "--shapesworld_negative_colours"),
        (["--gradient_accumulation_steps", "2", "--fake_updates_per_step", "2"], "--gradient_accumulation_steps"),
        (["--shapesworld_partial_caption_prob", "2"], "--shapesworld_partial_caption_prob"),
    ],
)
def test_bad_flags_are_rejected_by_name(flags, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("a prompt\n")
    train_snoopi = import_train_snoopi()
    with pytest.raises(ValueError, match=message):
        train_snoopi.parse_args(["--pretrained_model_name_or_path", "x", "--output_dir", "o", "--max_train_steps", "1",
                                 "--shapesworld_prompts", "4", *flags])  # fmt: skip


@pytest.mark.parametrize(
    "sources",
    [
        [],
        ["--prompts_file", "p.txt", "--dataset_name", "d"],
        ["--prompts_file", "p.txt", "--shapesworld_prompts", "4"],
    ],
)
def test_exactly_one_prompt_source(sources, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("a prompt\n")
    train_snoopi = import_train_snoopi()
    with pytest.raises(
        ValueError, match="exactly one of `--prompts_file`, `--dataset_name` or `--shapesworld_prompts`"
    ):
        train_snoopi.parse_args(["--pretrained_model_name_or_path", "x", "--output_dir", "o", "--max_train_steps", "1",
                                 *sources])  # fmt: skip
    with pytest.raises(ValueError, match="--prompts_file"):
        train_snoopi.parse_args(["--pretrained_model_name_or_path", "x", "--output_dir", "o", "--max_train_steps", "1",
                                 "--prompts_file", "missing.txt"])  # fmt: skip


def test_nasa_t_negatives_never_name_a_colour_the_prompt_asks_for():
    prompts = ["a large red circle at the top", "a square", "a small blue cross"] * 20
    drawn = draw_negative_prompts(prompts, list(COLOURS))
    assert all(f" {n} " not in f" {p} " for p, n in zip(prompts, drawn))
    assert len({n for p, n in zip(prompts, drawn) if p == "a square"}) >= 3  # drawn at random, not fixed
    assert set(draw_negative_prompts(prompts, ["blurry"])) == {"blurry"}
    assert draw_negative_prompts(["a red circle"], ["red"]) == ["red"]  # every negative named: any of them


def test_prompts_come_from_captions_only(tmp_path):
    train_snoopi = import_train_snoopi()
    base = ["--pretrained_model_name_or_path", "x", "--output_dir", str(tmp_path), "--max_train_steps", "1"]

    shapes = load_prompts(train_snoopi.parse_args([*base, "--shapesworld_prompts", "40"]))
    assert len(shapes) == 40 and all(isinstance(p, str) for p in shapes)  # ShapesWorld captions, no images drawn

    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps({"prompt": f"p{i}", "n": i}) + "\n" for i in range(3)))
    args = train_snoopi.parse_args([*base, "--dataset_name", str(data), "--caption_column", "prompt"])
    assert load_prompts(args) == ["p0", "p1", "p2"]
    args = train_snoopi.parse_args([*base, "--dataset_name", str(data), "--caption_column", "text"])
    with pytest.raises(ValueError, match="--caption_column"):
        load_prompts(args)


def test_teacher_must_be_a_pipeline_folder(tmp_path):
    train_snoopi = import_train_snoopi()
    args = train_snoopi.parse_args(["--pretrained_model_name_or_path", str(tmp_path), "--output_dir", "o",
                                    "--max_train_steps", "1", "--shapesworld_prompts", "4"])  # fmt: skip
    with pytest.raises(ValueError, match="pretrained_model_name_or_path"):
        train_snoopi.check_teacher(str(tmp_path), args)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "X", "unet": ["diffusers", "UNet"]}))
    with pytest.raises(ValueError, match="lacks"):
        train_snoopi.check_teacher(str(tmp_path), args)


@pytest.mark.slow
def test_regression_on_teacher_pairs_pulls_the_student_toward_the_teachers_latents(tiny_sd_path, tmp_path):
    """DMD's regression stream: with a large weight the student's one-step x0 from a pair's noise moves toward the
    teacher's latent for that noise, more than VSD alone moves it."""
    pairs = tmp_path / "pairs"
    accelerate_launch(
        "generate_reflow_pairs.py", "--pretrained_model_name_or_path", str(tiny_sd_path), "--output_dir", str(pairs),
        "--num_pairs", "4", "--shard_size", "4", "--batch_size", "4", "--num_inference_steps", "2",
        "--guidance_scale", "2", "--shapesworld_prompts", "4",
    )  # fmt: skip
    from fastgen_diffusers.training.reflow import load_pairs

    rows = load_pairs(pairs, cache_dir=str(tmp_path / "cache")).with_format("torch")[:]

    def pair_error(folder: Path) -> float:
        pipe = FastPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        latents = pipe(rows["prompt"], latents=rows["noise"], output_type="latent").images
        return (latents.float() - rows["latent"].float()).pow(2).mean().item()

    errors = {}
    for weight in ("0", "100"):
        out = tmp_path / f"weight-{weight}"
        train(tiny_sd_path, out, 2, *SHAPESWORLD_PROMPTS, "--regression_pairs_dir", str(pairs),
              "--regression_weight", weight, "--ema_decay", "0")  # fmt: skip
        errors[weight] = pair_error(out)
    assert errors["100"] < errors["0"], errors


def test_bad_regression_flags_are_rejected_by_name(tmp_path):
    module = import_train_snoopi()
    base = ["--pretrained_model_name_or_path", "x", "--output_dir", str(tmp_path / "o"), "--max_train_steps", "1",
            *SHAPESWORLD_PROMPTS]  # fmt: skip
    with pytest.raises(ValueError, match="--regression_pairs_dir"):
        module.parse_args([*base, "--regression_pairs_dir", str(tmp_path / "missing")])
    with pytest.raises(ValueError, match="--regression_weight"):
        module.parse_args([*base, "--regression_pairs_dir", str(tmp_path), "--regression_weight", "-1"])
