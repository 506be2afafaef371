"""The start of every training run and its data stream, shared so that each script resumes the same way."""

from __future__ import annotations

import argparse
import itertools
import json
import logging
from collections.abc import Iterator
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader

from .hub import training_command


def start_run(args: argparse.Namespace) -> Accelerator:
    """The `Accelerator` for a run, with the seed set and the arguments and command line recorded.

    `training_commands.txt` is appended to, not rewritten: a resumed run is made by several commands,
    and the model card lists them all.
    """
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),  # same data order after a resume
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    set_seed(args.seed)  # also the same initialisation (e.g. of LoRA layers) on every process
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "training_args.json").write_text(json.dumps(vars(args), indent=2))
        with open(output_dir / "training_commands.txt", "a") as log:
            log.write(training_command() + "\n")
    return accelerator


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
