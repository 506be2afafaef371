"""Crash-safe checkpoints for `accelerate` training loops.

A checkpoint is written to `checkpoint-N.partial` and renamed to `checkpoint-N` only when
complete, so a job killed at any moment resumes from the last whole checkpoint.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from ..utils.safe_loading import check_weight_files

_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in output_dir.iterdir() if (m := _CHECKPOINT_NAME.match(p.name)) and p.is_dir()
    ]
    return [p for _, p in sorted(found)]


def checkpoint_step(path: str | Path) -> int:
    match = _CHECKPOINT_NAME.match(Path(path).name)
    if match is None:
        raise ValueError(f"`resume_from_checkpoint` must name a `checkpoint-N` folder, got {str(path)!r}.")
    return int(match.group(1))


def resolve_resume_path(output_dir: str | Path, resume_from_checkpoint: str | None) -> Path | None:
    """Turn `--resume_from_checkpoint` ('latest', a path, or None) into a checkpoint folder, or None to start fresh."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            return None
        path = checkpoints[-1]
    else:
        path = Path(resume_from_checkpoint)
        if not path.is_dir():
            path = Path(output_dir) / resume_from_checkpoint
        if not path.is_dir():
            raise ValueError(
                f"`resume_from_checkpoint` {resume_from_checkpoint!r} is neither 'latest' nor a checkpoint folder."
            )
        checkpoint_step(path)
    # Every file whole, or a ValueError naming the damaged one. Accelerate's optimizer, sampler and RNG states are
    # pickles: trusted as this job's own output (never resume from a checkpoint of unknown origin).
    check_weight_files(path, allow_pickle=True)
    return path


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, step: int, total_limit: int | None) -> Path:
    """Save the full training state atomically and keep at most `total_limit` checkpoints."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    partial = output_dir / f"checkpoint-{step}.partial"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        if total_limit is not None:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def trainable_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters an optimiser updates, by name: all a checkpoint must hold of a model whose other weights are
    frozen (a LoRA on a teacher)."""
    return {name: parameter for name, parameter in module.named_parameters() if parameter.requires_grad}


def load_trainable_parameters(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Copy `state` (saved from `trainable_parameters`) into `module`'s trainable parameters, which it must match."""
    parameters = trainable_parameters(module)
    if state.keys() != parameters.keys():
        raise ValueError(f"`{source}` does not match the trainable weights of this model.")
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(state[name])


def checkpoint_trainable_weights(accelerator: Accelerator, modules: dict[str, torch.nn.Module]) -> None:
    """Make `accelerator.save_state` / `load_state` keep each module's trainable weights only, as
    `{name}.safetensors` in float32 (not the frozen teacher weights a LoRA sits on)."""

    def save_model_hook(models, weights, checkpoint_dir):
        if accelerator.is_main_process:
            for name, module in modules.items():
                parameters = trainable_parameters(module)
                state = {key: value.detach().float().cpu().contiguous() for key, value in parameters.items()}
                save_file(state, str(Path(checkpoint_dir) / f"{name}.safetensors"))
        weights.clear()  # nothing left for accelerate to save

    def load_model_hook(models, checkpoint_dir):
        for name, module in modules.items():
            path = Path(checkpoint_dir) / f"{name}.safetensors"
            load_trainable_parameters(module, load_file(str(path)), path)
        models.clear()

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)
