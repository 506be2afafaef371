"""InstaFlow training: the reflow maths, the pairs store, and the two scripts end to end under `accelerate launch`."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file
from test_training_scripts import accelerate_launch, script_module

from fastgen_diffusers import FastPipeline, InstaFlowPipeline, RectifiedFlowEulerScheduler
from fastgen_diffusers.training.checkpointing import list_checkpoints
from fastgen_diffusers.training.prompts import cycle_with_empty_prompts
from fastgen_diffusers.training.reflow import (
    PAIRS_CONFIG_FILE,
    check_pairs_config,
    complete_shards,
    default_huber_c,
    l2_loss,
    latent_loss,
    load_lpips,
    load_pairs,
    one_step_sample,
    pseudo_huber_loss,
    sample_noise_levels,
    shard_indices,
    shard_path,
    write_pair_shard,
)

PAIRS_ARGS = ["--num_pairs", "10", "--shard_size", "4", "--batch_size", "3", "--num_inference_steps", "2",
              "--guidance_scale", "2.0", "--shapesworld_prompts", "10"]  # fmt: skip
TRAIN_ARGS = ["--train_batch_size", "2", "--validation_steps", "100", "--num_validation_images", "2"]


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """`accelerate_launch` with a private datasets cache for this module's runs."""
    cache = tmp_path_factory.mktemp("datasets-cache")

    def run(script: str, *args: str, num_processes: int = 1):
        return accelerate_launch(script, *args, num_processes=num_processes, env={"HF_DATASETS_CACHE": str(cache)})

    return run


def read_pairs(pairs_dir: Path, cache_dir: Path) -> dict:
    return load_pairs(pairs_dir, cache_dir=str(cache_dir)).with_format("torch")[:]


# ----------------------------------------------------------------------------- the maths


def test_straight_path_endpoints_and_target():
    """The scheduler's path and target velocity, in InstaFlow's flow time tau = 1 - timestep / 1000."""
    scheduler = RectifiedFlowEulerScheduler()
    x0, x1 = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    torch.testing.assert_close(scheduler.scale_noise(x1, torch.full((3,), 1000.0), x0), x0)
    torch.testing.assert_close(scheduler.scale_noise(x1, torch.zeros(3), x0), x1)
    tau = torch.tensor([0.0, 0.25, 1.0])
    midway = scheduler.scale_noise(x1, (1 - tau) * 1000, x0)
    torch.testing.assert_close(midway[1], 0.25 * x1[1] + 0.75 * x0[1])
    # The target is the path's constant velocity: one Euler step over the rest of the path lands on x1.
    target = scheduler.get_velocity(x1, x0)
    torch.testing.assert_close(midway + (1 - tau).reshape(-1, 1, 1, 1) * target, x1)
    torch.testing.assert_close(one_step_sample(x0, target), x1)
    reversed_direction = RectifiedFlowEulerScheduler(velocity_direction="data_to_noise")
    torch.testing.assert_close(reversed_direction.get_velocity(x1, x0), -target)


@pytest.mark.parametrize("num_inference_steps", [1, 4])
def test_time_convention_matches_instaflow_pipeline(tiny_sd_components, monkeypatch, num_inference_steps):
    """A UNet that has learned the reflow target exactly makes InstaFlowPipeline return the pair's latent."""
    components = {k: v for k, v in tiny_sd_components.items() if k != "scheduler"}
    pipe = InstaFlowPipeline(**components, scheduler=RectifiedFlowEulerScheduler())
    pipe.set_progress_bar_config(disable=True)
    x0, x1 = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16)
    times = []

    def perfect_unet(sample, timestep, *args, **kwargs):
        # The training distribution: at a UNet time the input is the scheduler's point of the path, the answer its
        # velocity.
        timesteps = timestep.expand(sample.shape[0])
        torch.testing.assert_close(sample, pipe.scheduler.scale_noise(x1, timesteps, x0), atol=1e-5, rtol=1e-5)
        times.extend(timesteps.tolist())
        return (pipe.scheduler.get_velocity(x1, x0),)

    monkeypatch.setattr(pipe.unet, "forward", perfect_unet)
    latents = pipe("a red circle", latents=x0, num_inference_steps=num_inference_steps, output_type="latent").images
    torch.testing.assert_close(latents, x1, atol=1e-5, rtol=1e-5)
    assert times[0] == 1000.0 and len(times) == num_inference_steps


def test_losses():
    prediction, target = torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 8, 8)
    target[1] = 0.5
    torch.testing.assert_close(l2_loss(prediction, target), torch.tensor([0.0, 0.25]))
    c = default_huber_c(4 * 8 * 8)
    assert c == pytest.approx(0.00054 * 16)
    huber = pseudo_huber_loss(prediction, target)
    assert huber[0] == 0 and huber[1] == pytest.approx((0.25 * 256 + c**2) ** 0.5 - c)
    # Quadratic for small errors (||d||^2 / 2c), linear for large ones (||d|| - c).
    small = pseudo_huber_loss(torch.full((1, 4), 1e-4), torch.zeros(1, 4), c=1.0)
    assert small.item() == pytest.approx(4e-8 / 2, rel=1e-3)
    torch.testing.assert_close(
        latent_loss("pseudo_huber", prediction, target, 0.1), pseudo_huber_loss(prediction, target, 0.1)
    )
    with pytest.raises(ValueError, match="loss"):
        latent_loss("lpips", prediction, target)


def test_lpips_is_optional():
    try:
        import lpips  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install lpips"):
            load_lpips()
    else:
        pytest.skip("lpips is installed")


# ----------------------------------------------------------------------------- the pairs store


def test_shard_store_roundtrip_and_nan_check(tmp_path):
    assert list(shard_indices(2, 10, 4)) == [8, 9]
    noise, latents = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    write_pair_shard(tmp_path / "pairs", 0, [0, 1, 2], noise, latents, ["a", "b", "c"])
    bad = latents.clone()
    bad[1, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"latent of samples \[4\]"):
        write_pair_shard(tmp_path / "pairs", 1, [3, 4, 5], noise, bad, ["a", "b", "c"])
    shard_path(tmp_path / "pairs", 2).with_suffix(".parquet.partial").write_text("interrupted")
    assert complete_shards(tmp_path / "pairs") == [0]
    rows = read_pairs(tmp_path / "pairs", tmp_path / "cache")
    assert rows["index"].tolist() == [0, 1, 2] and rows["prompt"] == ["a", "b", "c"]
    assert torch.equal(rows["noise"], noise) and torch.equal(rows["latent"], latents)
    with pytest.raises(ValueError, match="pairs_dir"):
        load_pairs(tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no complete shard"):
        load_pairs(tmp_path / "empty")


def test_empty_prompt_share_is_seeded_and_keeps_the_cycle():
    source = ["a red circle", "a square", "a small blue cross"]
    assert cycle_with_empty_prompts(source, 7, 0.0, seed=0) == [source[i % 3] for i in range(7)]
    prompts = cycle_with_empty_prompts(source, 2000, 0.25, seed=3)
    assert prompts == cycle_with_empty_prompts(source, 2000, 0.25, seed=3)  # every process draws the same
    assert prompts != cycle_with_empty_prompts(source, 2000, 0.25, seed=4)
    assert 0.21 < prompts.count("") / len(prompts) < 0.29
    assert all(prompt in ("", source[i % 3]) for i, prompt in enumerate(prompts))  # the rest stay in place


def test_noise_level_samplers_follow_their_densities():
    torch.manual_seed(0)
    n = 200_000
    uniform = sample_noise_levels("uniform", n)
    assert 0 < uniform.min() and uniform.max() <= 1 and abs((uniform < 0.1).float().mean().item() - 0.1) < 0.005
    # U-shaped, a = 4: P(sigma < 0.1) = (CDF_exp(0.1) + 1 - CDF_exp(0.9)) / 2 with CDF_exp(x) = expm1(4x) / expm1(4).
    u_shaped = sample_noise_levels("u_shaped", n, u_shape_a=4.0)
    cdf = lambda x: math.expm1(4 * x) / math.expm1(4)
    expected_low = (cdf(0.1) + 1 - cdf(0.9)) / 2
    assert 0 <= u_shaped.min() and u_shaped.max() <= 1
    assert abs((u_shaped < 0.1).float().mean().item() - expected_low) < 0.005
    assert abs((u_shaped > 0.9).float().mean().item() - expected_low) < 0.005  # symmetric
    assert abs(((u_shaped > 0.4) & (u_shaped < 0.6)).float().mean().item() - (cdf(0.6) - cdf(0.4))) < 0.005
    # logit-normal: a positive mean puts most of the training at high noise.
    assert (sample_noise_levels("logit_normal", n, logit_mean=1.0) > 0.5).float().mean() > 0.8
    with pytest.raises(ValueError, match="time_sampling"):
        sample_noise_levels("cosine", 4)
    with pytest.raises(ValueError, match="sharpness"):
        sample_noise_levels("u_shaped", 4, u_shape_a=0.0)


def test_bad_flags_are_rejected(tmp_path):
    train = script_module("train_rectified_flow")
    base = ["--output_dir", str(tmp_path / "out"), "--max_train_steps", "1", "--pretrained_model_name_or_path", "x"]
    with pytest.raises(ValueError, match="--pairs_dir"):
        train.parse_args([*base, "--pairs_dir", str(tmp_path / "missing")])
    with pytest.raises(ValueError, match="--distill"):
        train.parse_args([*base, "--pairs_dir", str(tmp_path), "--loss", "lpips"])
    with pytest.raises(ValueError, match="--nasa_scale"):
        train.parse_args([*base, "--pairs_dir", str(tmp_path), "--nasa_scale", "-0.1"])
    with pytest.raises(SystemExit):  # argparse: "argument --loss: invalid choice"
        train.parse_args([*base, "--pairs_dir", str(tmp_path), "--loss", "l1"])
    with pytest.raises(ValueError, match="--time_sampling"):
        train.parse_args([*base, "--pairs_dir", str(tmp_path), "--distill", "--time_sampling", "u_shaped"])
    with pytest.raises(ValueError, match="--shift"):
        train.parse_args([*base, "--pairs_dir", str(tmp_path), "--shift", "-1"])
    with pytest.raises(ValueError, match="--u_shape_a"):
        train.parse_args([*base, "--pairs_dir", str(tmp_path), "--time_sampling", "u_shaped", "--u_shape_a", "0"])
    assert train.parse_args([*base, "--pairs_dir", str(tmp_path), "--distill"]).num_inference_steps == 1
    assert train.parse_args([*base, "--pairs_dir", str(tmp_path)]).num_inference_steps == 4

    generate = script_module("generate_reflow_pairs")
    base = ["--output_dir", str(tmp_path), "--pretrained_model_name_or_path", "x"]
    with pytest.raises(ValueError, match="--shard_size"):
        generate.parse_args([*base, "--num_pairs", "4", "--shard_size", "0", "--shapesworld_prompts", "4"])
    with pytest.raises(ValueError, match="--prompts_file"):
        generate.parse_args([*base, "--num_pairs", "4", "--prompts_file", str(tmp_path / "none.txt")])
    with pytest.raises(ValueError, match="exactly one of `--prompts_file`"):  # no default source
        generate.parse_args([*base, "--num_pairs", "4"])
    with pytest.raises(ValueError, match="--empty_prompt_prob"):
        generate.parse_args([*base, "--num_pairs", "4", "--shapesworld_prompts", "4", "--empty_prompt_prob", "1.5"])
    (tmp_path / PAIRS_CONFIG_FILE).write_text(json.dumps({"seed": 0, "num_pairs": 4}))
    with pytest.raises(ValueError, match="other settings"):
        check_pairs_config(tmp_path, {"seed": 1, "num_pairs": 4})


# ----------------------------------------------------------------------------- the scripts


@pytest.fixture(scope="module")
def teacher_pairs(launch, tiny_sd_path, tmp_path_factory):
    """Pairs from the tiny SD teacher (DDIM, CFG 2), written by one process: 3 shards of 4, 4 and 2."""
    out = tmp_path_factory.mktemp("pairs") / "one-process"
    launch("generate_reflow_pairs.py", "--pretrained_model_name_or_path", str(tiny_sd_path), "--output_dir", str(out),
           *PAIRS_ARGS)  # fmt: skip
    return out


def test_pairs_do_not_depend_on_the_number_of_processes(launch, tiny_sd_path, teacher_pairs, tmp_path):
    out = tmp_path / "two-processes"
    result = launch("generate_reflow_pairs.py", "--pretrained_model_name_or_path", str(tiny_sd_path), "--output_dir",
                    str(out), *PAIRS_ARGS, num_processes=2)  # fmt: skip
    # Shards 0 and 2 go to process 0, shard 1 to process 1: each process writes only its own.
    assert "[RANK 0] 0 shards complete; this process writes 2 of its 2" in result.stderr
    assert "[RANK 1] 0 shards complete; this process writes 1 of its 1" in result.stderr
    assert complete_shards(out) == complete_shards(teacher_pairs) == [0, 1, 2]
    one, two = read_pairs(teacher_pairs, tmp_path / "cache"), read_pairs(out, tmp_path / "cache")
    assert one["index"].tolist() == two["index"].tolist() == list(range(10))
    assert one["prompt"] == two["prompt"] and len(set(one["prompt"])) > 1
    assert torch.equal(one["noise"], two["noise"])
    torch.testing.assert_close(one["latent"], two["latent"], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(one["latent"], one["noise"])
    config = json.loads((out / "reflow_pairs.json").read_text())
    assert config["scheduler"] == "DDIMScheduler" and config["guidance_scale"] == 2.0


def test_interrupted_shard_is_redone(launch, tiny_sd_path, teacher_pairs, tmp_path):
    out = tmp_path / "pairs"
    shutil.copytree(teacher_pairs, out)
    shard_path(out, 1).unlink()
    shard_path(out, 1).with_suffix(".parquet.partial").write_text("killed mid-write")
    kept = {k: shard_path(out, k).stat().st_mtime_ns for k in (0, 2)}
    result = launch("generate_reflow_pairs.py", "--pretrained_model_name_or_path", str(tiny_sd_path), "--output_dir",
                    str(out), *PAIRS_ARGS)  # fmt: skip
    assert "this process writes 1 of its 3" in result.stderr
    assert {k: shard_path(out, k).stat().st_mtime_ns for k in (0, 2)} == kept  # complete shards are skipped
    assert complete_shards(out) == [0, 1, 2] and not list(out.glob("*.partial"))
    redone, original = read_pairs(out, tmp_path / "cache"), read_pairs(teacher_pairs, tmp_path / "cache")
    assert torch.equal(redone["noise"], original["noise"])
    torch.testing.assert_close(redone["latent"], original["latent"], atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def two_rf(launch, tiny_sd_path, teacher_pairs, tmp_path_factory):
    """2-RF for 4 steps on two processes (2 batches an epoch, so the run crosses an epoch), checkpoints every 2;
    U-shaped noise levels, and a shifted grid saved as the model's default."""
    out = tmp_path_factory.mktemp("two-rf") / "run"
    args = ["--pretrained_model_name_or_path", str(tiny_sd_path), "--pairs_dir", str(teacher_pairs), "--output_dir",
            str(out), "--max_train_steps", "4", "--checkpointing_steps", "2", "--time_sampling", "u_shaped",
            "--shift", "3", *TRAIN_ARGS]  # fmt: skip
    launch("train_rectified_flow.py", *args, num_processes=2)
    return out, args


def test_two_rf_resumes_exactly_and_loads_as_instaflow(launch, tiny_sd_path, two_rf, tmp_path):
    out, args = two_rf
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    straight = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")

    assert RectifiedFlowEulerScheduler.from_pretrained(out, subfolder="scheduler").config.shift == 3.0

    # The same run interrupted after checkpoint-2 and resumed gives the same weights: same data order, taus, EMA.
    resumed = tmp_path / "run"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoint-4")
    args = [a if a != str(out) else str(resumed) for a in args]
    result = launch("train_rectified_flow.py", *args, "--resume_from_checkpoint", "latest", num_processes=2)
    assert "Resuming from" in result.stderr and "checkpoint-2" in result.stderr
    again = load_file(resumed / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(straight[k], again[k]) for k in straight)
    teacher = load_file(tiny_sd_path / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(straight[k], teacher[k]) for k in straight)

    pipe = FastPipeline.from_pretrained(resumed)
    assert isinstance(pipe, InstaFlowPipeline) and isinstance(pipe.scheduler, RectifiedFlowEulerScheduler)
    assert json.loads((resumed / "fastgen.json").read_text())["default_inference"]["num_inference_steps"] == 4
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=4, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
    card = (resumed / "README.md").read_text()
    assert card.count("train_rectified_flow.py") == 2 and "--resume_from_checkpoint latest" in card  # both runs
    assert (resumed / "validation" / "final.png").is_file()


def test_distillation_from_two_rf_pairs(launch, two_rf, tmp_path):
    two_rf_dir = two_rf[0]
    pairs = tmp_path / "two-rf-pairs"  # the 2-RF model as the teacher, at its saved default sampler
    launch("generate_reflow_pairs.py", "--pretrained_model_name_or_path", str(two_rf_dir), "--output_dir", str(pairs),
           "--num_pairs", "4", "--shard_size", "4", "--shapesworld_prompts", "4")  # fmt: skip
    assert json.loads((pairs / "reflow_pairs.json").read_text())["pipeline"] == "InstaFlowPipeline"

    out = tmp_path / "student"
    launch("train_rectified_flow.py", "--pretrained_model_name_or_path", str(two_rf_dir), "--pairs_dir", str(pairs),
           "--output_dir", str(out), "--distill", "--loss", "pseudo_huber", "--max_train_steps", "2",
           "--nasa_scale", "0.4", *TRAIN_ARGS)  # fmt: skip
    assert json.loads((out / "fastgen.json").read_text()) == {
        "method": "instaflow",
        "default_inference": {"num_inference_steps": 1, "guidance_scale": 1.0},
    }
    pipe = FastPipeline.from_pretrained(out)
    assert isinstance(pipe, InstaFlowPipeline) and pipe.config.negative_attention == {"method": "nasa", "scale": 0.4}
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a red circle", num_inference_steps=1).images[0].size == (32, 32)
    card = (out / "README.md").read_text()
    assert "one-step distillation" in card and "default scale 0.4" in card


def test_lora_output_loads_and_changes_the_model(launch, tiny_sd_path, teacher_pairs, tmp_path):
    out = tmp_path / "lora"
    launch("train_rectified_flow.py", "--pretrained_model_name_or_path", str(tiny_sd_path), "--pairs_dir",
           str(teacher_pairs), "--output_dir", str(out), "--use_lora", "--lora_rank", "2", "--learning_rate", "1e-2",
           "--max_train_steps", "2", "--max_pairs", "6", *TRAIN_ARGS)  # fmt: skip
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    assert weights and all("lora" in key for key in weights)
    assert not (out / "unet").exists()
    # --max_pairs: the first 6 of the 10 pairs, each step's samples among them (the step journal)
    assert "| pairs | 6," in (out / "README.md").read_text()
    first_six = read_pairs(teacher_pairs, tmp_path / "cache")["noise"][:6].double().flatten(1).sum(1).tolist()
    for line in (out / "step_log.jsonl").read_text().splitlines():
        assert all(min(abs(f - x) for x in first_six) < 1e-6 * max(1.0, abs(f)) for f in json.loads(line)["samples"])

    teacher = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    pipe = InstaFlowPipeline(
        vae=teacher.vae,
        text_encoder=teacher.text_encoder,
        tokenizer=teacher.tokenizer,
        unet=teacher.unet,
        scheduler=RectifiedFlowEulerScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    before = pipe("a red circle", latents=noise, output_type="latent").images
    pipe.load_lora_weights(out)
    after = pipe("a red circle", latents=noise, output_type="latent").images
    assert not torch.allclose(before, after, atol=1e-4)
