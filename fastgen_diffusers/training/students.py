"""The one-step student of a `train_snoopi.py` run: its scheduler, and the student of any of its checkpoints.

A run's output folder holds the final (EMA) student only; its `checkpoint-N` folders hold the raw trainable
weights at step N. Rebuilding a checkpoint's student as a `OneStepPipeline` lets the package's own metrics compare
checkpoints (`benchmarks/bench_checkpoints.py`): on ShapesWorld, how NASA's side effects grow with VSD training
decided how long `shapes-snoopi` trains.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

from diffusers.configuration_utils import FrozenDict
from safetensors.torch import load_file

from ..pipelines.auto import resolve_model_location
from ..pipelines.one_step import OneStepPipeline
from ..schedulers import OneStepScheduler
from ..utils.safe_loading import check_weight_files
from .checkpointing import load_trainable_parameters
from .lora import unet_lora_config


def student_scheduler(teacher_scheduler_config: FrozenDict | dict, student_timestep: int | None) -> OneStepScheduler:
    """The student's scheduler on the teacher's schedule; `student_timestep` None means the last training timestep
    (999 for SD)."""
    if student_timestep is None:
        student_timestep = teacher_scheduler_config["num_train_timesteps"] - 1
    # Keep only the schedule: the teacher's sampler options (DDIM's clip_sample, steps_offset, ...) would be saved
    # into the student's config and warned about at every load.
    accepted = inspect.signature(OneStepScheduler.__init__).parameters
    schedule = {key: value for key, value in teacher_scheduler_config.items() if key in accepted}
    return OneStepScheduler.from_config(schedule, student_timestep=student_timestep)


def load_student_checkpoint(run_dir: str | Path, checkpoint: str | Path) -> OneStepPipeline:
    """The raw (not EMA) student of `checkpoint` (a `checkpoint-N` folder, or its name inside `run_dir`) as a
    `OneStepPipeline` on the run's teacher, with the run's `training_args.json` saying how to build it."""
    run_dir = Path(run_dir)
    checkpoint = Path(checkpoint) if Path(checkpoint).is_dir() else run_dir / checkpoint
    args_file, weights_file = run_dir / "training_args.json", checkpoint / "student.safetensors"
    for required in (args_file, weights_file):
        if not required.is_file():
            raise ValueError(
                f"`{required}` is missing: give a `train_snoopi.py` output folder and one of its checkpoints."
            )
    check_weight_files(weights_file)
    args = json.loads(args_file.read_text())
    teacher = resolve_model_location(args["pretrained_model_name_or_path"])
    check_weight_files(teacher)
    pipe = OneStepPipeline.from_pretrained(
        teacher, revision=args.get("revision"), variant=args.get("variant"), use_safetensors=True
    )
    pipe.scheduler = student_scheduler(pipe.scheduler.config, args["student_timestep"])
    if args["use_lora"]:
        pipe.unet.add_adapter(unet_lora_config(args["lora_rank"], args["lora_alpha"]))
    load_trainable_parameters(pipe.unet, load_file(weights_file), weights_file)
    return pipe
