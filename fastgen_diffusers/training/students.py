"""The one-step student of a `train_snoopi.py` run, rebuilt from any of its checkpoints.

A run's output folder holds the final (EMA) student only; its `checkpoint-N` folders hold the raw trainable
weights at step N. Rebuilding a checkpoint's student as a `OneStepPipeline` lets the package's own metrics compare
checkpoints (`benchmarks/bench_checkpoints.py`): on ShapesWorld, how NASA's side effects grow with VSD training
decided how long `shapes-snoopi` trains.
"""

from __future__ import annotations

import json
from pathlib import Path

from peft import LoraConfig
from safetensors.torch import load_file

from ..pipelines.auto import resolve_model_location
from ..pipelines.one_step import OneStepPipeline

# The student LoRA of `train_snoopi.py --use_lora`: every attention projection, self- and cross-attention.
STUDENT_LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]


def student_lora_config(rank: int, alpha: float) -> LoraConfig:
    """The peft config of a LoRA student (`--lora_rank`, `--lora_alpha`)."""
    return LoraConfig(
        r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=STUDENT_LORA_TARGET_MODULES
    )


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
    args = json.loads(args_file.read_text())
    teacher = resolve_model_location(args["pretrained_model_name_or_path"])
    pipe = OneStepPipeline.from_pretrained(teacher, revision=args.get("revision"), variant=args.get("variant"))
    timestep = args["student_timestep"]  # None: the script's default, the last training timestep
    last_timestep = pipe.scheduler.config.num_train_timesteps - 1
    pipe.register_to_config(student_timestep=last_timestep if timestep is None else timestep)

    state = load_file(weights_file)
    if args["use_lora"]:
        pipe.unet.add_adapter(student_lora_config(args["lora_rank"], args["lora_alpha"]))
        result = pipe.unet.load_state_dict(state, strict=False)
        missing_lora = [key for key in result.missing_keys if "lora" in key]
        if result.unexpected_keys or missing_lora:
            raise ValueError(f"`{weights_file}` does not match the LoRA that `{args_file}` describes.")
    else:
        pipe.unet.load_state_dict(state)
    return pipe
