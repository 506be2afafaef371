"""The parts of a training run every script shares: its start, the seeds, resuming, the batch stream, and the end of
each optimisation step (log, step journal, checkpoint, validation with the EMA weights)."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, gather_object, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .checkpointing import checkpoint_step, resolve_resume_path, save_checkpoint
from .hub import training_command

logger = get_logger(__name__, log_level="INFO")

# `--mixed_precision` (and `accelerator.mixed_precision`) -> the dtype of frozen weights.
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# Arguments never written to a run folder or a tracker: a folder may be uploaded, a tracker is often public.
SECRET_ARGUMENTS = ("hub_token",)

# One JSON line per optimisation step in the output folder: what each step trained on and what it logged.
STEP_JOURNAL = "step_log.jsonl"

def start_run(args: argparse.Namespace) -> Accelerator:
    """The `Accelerator` for a run, with the seed set and the arguments and command line recorded.

    The seed is the same on every process here, so that models are initialised alike; `resume_or_seed` gives each
    process its own stream once the models are prepared. `training_commands.txt` is appended to, not rewritten: a
    resumed run is made by several commands, and the model card lists them all.
    """
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to,
        # The same data order on every process and after a resume, whatever the processes' own seeds.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    set_seed(args.seed)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        args_file = output_dir / "training_args.json"
        args_file.with_name(args_file.name + ".partial").write_text(json.dumps(recorded_args(args), indent=2))
        os.replace(args_file.with_name(args_file.name + ".partial"), args_file)
        with open(output_dir / "training_commands.txt", "a") as log:
            log.write(training_command() + "\n")
    return accelerator


def recorded_args(args: argparse.Namespace) -> dict:
    """The run's arguments as they are written to `training_args.json` and the trackers: all but the Hub token."""
    return {key: value for key, value in vars(args).items() if key not in SECRET_ARGUMENTS}


def resume_or_seed(accelerator: Accelerator, args: argparse.Namespace, tracker_name: str) -> int:
    """The number of steps already done, after restoring `--resume_from_checkpoint` or seeding a fresh run.

    A fresh run seeds every process differently (`device_specific`), so DDP ranks draw different noise, timesteps
    and scales; a resumed one gets each process's random state back from the checkpoint. Call it after
    `accelerator.prepare`, so that models initialised from the shared seed are already in sync.
    """
    resume_path = resolve_resume_path(args.output_dir, args.resume_from_checkpoint)
    global_step = 0
    if resume_path is None:
        set_seed(args.seed, device_specific=True)
    else:
        logger.info(f"Resuming from {resume_path}")
        accelerator.load_state(str(resume_path))
        global_step = checkpoint_step(resume_path)
    trim_step_journal(accelerator, args.output_dir, global_step)
    if accelerator.is_main_process:
        config = {key: value for key, value in recorded_args(args).items() if isinstance(value, (int, float, str, bool))}
        accelerator.init_trackers(tracker_name, config=config)
    return global_step


def constant_lr_scheduler(
    optimizer: Optimizer, accelerator: Accelerator, warmup_updates: int, total_updates: int
) -> LRScheduler:
    """Diffusers' constant-with-warm-up schedule, counted in optimizer updates.

    Once `accelerator.prepare`d, a scheduler steps once per process for every optimizer update, so both counts
    are multiplied by the number of processes here.
    """
    return get_scheduler(
        "constant_with_warmup",
        optimizer=optimizer,
        num_warmup_steps=warmup_updates * accelerator.num_processes,
        num_training_steps=total_updates * accelerator.num_processes,
    )


def resumed_batches(accelerator: Accelerator, dataloader: DataLoader, batches_done: int) -> Iterator:
    """Endless batches over epochs, skipping the `batches_done` a resumed run has already used."""
    epoch, skip = divmod(batches_done, len(dataloader))
    for e in itertools.count(epoch):
        dataloader.set_epoch(e)
        yield from (accelerator.skip_first_batches(dataloader, skip) if e == epoch and skip else dataloader)


def optimizer_step(
    accelerator: Accelerator,
    loss: torch.Tensor,
    parameters: Iterable[torch.nn.Parameter],
    optimizer: Optimizer,
    lr_scheduler: LRScheduler | None = None,
    max_grad_norm: float | None = None,
) -> None:
    """Backpropagate `loss` and update: gradients clipped to `max_grad_norm` (if given) once they are accumulated,
    then the learning-rate schedule (if any) steps."""
    accelerator.backward(loss)
    if accelerator.sync_gradients and max_grad_norm is not None:
        accelerator.clip_grad_norm_(parameters, max_grad_norm)
    optimizer.step()
    if lr_scheduler is not None:
        lr_scheduler.step()
    optimizer.zero_grad()


def progress_bar(accelerator: Accelerator, total_steps: int, global_step: int) -> tqdm:
    return tqdm(range(total_steps), initial=global_step, desc="steps", disable=not accelerator.is_local_main_process)


def end_step(
    accelerator: Accelerator,
    args: argparse.Namespace,
    progress: tqdm,
    global_step: int,
    logs: dict[str, float],
    total_steps: int | None = None,
    samples: list[torch.Tensor] | None = None,
) -> bool:
    """Log step `global_step`, journal it (with the fingerprints of its `samples`, see `record_step`) and save a
    checkpoint when one is due (every `--checkpointing_steps` and at the last step); return whether validation
    images are due, on the main process only (every `--validation_steps`). Call it on every process."""
    progress.update(1)
    progress.set_postfix(**logs)
    accelerator.log(logs, step=global_step)
    record_step(accelerator, args.output_dir, global_step, logs, samples)  # before the checkpoint that covers it
    if global_step % args.checkpointing_steps == 0 or global_step == (total_steps or args.max_train_steps):
        save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
    return accelerator.is_main_process and global_step % args.validation_steps == 0


def fingerprints(samples: torch.Tensor) -> torch.Tensor:
    """One number per sample that tells samples apart: the float64 sum of its values (its pixels, noise, latent)."""
    return samples.detach().flatten(1).double().sum(dim=1).cpu()


def text_fingerprints(texts: Iterable[str]) -> torch.Tensor:
    """One number per text (its CRC-32): for data that is prompts only."""
    return torch.tensor([float(zlib.crc32(text.encode())) for text in texts], dtype=torch.float64)


def record_step(
    accelerator: Accelerator,
    output_dir: str | Path,
    global_step: int,
    logs: dict[str, float],
    samples: list[torch.Tensor] | None = None,
) -> None:
    """Append step `global_step` to the output folder's step journal (`step_log.jsonl`): the logs and, under
    `samples`, the fingerprints of what the step trained on, gathered over the processes in rank order.

    `samples` holds this process's fingerprints of each micro-batch of the step (see `fingerprints`); it is emptied
    here, ready for the next step. The journal lets a test count that a resumed run lost or repeated no step and saw
    the data in the same order. Call it on every process (the gather); only the main one writes.
    """
    seen = gather_object(torch.cat(samples).tolist()) if samples else None
    if samples is not None:
        samples.clear()
    if accelerator.is_main_process:
        line = json.dumps({"step": global_step, **logs, **({"samples": seen} if seen is not None else {})})
        with open(Path(output_dir) / STEP_JOURNAL, "a") as journal:
            journal.write(line + "\n")


def trim_step_journal(accelerator: Accelerator, output_dir: str | Path, global_step: int) -> None:
    """Keep the journal's steps up to `global_step`, where a (resumed) run starts: the steps after the checkpoint
    it resumes from are done again, and a line torn by a kill is dropped. The file is replaced atomically."""
    path = Path(output_dir) / STEP_JOURNAL
    if accelerator.is_main_process and path.is_file():
        kept = []
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # the end of a line a kill cut short
            if entry.get("step", global_step + 1) <= global_step:
                kept.append(line + "\n")
        partial = path.with_name(path.name + ".partial")
        partial.write_text("".join(kept))
        os.replace(partial, path)
    accelerator.wait_for_everyone()


@contextlib.contextmanager
def ema_weights(ema: EMAModel, parameters: Iterable[torch.nn.Parameter]) -> Iterator[None]:
    """The EMA weights in `parameters` for the `with` block (validation), the trained ones back afterwards."""
    parameters = list(parameters)
    ema.store(parameters)
    ema.copy_to(parameters)
    try:
        yield
    finally:
        ema.restore(parameters)


def mean_over_processes(accelerator: Accelerator, **values: torch.Tensor) -> dict[str, float]:
    """Each scalar averaged over the processes, for the logs."""
    gathered = accelerator.gather(torch.stack([value.detach().float() for value in values.values()])[None])
    return dict(zip(values, gathered.mean(dim=0).tolist()))
