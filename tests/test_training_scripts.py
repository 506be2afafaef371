"""The training scripts end to end on micro configs under `accelerate launch`, including resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from fastgen_diffusers import FastPipeline
from fastgen_diffusers.training.checkpointing import list_checkpoints, resolve_resume_path

REPO = Path(__file__).resolve().parents[1]


def accelerate_launch(
    script: str, *args: str, num_processes: int = 1, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run `training/{script}` under `accelerate launch` on the CPU, one thread a process, offline."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no"]  # fmt: skip
    if num_processes > 1:
        env["ACCELERATE_USE_CPU"] = "1"
        launch += ["--multi_gpu", "--num_processes", str(num_processes)]
    else:
        launch += ["--cpu", "--num_processes", "1"]
    result = subprocess.run(
        [*launch, str(REPO / "training" / script), *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def script_module(name: str):
    """A training script imported as a module, for its `parse_args` and helpers."""
    sys.path.insert(0, str(REPO / "training"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


TEACHER_ARGS = ["--scale", "micro", "--num_train_samples", "64", "--train_batch_size", "4", "--vae_train_steps", "2",
                "--checkpointing_steps", "2", "--validation_steps", "100", "--num_validation_images", "2"]  # fmt: skip


def test_train_teacher_runs_and_resumes(tmp_path):
    out = tmp_path / "teacher"
    accelerate_launch("train_teacher.py", "--output_dir", str(out), "--max_train_steps", "2", *TEACHER_ARGS)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    first_unet = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")

    # A longer run resumes from checkpoint-4 (VAE and 2 UNet steps done) and trains 2 more UNet steps.
    result = accelerate_launch(
        "train_teacher.py", "--output_dir", str(out), "--max_train_steps", "4", "--resume_from_checkpoint", "latest",
        *TEACHER_ARGS,
    )  # fmt: skip
    assert "Resuming from" in result.stderr and "checkpoint-4" in result.stderr
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-4", "checkpoint-6"]  # total limit 2
    assert not list(out.glob("*.partial"))
    second_unet = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(first_unet[k], second_unet[k]) for k in first_unet)
    scaling_factor = StableDiffusionPipeline.from_pretrained(out).vae.config.scaling_factor

    # Resuming at the last step only exports the model, with the same latent scale.
    accelerate_launch(
        "train_teacher.py", "--output_dir", str(out), "--max_train_steps", "4", "--resume_from_checkpoint", "latest",
        *TEACHER_ARGS,
    )  # fmt: skip
    assert StableDiffusionPipeline.from_pretrained(out).vae.config.scaling_factor == pytest.approx(scaling_factor)
    exported_unet = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(exported_unet[k], second_unet[k]) for k in second_unet)

    # The result is a plain Diffusers checkpoint with a model card that records the command.
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert pipe.vae.config.scaling_factor != 0.18215  # measured from the trained VAE, not SD's constant
    assert isinstance(FastPipeline.from_pretrained(out), StableDiffusionPipeline)
    card = (out / "README.md").read_text()
    assert "train_teacher.py" in card and "--max_train_steps 4" in card
    assert json.loads((out / "fastgen.json").read_text())["default_inference"]["num_inference_steps"] == 25


def test_train_teacher_two_processes(tmp_path):
    out = tmp_path / "teacher-ddp"
    accelerate_launch("train_teacher.py", "--output_dir", str(out), "--max_train_steps", "2", *TEACHER_ARGS,
                      num_processes=2)  # fmt: skip
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "checkpoint-4" / "random_states_1.pkl").is_file()  # both processes saved their state


def test_train_judge_runs(tmp_path):
    out = tmp_path / "judge"
    accelerate_launch("train_judge.py", "--output_dir", str(out), "--max_train_steps", "2",
                      "--train_batch_size", "8", "--num_train_samples", "64", "--num_eval_samples", "20",
                      "--checkpointing_steps", "1")  # fmt: skip
    accuracy = json.loads((out / "accuracy.json").read_text())
    assert set(accuracy) == {"size", "colour", "shape", "position", "background"}
    assert accuracy["background"] == 1.0  # analytic read-outs need no training


def test_resume_path_errors(tmp_path):
    assert resolve_resume_path(tmp_path, None) is None
    assert resolve_resume_path(tmp_path, "latest") is None
    (tmp_path / "checkpoint-3.partial").mkdir()  # an interrupted save is never resumed from
    assert resolve_resume_path(tmp_path, "latest") is None
    with pytest.raises(ValueError, match="resume_from_checkpoint"):
        resolve_resume_path(tmp_path, "checkpoint-9")


def test_bad_training_flags_are_rejected(tmp_path):
    train_teacher = script_module("train_teacher")
    with pytest.raises(ValueError, match="--max_train_steps"):
        train_teacher.parse_args(["--output_dir", str(tmp_path), "--max_train_steps", "0"])
    with pytest.raises(ValueError, match="--vae_train_steps"):
        train_teacher.parse_args(["--output_dir", str(tmp_path), "--max_train_steps", "1", "--vae_train_steps", "0"])


def test_high_noise_timesteps():
    train_teacher = script_module("train_teacher")
    torch.manual_seed(0)
    assert train_teacher.sample_timesteps(4000, 1000, 1.0, 600).min() >= 600
    uniform = train_teacher.sample_timesteps(4000, 1000, 0.0, 600)
    assert uniform.min() < 50 and uniform.max() > 950
    half = train_teacher.sample_timesteps(4000, 1000, 0.5, 600)
    assert 0.65 < (half >= 600).float().mean().item() < 0.75  # 0.5 + 0.5 * 0.4
